"""DPO (Direct Preference Optimization), the paired method KTO is compared with: loss, hand-written
gradient and TRL's metrics, in the same forward/backward form as kto_np.losses.

Shape letter: n, the number of (chosen, rejected) pairs; every per-pair array is [n]. πc, πr are the
policy's log-probabilities of the chosen and the rejected completion, refc, refr the reference's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .backend import array_module, to_module
from .losses import _check_no_overflow, log_sigmoid, sigmoid
from .validation import as_float_array, check_finite_scalar, check_same_shape

__all__ = ["DPOCache", "dpo_backward", "dpo_forward", "dpo_loss", "dpo_loss_and_grad", "dpo_metrics"]


class DPOCache(NamedTuple):
    """Saved by dpo_forward for dpo_backward and dpo_metrics."""

    beta: float
    margins: Any  # [n] h_i = β((πc_i - refc_i) - (πr_i - refr_i))
    chosen_log_ratios: Any  # [n]
    rejected_log_ratios: Any  # [n]
    policy_chosen_logps: Any  # [n]
    policy_rejected_logps: Any  # [n]


def dpo_forward(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                beta=0.1):
    """DPO: L = mean_i -log σ(h_i), h_i = β((πc_i - refc_i) - (πr_i - refr_i)); all inputs [n].

    -log σ(h) is computed as logaddexp(0, -h). Returns (loss, cache).
    """
    policy_chosen_logps = as_float_array("policy_chosen_logps", policy_chosen_logps, ndim=1)
    arrays = {"policy_chosen_logps": policy_chosen_logps}
    for name, value in (("policy_rejected_logps", policy_rejected_logps),
                        ("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        arrays[name] = as_float_array(name, value, ndim=1)
        check_same_shape(name, arrays[name], "policy_chosen_logps", policy_chosen_logps)
    beta = check_finite_scalar("beta", beta, positive=True)
    xp = array_module(*arrays.values())
    arrays = {name: to_module(value, xp) for name, value in arrays.items()}
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, by name
        chosen_log_ratios = arrays["policy_chosen_logps"] - arrays["ref_chosen_logps"]
        rejected_log_ratios = arrays["policy_rejected_logps"] - arrays["ref_rejected_logps"]
        margins = beta * (chosen_log_ratios - rejected_log_ratios)  # [n] h
        loss = float(xp.mean(-log_sigmoid(margins)))
        n = margins.shape[0]
        _check_no_overflow("the DPO loss", margins.dtype, {
            "the loss": loss, "the log-ratios": chosen_log_ratios - rejected_log_ratios,
            "the gradient": beta / n,
            "the rewards": float(xp.sum(xp.abs(beta * chosen_log_ratios)) + xp.sum(xp.abs(beta * rejected_log_ratios))),
            "the mean log-probabilities": float(xp.sum(xp.abs(arrays["policy_chosen_logps"]))
                                                + xp.sum(xp.abs(arrays["policy_rejected_logps"]))),
        }, f"beta={beta:g}, policy_chosen_logps - ref_chosen_logps and policy_rejected_logps - "
           f"ref_rejected_logps up to {float(xp.max(xp.abs(chosen_log_ratios))):.3g} and "
           f"{float(xp.max(xp.abs(rejected_log_ratios))):.3g}")
    cache = DPOCache(beta, margins, chosen_log_ratios, rejected_log_ratios, arrays["policy_chosen_logps"],
                     arrays["policy_rejected_logps"])
    return loss, cache


def dpo_backward(dloss, cache: DPOCache):
    """(dL/dpolicy_chosen_logps, dL/dpolicy_rejected_logps), each [n] in its input's dtype.

    d(-log σ(h))/dh = -σ(-h), so dL/dπc_i = -β σ(-h_i) dloss / n and dL/dπr_i = +β σ(-h_i) dloss / n.
    """
    if not isinstance(cache, DPOCache):
        raise TypeError(f"cache must be the DPOCache returned by dpo_forward, got {type(cache).__name__}")
    dloss = check_finite_scalar("dloss", dloss)
    n = cache.margins.shape[0]
    with np.errstate(over="ignore", under="ignore"):
        dchosen = -(cache.beta * dloss / n) * sigmoid(-cache.margins)  # [n]
    return (dchosen.astype(cache.policy_chosen_logps.dtype),
            (-dchosen).astype(cache.policy_rejected_logps.dtype))


def dpo_metrics(cache: DPOCache) -> dict:
    """TRL-named DPO metrics as Python floats: rewards/chosen, rewards/rejected (mean β r per side),
    rewards/margins, rewards/accuracies (fraction with chosen reward > rejected), logps/chosen,
    logps/rejected."""
    xp = array_module(cache.margins)
    with np.errstate(over="ignore"):  # bounded by the forward's overflow check
        chosen_rewards = cache.beta * cache.chosen_log_ratios
        rejected_rewards = cache.beta * cache.rejected_log_ratios
        return {
            "rewards/chosen": float(xp.mean(chosen_rewards)),
            "rewards/rejected": float(xp.mean(rejected_rewards)),
            "rewards/margins": float(xp.mean(chosen_rewards - rejected_rewards)),
            "rewards/accuracies": float(xp.mean(chosen_rewards > rejected_rewards)),
            "logps/chosen": float(xp.mean(cache.policy_chosen_logps)),
            "logps/rejected": float(xp.mean(cache.policy_rejected_logps)),
        }


def dpo_loss_and_grad(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      beta=0.1):
    """(loss, (dL/dpolicy_chosen_logps, dL/dpolicy_rejected_logps), metrics); formula in dpo_forward."""
    loss, cache = dpo_forward(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                              ref_rejected_logps, beta)
    return loss, dpo_backward(1.0, cache), dpo_metrics(cache)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta=0.1) -> float:
    """The DPO loss as a Python float; formula in dpo_forward."""
    loss, _ = dpo_forward(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                          beta)
    return loss
