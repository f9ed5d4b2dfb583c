"""Forward/backward pairs for every op of the GPT-2 block, in NumPy (or CuPy) by hand: the reading edition.

Each op is `out, cache = X_forward(...)` and `grads = X_backward(dout, cache)`; the cache is a small
NamedTuple holding what the backward needs. Each op is written as its formula, the one in its docstring;
`kto_np.fast.layers` computes the same numbers faster (and is tested against this file).
Shape letters: B batch, T time, C channels, NH heads, HS head size (C // NH), V vocabulary;
`...` is any number of leading axes.

The ops assume valid input: the public functions that call them (GPT.forward, generate, ...) check
their arguments once, at the door.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from .backend import array_module, scatter_add

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
    adds its lookup gradient to the head's gradient).
    """
    if out is None:
        out = array_module(dout).zeros((cache.num_embeddings, dout.shape[-1]), dtype=cache.dtype)
    scatter_add(out, cache.indices, dout)  # out[indices[i]] += dout[i], repeated ids summed
    return out


# ----------------------------------------------------------------------------------------------
# linear (GPT-2 Conv1D orientation)


class LinearCache(NamedTuple):
    x: Any  # [..., in]
    weight: Any  # [in, out]
    has_bias: bool


def linear_forward(x, weight, bias=None):
    """out = x @ weight + bias.  x [..., in], weight [in, out], bias [out] or None -> out [..., out]."""
    out = x @ weight
    if bias is not None:
        out = out + bias
    return out, LinearCache(x, weight, bias is not None)


def linear_backward(dout, cache: LinearCache):
    """dx = dout @ weight^T, dweight = x^T @ dout, dbias = sum of dout, the sums over all rows (...).

    Returns (dx [..., in], dweight [in, out], dbias [out] or None).
    """
    n_in, n_out = cache.weight.shape
    x_rows, dout_rows = cache.x.reshape(-1, n_in), dout.reshape(-1, n_out)  # [N, in], [N, out]
    dx = dout @ cache.weight.T
    dweight = x_rows.T @ dout_rows
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
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(var + eps)
    x_hat = (x - mean) * rstd
    out = x_hat * weight + bias
    return out, LayerNormCache(x, weight, mean, rstd)


def layernorm_backward(dout, cache: LayerNormCache):
    """With x_hat = (x - mean) * rstd and g = dout * weight:
    dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)), dweight = sum(dout * x_hat), dbias = sum(dout),
    the means over the last axis, the sums over all leading axes.

    Returns (dx [..., C], dweight [C], dbias [C]).
    """
    C = cache.x.shape[-1]
    x_hat = (cache.x - cache.mean) * cache.rstd
    g = dout * cache.weight
    dx = cache.rstd * (g - g.mean(axis=-1, keepdims=True) - x_hat * (g * x_hat).mean(axis=-1, keepdims=True))
    dweight = (dout * x_hat).reshape(-1, C).sum(axis=0)
    dbias = dout.reshape(-1, C).sum(axis=0)
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------
# GELU, tanh approximation ("gelu_new")


class GeluCache(NamedTuple):
    x: Any  # [...]
    tanh_out: Any  # [...]  t = tanh(sqrt(2/pi) (x + 0.044715 x^3))


def gelu_forward(x):
    """out = 0.5 x (1 + t), t = tanh(sqrt(2/pi) (x + 0.044715 x^3))."""
    xp = array_module(x)
    t = xp.tanh(SQRT_2_OVER_PI * (x + GELU_COEFF * x * x * x))
    out = 0.5 * x * (1.0 + t)
    return out, GeluCache(x, t)


def gelu_backward(dout, cache: GeluCache):
    """dx = dout * 0.5 (1 + t + x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)):
    the product rule on 0.5 x (1 + t), with dt/dx = (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    x, t = cache.x, cache.tanh_out
    dt_dx = (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_COEFF * x * x)
    return dout * 0.5 * (1.0 + t + x * dt_dx)


# ----------------------------------------------------------------------------------------------
# softmax (last axis)


class SoftmaxCache(NamedTuple):
    probs: Any  # [..., N]


def softmax_forward(x, mask=None):
    """probs = exp(x - max) / sum(exp(x - max)) over the last axis.

    mask (bool, broadcastable to x, True = keep) sets the excluded entries' probability to exactly 0
    (their x counts as -inf); a row with no kept entry gives all zeros (and zero gradient) rather than NaN.
    """
    xp = array_module(x)
    if mask is not None:
        x = xp.where(mask, x, x.dtype.type(-np.inf))
    row_max = x.max(axis=-1, keepdims=True)
    if mask is not None:
        row_max = xp.where(xp.isfinite(row_max), row_max, 0)  # a fully masked row: exp(-inf - 0) = 0
    e = xp.exp(x - row_max)
    total = e.sum(axis=-1, keepdims=True)
    if mask is not None:
        total = xp.where(total == 0, 1, total)  # a fully masked row stays all zeros
    probs = e / total
    return probs, SoftmaxCache(probs)


def softmax_backward(dprobs, cache: SoftmaxCache):
    """dx = probs * (dprobs - sum(dprobs * probs)), the sum over the last axis."""
    probs = cache.probs
    return probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True))


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


def _transpose_last(a):
    """[B, NH, T, S] -> [B, NH, S, T]: the matrix transpose of every head."""
    return a.transpose(0, 1, 3, 2)


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
    T, C = x.shape[1], x.shape[2]
    qkv, qkv_cache = linear_forward(x, c_attn_weight, c_attn_bias)  # [B, T, 3C]
    q, k, v = (split_heads(qkv[..., i * C:(i + 1) * C], num_heads) for i in range(3))  # [B, NH, T, HS] each
    scale = 1.0 / math.sqrt(C // num_heads)
    scores = (q @ _transpose_last(k)) * scale  # [B, NH, T, T]
    probs, softmax_cache = softmax_forward(scores, mask=causal_mask(T, T, xp))
    probs_dropped, dropout_cache = dropout_forward(probs, dropout, train=train, rng=rng)
    y = probs_dropped @ v  # [B, NH, T, HS]
    out, proj_cache = linear_forward(merge_heads(y), c_proj_weight, c_proj_bias)
    cache = AttentionCache(qkv_cache, q, k, v, softmax_cache, dropout_cache, probs_dropped, proj_cache, scale)
    return out, cache


def attention_backward(dout, cache: AttentionCache) -> AttentionGrads:
    """Backward of attention_forward, read bottom-up. dout [B, T, C] -> AttentionGrads."""
    xp = array_module(dout)
    NH = cache.q.shape[1]
    # out = merge(y) @ c_proj_weight + c_proj_bias
    dy_merged, dc_proj_weight, dc_proj_bias = linear_backward(dout, cache.proj_cache)
    dy = split_heads(dy_merged, NH)  # [B, NH, T, HS]
    # y = probs_dropped @ v
    dprobs_dropped = dy @ _transpose_last(cache.v)  # [B, NH, T, T]
    dv = _transpose_last(cache.probs_dropped) @ dy  # [B, NH, T, HS]
    # probs_dropped = dropout(probs), probs = softmax(scores)
    dprobs = dropout_backward(dprobs_dropped, cache.dropout_cache)
    dscores = softmax_backward(dprobs, cache.softmax_cache)  # masked entries get 0
    # scores = q @ k^T * scale
    dq = (dscores @ cache.k) * cache.scale  # [B, NH, T, HS]
    dk = (_transpose_last(dscores) @ cache.q) * cache.scale  # [B, NH, T, HS]
    # qkv = x @ c_attn_weight + c_attn_bias, with qkv = [q | k | v] along the last axis
    dqkv = xp.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)  # [B, T, 3C]
    dx, dc_attn_weight, dc_attn_bias = linear_backward(dqkv, cache.qkv_cache)
    return AttentionGrads(dx, dc_attn_weight, dc_attn_bias, dc_proj_weight, dc_proj_bias)
