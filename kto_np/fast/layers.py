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

    x [..., C], weight [C], bias [C] -> out [..., C].
    """
    xp = array_module(x)
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(var + eps)
    out = centered  # out = centered * rstd * weight + bias, in one buffer
    out *= rstd
    out *= weight
    out += bias
    return out, LayerNormCache(x, weight, mean, rstd)


def layernorm_backward(dout, cache: LayerNormCache):
    """With x_hat = (x - mean) * rstd and g = dout * weight:
    dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)), dweight = sum(dout * x_hat), dbias = sum(dout).

    Returns (dx [..., C], dweight [C], dbias [C]).
    """
    C = cache.x.shape[-1]
    x_hat = cache.x - cache.mean
    x_hat *= cache.rstd
    dbias = dout.reshape(-1, C).sum(axis=0)
    dout_x_hat = dout * x_hat
    dweight = dout_x_hat.reshape(-1, C).sum(axis=0)
    # the formula above with three [..., C] buffers instead of eight temporaries: LayerNorm runs 2L + 1
    # times per pass, and the expression form cost ~3 % of a small training step (kto-np bench, measured)
    g_x_hat = dout_x_hat
    g_x_hat *= cache.weight  # g * x_hat
    dx = dout * cache.weight  # g
    dx -= dx.mean(axis=-1, keepdims=True)
    x_hat *= g_x_hat.mean(axis=-1, keepdims=True)
    dx -= x_hat
    dx *= cache.rstd
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------
# GELU, tanh approximation ("gelu_new")


def gelu_forward(x):
    """out = 0.5 x (1 + t), t = tanh(sqrt(2/pi) (x + 0.044715 x^3)) = tanh(x (a + b x^2)),
    a = sqrt(2/pi), b = sqrt(2/pi) 0.044715.

    Computed in place in two buffers (t and out): the formula as one expression makes four [B, T, 4C]
    temporaries, which `kto-np bench` measured at about 5 % of a medium step."""
    xp = array_module(x)
    tanh_out = x * x
    tanh_out *= SQRT_2_OVER_PI * GELU_COEFF
    tanh_out += SQRT_2_OVER_PI
    tanh_out *= x
    xp.tanh(tanh_out, out=tanh_out)  # t
    out = tanh_out + 1.0
    out *= x
    out *= 0.5
    return out, GeluCache(x, tanh_out)


def gelu_backward(dout, cache: GeluCache):
    """dx = dout * 0.5 ((1 - t^2) x (a + 3 b x^2) + t + 1): the derivative of 0.5 x (1 + tanh(x (a + b x^2))).
    In place in two buffers, as the forward."""
    x, t = cache.x, cache.tanh_out
    dtanh_arg = x * x  # d(x (a + b x^2))/dx = a + 3 b x^2
    dtanh_arg *= SQRT_2_OVER_PI * 3.0 * GELU_COEFF
    dtanh_arg += SQRT_2_OVER_PI
    dx = t * t
    array_module(dx).subtract(1.0, dx, out=dx)  # 1 - t^2
    dx *= x
    dx *= dtanh_arg
    dx += t
    dx += 1.0
    dx *= 0.5
    dx *= dout
    return dx


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


def _softmax_in_place(x, mask=None):
    """softmax_forward computed in x's own buffer: x becomes probs (and is the cache's probs).
    Attention's scores are needed for nothing else, so no second [B, NH, T, T] array is made."""
    xp = array_module(x)
    probs = x
    if mask is not None:
        xp.copyto(probs, x.dtype.type(-np.inf), where=~mask)
    row_max = probs.max(axis=-1, keepdims=True)
    if mask is not None:
        row_max[~xp.isfinite(row_max)] = 0  # a fully masked row
    probs -= row_max
    xp.exp(probs, out=probs)
    total = probs.sum(axis=-1, keepdims=True)
    if mask is not None:
        total[total == 0] = 1  # a fully masked row stays all zeros
    probs *= 1.0 / total
    return probs, SoftmaxCache(probs)


def _softmax_backward_in_place(dprobs, cache: SoftmaxCache):
    """softmax_backward computed in dprobs' own buffer: dprobs becomes dx."""
    probs = cache.probs
    row_dot = array_module(dprobs).einsum("...j,...j->...", dprobs, probs)[..., None]  # sum_j dprobs_j probs_j
    dx = dprobs
    dx -= row_dot
    dx *= probs
    return dx


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
    scores = q @ k_t  # [B, NH, T, T]
    scores *= scale  # scores = q @ k^T * scale, in one buffer
    probs, softmax_cache = _softmax_in_place(scores, mask=causal_mask(T, T, xp))
    probs_dropped, dropout_cache = dropout_forward(probs, dropout, train=train, rng=rng)
    y = probs_dropped @ v  # [B, NH, T, HS]
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
    dprobs_dropped = dy @ v_t  # [B, NH, T, T]
    dv = cache.probs_dropped.transpose(0, 1, 3, 2) @ dy  # [B, NH, T, HS]
    dprobs = dropout_backward(dprobs_dropped, cache.dropout_cache)
    # the [B, NH, T, T] gradients are computed in one buffer (dprobs is a new array here, or
    # dprobs_dropped itself without dropout: needed for nothing else either way)
    dscores = _softmax_backward_in_place(dprobs, cache.softmax_cache)  # masked entries get 0
    # scores = q @ k^T * scale
    dscores *= cache.scale
    dq = dscores @ cache.k  # [B, NH, T, HS]
    dk = dscores.transpose(0, 1, 3, 2) @ cache.q  # [B, NH, T, HS]
    dqkv = xp.empty((B, T, 3, NH, HS), dtype=dout.dtype)
    dqkv[:, :, 0] = dq.transpose(0, 2, 1, 3)
    dqkv[:, :, 1] = dk.transpose(0, 2, 1, 3)
    dqkv[:, :, 2] = dv.transpose(0, 2, 1, 3)
    # qkv = x @ c_attn_weight + c_attn_bias
    dx, dc_attn_weight, dc_attn_bias = linear_backward(dqkv.reshape(B, T, 3 * NH * HS), cache.qkv_cache)
    return AttentionGrads(dx, dc_attn_weight, dc_attn_bias, dc_proj_weight, dc_proj_bias)
