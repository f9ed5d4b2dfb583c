"""Forward/backward pairs for every op of the GPT-2 block, in NumPy (or CuPy) by hand.

Each op is `out, cache = X_forward(...)` and `grads = X_backward(dout, cache)`; the cache is a small
NamedTuple holding what the backward needs. Shape letters: B batch, T time, C channels, NH heads,
HS head size (C // NH), V vocabulary; `...` is any number of leading axes.

The ops assume valid input: the public functions that call them (GPT.forward, generate, ...) check
their arguments once, at the door.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from ..backend import array_module, scatter_add

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

LAYERNORM_EPS = 1e-5
GELU_COEFF = 0.044715
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# ----------------------------------------------------------------------------------------------
# embedding


class EmbeddingCache(NamedTuple):
    indices: Any  # [...] integer token ids
    num_embeddings: int  # V
    dtype: Any  # dtype of the weight


def embedding_forward(weight, indices):
    """Row lookup: out[...] = weight[indices[...]].  weight [V, C], indices [...] -> out [..., C]."""
    out = weight[indices]
    return out, EmbeddingCache(indices, weight.shape[0], weight.dtype)


def embedding_backward(dout, cache: EmbeddingCache, out=None):
    """dweight[v] = sum of dout[...] over the positions where indices[...] == v.  -> dweight [V, C].

    With out [V, C] given, the sums are added to it in place and out is returned (a tied embedding
    adds its lookup gradient to the head's gradient without a second [V, C] array).
    """
    if out is None:
        out = array_module(dout).zeros((cache.num_embeddings, dout.shape[-1]), dtype=cache.dtype)
    scatter_add(out, cache.indices, dout)
    return out


# ----------------------------------------------------------------------------------------------
# linear (GPT-2 Conv1D orientation)


class LinearCache(NamedTuple):
    x: Any  # [..., in]
    weight: Any  # [in, out]
    has_bias: bool


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


class LayerNormCache(NamedTuple):
    x: Any  # [..., C]
    weight: Any  # [C]
    mean: Any  # [..., 1]
    rstd: Any  # [..., 1]  1 / sqrt(var + eps)


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


class GeluCache(NamedTuple):
    x: Any  # [...]
    tanh_out: Any  # [...]  t = tanh(sqrt(2/pi) (x + 0.044715 x^3))


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


class SoftmaxCache(NamedTuple):
    probs: Any  # [..., N]


def softmax_forward(x, mask=None, *, overwrite_x: bool = False):
    """probs = exp(x - max) / sum(exp(x - max)) over the last axis.

    mask (bool, broadcastable to x, True = keep) sets the excluded entries' probability to exactly 0;
    a row with no kept entry gives all zeros (and zero gradient) rather than NaN.
    overwrite_x=True computes probs in x's own buffer: attention's scores are needed for nothing else,
    and probs is the cached [B, NH, T, T] array, so no second array of that size is made (a copy and a
    masked copy cost ~4 % of a medium training step in `kto-np bench`, measured).
    """
    xp = array_module(x)
    probs = x if overwrite_x else x.copy()
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


def softmax_backward(dprobs, cache: SoftmaxCache, *, overwrite_dprobs: bool = False):
    """dx = probs * (dprobs - sum(dprobs * probs, last axis)).

    overwrite_dprobs=True writes dx into dprobs' buffer (as the forward's overwrite_x).
    """
    probs = cache.probs
    row_dot = array_module(dprobs).einsum("...j,...j->...", dprobs, probs)[..., None]  # sum_j dprobs_j probs_j
    dx = dprobs if overwrite_dprobs else dprobs.copy()
    dx -= row_dot
    dx *= probs
    return dx


# ----------------------------------------------------------------------------------------------
# dropout (inverted)


class DropoutCache(NamedTuple):
    keep: Any  # [...] bool, True where kept; None when the op is the identity
    scale: float  # 1 / (1 - p)


def dropout_forward(x, p: float, *, train: bool, rng: np.random.Generator | None = None):
    """out = x * keep / (1 - p), keep ~ Bernoulli(1 - p) drawn on the host from `rng`; p in [0, 1).

    The identity when train is False or p == 0 (rng is then not used). The mask is drawn with NumPy
    and moved to x's array module, so NumPy and CuPy runs with the same rng use the same mask.
    """
    if not train or p == 0.0:
        return x, DropoutCache(None, 1.0)
    keep = array_module(x).asarray(rng.random(x.shape) >= p)
    scale = 1.0 / (1.0 - p)
    return x * keep * scale, DropoutCache(keep, scale)


def dropout_backward(dout, cache: DropoutCache):
    """dx = dout * keep / (1 - p), with the mask of the forward pass."""
    if cache.keep is None:
        return dout
    return dout * cache.keep * cache.scale


# ----------------------------------------------------------------------------------------------
# causal multi-head self-attention


def causal_mask(num_queries: int, num_keys: int, xp: Any = np):
    """[Tq, Tk] bool: query i, at absolute position num_keys - num_queries + i, sees keys j <= it."""
    return xp.tri(num_queries, num_keys, k=num_keys - num_queries, dtype=bool)


def split_heads(x, num_heads: int):
    """[B, T, C] -> [B, NH, T, HS] (a view)."""
    B, T, C = x.shape
    return x.reshape(B, T, num_heads, C // num_heads).transpose(0, 2, 1, 3)


def merge_heads(y):
    """[B, NH, T, HS] -> [B, T, C] (contiguous)."""
    B, NH, T, HS = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, NH * HS)


class AttentionCache(NamedTuple):
    qkv_cache: LinearCache  # x [B, T, C] -> qkv [B, T, 3C]
    q: Any  # [B, NH, T, HS]
    k: Any  # [B, NH, T, HS]
    v: Any  # [B, NH, T, HS]
    softmax_cache: SoftmaxCache  # probs [B, NH, T, T]
    dropout_cache: DropoutCache  # mask [B, NH, T, T] or None
    probs_dropped: Any  # [B, NH, T, T]  (the same array as the probs without dropout)
    proj_cache: LinearCache  # merged heads [B, T, C] -> out [B, T, C]
    scale: float  # 1 / sqrt(HS)


class AttentionGrads(NamedTuple):
    dx: Any  # [B, T, C]
    dc_attn_weight: Any  # [C, 3C]
    dc_attn_bias: Any  # [3C]
    dc_proj_weight: Any  # [C, C]
    dc_proj_bias: Any  # [C]


def attention_forward(x, c_attn_weight, c_attn_bias, c_proj_weight, c_proj_bias, num_heads: int, *,
                      dropout: float = 0.0, train: bool = False, rng: np.random.Generator | None = None,
                      past: tuple | None = None):
    """Causal multi-head self-attention, GPT-2 style.

    q, k, v = split(x @ c_attn_weight + c_attn_bias)             x [B, T, C] -> 3 x [B, NH, T, HS]
    probs = softmax(q @ k^T / sqrt(HS), causal mask)             [B, NH, T, Tk]
    y = dropout(probs) @ v                                       [B, NH, T, HS]
    out = merge(y) @ c_proj_weight + c_proj_bias                 [B, T, C]

    past = (keys, values, start), buffers [B, NH, capacity, HS] of a key/value cache (generation):
    x holds positions start..start+T-1, its k and v are written into the buffers there, and the
    queries attend over all Tk = start + T cached keys. Without past, Tk = T and start = 0.
    """
    xp = array_module(x)
    B, T, C = x.shape
    HS = C // num_heads
    qkv, qkv_cache = linear_forward(x, c_attn_weight, c_attn_bias)  # [B, T, 3C]
    # contiguous heads: NumPy's batched matmul falls back to a slow loop on strided views
    qkv_heads = xp.ascontiguousarray(qkv.reshape(B, T, 3, num_heads, HS).transpose(2, 0, 3, 1, 4))
    q, k, v = qkv_heads[0], qkv_heads[1], qkv_heads[2]  # [B, NH, T, HS] each
    if past is not None:
        keys, values, start = past
        keys[:, :, start:start + T], values[:, :, start:start + T] = k, v
        k, v = keys[:, :, :start + T], values[:, :, :start + T]  # [B, NH, Tk, HS]
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(HS)
    # k^T as its own contiguous array: OpenBLAS runs small plain products A @ B on one thread, but
    # sends A @ B.T (a transposed operand) to its threaded path, slow for many small heads
    k_t = xp.ascontiguousarray(k.transpose(0, 1, 3, 2))  # [B, NH, HS, Tk]
    scores = q @ k_t  # [B, NH, T, Tk]
    scores *= scale  # scores = q @ k^T * scale, in one buffer
    probs, softmax_cache = softmax_forward(scores, mask=causal_mask(T, Tk, xp), overwrite_x=True)
    probs_dropped, dropout_cache = dropout_forward(probs, dropout, train=train, rng=rng)
    y = probs_dropped @ v  # [B, NH, T, HS]
    out, proj_cache = linear_forward(merge_heads(y), c_proj_weight, c_proj_bias)
    cache = AttentionCache(qkv_cache, q, k, v, softmax_cache, dropout_cache, probs_dropped, proj_cache, scale)
    return out, cache


def attention_backward(dout, cache: AttentionCache) -> AttentionGrads:
    """Backward of attention_forward (without past), read bottom-up. dout [B, T, C] -> AttentionGrads."""
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
    # the [B, NH, T, T] gradients are computed in one buffer (see softmax_forward's overwrite_x)
    dscores = softmax_backward(dprobs, cache.softmax_cache, overwrite_dprobs=True)  # masked entries get 0
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
