"""AdamW, gradient clipping and the learning-rate schedule, written out by hand.

The optimizer state is a plain dict of arrays, {"step": int, "m": {name: array}, "v": {name: array}},
so it goes into a checkpoint's `extra` as it is and training resumes exactly. Parameters, gradients
and moments share names, shapes, dtype and array module (NumPy or CuPy); nothing is cast.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import numpy as np

from ..backend import array_module
from ..validation import check_choice, check_finite_scalar, check_positive_int, reject_autograd

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
# With NumPy, AdamW and the gradient norm go over each array in blocks of this many entries (1 MiB of
# float32): the few temporaries are block-sized and stay in cache, instead of parameter-sized arrays
# allocated (and page-faulted) at every step. CuPy arrays are processed whole.
_BLOCK_ELEMENTS = 1 << 18


def _flat_blocks(*arrays):
    """Matching 1-D block views of same-shape arrays: [(a[i:j], b[i:j], ...), ...].

    One whole-array block when the arrays are CuPy or not all C-contiguous (a flat view of a
    non-contiguous array would be a copy, and in-place updates of it would be lost).
    """
    xp = array_module(*arrays)
    if xp is not np or not all(a.flags.c_contiguous for a in arrays):
        return [arrays]
    flat = [a.reshape(-1) for a in arrays]
    size = flat[0].size
    return [tuple(f[start:start + _BLOCK_ELEMENTS] for f in flat) for start in range(0, size, _BLOCK_ELEMENTS)]


def _max_abs(array) -> float:
    """max |array| over its blocks, without a temporary (NaN when any entry is NaN; 0 when empty)."""
    largest = 0.0
    for (block,) in _flat_blocks(array):
        if block.size:
            high, low = float(block.max()), float(block.min())
            if math.isnan(high) or math.isnan(low):
                return math.nan
            largest = max(largest, abs(high), abs(low))
    return largest


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
        p ← p − lr · (m / (1 − β1^t)) / (sqrt(v / (1 − β2^t)) + eps)
    decay_mask(name) -> bool picks the decayed parameters; the default decays every parameter with
    ndim >= 2 (weights and embeddings) and no bias or LayerNorm parameter, the GPT-2 convention.
    Everything is checked before anything is written: on error, params and state are untouched.
    Non-finite gradients are an error (clip_grad_norm reports them first, so the caller can skip).
    """
    _check_array_dict("params", params)
    _check_like_params("grads", grads, params)
    step = _check_state(state, params) + 1
    lr = check_finite_scalar("lr", lr, nonnegative=True)
    beta1, beta2 = _check_betas(betas)
    eps = check_finite_scalar("eps", eps, positive=True)
    weight_decay = check_finite_scalar("weight_decay", weight_decay, nonnegative=True)
    if decay_mask is not None and not callable(decay_mask):
        raise TypeError(f"decay_mask must be a callable name -> bool or None, got {decay_mask!r}")
    decayed = {
        k: bool(decay_mask(k)) if decay_mask is not None else p.ndim >= 2 for k, p in params.items()
    }
    for name, arrays in (("grads", grads), ("params", params)):
        for key, array in arrays.items():
            largest = _max_abs(array)  # NaN when any entry is
            if not math.isfinite(largest):
                raise ValueError(f"{name}[{key!r}] must be finite, got NaN or infinite values")
            if name == "grads" and largest > math.sqrt(float(np.finfo(array.dtype).max)):
                raise ValueError(f"grads[{key!r}] up to {largest:.3g}: its square overflows {array.dtype} in "
                                 "the second moment v; clip the gradients first (clip_grad_norm)")

    # Python floats times arrays keep the arrays' dtype (float32 stays float32).
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    step_size = lr / bias_correction1
    for key, param in params.items():
        xp = array_module(param)
        decay = decayed[key] and weight_decay
        for param_block, grad, m, v in _flat_blocks(param, grads[key], state["m"][key], state["v"][key]):
            scratch = xp.empty_like(param_block)
            if decay:
                param_block *= 1.0 - lr * weight_decay
            m *= beta1
            m += xp.multiply(grad, 1.0 - beta1, out=scratch)
            v *= beta2
            grad_squared = xp.multiply(grad, grad, out=scratch)
            grad_squared *= 1.0 - beta2
            v += grad_squared
            denom = xp.sqrt(v, out=scratch)
            denom /= bias_correction2_sqrt
            denom += eps
            update = xp.divide(m, denom, out=scratch)
            update *= step_size
            param_block -= update
    state["step"] = step
    for key, param in params.items():  # lr is finite but can still be too large for the dtype
        if not math.isfinite(_max_abs(param)):
            raise ValueError(f"lr={lr:g} made params[{key!r}] overflow to infinity ({param.dtype}); the step was "
                             "applied: restore params and state from a checkpoint and use a smaller lr")


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """Global L2 norm of all gradients; rescale them in place when it exceeds max_norm.

    total = sqrt(Σ_name Σ g²), accumulated in float64 whatever the gradients' dtype, in an order that
    does not depend on the number of BLAS threads (the blocks' sums are added with math.fsum).
    coef = max_norm / (total + 1e-6); when coef < 1 every gradient is multiplied by coef
    (torch.nn.utils.clip_grad_norm_). Finite gradients whose squares overflow get their norm from
    the gradients scaled by their largest entry. A NaN total (NaN or infinite gradients) or an
    infinite one (a norm beyond the float range) is returned as is and nothing is scaled: the caller
    decides (skip the step, lower the learning rate, stop).
    """
    _check_array_dict("grads", grads)
    max_norm = check_finite_scalar("max_norm", max_norm, positive=True)
    squares = []
    with np.errstate(over="ignore"):  # an overflowing sum of squares is handled below
        for grad in grads.values():
            xp = array_module(grad)
            for (block,) in _flat_blocks(grad):
                flat = block.astype(xp.float64, copy=False).reshape(-1)
                # einsum's own loop, not BLAS dot: a threaded dot splits the sum differently for each
                # thread count, and the last bit of the norm (hence of the update) with it
                squares.append(float(xp.einsum("i,i->", flat, flat)) if flat.size else 0.0)
    try:
        total = math.sqrt(math.fsum(squares))
    except OverflowError:  # finite squares whose sum passes the float range
        total = math.inf
    if math.isinf(total):  # finite gradients whose squares overflow: the norm of the gradients scaled down
        scale = max(_max_abs(grad) for grad in grads.values())
        if math.isfinite(scale):
            scaled = []
            for grad in grads.values():
                xp = array_module(grad)
                for (block,) in _flat_blocks(grad):
                    flat = block.astype(xp.float64, copy=False).reshape(-1) / scale
                    scaled.append(float(xp.einsum("i,i->", flat, flat)) if flat.size else 0.0)
            total = scale * math.sqrt(math.fsum(scaled))
    if not math.isfinite(total):
        return total
    coef = max_norm / (total + CLIP_EPS)
    if coef < 1.0:
        for grad in grads.values():
            grad *= coef
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
    step = check_positive_int("step", step, minimum=0)
    base_lr = check_finite_scalar("base_lr", base_lr, nonnegative=True)
    warmup_steps = check_positive_int("warmup_steps", warmup_steps, minimum=0)
    total_steps = check_positive_int("total_steps", total_steps, minimum=1)
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps must be <= total_steps ({total_steps}), got {warmup_steps}"
        )
    check_choice("schedule", schedule, SCHEDULES)
    min_lr_ratio = check_finite_scalar("min_lr_ratio", min_lr_ratio, nonnegative=True)
    if min_lr_ratio > 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

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
