"""AdamW, gradient clipping and the learning-rate schedule, written as their formulas.

The optimizer state is a plain dict of arrays, {"step": int, "m": {name: array}, "v": {name: array}},
so it goes into a checkpoint's `extra` as it is and training resumes exactly. Parameters, gradients
and moments share names, shapes, dtype and array module (NumPy or CuPy); nothing is cast.

The file has two parts: the door (the argument checks, run once before anything is written), then
the math (AdamW, the global gradient norm, the schedule), one formula a line. `kto_np.fast.optim`
computes the same numbers in cache-sized blocks, for training.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import numpy as np

from .backend import array_module
from .validation import (
    NonFiniteError,
    check_choice,
    check_finite,
    check_finite_scalar,
    check_positive_int,
    reject_autograd,
)

__all__ = [
    "SCHEDULES",
    "adamw_init",
    "adamw_step",
    "check_adamw_state",
    "clip_grad_norm",
    "learning_rate",
]

SCHEDULES = ("cosine", "linear", "constant")
CLIP_EPS = 1e-6  # as in torch.nn.utils.clip_grad_norm_


# ---------------------------------------------------------------------------------------------
# The door: argument checks


def _check_array_dict(name: str, arrays) -> None:
    if not isinstance(arrays, dict):
        raise TypeError(f"{name} must be a dict of arrays, got {type(arrays).__name__}")
    for key, value in arrays.items():
        reject_autograd(f"{name}[{key!r}]", value)
        if type(value).__module__.split(".")[0] == "torch":
            raise TypeError(f"{name}[{key!r}] must be a NumPy or CuPy array, got a torch tensor")
        dtype = getattr(value, "dtype", None)
        if getattr(value, "shape", None) is None or dtype is None:
            raise TypeError(f"{name}[{key!r}] must be an array, got {type(value).__name__}")
        if np.dtype(dtype).kind != "f":
            raise TypeError(f"{name}[{key!r}] must be a floating array, got dtype {dtype}")


def _check_same_keys(name: str, arrays: dict, params: dict) -> None:
    missing = [k for k in params if k not in arrays]
    extra = [k for k in arrays if k not in params]
    if missing or extra:
        raise ValueError(
            f"{name} must have the same keys as params: missing {missing}, unexpected {extra}"
        )


def _check_like_params(name: str, arrays: dict, params: dict) -> None:
    """Same keys, and per key the same shape, dtype and array module as params."""
    _check_array_dict(name, arrays)
    _check_same_keys(name, arrays, params)
    for key, param in params.items():
        value = arrays[key]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"{name}[{key!r}] must have the shape of params[{key!r}] {tuple(param.shape)}, "
                f"got {tuple(value.shape)}"
            )
        if value.dtype != param.dtype:
            raise ValueError(
                f"{name}[{key!r}] must have the dtype of params[{key!r}] ({param.dtype}), got {value.dtype}"
            )
        if array_module(value) is not array_module(param):
            raise TypeError(
                f"{name}[{key!r}] must live in the same array module as params[{key!r}] "
                f"({array_module(param).__name__}), got {array_module(value).__name__}"
            )


def _check_state(state, params: dict) -> int:
    if not isinstance(state, dict) or set(state) != {"step", "m", "v"}:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"state must be a dict with keys ['m', 'step', 'v'] (from adamw_init), got {got}")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, (numbers.Integral, np.integer)) or step < 0:
        raise ValueError(f"state['step'] must be an integer >= 0, got {step!r}")
    _check_like_params("state['m']", state["m"], params)
    _check_like_params("state['v']", state["v"], params)
    return int(step)


def check_adamw_state(state, params: dict) -> int:
    """Check an AdamW state (from adamw_init / a checkpoint) against params; returns its step."""
    _check_array_dict("params", params)
    return _check_state(state, params)


def _check_betas(betas) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    checked = tuple(check_finite_scalar(f"betas[{i}]", b) for i, b in enumerate(betas))
    for i, beta in enumerate(checked):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
    return checked


def _check_adamw_arguments(params, grads, state, lr, betas, eps, weight_decay, decay_mask):
    """Every argument of adamw_step, checked: (step, lr, (beta1, beta2), eps, weight_decay, decayed)
    where decayed[name] says whether params[name] gets the weight decay."""
    _check_array_dict("params", params)
    _check_like_params("grads", grads, params)
    step = _check_state(state, params)
    lr = check_finite_scalar("lr", lr, nonnegative=True)
    betas = _check_betas(betas)
    eps = check_finite_scalar("eps", eps, positive=True)
    weight_decay = check_finite_scalar("weight_decay", weight_decay, nonnegative=True)
    if decay_mask is not None and not callable(decay_mask):
        raise TypeError(f"decay_mask must be a callable name -> bool or None, got {decay_mask!r}")
    # default: decay every parameter with ndim >= 2 (weights, embeddings), no bias or LayerNorm (GPT-2)
    decayed = {k: bool(decay_mask(k)) if decay_mask is not None else p.ndim >= 2 for k, p in params.items()}
    return step, lr, betas, eps, weight_decay, decayed


def _check_finite_and_squarable(params: dict, grads: dict) -> None:
    """Every gradient and parameter is finite, and every gradient's square fits its dtype (else v
    would become infinite)."""
    for key, grad in grads.items():
        check_finite(f"grads[{key!r}]", grad)
        largest = float(array_module(grad).abs(grad).max()) if grad.size else 0.0
        if largest > math.sqrt(float(np.finfo(grad.dtype).max)):
            raise NonFiniteError(f"grads[{key!r}] up to {largest:.3g}: its square overflows {grad.dtype} in "
                                 "the second moment v; clip the gradients first (clip_grad_norm)")
    for key, param in params.items():
        check_finite(f"params[{key!r}]", param)


def _check_params_after_the_step(params: dict, lr: float) -> None:
    """lr is finite but can still be too large for the dtype: the parameters it made infinite."""
    for key, param in params.items():
        if not bool(array_module(param).isfinite(param).all()):
            raise NonFiniteError(f"lr={lr:g} made params[{key!r}] overflow to infinity ({param.dtype}); the step "
                                 "was applied: restore params and state from a checkpoint and use a smaller lr")


def _check_schedule(step, base_lr, warmup_steps, total_steps, schedule, min_lr_ratio):
    step = check_positive_int("step", step, minimum=0)
    base_lr = check_finite_scalar("base_lr", base_lr, nonnegative=True)
    warmup_steps = check_positive_int("warmup_steps", warmup_steps, minimum=0)
    total_steps = check_positive_int("total_steps", total_steps, minimum=1)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps must be <= total_steps ({total_steps}), got {warmup_steps}")
    check_choice("schedule", schedule, SCHEDULES)
    min_lr_ratio = check_finite_scalar("min_lr_ratio", min_lr_ratio, nonnegative=True)
    if min_lr_ratio > 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    return step, base_lr, warmup_steps, total_steps, min_lr_ratio


# ---------------------------------------------------------------------------------------------
# The math


def adamw_init(params: dict) -> dict:
    """Fresh AdamW state: step 0 and zero first/second moments shaped like each parameter."""
    _check_array_dict("params", params)
    return {
        "step": 0,
        "m": {k: array_module(p).zeros_like(p) for k, p in params.items()},
        "v": {k: array_module(p).zeros_like(p) for k, p in params.items()},
    }


def adamw_step(
    params: dict,
    grads: dict,
    state: dict,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    decay_mask: Callable[[str], bool] | None = None,
) -> None:
    """One AdamW step (torch.optim.AdamW, amsgrad off), updating params and state in place.

    With t = state["step"] + 1 and g the gradient of parameter p:
        p ← p − lr·wd·p                      (decoupled weight decay, only where decay_mask(name))
        m ← β1·m + (1 − β1)·g
        v ← β2·v + (1 − β2)·g²
        m̂ = m / (1 − β1^t),  v̂ = v / (1 − β2^t)
        p ← p − lr · m̂ / (sqrt(v̂) + eps)
    decay_mask(name) -> bool picks the decayed parameters; the default decays every parameter with
    ndim >= 2 (weights and embeddings) and no bias or LayerNorm parameter, the GPT-2 convention.
    Everything is checked before anything is written: on error, params and state are untouched.
    Non-finite gradients are an error (clip_grad_norm reports them first, so the caller can skip).
    """
    step, lr, (beta1, beta2), eps, weight_decay, decayed = _check_adamw_arguments(
        params, grads, state, lr, betas, eps, weight_decay, decay_mask)
    _check_finite_and_squarable(params, grads)

    t = step + 1
    # Python floats times arrays keep the arrays' dtype (float32 stays float32). An lr too large for
    # the dtype overflows the parameters: reported below, by name, instead of warned about here.
    with np.errstate(over="ignore", invalid="ignore"):
        for name, p in params.items():
            g, m, v = grads[name], state["m"][name], state["v"][name]
            xp = array_module(p)
            if decayed[name]:
                p *= 1 - lr * weight_decay
            m[...] = beta1 * m + (1 - beta1) * g
            v[...] = beta2 * v + (1 - beta2) * g**2
            m_hat = m / (1 - beta1**t)
            v_hat = v / (1 - beta2**t)
            p -= lr * (m_hat / (xp.sqrt(v_hat) + eps))
    state["step"] = t
    _check_params_after_the_step(params, lr)


def _sum_of_squares(grads: dict, scale: float = 1.0) -> float:
    """Σ (g / scale)² over every entry of every gradient, in float64; each array is summed by NumPy's
    own (pairwise) sum, not a BLAS dot whose order depends on the thread count, and the arrays' sums
    are added exactly by math.fsum: the same bits whatever the number of BLAS threads."""
    with np.errstate(over="ignore"):  # squares beyond the float range: handled by the caller
        sums = [float(((g.astype(np.float64) / scale) ** 2).sum()) for g in grads.values()]
    try:
        return math.fsum(sums)
    except OverflowError:  # finite sums whose total passes the float range
        return math.inf


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """Global L2 norm of all gradients; rescale them in place when it exceeds max_norm.

    total = sqrt(Σ_name Σ g²), accumulated in float64 whatever the gradients' dtype, in an order that
    does not depend on the number of BLAS threads.
    coef = max_norm / (total + 1e-6); when coef < 1 every gradient is multiplied by coef
    (torch.nn.utils.clip_grad_norm_). Finite gradients whose squares overflow get their norm from
    the gradients scaled by their largest entry. A NaN total (NaN or infinite gradients) or an
    infinite one (a norm beyond the float range) is returned as is and nothing is scaled: the caller
    decides (skip the step, lower the learning rate, stop).
    """
    _check_array_dict("grads", grads)
    max_norm = check_finite_scalar("max_norm", max_norm, positive=True)

    total = math.sqrt(_sum_of_squares(grads))
    if math.isinf(total):  # finite gradients whose squares overflow: ‖g‖ = s · ‖g / s‖, s = max |g|
        scale = max((float(array_module(g).abs(g).max()) for g in grads.values() if g.size), default=0.0)
        if math.isfinite(scale):
            total = scale * math.sqrt(_sum_of_squares(grads, scale))
    if not math.isfinite(total):
        return total
    coef = max_norm / (total + CLIP_EPS)
    if coef < 1.0:
        for g in grads.values():
            g *= coef
    return total


def learning_rate(
    step: int,
    *,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> float:
    """Learning rate at `step` (0-based): linear warm-up, then decay to min_lr_ratio·base_lr.

    warm-up (step < warmup_steps):  base_lr · step / warmup_steps       (0 at step 0)
    then, with progress = (step − warmup_steps) / (total_steps − warmup_steps) clipped to [0, 1]
    and min_lr = min_lr_ratio · base_lr:
        cosine:   min_lr + (base_lr − min_lr) · (1 + cos(π · progress)) / 2
        linear:   base_lr − (base_lr − min_lr) · progress
        constant: base_lr
    From total_steps on, cosine and linear stay at min_lr.
    """
    step, base_lr, warmup_steps, total_steps, min_lr_ratio = _check_schedule(
        step, base_lr, warmup_steps, total_steps, schedule, min_lr_ratio)

    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if schedule == "constant":
        return base_lr
    min_lr = min_lr_ratio * base_lr
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    if schedule == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr - (base_lr - min_lr) * progress
