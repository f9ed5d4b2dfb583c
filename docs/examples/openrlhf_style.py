"""A stand-in in OpenRLHF's convention (our words, not its code): a torch module KTOLoss(beta,
desirable_weight, undesirable_weight, world_size, device) whose forward takes the batch split by label and
returns (loss, chosen_rewards, rejected_rewards, kl), the loss already averaged over the batch. Its KL
estimate is the detached, clamped mean (one rank here: OpenRLHF's own all-reduces it over the ranks)."""

import torch


class KTOLoss(torch.nn.Module):
    def __init__(self, beta, desirable_weight, undesirable_weight, world_size, device):
        super().__init__()
        self.beta, self.world_size, self.device = beta, world_size, device
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight

    def forward(self, policy_chosen_logps, policy_rejected_logps, policy_KL_logps, reference_chosen_logps,
                reference_rejected_logps, reference_KL_logps):
        kl = (policy_KL_logps - reference_KL_logps).mean().detach()  # one rank: no all-reduce needed
        kl = kl.clamp(min=0)
        chosen = policy_chosen_logps - reference_chosen_logps
        rejected = policy_rejected_logps - reference_rejected_logps
        losses = torch.cat([self.desirable_weight * (1 - torch.sigmoid(self.beta * (chosen - kl))),
                            self.undesirable_weight * (1 - torch.sigmoid(self.beta * (kl - rejected)))])
        return losses.mean(), self.beta * chosen.detach(), self.beta * rejected.detach(), kl
