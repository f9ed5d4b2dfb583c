"""A stand-in of the HALOs KTO loss body (our words, not its code): the split signature with beta and the class
weights as keywords, computed in float32 inside (log-ratios cast with .float()), as a float32-internal trainer
does even when its inputs are float64."""

import torch


def kto_loss(policy_chosen_logps, policy_rejected_logps, policy_KL_logps, reference_chosen_logps,
             reference_rejected_logps, reference_KL_logps, beta, desirable_weight, undesirable_weight):
    kl = (policy_KL_logps - reference_KL_logps).float().mean().clamp(min=0).detach()
    chosen = (policy_chosen_logps - reference_chosen_logps).float()
    rejected = (policy_rejected_logps - reference_rejected_logps).float()
    losses = torch.cat([desirable_weight * (1 - torch.sigmoid(beta * (chosen - kl))),
                        undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected)))])
    return losses, beta * chosen.detach(), beta * rejected.detach(), kl
