"""AdamW and the global gradient norm of `kto_np.optim`, made fast: the same names, signatures and numbers.

What is fast: with NumPy, each array is processed in blocks of 1 MiB of float32 (`_BLOCK_ELEMENTS`
entries) whose few temporaries stay in cache, updated in place through one reused scratch block, instead
of the parameter-sized temporaries (m̂, v̂, sqrt(v̂), ...) that the formulas allocate, and page-fault, at
every step; the blocks of all parameters run on the fast room's threads (kto_np.fast.threads), each
block computed alike whatever thread runs it. CuPy arrays and non-contiguous arrays are processed whole.
The norm is still accumulated in float64 and added with math.fsum, in an order that does not depend on
the number of BLAS threads or of the fast room's threads.

These functions assume checked arguments: no type, shape, dtype or finiteness check is made here.
Callers check once at their door (`kto_np.optim` checks everything; training guards the loss, the
gradient norm and the parameters after the update). `adamw_init`, `check_adamw_state` and
`learning_rate` are the reading edition's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..backend import array_module
from ..optim import CLIP_EPS, SCHEDULES, adamw_init, check_adamw_state, learning_rate
from . import threads

__all__ = [
    "SCHEDULES",
    "adamw_init",
    "adamw_step",
    "check_adamw_state",
    "clip_grad_norm",
    "learning_rate",
]

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
    """kto_np.optim.adamw_step in blocks, on checked arguments (see there for the formulas). NumPy: the
    blocks of every parameter spread over the threads (kto_np.fast.threads), each computed alike."""
    beta1, beta2 = betas
    step = int(state["step"]) + 1
    # Python floats times arrays keep the arrays' dtype (float32 stays float32).
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    step_size = lr / bias_correction1
    numpy_tasks = []
    for key, param in params.items():
        decayed = bool(decay_mask(key)) if decay_mask is not None else param.ndim >= 2
        decay = 1.0 - lr * weight_decay if decayed and weight_decay else None
        arrays = (param, grads[key], state["m"][key], state["v"][key])
        for block in _flat_blocks(*arrays):
            if threads.numpy_only(*arrays):
                numpy_tasks.append((*block, decay))
            else:  # CuPy: the whole array, on the device
                _adamw_block(*block, decay, beta1, beta2, eps, bias_correction2_sqrt, step_size,
                             array_module(param).empty_like(param))

    def numpy_block(param, grad, m, v, decay):
        _adamw_block(param, grad, m, v, decay, beta1, beta2, eps, bias_correction2_sqrt, step_size,
                     threads.scratch(param.size, param.dtype).reshape(param.shape))

    threads.run(numpy_block, numpy_tasks, sum(task[0].size for task in numpy_tasks))
    state["step"] = step


def _adamw_block(param, grad, m, v, decay, beta1, beta2, eps, bias_correction2_sqrt, step_size, scratch):
    """One block of AdamW, in place, through one scratch block: m, v updated, then param."""
    xp = array_module(param)
    if decay is not None:
        param *= decay
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
    param -= update


def _sum_of_squares(grads: dict, scale: float | None = None) -> float:
    """Σ (g / scale)² in float64: einsum's own loop per block, not BLAS dot (a threaded dot splits the
    sum differently for each thread count, and the last bit of the norm with it), blocks added by fsum."""
    blocks = [(block, array_module(grad)) for grad in grads.values() for (block,) in _flat_blocks(grad)]
    squares = [0.0] * len(blocks)

    def block_square(index):
        block, xp = blocks[index]
        flat = block.astype(xp.float64, copy=False).reshape(-1)
        if scale is not None:
            flat = flat / scale
        squares[index] = float(xp.einsum("i,i->", flat, flat)) if flat.size else 0.0

    with np.errstate(over="ignore"):  # an overflowing sum of squares is handled by the caller
        if all(xp is np for _, xp in blocks):
            threads.run(block_square, [(i,) for i in range(len(blocks))], sum(b.size for b, _ in blocks))
        else:
            for i in range(len(blocks)):
                block_square(i)
    try:
        return math.fsum(squares)
    except OverflowError:  # finite squares whose sum passes the float range
        return math.inf


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """kto_np.optim.clip_grad_norm in blocks, on checked arguments: the global L2 norm (returned), and
    every gradient scaled by max_norm / (norm + 1e-6) when that is < 1; a NaN or infinite norm is
    returned as is and nothing is scaled."""
    total = math.sqrt(_sum_of_squares(grads))
    if math.isinf(total):  # finite gradients whose squares overflow: the norm of the gradients scaled down
        scale = max((_max_abs(grad) for grad in grads.values()), default=0.0)
        if math.isfinite(scale):
            total = scale * math.sqrt(_sum_of_squares(grads, scale))
    if not math.isfinite(total):
        return total
    coef = max_norm / (total + CLIP_EPS)
    if coef < 1.0:
        for grad in grads.values():
            grad *= coef
    return total
