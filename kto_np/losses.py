"""KTO (Kahneman–Tversky Optimization): the loss of a batch and its gradient, written by hand.

Notation, for a batch of n examples (every per-example array is [n]):
    r_i = policy_logps_i - ref_logps_i    the log-ratio of the policy to the frozen reference
    s_i = +1 if label_i = 1 (desirable), -1 if label_i = 0 (undesirable)
    w_i = λ_D (desirable_weight) if label_i = 1, else λ_U (undesirable_weight)
    β > 0 (beta), σ(x) = 1 / (1 + exp(-x)), and the loss L = mean_i loss_i.

The three variants:
    "edifice"  the seed's formula (Edifice.Meta.KTO, the Elixir library this project started from):
               z = mean_j β r_j, from the batch itself, not clamped;
               loss_i = -w_i σ(s_i (β r_i - z)).  Gradient flows through z unless stop_z_grad.
               (The seed's module doc writes σ(-KL - z) for the undesirable case; its function doc
               and code use σ(-(KL - z)), which is what is implemented, with KL_i = β r_i.)
    "kto"      the KTO paper and TRL: z_ref = max(0, mean_j (kl_policy_logps_j - kl_ref_logps_j)) over
               mismatched (prompt, completion) pairs, detached, and 0 without them;
               loss_i = w_i (1 - σ(s_i β (r_i - z_ref))).
    "apo_zero_unpaired"  TRL's APO-zero: loss_i = w_i (1 - σ(s_i β r_i)), no z ("kto" without KL pairs).

Each is a function of one argument per example, u_i = β r_i - z, β (r_i - z_ref) or β r_i, and
1 - σ(x) = σ(-x), so all three share ∂loss_i/∂u_i = -w_i s_i σ(u_i) σ(-u_i) and one backward.

Reading order: kto_forward, kto_backward, kto_metrics (the formulas; they check nothing); KTOConfig (the
hyper-parameters, checked once; its loss_and_grad is what the training step calls); kto_loss,
default_beta, kto_loss_and_grad (the seed's API: they check every argument); check_balance.
DPO, the paired method KTO is compared with, is in kto_np.dpo.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .backend import array_module, to_module
from .validation import (
    NonFiniteError,
    as_float_array,
    as_labels,
    check_bool,
    check_choice,
    check_finite_scalar,
    check_same_shape,
    reject_autograd,
)

__all__ = [
    "BALANCE_RANGE",
    "VARIANTS",
    "KTOCache",
    "KTOConfig",
    "check_balance",
    "default_beta",
    "kto_backward",
    "kto_forward",
    "kto_loss",
    "kto_loss_and_grad",
    "kto_metrics",
    "log_sigmoid",
    "sigmoid",
]


# ---------------------------------------------------------------------------------------------------
# the KTO loss: forward, backward, metrics


def kto_forward(config: KTOConfig, policy_logps, ref_logps, labels, kl_policy_logps=None, kl_ref_logps=None):
    """The KTO loss of a batch, (loss, cache); the formulas are in the module docstring.

    policy_logps, ref_logps: [n] floating arrays; labels: [n] 0/1; kl_policy_logps, kl_ref_logps:
    [m] or None ("kto" only). Nothing is checked here: kto_loss and kto_loss_and_grad check their
    arguments, and the training step checks its own.
    """
    xp = array_module(policy_logps, ref_logps)
    beta = config.beta
    r = policy_logps - ref_logps  # [n]
    desirable = xp.asarray(labels) == 1  # [n]
    dtype = r.dtype
    w = xp.where(desirable, xp.asarray(config.desirable_weight, dtype=dtype),
                 xp.asarray(config.undesirable_weight, dtype=dtype))  # [n] λ_D or λ_U
    s = xp.where(desirable, xp.asarray(1.0, dtype=dtype), xp.asarray(-1.0, dtype=dtype))  # [n] +1 or -1
    kl_raw = None
    if config.variant == "edifice":
        kl = beta * r  # [n] the seed's KL_i
        z = xp.mean(kl)
        u = kl - z  # [n] the seed's reward_i
        losses = -w * sigmoid(s * u)  # [n]
    else:
        z = 0.0
        if config.variant == "kto" and kl_policy_logps is not None:
            kl_raw = float(xp.mean(kl_policy_logps - kl_ref_logps))
            z = max(0.0, kl_raw)  # z_ref, a constant: no gradient flows through it
        u = beta * (r - z)  # [n]
        losses = w * sigmoid(-s * u)  # 1 - σ(s u)
    loss = float(xp.mean(losses))
    dloss_du = -w * s * sigmoid(u) * sigmoid(-u)  # [n] ∂loss_i/∂u_i
    z_has_grad = config.variant == "edifice" and not config.stop_z_grad
    return loss, KTOCache(beta, z_has_grad, float(z), dloss_du, policy_logps, r, desirable, kl_raw)


def kto_backward(dloss, cache: KTOCache):
    """dL/dpolicy_logps [n] (the dtype of policy_logps) for an upstream gradient dloss (a float).

    g_i = dloss · ∂loss_i/∂u_i / n. When z = mean_j β r_j carries gradient (edifice, stop_z_grad=False),
    ∂u_i/∂r_j = β (δ_ij - 1/n), so dL/dr_j = β (g_j - mean_i g_i); otherwise dL/dr_j = β g_j.
    dL/dref_logps is the negative of the result; nothing reaches kl_policy_logps (z_ref is detached).
    """
    n = cache.dloss_du.shape[0]
    g = (dloss / n) * cache.dloss_du  # [n]
    if cache.z_has_grad:
        g = g - g.mean()
    return (cache.beta * g).astype(cache.policy_logps.dtype)


def kto_metrics(cache: KTOCache) -> dict:
    """TRL-named metrics, as Python floats (counts as ints).

    kl: the z used: mean(β r) for edifice (reward units, can be negative), z_ref = max(0, mean KL-pair
    log-ratio) for kto (log-ratio units, as TRL reports it), 0.0 for apo_zero_unpaired;
    kl_raw: for kto with KL pairs, the estimate mean(kl_policy_logps - kl_ref_logps) before the clamp
    (it can be negative: the KL pairs are the dataset's completions, not samples from π), else None;
    rewards/chosen, rewards/rejected: mean β r_i over desirable / undesirable examples;
    rewards/margins: chosen - rejected; logps/chosen, logps/rejected: mean policy log-prob per class;
    count/chosen, count/rejected. When a class is absent its entries (and margins) are None, never NaN.
    """
    desirable = cache.desirable
    num_chosen = int(desirable.sum())
    num_rejected = int(desirable.shape[0]) - num_chosen
    rewards = cache.beta * cache.log_ratios
    chosen = _class_mean(rewards, desirable, num_chosen)
    rejected = _class_mean(rewards, ~desirable, num_rejected)
    return {
        "kl": cache.z,
        "kl_raw": cache.kl_raw,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": None if chosen is None or rejected is None else chosen - rejected,
        "logps/chosen": _class_mean(cache.policy_logps, desirable, num_chosen),
        "logps/rejected": _class_mean(cache.policy_logps, ~desirable, num_rejected),
        "count/chosen": num_chosen,
        "count/rejected": num_rejected,
    }


def _class_mean(values, mask, count: int) -> float | None:
    return None if count == 0 else float(values[mask].mean())


class KTOCache(NamedTuple):
    """What kto_forward saves for kto_backward and kto_metrics."""

    beta: float
    z_has_grad: bool  # edifice without stop_z_grad: z = mean(β r) passes gradient back to every r_j
    z: float  # mean(β r) (edifice, reward units), z_ref (kto, log-ratio units), 0.0 (apo_zero_unpaired)
    dloss_du: Any  # [n] ∂loss_i/∂u_i
    policy_logps: Any  # [n], as given (its dtype is the gradient's dtype)
    log_ratios: Any  # [n] r_i
    desirable: Any  # [n] bool
    kl_raw: float | None  # kto with KL pairs: mean KL-pair log-ratio before the clamp, else None


def sigmoid(x):
    """σ(x) = 1 / (1 + exp(-x)) without overflow: e = exp(-|x|), σ = 1/(1+e) if x >= 0 else e/(1+e)."""
    xp = array_module(x)
    x = xp.asarray(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def log_sigmoid(x):
    """log σ(x) = -log(1 + exp(-x)) = -logaddexp(0, -x), stable for any finite x."""
    xp = array_module(x)
    x = xp.asarray(x)
    return -xp.logaddexp(xp.zeros_like(x), -x)


# ---------------------------------------------------------------------------------------------------
# the hyper-parameters, checked once

VARIANTS = ("edifice", "kto", "apo_zero_unpaired")


@dataclass(frozen=True)
class KTOConfig:
    """The hyper-parameters of one KTO loss, checked once when the config is made.

    variant: "edifice" (the seed formula), "kto" (paper / TRL) or "apo_zero_unpaired";
    beta: β > 0; desirable_weight λ_D >= 0, undesirable_weight λ_U >= 0, not both 0;
    stop_z_grad: for "edifice", stop the gradient through z = mean(β r).
    """

    variant: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    stop_z_grad: bool = False

    def __post_init__(self):
        check_choice("variant", self.variant, VARIANTS)
        checked = {
            "beta": check_finite_scalar("beta", self.beta, positive=True),
            "desirable_weight": check_finite_scalar("desirable_weight", self.desirable_weight, nonnegative=True),
            "undesirable_weight": check_finite_scalar("undesirable_weight", self.undesirable_weight,
                                                      nonnegative=True),
            "stop_z_grad": check_bool("stop_z_grad", self.stop_z_grad),
        }
        check_weights_not_both_zero(checked["desirable_weight"], checked["undesirable_weight"])
        for name, value in checked.items():  # plain Python floats and bools from here on
            object.__setattr__(self, name, value)

    @property
    def uses_kl_pairs(self) -> bool:
        """Only "kto" estimates z from KL pairs (mismatched prompt/completion rows)."""
        return self.variant == "kto"

    def loss_and_grad(self, policy_logps, ref_logps, labels, kl_policy_logps=None, kl_ref_logps=None):
        """(loss, dL/dpolicy_logps [n], metrics) of this loss, for arrays the caller made and checked (the
        training step checks ref_logps and kl_ref_logps at its own door): no argument is checked again.
        Only an overflow is caught, after the forward: a ValueError naming beta, the weights and the
        log-ratios (how a training step that diverges names the cause)."""
        loss, cache = _forward_or_overflow_error(self, policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps)
        return loss, kto_backward(1.0, cache), kto_metrics(cache)


# ---------------------------------------------------------------------------------------------------
# the seed's API: every argument checked once


def kto_loss(policy_logps, ref_logps, labels, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0,
             *, variant="edifice", stop_z_grad=False, kl_policy_logps=None, kl_ref_logps=None,
             warn_balance=True) -> float:
    """The KTO loss of a batch as a Python float: the seed's API, with its formula by default.

    policy_logps, ref_logps: [n] log-probabilities of the completions under the policy and the frozen
    reference; labels: [n] 0/1 (1 desirable); beta, desirable_weight, undesirable_weight, variant,
    stop_z_grad: as KTOConfig; kl_policy_logps, kl_ref_logps: [m], both or neither, "kto" only.
    Bad input is a ValueError or TypeError naming the argument, and so are huge-but-finite inputs for
    which the loss, its gradient or its metrics would overflow. For "edifice" and "kto", a UserWarning
    when both classes are present and λ_D n_D / (λ_U n_U) is outside [1, 4/3] (see check_balance),
    unless warn_balance=False.
    """
    return _checked_forward(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                            variant, stop_z_grad, kl_policy_logps, kl_ref_logps, warn_balance)[0]


def default_beta() -> float:
    """The seed's default β: 0.1."""
    return 0.1


def kto_loss_and_grad(policy_logps, ref_logps, labels, beta=0.1, desirable_weight=1.0,
                      undesirable_weight=1.0, *, variant="edifice", stop_z_grad=False,
                      kl_policy_logps=None, kl_ref_logps=None, warn_balance=True):
    """(loss, dL/dpolicy_logps [n], metrics) for any KTO variant; arguments and checks as kto_loss."""
    loss, cache = _checked_forward(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                                   variant, stop_z_grad, kl_policy_logps, kl_ref_logps, warn_balance)
    return loss, kto_backward(1.0, cache), kto_metrics(cache)


def _checked_forward(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, variant,
                     stop_z_grad, kl_policy_logps, kl_ref_logps, warn_balance):
    """The doors' kto_forward: check every argument, warn about the balance, reject overflow by name."""
    config = KTOConfig(variant, beta, desirable_weight, undesirable_weight, stop_z_grad)
    warn_balance = check_bool("warn_balance", warn_balance)
    policy_logps, ref_logps, desirable, kl_policy_logps, kl_ref_logps = _check_arrays(
        config.variant, policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps)
    if warn_balance and config.variant in ("edifice", "kto"):
        num_desirable = int(desirable.sum())
        num_undesirable = int(desirable.shape[0]) - num_desirable
        ratio = _balance_ratio(num_desirable, num_undesirable, config.desirable_weight, config.undesirable_weight)
        _warn_if_unbalanced(ratio, num_desirable, num_undesirable, config.desirable_weight,
                            config.undesirable_weight, stacklevel=4)  # the caller of kto_loss(_and_grad)
    return _forward_or_overflow_error(config, policy_logps, ref_logps, desirable, kl_policy_logps, kl_ref_logps)


def _check_arrays(variant, policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps):
    """The arrays as floating arrays of one module (labels as bool), or the error that names one."""
    policy_logps = as_float_array("policy_logps", policy_logps, ndim=1)
    ref_logps = as_float_array("ref_logps", ref_logps, ndim=1)
    check_same_shape("ref_logps", ref_logps, "policy_logps", policy_logps)
    xp = array_module(policy_logps, ref_logps)
    policy_logps, ref_logps = to_module(policy_logps, xp), to_module(ref_logps, xp)  # one module: no mix
    desirable = to_module(as_labels("labels", labels, policy_logps.shape[0]), xp)

    given = [name for name, value in (("kl_policy_logps", kl_policy_logps), ("kl_ref_logps", kl_ref_logps))
             if value is not None]
    if variant != "kto" and given:
        reason = ("the edifice variant estimates z from the batch itself (z = mean β r)"
                  if variant == "edifice" else "apo_zero_unpaired has no z")
        raise ValueError(
            f"{given[0]} is only used by variant='kto'; {reason}. Got variant={variant!r} with "
            f"{' and '.join(given)}"
        )
    if len(given) == 1:
        missing = "kl_ref_logps" if given[0] == "kl_policy_logps" else "kl_policy_logps"
        raise ValueError(f"{missing} must be given together with {given[0]} (both or neither), got None")
    if given:
        kl_policy_logps = to_module(as_float_array("kl_policy_logps", kl_policy_logps, ndim=1), xp)
        kl_ref_logps = to_module(as_float_array("kl_ref_logps", kl_ref_logps, ndim=1), xp)
        check_same_shape("kl_ref_logps", kl_ref_logps, "kl_policy_logps", kl_policy_logps)
    return policy_logps, ref_logps, desirable, kl_policy_logps, kl_ref_logps


def _forward_or_overflow_error(config: KTOConfig, policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps):
    """kto_forward; huge-but-finite inputs whose loss, gradient or metrics would not be finite are a
    ValueError that names them, instead of inf, NaN or a RuntimeWarning."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, by name
        loss, cache = kto_forward(config, policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps)
        r, beta, n = cache.log_ratios, config.beta, cache.log_ratios.shape[0]
        xp = array_module(r)
        if not bool(xp.isfinite(r).all()):
            raise ValueError("policy_logps - ref_logps must be finite, got an overflow (log-probabilities near "
                             "the largest float)")
        quantities = {
            "the loss": loss, "z": cache.z, "dL/du": cache.dloss_du,
            "the gradient": 2.0 * beta * float(xp.max(xp.abs(cache.dloss_du))) / n,
            "the rewards beta * r": float(xp.sum(xp.abs(beta * r))),
            "the mean log-probabilities": float(xp.sum(xp.abs(cache.policy_logps))),
        }
    if cache.kl_raw is not None:
        quantities["the KL estimate mean(kl_policy_logps - kl_ref_logps)"] = cache.kl_raw
    _check_no_overflow("the KTO loss", r.dtype, quantities,
                       f"beta={beta:g}, desirable_weight={config.desirable_weight:g}, "
                       f"undesirable_weight={config.undesirable_weight:g}, |policy_logps - ref_logps| up to "
                       f"{float(xp.max(xp.abs(r))):.3g}"
                       + ("" if cache.kl_raw is None else ", z from kl_policy_logps - kl_ref_logps"))
    return loss, cache


def _check_no_overflow(what: str, dtype, quantities: dict, arguments: str) -> None:
    """Every quantity (a float or an array) must be finite in `dtype`, else a NonFiniteError (a ValueError)
    that names the arguments: huge-but-finite inputs are rejected by name instead of giving inf or NaN."""
    largest = float(np.finfo(dtype).max)
    bad = []
    for name, value in quantities.items():
        if isinstance(value, float):
            ok = math.isfinite(value) and abs(value) <= largest
        else:
            ok = bool(array_module(value).isfinite(value).all())
        if not ok:
            bad.append(name)
    if bad:
        raise NonFiniteError(f"{what} overflows {np.dtype(dtype).name} for these inputs ({arguments}): "
                         f"{', '.join(bad)} would not be finite; use a smaller beta or weights, or "
                         "log-probabilities of a sensible size")


# ---------------------------------------------------------------------------------------------------
# desirable/undesirable balance

BALANCE_RANGE = (1.0, 4.0 / 3.0)  # KTO paper, Eq. 8: λ_D n_D / (λ_U n_U) in [1, 4/3]
_BALANCE_SLACK = 1e-12


def check_balance(labels, desirable_weight=1.0, undesirable_weight=1.0) -> float | None:
    """The balance λ_D n_D / (λ_U n_U) of a batch; warns (UserWarning) when it is outside [1, 4/3].

    labels: [n] 0/1. Returns None when one class is absent (no balance to speak of), math.inf
    when undesirable_weight is 0 and both classes are present (or the ratio exceeds the float range).
    """
    reject_autograd("labels", labels)
    try:
        shape = array_module(labels).asarray(labels).shape
    except (TypeError, ValueError) as exc:
        raise TypeError(f"labels must be an array of 0/1 labels, got {type(labels).__name__}") from exc
    desirable = as_labels("labels", labels, shape[0] if len(shape) else 0)
    desirable_weight = check_finite_scalar("desirable_weight", desirable_weight, nonnegative=True)
    undesirable_weight = check_finite_scalar("undesirable_weight", undesirable_weight, nonnegative=True)
    check_weights_not_both_zero(desirable_weight, undesirable_weight)
    num_desirable = int(desirable.sum())
    num_undesirable = int(desirable.shape[0]) - num_desirable
    ratio = _balance_ratio(num_desirable, num_undesirable, desirable_weight, undesirable_weight)
    _warn_if_unbalanced(ratio, num_desirable, num_undesirable, desirable_weight, undesirable_weight,
                        stacklevel=3)
    return ratio


def check_weights_not_both_zero(desirable_weight: float, undesirable_weight: float) -> None:
    if desirable_weight == 0.0 and undesirable_weight == 0.0:
        raise ValueError(
            "desirable_weight and undesirable_weight must not both be 0 (the loss would be constant), "
            "got desirable_weight=0.0, undesirable_weight=0.0"
        )


def _balance_ratio(num_desirable: int, num_undesirable: int, desirable_weight: float,
                   undesirable_weight: float) -> float | None:
    if num_desirable == 0 or num_undesirable == 0:
        return None
    if undesirable_weight == 0.0:
        return math.inf
    return (desirable_weight / undesirable_weight) * (num_desirable / num_undesirable)  # inf past the float range


def _warn_if_unbalanced(ratio, num_desirable, num_undesirable, desirable_weight, undesirable_weight,
                        stacklevel: int) -> None:
    low, high = BALANCE_RANGE
    if ratio is None or low * (1 - _BALANCE_SLACK) <= ratio <= high * (1 + _BALANCE_SLACK):
        return
    if num_desirable and undesirable_weight > 0:
        base = undesirable_weight * num_undesirable / num_desirable
        hint = f"; desirable_weight in [{low * base:.4g}, {high * base:.4g}] would balance this batch"
    else:
        hint = ""
    warnings.warn(
        f"desirable/undesirable balance λ_D·n_D/(λ_U·n_U) = {ratio:.4g} (desirable_weight="
        f"{desirable_weight} × {num_desirable} desirable, undesirable_weight={undesirable_weight} × "
        f"{num_undesirable} undesirable) is outside [1, 4/3], the range the KTO paper recommends "
        f"(Eq. 8){hint}. kto_loss and kto_loss_and_grad take warn_balance=False to silence this.",
        UserWarning,
        stacklevel=stacklevel,
    )
