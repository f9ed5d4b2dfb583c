"""Liger's real fused-linear KTO loss (liger_kernel.chunked_loss.LigerFusedLinearKTOLoss, run on CPU with
compiled=False) as a kto_loss candidate. Liger takes hidden states and an LM-head weight, not log-probs, so each
example i becomes a one-token sequence whose hidden state is the unit vector e_i and whose head row 0 holds
a_i = logp_i - log(1 - exp(logp_i)): then log_softmax([a_i, 0])[0] = logp_i. The KL estimate is given to Liger
from outside (as TRL's Liger path does): the detached, clamped mean. Liger has no class weights."""

import torch
from liger_kernel.chunked_loss import LigerFusedLinearKTOLoss


def _head(logps):
    """[2, n] head weight whose row 0 gives, for hidden state e_i, the logit a_i with log p(token 0) = logps_i."""
    logits = logps - torch.log(-torch.expm1(logps))
    return torch.stack([logits, torch.zeros_like(logits)])


def kto_loss(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, kl_policy_logps=None,
             kl_ref_logps=None):
    policy_logps, ref_logps = torch.as_tensor(policy_logps), torch.as_tensor(ref_logps)
    n = policy_logps.shape[0]
    hidden = torch.eye(n, dtype=policy_logps.dtype)[:, None, :]  # [n, 1 token, n]
    target = torch.zeros((n, 1), dtype=torch.int64)
    kl = None
    if kl_policy_logps is not None:
        kl = (torch.as_tensor(kl_policy_logps) - torch.as_tensor(kl_ref_logps)).mean().clamp(min=0).detach()
    loss_fn = LigerFusedLinearKTOLoss(beta=beta, compiled=False, use_ref_model=True)
    out = loss_fn(hidden, _head(policy_logps), target, preference_labels=torch.as_tensor(labels),
                  ref_input=hidden, ref_weight=_head(ref_logps), kl=kl)
    return out[0] if isinstance(out, tuple) else out
