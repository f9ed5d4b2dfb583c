"""The KTO loss family with hand-written gradients: the Edifice seed formula, the paper/TRL formula and
APO-zero (unpaired). DPO, the paired method KTO is compared with, is in kto_np.dpo.

Shape letter: n, the batch size; every per-example array is [n]. Each loss is a forward/backward
pair, `loss, cache = *_forward(...)` and `grads = *_backward(dloss, cache)`, plus a one-call
`*_loss_and_grad` that also returns TRL-style metrics.

Notation: r_i = policy_logps_i - ref_logps_i (the log-ratio), w_i = desirable_weight (λ_D) when
label_i = 1 else undesirable_weight (λ_U), s_i = +1 (desirable) or -1 (undesirable), σ the logistic.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .backend import array_module, to_numpy
from .validation import (
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

VARIANTS = ("edifice", "kto", "apo_zero_unpaired")
BALANCE_RANGE = (1.0, 4.0 / 3.0)  # KTO paper, Eq. 8: λ_D n_D / (λ_U n_U) in [1, 4/3]
_BALANCE_SLACK = 1e-12


def default_beta() -> float:
    """The seed's default β: 0.1."""
    return 0.1


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


def _check_no_overflow(what: str, dtype, quantities: dict, arguments: str) -> None:
    """Every quantity (a float or an array) must be finite in `dtype`, else a ValueError that names the
    arguments: huge-but-finite inputs are rejected by name instead of giving inf or NaN."""
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
        raise ValueError(f"{what} overflows {np.dtype(dtype).name} for these inputs ({arguments}): "
                         f"{', '.join(bad)} would not be finite; use a smaller beta or weights, or "
                         "log-probabilities of a sensible size")


def _on_module(xp, arr):
    return to_numpy(arr) if xp is np else xp.asarray(arr)


# ---------------------------------------------------------------------------------------------------
# desirable/undesirable balance


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


# ---------------------------------------------------------------------------------------------------
# KTO family


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

    def loss_and_grad(self, policy_logps, ref_logps, labels, kl_policy_logps=None, kl_ref_logps=None, *,
                      warn_balance=False):
        """(loss, dL/dpolicy_logps [n], metrics) of this loss; see kto_forward for the formulas."""
        loss, cache = _kto_forward(policy_logps, ref_logps, labels, self, kl_policy_logps, kl_ref_logps,
                                   warn_balance)
        return loss, kto_backward(1.0, cache), kto_metrics(cache)


class KTOCache(NamedTuple):
    """Saved by kto_forward for kto_backward and kto_metrics."""

    variant: str
    beta: float
    z_has_grad: bool  # edifice without stop_z_grad: z = mean(β r) passes gradient back to every r_j
    z: float  # the variant's z: mean(β r) (edifice, reward units), z_ref (kto, log-ratio units), 0.0
    dloss_du: Any  # [n] ∂loss_i/∂u_i, u_i the sigmoid argument (β r_i - z or β(r_i - z_ref) or β r_i)
    policy_logps: Any  # [n], as given (its dtype is the gradient's dtype)
    log_ratios: Any  # [n] r_i
    desirable: Any  # [n] bool
    kl_raw: float | None = None  # kto with KL pairs: mean KL-pair log-ratio before the clamp, else None


def _check_kto_arrays(policy_logps, ref_logps, labels, variant, kl_policy_logps, kl_ref_logps):
    policy_logps = as_float_array("policy_logps", policy_logps, ndim=1)
    ref_logps = as_float_array("ref_logps", ref_logps, ndim=1)
    check_same_shape("ref_logps", ref_logps, "policy_logps", policy_logps)
    xp = array_module(policy_logps, ref_logps)
    desirable = _on_module(xp, as_labels("labels", labels, policy_logps.shape[0]))

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
        kl_policy_logps = _on_module(xp, as_float_array("kl_policy_logps", kl_policy_logps, ndim=1))
        kl_ref_logps = _on_module(xp, as_float_array("kl_ref_logps", kl_ref_logps, ndim=1))
        check_same_shape("kl_ref_logps", kl_ref_logps, "kl_policy_logps", kl_policy_logps)
    return xp, policy_logps, ref_logps, desirable, kl_policy_logps, kl_ref_logps


def _kto_forward(policy_logps, ref_logps, labels, config: KTOConfig, kl_policy_logps=None, kl_ref_logps=None,
                 warn_balance=True):
    """kto_forward with its hyper-parameters in a checked KTOConfig."""
    warn_balance = check_bool("warn_balance", warn_balance)
    variant, beta = config.variant, config.beta
    xp, policy_logps, ref_logps, desirable, kl_policy_logps, kl_ref_logps = _check_kto_arrays(
        policy_logps, ref_logps, labels, variant, kl_policy_logps, kl_ref_logps)
    n = policy_logps.shape[0]
    if warn_balance and variant in ("edifice", "kto"):
        num_desirable = int(desirable.sum())
        ratio = _balance_ratio(num_desirable, n - num_desirable, config.desirable_weight,
                               config.undesirable_weight)
        _warn_if_unbalanced(ratio, num_desirable, n - num_desirable, config.desirable_weight,
                            config.undesirable_weight, stacklevel=4)  # the caller of the public function

    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, by name
        log_ratios = policy_logps - ref_logps  # [n] r
        if not bool(xp.isfinite(log_ratios).all()):
            raise ValueError("policy_logps - ref_logps must be finite, got an overflow (log-probabilities near "
                             "the largest float)")
        dtype = log_ratios.dtype
        weights = xp.where(desirable, xp.asarray(config.desirable_weight, dtype=dtype),
                           xp.asarray(config.undesirable_weight, dtype=dtype))  # [n] w
        signs = xp.where(desirable, xp.asarray(1.0, dtype=dtype), xp.asarray(-1.0, dtype=dtype))  # [n] s

        if variant == "edifice":
            kl_terms = beta * log_ratios  # [n] KL_i = β r_i
            z_array = xp.mean(kl_terms)
            z = float(z_array)
            u = kl_terms - z_array  # [n] reward_i
            losses = -weights * sigmoid(signs * u)
            kl_raw = None
        else:
            kl_raw = None
            if variant == "kto" and kl_policy_logps is not None:
                kl_raw = float(xp.mean(kl_policy_logps - kl_ref_logps))
                z = max(0.0, kl_raw)
            else:
                z = 0.0
            u = beta * (log_ratios - z)  # [n]
            losses = weights * sigmoid(-signs * u)  # 1 - σ(s u) = σ(-s u)
        loss = float(xp.mean(losses))
        dloss_du = -weights * signs * sigmoid(u) * sigmoid(-u)  # [n]
        # what kto_backward and kto_metrics will compute must not overflow either
        _check_no_overflow("the KTO loss", dtype, {
            "the loss": loss, "z": z, "dL/du": dloss_du,
            "the gradient": 2.0 * beta * float(xp.max(xp.abs(dloss_du))) / n,
            "the rewards beta * r": float(xp.sum(xp.abs(beta * log_ratios))),
            "the mean log-probabilities": float(xp.sum(xp.abs(policy_logps))),
            **({} if kl_raw is None else {"the KL estimate mean(kl_policy_logps - kl_ref_logps)": kl_raw}),
        }, f"beta={beta:g}, desirable_weight={config.desirable_weight:g}, "
           f"undesirable_weight={config.undesirable_weight:g}, |policy_logps - ref_logps| up to "
           f"{float(xp.max(xp.abs(log_ratios))):.3g}"
           + ("" if kl_policy_logps is None else ", z from kl_policy_logps - kl_ref_logps"))
    cache = KTOCache(variant, beta, variant == "edifice" and not config.stop_z_grad, z, dloss_du, policy_logps,
                     log_ratios, desirable, kl_raw)
    return loss, cache


def kto_forward(policy_logps, ref_logps, labels, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0,
                *, variant="edifice", stop_z_grad=False, kl_policy_logps=None, kl_ref_logps=None,
                warn_balance=True):
    """The KTO loss of a batch. policy_logps, ref_logps: [n]; labels: [n] 0/1. Returns (loss, cache).

    variant="edifice" (the seed's formula, default):
        KL_i = β r_i, z = mean_i KL_i (whole batch, not clamped), reward_i = KL_i - z,
        loss_i = -λ_D σ(reward_i) (desirable) or -λ_U σ(-(reward_i)) (undesirable), L = mean_i loss_i.
        The seed's module doc writes σ(-KL - z) for the undesirable case; its function doc and code
        use σ(-(KL - z)), which is what is implemented. Gradient flows through z unless stop_z_grad.
        kl_policy_logps/kl_ref_logps are rejected: this variant estimates z from the batch.
    variant="kto" (paper / TRL):
        z_ref = max(0, mean_j(kl_policy_logps_j - kl_ref_logps_j)), detached, 0 without KL pairs;
        loss_i = λ_D (1 - σ(β(r_i - z_ref))) or λ_U (1 - σ(β(z_ref - r_i))), L = mean over all n.
        z_ref never passes gradient, so stop_z_grad has no effect.
    variant="apo_zero_unpaired" (TRL): loss_i = λ_D (1 - σ(β r_i)) or λ_U σ(β r_i); no z.
        (The same numbers as "kto" without KL pairs.)

    Note kto/apo loss_i = edifice-shaped loss_i + λ_i: they share ∂loss_i/∂u_i = -w_i s_i σ(u_i) σ(-u_i).
    A UserWarning is raised for "edifice" and "kto" when both classes are present and
    λ_D n_D / (λ_U n_U) is outside [1, 4/3] (see check_balance), unless warn_balance=False.
    """
    config = KTOConfig(variant, beta, desirable_weight, undesirable_weight, stop_z_grad)
    return _kto_forward(policy_logps, ref_logps, labels, config, kl_policy_logps, kl_ref_logps, warn_balance)


def kto_backward(dloss, cache: KTOCache):
    """dL/dpolicy_logps [n] (dtype and module of policy_logps), given dloss = upstream dL (a scalar).

    With g_i = dloss · ∂loss_i/∂u_i / n: dL/dr_j = β (g_j - mean_i g_i) when z = mean(β r) carries
    gradient (edifice, stop_z_grad=False), else β g_j. dL/dref_logps is the negative of the result;
    no gradient reaches kl_policy_logps (z_ref is detached).
    """
    if not isinstance(cache, KTOCache):
        raise TypeError(f"cache must be the KTOCache returned by kto_forward, got {type(cache).__name__}")
    dloss = check_finite_scalar("dloss", dloss)
    xp = array_module(cache.dloss_du)
    n = cache.dloss_du.shape[0]
    with np.errstate(over="ignore", under="ignore"):  # bounded by the forward's overflow check
        per_example = (dloss / n) * cache.dloss_du  # [n] g
        if cache.z_has_grad:
            per_example = per_example - xp.mean(per_example)  # z = mean(β r): dz/dr_j = β / n
        return (cache.beta * per_example).astype(cache.policy_logps.dtype)


def _class_mean(values, mask, count: int) -> float | None:
    return None if count == 0 else float(values[mask].mean())


def kto_metrics(cache: KTOCache) -> dict:
    """TRL-named metrics, as Python floats (counts as ints).

    kl: the z used: mean(β r) for edifice (reward units, can be negative), z_ref = max(0, mean KL-pair
    log-ratio) for kto (log-ratio units, as TRL reports it), 0.0 for apo_zero_unpaired;
    kl_raw: for kto with KL pairs, the estimate mean(kl_policy_logps - kl_ref_logps) before the clamp
    (it can be negative: the KL pairs are the dataset's completions, not samples from π), else None;
    rewards/chosen, rewards/rejected:
    mean β r_i over desirable / undesirable examples; rewards/margins: chosen - rejected;
    logps/chosen, logps/rejected: mean policy log-prob per class; count/chosen, count/rejected.
    When a class is absent its entries (and margins) are None, never NaN.
    """
    desirable = cache.desirable
    num_chosen = int(desirable.sum())
    num_rejected = int(desirable.shape[0]) - num_chosen
    with np.errstate(over="ignore"):  # bounded by the forward's overflow check
        rewards = cache.beta * cache.log_ratios
        chosen = _class_mean(rewards, desirable, num_chosen)
        rejected = _class_mean(rewards, ~desirable, num_rejected)
    return {
        "kl": float(cache.z),
        "kl_raw": cache.kl_raw,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": None if chosen is None or rejected is None else chosen - rejected,
        "logps/chosen": _class_mean(cache.policy_logps, desirable, num_chosen),
        "logps/rejected": _class_mean(cache.policy_logps, ~desirable, num_rejected),
        "count/chosen": num_chosen,
        "count/rejected": num_rejected,
    }


def kto_loss_and_grad(policy_logps, ref_logps, labels, beta=0.1, desirable_weight=1.0,
                      undesirable_weight=1.0, *, variant="edifice", stop_z_grad=False,
                      kl_policy_logps=None, kl_ref_logps=None, warn_balance=True):
    """(loss, dL/dpolicy_logps [n], metrics) for any KTO variant; arguments as kto_forward."""
    config = KTOConfig(variant, beta, desirable_weight, undesirable_weight, stop_z_grad)
    loss, cache = _kto_forward(policy_logps, ref_logps, labels, config, kl_policy_logps, kl_ref_logps,
                               warn_balance)
    return loss, kto_backward(1.0, cache), kto_metrics(cache)


def kto_loss(policy_logps, ref_logps, labels, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0,
             *, variant="edifice", stop_z_grad=False, kl_policy_logps=None, kl_ref_logps=None,
             warn_balance=True) -> float:
    """The KTO loss as a Python float (the seed API); formulas in kto_forward."""
    config = KTOConfig(variant, beta, desirable_weight, undesirable_weight, stop_z_grad)
    return _kto_forward(policy_logps, ref_logps, labels, config, kl_policy_logps, kl_ref_logps, warn_balance)[0]
