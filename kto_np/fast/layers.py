"""The fast room's twin of kto_np.layers: the same op pairs, names, signatures, caches and numbers
(float64 to 1e-12 relative, float32 to 1e-5; tests/test_fast.py checks every pair), made fast.

Read kto_np.layers first: it states each op as its formula. What this file changes, and why (the costs
are `kto-np bench` measurements of a training step):

- LayerNorm and GELU compute their formulas in place in two or three buffers instead of one temporary
  per operator (the expression forms cost ~3 % (LayerNorm) and ~5 % (GELU) of a step).
- Attention's scores become its probabilities, and their gradient its dscores, in one [B, NH, T, T]
  buffer each (a copy and a masked copy cost ~4 % of a medium step): `_softmax_in_place` and
  `_softmax_backward_in_place` below, which the public softmax pair wraps with one copy.
- Contiguous heads and k^T, v^T as contiguous arrays: NumPy's batched matmul falls back to a slow loop
  on strided views, and OpenBLAS sends A @ B.T (a transposed operand) to its threaded path, slow for
  many small heads.
- linear runs one 2-D matrix product over all rows ([N, in] @ [in, out]) and adds the bias in place.
- LayerNorm, GELU and softmax run over fixed cache-sized blocks of rows on the fast room's threads
  (kto_np.fast.threads: each block's passes stay in cache, and both cores work); attention's per-head
  products go over the same threads, one BLAS thread each (threads.batched_matmul). The blocks depend
  on the shapes only: the numbers do not depend on the thread count. CuPy arrays are computed whole.

The caches, the constants and the ops with nothing to make faster (embedding, dropout, causal_mask,
split_heads, merge_heads) are the reading edition's own, imported from it.

The ops assume valid input, as the reading edition's do: the doors check once.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import array_module
from ..layers import (
    GELU_COEFF,
    LAYERNORM_EPS,
    SQRT_2_OVER_PI,
    AttentionCache,
    AttentionGrads,
    DropoutCache,
    EmbeddingCache,
    GeluCache,
    LayerNormCache,
    LinearCache,
    SoftmaxCache,
    causal_mask,
    dropout_backward,
    dropout_forward,
    embedding_backward,
    embedding_forward,
    merge_heads,
    split_heads,
)
from . import threads

__all__ = [
    "AttentionCache",
    "AttentionGrads",
    "DropoutCache",
    "EmbeddingCache",
    "GeluCache",
    "LayerNormCache",
    "LinearCache",
    "SoftmaxCache",
    "attention_backward",
    "attention_forward",
    "causal_mask",
    "dropout_backward",
    "dropout_forward",
    "embedding_backward",
    "embedding_forward",
    "gelu_backward",
    "gelu_forward",
    "layernorm_backward",
    "layernorm_forward",
    "linear_backward",
    "linear_forward",
    "merge_heads",
    "softmax_backward",
    "softmax_forward",
    "split_heads",
]


# ----------------------------------------------------------------------------------------------
# linear (GPT-2 Conv1D orientation)


def linear_forward(x, weight, bias=None):
    """out = x @ weight + bias.  x [..., in], weight [in, out], bias [out] or None -> out [..., out]."""
    n_in, n_out = weight.shape
    out = (x.reshape(-1, n_in) @ weight).reshape(*x.shape[:-1], n_out)
    if bias is not None:
        out += bias
    return out, LinearCache(x, weight, bias is not None)


def linear_backward(dout, cache: LinearCache):
    """dx = dout @ weight.T, dweight = x.T @ dout, dbias = sum of dout over rows.

    Returns (dx [..., in], dweight [in, out], dbias [out] or None).
    """
    n_in, n_out = cache.weight.shape
    dout_rows = dout.reshape(-1, n_out)  # [N, out]
    dx = (dout_rows @ cache.weight.T).reshape(cache.x.shape)
    dweight = cache.x.reshape(-1, n_in).T @ dout_rows
    dbias = dout_rows.sum(axis=0) if cache.has_bias else None
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------
# LayerNorm


def layernorm_forward(x, weight, bias, eps: float = LAYERNORM_EPS):
    """out = (x - mean) / sqrt(var + eps) * weight + bias over the last axis (biased variance).

    x [..., C], weight [C], bias [C] -> out [..., C]. NumPy: in blocks of rows, over the threads.
    """
    xp = array_module(x)
    C = x.shape[-1]
    out = xp.empty(x.shape, dtype=x.dtype)
    mean = xp.empty((*x.shape[:-1], 1), dtype=x.dtype)
    rstd = xp.empty_like(mean)
    if not threads.blocked(x):
        _layernorm_block(x, weight, bias, eps, out, mean, rstd, xp.empty_like(x), blas=True)
    else:
        x_rows, out_rows = x.reshape(-1, C), out.reshape(-1, C)
        mean_rows, rstd_rows = mean.reshape(-1, 1), rstd.reshape(-1, 1)

        def block(start, stop):
            squares = threads.scratch((stop - start) * C, x.dtype).reshape(stop - start, C)
            _layernorm_block(x_rows[start:stop], weight, bias, eps, out_rows[start:stop], mean_rows[start:stop],
                             rstd_rows[start:stop], squares, blas=False)

        threads.run(block, threads.blocks(x_rows.shape[0], C), x.size)
    return out, LayerNormCache(x, weight, mean, rstd)


def _row_means(x, out, blas: bool):
    """The mean of each row of x [..., C] into out [..., 1]. blas=True: a matrix-vector product with
    (1/C, ..., 1/C), a BLAS pass several times faster than NumPy's reduction over short rows (C of 128 to
    1024), for a whole array; blas=False: NumPy's mean, for the blocks the pool's threads run (no
    threaded BLAS call beside the other blocks' threads). The choice follows the array's size only
    (threads.blocked), so the numbers do not depend on the thread count."""
    xp = array_module(x)
    if not blas:
        return xp.mean(x, axis=-1, keepdims=True, out=out)
    C = x.shape[-1]
    xp.matmul(x.reshape(-1, C), xp.full((C, 1), 1.0 / C, dtype=x.dtype), out=out.reshape(-1, 1))
    return out


def _layernorm_block(x, weight, bias, eps, out, mean, rstd, squares, *, blas: bool):
    """layernorm_forward of rows x [n, C] into out [n, C], mean and rstd [n, 1]; squares: scratch [n, C]."""
    xp = array_module(x)
    _row_means(x, mean, blas)
    centered = xp.subtract(x, mean, out=out)
    var = _row_means(xp.multiply(centered, centered, out=squares), rstd, blas)
    var += eps
    xp.sqrt(var, out=rstd)
    xp.divide(1.0, rstd, out=rstd)  # rstd = 1 / sqrt(var + eps)
    out *= rstd  # out = centered * rstd * weight + bias, in one buffer
    out *= weight
    out += bias


def layernorm_backward(dout, cache: LayerNormCache):
    """With x_hat = (x - mean) * rstd and g = dout * weight:
    dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)), dweight = sum(dout * x_hat), dbias = sum(dout).

    Returns (dx [..., C], dweight [C], dbias [C]). NumPy: in blocks of rows over the threads, the sums
    over rows (dweight, dbias) one per block, added in block order.
    """
    x = cache.x
    xp = array_module(x)
    C = x.shape[-1]
    dx = xp.empty(x.shape, dtype=x.dtype)
    if not threads.blocked(x, dout):
        sums = xp.empty((1, 2, C), dtype=x.dtype)
        _layernorm_backward_block(dout, x, cache.mean, cache.rstd, cache.weight, dx, sums[0],
                                  xp.empty_like(x), xp.empty_like(x), blas=True)
    else:
        rows = threads.blocks(x.size // C, C)
        x_rows, dout_rows, dx_rows = x.reshape(-1, C), dout.reshape(-1, C), dx.reshape(-1, C)
        mean_rows, rstd_rows = cache.mean.reshape(-1, 1), cache.rstd.reshape(-1, 1)
        sums = np.empty((len(rows), 2, C), dtype=x.dtype)  # per block: dbias, dweight

        def block(index, start, stop):
            buffer = threads.scratch(2 * (stop - start) * C, x.dtype).reshape(2, stop - start, C)
            _layernorm_backward_block(dout_rows[start:stop], x_rows[start:stop], mean_rows[start:stop],
                                      rstd_rows[start:stop], cache.weight, dx_rows[start:stop], sums[index],
                                      buffer[0], buffer[1], blas=False)

        threads.run(block, [(i, start, stop) for i, (start, stop) in enumerate(rows)], x.size)
    dbias, dweight = sums.sum(axis=0) if sums.shape[0] > 1 else sums[0]
    return dx, dweight, dbias


def _layernorm_backward_block(dout, x, mean, rstd, weight, dx, sums, x_hat, g_x_hat, *, blas: bool):
    """layernorm_backward of rows [..., C] into dx; sums [2, C] gets (sum of dout, sum of dout * x_hat)
    over the rows. x_hat and g_x_hat: scratch of x's shape. Three buffers instead of the formula's eight
    temporaries (LayerNorm runs 2L + 1 times per pass)."""
    xp = array_module(x)
    C = x.shape[-1]
    xp.subtract(x, mean, out=x_hat)
    x_hat *= rstd
    xp.sum(dout.reshape(-1, C), axis=0, out=sums[0])  # dbias
    xp.multiply(dout, x_hat, out=g_x_hat)
    xp.sum(g_x_hat.reshape(-1, C), axis=0, out=sums[1])  # dweight
    g_x_hat *= weight  # g * x_hat
    xp.multiply(dout, weight, out=dx)  # g
    row_means = xp.empty((*dx.shape[:-1], 2), dtype=dx.dtype)  # mean(g), mean(g * x_hat)
    dx -= _row_means(dx, row_means[..., :1], blas)
    x_hat *= _row_means(g_x_hat, row_means[..., 1:], blas)
    dx -= x_hat
    dx *= rstd


# ----------------------------------------------------------------------------------------------
# GELU, tanh approximation ("gelu_new")


def _elementwise(kernel, out_arrays, in_arrays):
    """kernel(*outs, *ins) on the whole arrays (CuPy), or on matching flat blocks over the threads (NumPy;
    every array C-contiguous and of one shape). Each block's scratch: threads.scratch."""
    if not threads.blocked(*in_arrays) or not all(a.flags.c_contiguous for a in in_arrays):
        kernel(*out_arrays, *in_arrays)
        return
    flat = [a.reshape(-1) for a in (*out_arrays, *in_arrays)]
    threads.run(lambda start, stop: kernel(*(a[start:stop] for a in flat)), threads.blocks(flat[0].size, 1),
                flat[0].size)


def gelu_forward(x):
    """out = 0.5 x (1 + t), t = tanh(sqrt(2/pi) (x + 0.044715 x^3)) = tanh(x (a + b x^2)),
    a = sqrt(2/pi), b = sqrt(2/pi) 0.044715.

    Computed in place in two buffers (t and out), a cache-sized block at a time over the threads: the
    formula as one expression makes four [B, T, 4C] temporaries (about 5 % of a medium step)."""
    xp = array_module(x)
    tanh_out, out = xp.empty(x.shape, dtype=x.dtype), xp.empty(x.shape, dtype=x.dtype)
    _elementwise(_gelu_forward_block, (tanh_out, out), (x,))
    return out, GeluCache(x, tanh_out)


def _gelu_forward_block(tanh_out, out, x):
    xp = array_module(x)
    xp.multiply(x, x, out=tanh_out)
    tanh_out *= SQRT_2_OVER_PI * GELU_COEFF
    tanh_out += SQRT_2_OVER_PI
    tanh_out *= x
    xp.tanh(tanh_out, out=tanh_out)  # t
    xp.add(tanh_out, 1.0, out=out)
    out *= x
    out *= 0.5


def gelu_backward(dout, cache: GeluCache):
    """dx = dout * 0.5 ((1 - t^2) x (a + 3 b x^2) + t + 1): the derivative of 0.5 x (1 + tanh(x (a + b x^2))).
    In place in two buffers, in blocks, as the forward."""
    xp = array_module(dout)
    dx = xp.empty(dout.shape, dtype=dout.dtype)
    _elementwise(_gelu_backward_block, (dx,), (cache.x, cache.tanh_out, dout))
    return dx


def _gelu_backward_block(dx, x, t, dout):
    xp = array_module(x)
    dtanh_arg = xp.multiply(x, x, out=threads.scratch(x.size, x.dtype).reshape(x.shape)) if xp is np else x * x
    dtanh_arg *= SQRT_2_OVER_PI * 3.0 * GELU_COEFF  # d(x (a + b x^2))/dx = a + 3 b x^2
    dtanh_arg += SQRT_2_OVER_PI
    xp.multiply(t, t, out=dx)
    xp.subtract(1.0, dx, out=dx)  # 1 - t^2
    dx *= x
    dx *= dtanh_arg
    dx += t
    dx += 1.0
    dx *= 0.5
    dx *= dout


# ----------------------------------------------------------------------------------------------
# softmax (last axis)


def softmax_forward(x, mask=None):
    """probs = exp(x - max) / sum(exp(x - max)) over the last axis (see kto_np.layers.softmax_forward):
    x is copied once, and the copy becomes probs in place."""
    return _softmax_in_place(x.copy(), mask)


def softmax_backward(dprobs, cache: SoftmaxCache):
    """dx = probs * (dprobs - sum(dprobs * probs, last axis)): dprobs is copied once, and the copy
    becomes dx in place."""
    return _softmax_backward_in_place(dprobs.copy(), cache)


def _matrix_blocks(x, mask):
    """x as [N, rows, K] row groups that a 2-D mask [rows, K] (or no mask) fits, with their blocks; None
    when the blocks cannot be views (CuPy, a non-contiguous x, a mask of another shape)."""
    if not threads.blocked(x) or not x.flags.c_contiguous or x.ndim == 0:
        return None
    if mask is None:
        groups = x.reshape(-1, 1, x.shape[-1])
    elif x.ndim >= 2 and mask.ndim == 2 and tuple(mask.shape) == tuple(x.shape[-2:]):
        groups = x.reshape(-1, *x.shape[-2:])
    else:
        return None
    return groups, threads.blocks(groups.shape[0], groups.shape[1] * groups.shape[2])


def _softmax_in_place(x, mask=None, scale=None):
    """softmax_forward(x * scale) computed in x's own buffer: x becomes probs (and is the cache's probs).
    Attention's scores are needed for nothing else, so no second [B, NH, T, T] array is made. NumPy: a
    block of whole [T, T] matrices at a time, over the threads."""
    excluded = None if mask is None else ~mask
    found = _matrix_blocks(x, mask)
    if found is None:
        _softmax_block(x, excluded, scale)
    else:
        groups, rows = found
        threads.run(lambda start, stop: _softmax_block(groups[start:stop], excluded, scale), rows, x.size)
    return x, SoftmaxCache(x)


def _softmax_block(probs, excluded, scale):
    xp = array_module(probs)
    if scale is not None:
        probs *= scale
    if excluded is not None:
        xp.copyto(probs, probs.dtype.type(-np.inf), where=excluded)
    row_max = probs.max(axis=-1, keepdims=True)
    if excluded is not None:
        row_max[~xp.isfinite(row_max)] = 0  # a fully masked row
    probs -= row_max
    xp.exp(probs, out=probs)
    total = probs.sum(axis=-1, keepdims=True)
    if excluded is not None:
        total[total == 0] = 1  # a fully masked row stays all zeros
    probs *= xp.divide(1.0, total, out=total)


def _softmax_backward_in_place(dprobs, cache: SoftmaxCache, scale=None):
    """softmax_backward computed in dprobs' own buffer: dprobs becomes dx (times scale, when given)."""
    probs = cache.probs
    found = _matrix_blocks(dprobs, None) if dprobs.shape == probs.shape else None
    if found is None:
        _softmax_backward_block(dprobs, probs, scale)
    else:
        groups, rows = found
        probs_groups = probs.reshape(groups.shape)
        threads.run(lambda start, stop: _softmax_backward_block(groups[start:stop], probs_groups[start:stop], scale),
                    rows, dprobs.size)
    return dprobs


def _softmax_backward_block(dx, probs, scale):
    row_dot = array_module(dx).einsum("...j,...j->...", dx, probs)[..., None]  # sum_j dprobs_j probs_j
    dx -= row_dot
    dx *= probs
    if scale is not None:
        dx *= scale


# ----------------------------------------------------------------------------------------------
# causal multi-head self-attention


def attention_forward(x, c_attn_weight, c_attn_bias, c_proj_weight, c_proj_bias, num_heads: int, *,
                      dropout: float = 0.0, train: bool = False, rng: np.random.Generator | None = None):
    """Causal multi-head self-attention, GPT-2 style.

    q, k, v = split(x @ c_attn_weight + c_attn_bias)             x [B, T, C] -> 3 x [B, NH, T, HS]
    probs = softmax(q @ k^T / sqrt(HS), causal mask)             [B, NH, T, T]
    y = dropout(probs) @ v                                       [B, NH, T, HS]
    out = merge(y) @ c_proj_weight + c_proj_bias                 [B, T, C]

    (Generation attends over cached keys with its own forward path: kto_np.generate.)
    """
    xp = array_module(x)
    B, T, C = x.shape
    HS = C // num_heads
    qkv, qkv_cache = linear_forward(x, c_attn_weight, c_attn_bias)  # [B, T, 3C]
    # contiguous heads: NumPy's batched matmul falls back to a slow loop on strided views
    qkv_heads = xp.ascontiguousarray(qkv.reshape(B, T, 3, num_heads, HS).transpose(2, 0, 3, 1, 4))
    q, k, v = qkv_heads[0], qkv_heads[1], qkv_heads[2]  # [B, NH, T, HS] each
    scale = 1.0 / math.sqrt(HS)
    # k^T as its own contiguous array: OpenBLAS runs small plain products A @ B on one thread, but
    # sends A @ B.T (a transposed operand) to its threaded path, slow for many small heads
    k_t = xp.ascontiguousarray(k.transpose(0, 1, 3, 2))  # [B, NH, HS, T]
    scores = threads.batched_matmul(q, k_t)  # [B, NH, T, T]
    # scores = q @ k^T * scale, and softmax, in one buffer
    probs, softmax_cache = _softmax_in_place(scores, mask=causal_mask(T, T, xp), scale=scale)
    probs_dropped, dropout_cache = dropout_forward(probs, dropout, train=train, rng=rng)
    y = threads.batched_matmul(probs_dropped, v)  # [B, NH, T, HS]
    out, proj_cache = linear_forward(merge_heads(y), c_proj_weight, c_proj_bias)
    cache = AttentionCache(qkv_cache, q, k, v, softmax_cache, dropout_cache, probs_dropped, proj_cache, scale)
    return out, cache


def attention_backward(dout, cache: AttentionCache) -> AttentionGrads:
    """Backward of attention_forward, read bottom-up. dout [B, T, C] -> AttentionGrads."""
    xp = array_module(dout)
    B, NH, T, HS = cache.q.shape
    # out = merge(y) @ c_proj_weight + c_proj_bias
    dy_merged, dc_proj_weight, dc_proj_bias = linear_backward(dout, cache.proj_cache)
    dy = xp.ascontiguousarray(split_heads(dy_merged, NH))  # [B, NH, T, HS]
    # y = probs_dropped @ v
    v_t = xp.ascontiguousarray(cache.v.transpose(0, 1, 3, 2))  # [B, NH, HS, T] (see k_t in the forward)
    dprobs_dropped = threads.batched_matmul(dy, v_t)  # [B, NH, T, T]
    dv = threads.batched_matmul(cache.probs_dropped.transpose(0, 1, 3, 2), dy)  # [B, NH, T, HS]
    dprobs = dropout_backward(dprobs_dropped, cache.dropout_cache)
    # the [B, NH, T, T] gradients are computed in one buffer (dprobs is a new array here, or
    # dprobs_dropped itself without dropout: needed for nothing else either way)
    # scores = q @ k^T * scale: dscores gets the scale in the same pass (masked entries get 0)
    dscores = _softmax_backward_in_place(dprobs, cache.softmax_cache, scale=cache.scale)
    dq = threads.batched_matmul(dscores, cache.k)  # [B, NH, T, HS]
    dk = threads.batched_matmul(dscores.transpose(0, 1, 3, 2), cache.q)  # [B, NH, T, HS]
    dqkv = xp.empty((B, T, 3, NH, HS), dtype=dout.dtype)
    dqkv[:, :, 0] = dq.transpose(0, 2, 1, 3)
    dqkv[:, :, 1] = dk.transpose(0, 2, 1, 3)
    dqkv[:, :, 2] = dv.transpose(0, 2, 1, 3)
    # qkv = x @ c_attn_weight + c_attn_bias
    dx, dc_attn_weight, dc_attn_bias = linear_backward(dqkv.reshape(B, T, 3 * NH * HS), cache.qkv_cache)
    return AttentionGrads(dx, dc_attn_weight, dc_attn_bias, dc_proj_weight, dc_proj_bias)
