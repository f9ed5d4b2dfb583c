"""A stand-in in LLaMA-Factory's convention (our words, not its code): its KTO trainer is a subclass of TRL's
KTOTrainer and keeps the split kto_loss method, reading beta, the class weights and TRL's calculate_KL switch
from the instance (no KL pairs: calculate_KL is False and the KL log-probs are None, z = 0)."""

import torch


class CustomKTOTrainer:
    def kto_loss(self, policy_chosen_logps, policy_rejected_logps, policy_KL_logps, reference_chosen_logps,
                 reference_rejected_logps, reference_KL_logps):
        if self.calculate_KL:
            kl = (policy_KL_logps - reference_KL_logps).mean().clamp(min=0).detach()
        else:
            kl = torch.zeros((), dtype=policy_chosen_logps.dtype)
        chosen = policy_chosen_logps - reference_chosen_logps
        rejected = policy_rejected_logps - reference_rejected_logps
        losses = torch.cat([self.desirable_weight * (1 - torch.sigmoid(self.beta * (chosen - kl))),
                            self.undesirable_weight * (1 - torch.sigmoid(self.beta * (kl - rejected)))])
        return losses, self.beta * chosen.detach(), self.beta * rejected.detach(), kl
