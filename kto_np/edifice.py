"""Edifice's KTO backbone (`Edifice.Meta.KTO.build/1`), exactly: config, parameters under Axon's
names, Axon's default initialisation, forward and hand-written backward.

Shape letters: B batch, T time, H hidden_size, V vocabulary, NH heads, HS head size (H // NH),
F = 4H the feed-forward width, L layers.

    x = E[tokens] + PE[:T]                     E[t, j] = (t H + j) / sqrt(V), fixed (or learned, below)
    for i = 1..L:                              PE = [sin(p f) | cos(p f)], f_i = 10000^(-i / max(H/2 - 1, 1))
        x = x + dropout(out(attn(LN_attn_norm(x))))     q, k, v, out: dense layers with biases
        x = x + dropout(down(gelu(up(LN_ffn_norm(x)))))  exact GELU x (1 + erf(x / sqrt 2)) / 2
    logits = lm_head(LN_final_norm(x))          a dense layer with a bias, not tied to anything
    attn: w = exp(s - max s) / (sum exp(s - max s) + 1e-8), s = q k^T / sqrt(HS) - 1e9 above the diagonal

Parameters are a flat dict keyed "<Axon layer>.<Axon parameter>": "block_1_attn_q.kernel" [H, H],
"block_1_attn_q.bias" [H], "final_norm.gamma" [H], "lm_head.kernel" [H, V], ... (blocks count from 1).
Dense kernels are [in, out] as in Axon. checkpoint.params_from_axon / params_to_axon convert to and
from Axon's nested {layer: {param: array}} layout.

The finding: the fixed embedding is a per-token constant t H / sqrt(V) on every channel plus a ramp
j / sqrt(V) shared by all tokens. Every LayerNorm subtracts its input's mean over the channels, so the
per-token constant never reaches anything but the residual stream, which the final LayerNorm
centres again: in exact arithmetic the logits depend on the positions only, not on the token ids.
token_embedding="learned" (a trainable [V, H] table, Axon.embedding's default init) repairs that.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np

from . import backend
from .backend import array_module, resolve_dtype
from .layers import (
    LAYERNORM_EPS,
    DropoutCache,
    EmbeddingCache,
    LayerNormCache,
    LinearCache,
    dropout_backward,
    dropout_forward,
    embedding_backward,
    embedding_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
    merge_heads,
    split_heads,
)
from .validation import (
    as_float_array,
    as_token_batch,
    check_bool,
    check_choice,
    check_param_dtypes,
    check_param_shapes,
    check_positive_int,
    check_rng,
)

__all__ = [
    "ARCHITECTURE",
    "ExactGeluCache",
    "SoftmaxEpsCache",
    "TOKEN_EMBEDDINGS",
    "Edifice",
    "EdificeConfig",
    "build_edifice",
    "edifice_positions",
    "erf",
    "fixed_token_embedding",
    "gelu_exact_backward",
    "gelu_exact_forward",
    "param_shapes",
    "softmax_eps_backward",
    "softmax_eps_forward",
]

ARCHITECTURE = "edifice"
TOKEN_EMBEDDINGS = ("fixed", "learned")
ATTENTION_MASK_VALUE = -1e9  # added to the scores above the diagonal (Edifice's causal mask)
SOFTMAX_EPS = 1e-8  # added to the softmax denominator (Edifice's attention weights)
FFN_MULTIPLIER = 4
POSITION_BASE = 10000.0
EMBEDDING_INIT_SCALE = 0.01  # Axon.embedding's default kernel initializer: uniform(-0.01, 0.01)
OUT_OF_RANGE_NOTE = ("(Edifice's one-hot embedding would silently embed such ids as zero vectors; "
                     "kto_np rejects them)")


@dataclass(frozen=True)
class EdificeConfig:
    """Hyper-parameters of Edifice's backbone (its build/1 options and defaults), validated on construction.

    token_embedding: "fixed" (Edifice's, not trainable) or "learned" (the repair, "token_embed.kernel").
    """

    vocab_size: int = 32000
    max_seq_len: int = 2048
    hidden_size: int = 512
    num_layers: int = 6
    num_heads: int = 8
    dropout: float = 0.1
    dtype: str = "float32"
    token_embedding: str = "fixed"

    def __post_init__(self):
        for name in ("vocab_size", "max_seq_len", "hidden_size", "num_layers", "num_heads"):
            check_positive_int(name, getattr(self, name))
        if self.hidden_size % 2 != 0:
            raise ValueError(
                f"hidden_size must be even for architecture='edifice': its position table is [sin | cos], "
                f"half = hidden_size / 2 columns each, got hidden_size={self.hidden_size}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size must be divisible by num_heads, got hidden_size={self.hidden_size} "
                f"and num_heads={self.num_heads}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise TypeError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        check_choice("dtype", self.dtype, ("float32", "float64"))
        check_choice("token_embedding", self.token_embedding, TOKEN_EMBEDDINGS)

    architecture = ARCHITECTURE  # a class attribute, not a field: to_dict adds it for checkpoints

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def np_dtype(self):
        return resolve_dtype(self.dtype)

    def to_dict(self) -> dict:
        return {"architecture": ARCHITECTURE, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> EdificeConfig:
        d = dict(d)
        architecture = d.pop("architecture", ARCHITECTURE)
        if architecture != ARCHITECTURE:
            raise ValueError(f"config architecture must be {ARCHITECTURE!r}, got {architecture!r}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"config has unknown keys {sorted(unknown)}")
        return cls(**d)


def param_shapes(config: EdificeConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's "<layer>.<param>" name and shape, in the order of the forward pass."""
    V, H, F = config.vocab_size, config.hidden_size, FFN_MULTIPLIER * config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {}
    if config.token_embedding == "learned":
        shapes["token_embed.kernel"] = (V, H)
    for i in range(1, config.num_layers + 1):
        p = f"block_{i}_"
        shapes[p + "attn_norm.gamma"] = (H,)
        shapes[p + "attn_norm.beta"] = (H,)
        for part in ("q", "k", "v", "out"):
            shapes[p + f"attn_{part}.kernel"] = (H, H)
            shapes[p + f"attn_{part}.bias"] = (H,)
        shapes[p + "ffn_norm.gamma"] = (H,)
        shapes[p + "ffn_norm.beta"] = (H,)
        shapes[p + "ffn_up.kernel"] = (H, F)
        shapes[p + "ffn_up.bias"] = (F,)
        shapes[p + "ffn_down.kernel"] = (F, H)
        shapes[p + "ffn_down.bias"] = (H,)
    shapes["final_norm.gamma"] = (H,)
    shapes["final_norm.beta"] = (H,)
    shapes["lm_head.kernel"] = (H, V)
    shapes["lm_head.bias"] = (V,)
    return shapes


def glorot_uniform_limit(shape: tuple[int, ...]) -> float:
    """Axon's glorot_uniform bound sqrt(3 / max((fan_in + fan_out) / 2, 1)).

    Axon's fans: rank 0 -> (1, 1); rank 1 [n] -> (n, n); rank 2 [in, out] -> (in, out); higher ranks
    multiply both by the receptive field (the product of the leading axes).
    """
    if len(shape) == 0:
        fan_in = fan_out = 1.0
    elif len(shape) == 1:
        fan_in = fan_out = float(shape[0])
    else:
        receptive_field = math.prod(shape[:-2])
        fan_in, fan_out = float(shape[-2] * receptive_field), float(shape[-1] * receptive_field)
    return math.sqrt(3.0 / max((fan_in + fan_out) / 2.0, 1.0))


def edifice_positions(num_positions: int, hidden_size: int) -> np.ndarray:
    """Edifice's position table, float64 on the host: [T, H] for positions 0..T-1.

    half = H / 2, f_i = exp(-ln(10000) i / max(half - 1, 1)) for i = 0..half-1,
    PE[p] = [sin(p f_0), ..., sin(p f_(half-1)), cos(p f_0), ..., cos(p f_(half-1))]  (concatenated).
    With H = 2 (half = 1) Edifice's max(half - 1, 1) makes f_0 = 1: PE[p] = [sin p, cos p].
    """
    half = hidden_size // 2
    frequencies = np.exp(-math.log(POSITION_BASE) * np.arange(half) / max(half - 1, 1))  # [half]
    angles = np.arange(num_positions, dtype=np.float64)[:, None] * frequencies  # [T, half]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def fixed_token_embedding(tokens, vocab_size: int, hidden_size: int, dtype):
    """Edifice's fixed embedding E[t, j] = (t H + j) / sqrt(V), looked up: [B, T] -> [B, T, H].

    (Edifice multiplies a one-hot [B, T, V] by the whole table iota({V, H}) / sqrt(V); the lookup is the
    same numbers for ids in [0, V).)
    """
    xp = array_module(tokens)
    ramp = xp.arange(hidden_size, dtype=dtype)  # [H]  j
    out = tokens[..., None].astype(dtype) * hidden_size + ramp  # [B, T, H]  t H + j
    out /= math.sqrt(vocab_size)
    return out


# ----------------------------------------------------------------------------------------------
# erf (NumPy has none) and the exact GELU built on it


ERF_SATURATION = 6.0  # |x| >= 6: erf(x) = ±1 in float64 (1 - erf(6) = 2.2e-17 < half a unit below 1)
ERF_TABLE_STEP = 1.0 / 32.0  # expansion centres c_k = k / 32, k = 0..192, so |x - c_k| <= 1/64
ERF_TAYLOR_TERMS = 10  # terms around each centre: what is left out is < 2e-20 of erf(x) (|h| <= 1/64)
ERF_TAYLOR_TERMS_FLOAT32 = 6  # for float32/float16 input: what is left out is < 6e-12 of erf(x)
TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def _erf_taylor_table():
    """Taylor coefficients of erf around c_k = k / 32, from Python's math module only (nothing fitted).

    erf(c + h) = sum_n a[n] h^n with a[0] = math.erf(c) and a[n + 1] = b[n] / (n + 1), where b are the
    Taylor coefficients of erf' = g = (2/sqrt(pi)) exp(-x^2): from g' = -2 x g,
    (n + 1) b[n + 1] = -2 (c b[n] + b[n - 1]), b[0] = g(c). Around c_0 = 0 this is the Maclaurin
    series (a[0] = 0 and every even a[n] exactly 0), so small |x| keeps full relative precision.
    Returns [N, K]: one contiguous row per power of h.
    """
    num_centres = round(ERF_SATURATION / ERF_TABLE_STEP) + 1
    table = np.zeros((num_centres, ERF_TAYLOR_TERMS))
    for k in range(num_centres):
        c = k * ERF_TABLE_STEP
        b = [TWO_OVER_SQRT_PI * math.exp(-c * c)]
        for n in range(ERF_TAYLOR_TERMS - 2):
            b.append(-2.0 * (c * b[n] + (b[n - 1] if n > 0 else 0.0)) / (n + 1))
        table[k, 0] = math.erf(c)
        table[k, 1:] = [b_n / (n + 1) for n, b_n in enumerate(b)]
    return np.ascontiguousarray(table.T)


_ERF_TAYLOR_BY_POWER = _erf_taylor_table()


def erf(x):
    """The error function erf(x) = (2/sqrt(pi)) integral_0^x exp(-t^2) dt, elementwise (NumPy or CuPy).

    float64: within 1e-15 relative of the exact value over the whole real line (tests/test_edifice.py
    checks it against math.erf, and mpmath where installed). float32 (and float16) input is computed
    in float64 with the first ERF_TAYLOR_TERMS_FLOAT32 terms (error < 6e-12) and rounded once.
    erf(±inf) = ±1, erf(nan) = nan, erf(-0.0) = -0.0; a subnormal x gives (2/sqrt(pi)) x rounded.
    |x| < 6: erf(|x|) = sum_n a_k[n] h^n with c_k = k/32 the nearest centre and
    h = |x| - c_k (Horner, the coefficients gathered per element), the sign copied from x; |x| >= 6: ±1.
    """
    xp = array_module(x)
    x = xp.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"erf: x must be a floating array, got dtype {x.dtype}")
    out_dtype = x.dtype
    x = x.astype(np.float64, copy=False)
    magnitude = xp.abs(x)
    num_terms = ERF_TAYLOR_TERMS if out_dtype == np.float64 else ERF_TAYLOR_TERMS_FLOAT32
    table = xp.asarray(_ERF_TAYLOR_BY_POWER[:num_terms])  # [N, K]
    # the nearest centre; fmin maps nan to 6 (its result is replaced below), so every index is valid
    scaled = xp.fmin(magnitude, ERF_SATURATION)
    scaled *= 1.0 / ERF_TABLE_STEP
    scaled += 0.5
    centre = scaled.astype(np.intp)  # [...] in 0..K-1: floor(|x| / step + 1/2)
    h = centre * -ERF_TABLE_STEP
    h += magnitude  # |x| - c_k, |h| <= 1/64 (larger only where |x| >= 6 or nan, replaced below)
    result = xp.take(table[-1], centre)
    coefficient = xp.empty_like(result)
    with np.errstate(invalid="ignore", over="ignore"):  # where |x| = inf (h = inf): replaced below
        for row in table[-2::-1]:
            result *= h
            result += xp.take(row, centre, out=coefficient)
    result = xp.where(magnitude < ERF_SATURATION, result, 1.0)
    result = xp.copysign(result, x, out=result)
    result = xp.where(xp.isnan(x), x, result)
    return result.astype(out_dtype, copy=False)


class ExactGeluCache(NamedTuple):
    x: Any  # [...]
    cdf: Any  # [...]  Phi(x) = (1 + erf(x / sqrt(2))) / 2


def gelu_exact_forward(x):
    """out = x (1 + erf(x / sqrt(2))) / 2 = x Phi(x), the exact GELU (Axon's :gelu, PyTorch's default)."""
    cdf = erf(x / math.sqrt(2.0))
    cdf += 1.0
    cdf *= 0.5
    return x * cdf, ExactGeluCache(x, cdf)


def gelu_exact_backward(dout, cache: ExactGeluCache):
    """dx = dout * (Phi(x) + x phi(x)), phi(x) = exp(-x^2 / 2) / sqrt(2 pi)."""
    xp = array_module(dout)
    x = cache.x
    local = x * x
    local *= -0.5
    xp.exp(local, out=local)
    local *= x
    local *= 1.0 / math.sqrt(2.0 * math.pi)
    local += cache.cdf
    local *= dout
    return local


# ----------------------------------------------------------------------------------------------
# softmax with an additive epsilon in the denominator (Edifice's attention weights)


class SoftmaxEpsCache(NamedTuple):
    weights: Any  # [..., N]
    max_share: Any  # [..., N]  1/m where x attains its row max (m entries), 0 elsewhere
    eps_over_denominator: Any  # [..., 1]  eps / (sum(exp(x - max)) + eps)


def softmax_eps_forward(x, eps: float = 1e-8):
    """w = exp(x - max(x)) / (sum(exp(x - max(x))) + eps) over the last axis.

    Unlike the plain softmax, this depends on the max itself: w = exp(x) / (sum(exp(x)) + eps exp(max)).
    """
    xp = array_module(x)
    row_max = x.max(axis=-1, keepdims=True)
    is_max = x == row_max
    max_share = is_max / is_max.sum(axis=-1, keepdims=True)  # ties share the max's gradient evenly
    weights = xp.exp(x - row_max)
    denominator = weights.sum(axis=-1, keepdims=True)
    denominator += eps
    weights /= denominator
    return weights, SoftmaxEpsCache(weights, max_share.astype(x.dtype), eps / denominator)


def softmax_eps_backward(dweights, cache: SoftmaxEpsCache):
    """With s = sum_j dweights_j w_j:  dx = w (dweights - s) - max_share * s * eps / (sum exp + eps).

    The first term is the plain softmax backward; the second is the path through max(x): dw_i/dmax =
    -w_i eps / denominator, and max(x) moves with the entry (or entries, shared) where it is attained.
    """
    xp = array_module(dweights)
    w = cache.weights
    row_dot = xp.einsum("...j,...j->...", dweights, w)[..., None]  # s
    dx = dweights - row_dot
    dx *= w
    dx -= cache.max_share * (row_dot * cache.eps_over_denominator)
    return dx


# ----------------------------------------------------------------------------------------------
# causal self-attention with separate q, k, v, out dense layers


class EdificeAttentionCache(NamedTuple):
    q_dense: LinearCache  # x [B, T, H] -> q [B, T, H]
    k_dense: LinearCache
    v_dense: LinearCache
    q: Any  # [B, NH, T, HS]
    k: Any  # [B, NH, T, HS]
    v: Any  # [B, NH, T, HS]
    softmax: SoftmaxEpsCache  # weights [B, NH, T, T]
    out_dense: LinearCache  # merged heads [B, T, H] -> out [B, T, H]
    scale: float  # sqrt(HS), the divisor of the scores


class EdificeAttentionGrads(NamedTuple):
    dx: Any  # [B, T, H]
    dkernels: dict  # "q" | "k" | "v" | "out" -> [H, H]
    dbiases: dict  # "q" | "k" | "v" | "out" -> [H]


def causal_mask_bias(num_positions: int, xp: Any = np, dtype=np.float64):
    """[T, T]: 0 where key j <= query i, -1e9 above the diagonal (added to the scores)."""
    above = xp.triu(xp.ones((num_positions, num_positions), dtype=bool), k=1)
    return xp.where(above, dtype(ATTENTION_MASK_VALUE), dtype(0.0)).astype(dtype)


def attention_forward(x, kernels: dict, biases: dict, num_heads: int):
    """Edifice's causal multi-head attention.  x [B, T, H] -> out [B, T, H]

    q = x Wq + bq, k = x Wk + bk, v = x Wv + bv                     [B, T, H] each, split [B, NH, T, HS]
    s = q k^T / sqrt(HS) + mask (-1e9 above the diagonal)           [B, NH, T, T]
    w = exp(s - max s) / (sum exp(s - max s) + 1e-8)                [B, NH, T, T]
    out = merge(w v) Wout + bout                                    [B, T, H]
    """
    xp = array_module(x)
    B, T, H = x.shape
    HS = H // num_heads
    q, q_dense = linear_forward(x, kernels["q"], biases["q"])
    k, k_dense = linear_forward(x, kernels["k"], biases["k"])
    v, v_dense = linear_forward(x, kernels["v"], biases["v"])
    q_heads = xp.ascontiguousarray(split_heads(q, num_heads))  # [B, NH, T, HS]
    k_heads = xp.ascontiguousarray(split_heads(k, num_heads))
    v_heads = xp.ascontiguousarray(split_heads(v, num_heads))
    scale = math.sqrt(HS)
    scores = q_heads @ xp.ascontiguousarray(k_heads.transpose(0, 1, 3, 2))  # [B, NH, T, T]
    scores /= scale
    scores += causal_mask_bias(T, xp, x.dtype.type)
    weights, softmax_cache = softmax_eps_forward(scores, SOFTMAX_EPS)
    y = weights @ v_heads  # [B, NH, T, HS]
    out, out_dense = linear_forward(merge_heads(y), kernels["out"], biases["out"])
    cache = EdificeAttentionCache(q_dense, k_dense, v_dense, q_heads, k_heads, v_heads, softmax_cache,
                                  out_dense, scale)
    return out, cache


def attention_backward(dout, cache: EdificeAttentionCache) -> EdificeAttentionGrads:
    """Backward of attention_forward, read bottom-up.  dout [B, T, H] -> EdificeAttentionGrads."""
    xp = array_module(dout)
    B, NH, T, HS = cache.q.shape
    dkernels, dbiases = {}, {}
    # out = merge(y) Wout + bout
    dy_merged, dkernels["out"], dbiases["out"] = linear_backward(dout, cache.out_dense)
    dy = xp.ascontiguousarray(split_heads(dy_merged, NH))  # [B, NH, T, HS]
    # y = w v
    dweights = dy @ xp.ascontiguousarray(cache.v.transpose(0, 1, 3, 2))  # [B, NH, T, T]
    dv = cache.softmax.weights.transpose(0, 1, 3, 2) @ dy  # [B, NH, T, HS]
    # w = softmax_eps(s); s = q k^T / sqrt(HS) + mask (the mask is a constant)
    dscores = softmax_eps_backward(dweights, cache.softmax)
    dscores /= cache.scale
    dq = dscores @ cache.k  # [B, NH, T, HS]
    dk = dscores.transpose(0, 1, 3, 2) @ cache.q  # [B, NH, T, HS]
    # q, k, v = x W + b: three uses of x, three contributions to dx
    dx, dkernels["v"], dbiases["v"] = linear_backward(merge_heads(dv), cache.v_dense)
    dx_k, dkernels["k"], dbiases["k"] = linear_backward(merge_heads(dk), cache.k_dense)
    dx += dx_k
    dx_q, dkernels["q"], dbiases["q"] = linear_backward(merge_heads(dq), cache.q_dense)
    dx += dx_q
    return EdificeAttentionGrads(dx, dkernels, dbiases)


# ----------------------------------------------------------------------------------------------
# the decoder block and the whole network


ATTENTION_PARTS = ("q", "k", "v", "out")


class EdificeBlockCache(NamedTuple):
    attn_norm: LayerNormCache  # x [B, T, H]
    attn: EdificeAttentionCache  # attn_norm out [B, T, H]
    attn_dropout: DropoutCache  # attn out [B, T, H]
    ffn_norm: LayerNormCache  # x_mid [B, T, H]
    ffn_up: LinearCache  # ffn_norm out [B, T, H] -> [B, T, F]
    gelu: ExactGeluCache  # [B, T, F]
    ffn_down: LinearCache  # gelu out [B, T, F] -> [B, T, H]
    ffn_dropout: DropoutCache  # ffn_down out [B, T, H]


def block_forward(params: dict, index: int, x, config: EdificeConfig, *, train: bool, rng):
    """Edifice's decoder block `block_{index}` (index from 1).  x [B, T, H] -> out [B, T, H]

    x_mid = x + dropout(attn(attn_norm(x)));  out = x_mid + dropout(ffn_down(gelu(ffn_up(ffn_norm(x_mid)))))
    """
    p = f"block_{index}_"
    attn_norm_out, attn_norm_cache = layernorm_forward(
        x, params[p + "attn_norm.gamma"], params[p + "attn_norm.beta"], LAYERNORM_EPS)
    kernels = {part: params[p + f"attn_{part}.kernel"] for part in ATTENTION_PARTS}
    biases = {part: params[p + f"attn_{part}.bias"] for part in ATTENTION_PARTS}
    attn_out, attn_cache = attention_forward(attn_norm_out, kernels, biases, config.num_heads)
    attn_out, attn_dropout_cache = dropout_forward(attn_out, config.dropout, train=train, rng=rng)
    x_mid = x + attn_out
    ffn_norm_out, ffn_norm_cache = layernorm_forward(
        x_mid, params[p + "ffn_norm.gamma"], params[p + "ffn_norm.beta"], LAYERNORM_EPS)
    up_out, up_cache = linear_forward(ffn_norm_out, params[p + "ffn_up.kernel"], params[p + "ffn_up.bias"])
    gelu_out, gelu_cache = gelu_exact_forward(up_out)
    down_out, down_cache = linear_forward(gelu_out, params[p + "ffn_down.kernel"], params[p + "ffn_down.bias"])
    down_out, ffn_dropout_cache = dropout_forward(down_out, config.dropout, train=train, rng=rng)
    out = x_mid + down_out
    cache = EdificeBlockCache(attn_norm_cache, attn_cache, attn_dropout_cache, ffn_norm_cache, up_cache,
                              gelu_cache, down_cache, ffn_dropout_cache)
    return out, cache


def block_backward(dout, cache: EdificeBlockCache, index: int, grads: dict):
    """Backward of block_forward: fills grads["block_{index}_*"] and returns dx [B, T, H]."""
    p = f"block_{index}_"
    # out = x_mid + dropout(ffn_down(gelu(ffn_up(ffn_norm(x_mid)))))
    ddown_out = dropout_backward(dout, cache.ffn_dropout)
    dgelu_out, grads[p + "ffn_down.kernel"], grads[p + "ffn_down.bias"] = linear_backward(ddown_out, cache.ffn_down)
    dup_out = gelu_exact_backward(dgelu_out, cache.gelu)
    dffn_norm_out, grads[p + "ffn_up.kernel"], grads[p + "ffn_up.bias"] = linear_backward(dup_out, cache.ffn_up)
    dx_mid, grads[p + "ffn_norm.gamma"], grads[p + "ffn_norm.beta"] = layernorm_backward(dffn_norm_out,
                                                                                         cache.ffn_norm)
    dx_mid += dout  # the residual path of out = x_mid + ...
    # x_mid = x + dropout(attn(attn_norm(x)))
    dattn_out = dropout_backward(dx_mid, cache.attn_dropout)
    attn_grads = attention_backward(dattn_out, cache.attn)
    for part in ATTENTION_PARTS:
        grads[p + f"attn_{part}.kernel"] = attn_grads.dkernels[part]
        grads[p + f"attn_{part}.bias"] = attn_grads.dbiases[part]
    dx, grads[p + "attn_norm.gamma"], grads[p + "attn_norm.beta"] = layernorm_backward(attn_grads.dx,
                                                                                       cache.attn_norm)
    dx += dx_mid  # the residual path of x_mid = x + ...
    return dx


class EdificeCache(NamedTuple):
    tokens: Any  # [B, T] int
    token_embed: EmbeddingCache | None  # the learned table's lookup; None for the fixed embedding
    blocks: list  # L x EdificeBlockCache
    final_norm: LayerNormCache  # [B, T, H]
    lm_head: LinearCache  # final_norm out [B, T, H] -> logits [B, T, V]
    logits_shape: tuple  # (B, T, V)
    dtype: Any  # the model dtype


class Edifice:
    """Edifice's KTO backbone: a frozen EdificeConfig plus pure functions of a params dict.

    The same interface as model.GPT: params = model.init(seed); logits, cache = model.forward(params,
    tokens); grads = model.backward(dlogits, cache) (same keys and shapes as params).
    """

    def __init__(self, config: EdificeConfig, *, fast: bool = False):
        if not isinstance(config, EdificeConfig):
            raise TypeError(f"config must be an EdificeConfig, got {type(config).__name__}")
        self.config = config
        # Edifice's own ops (erf GELU, ε-softmax) have no fast twins: fast=True is accepted, so that every
        # architecture builds the same way, and runs the reading edition
        self.fast = check_bool("fast", fast)

    def __repr__(self) -> str:
        return f"Edifice({self.config})"

    # -- parameters ------------------------------------------------------------------------------

    def init(self, seed: int) -> dict:
        """Axon's defaults: dense kernels and LayerNorm gammas glorot_uniform (glorot_uniform_limit),
        biases and betas 0, the learned token table (if any) uniform(-0.01, 0.01) as Axon.embedding.

        Drawn in float64 from numpy.random.default_rng(seed) in param_shapes order, then cast to
        config.dtype and moved to the selected backend. (The distributions are Axon's; the draws are not
        Nx.Random's: load Axon's own initial values with checkpoint.params_from_axon to match those.)
        """
        seed = check_positive_int("seed", seed, minimum=0)
        rng = np.random.default_rng(seed)
        xp, dtype = backend.xp(), self.config.np_dtype
        params = {}
        for name, shape in param_shapes(self.config).items():
            kind = name.rsplit(".", 1)[1]
            if name == "token_embed.kernel":
                values = rng.uniform(-EMBEDDING_INIT_SCALE, EMBEDDING_INIT_SCALE, size=shape)
            elif kind in ("kernel", "gamma"):
                limit = glorot_uniform_limit(shape)
                values = rng.uniform(-limit, limit, size=shape)
            else:  # bias, beta
                values = np.zeros(shape)
            params[name] = xp.asarray(values.astype(dtype))
        return params

    def num_params(self, params: dict | None = None) -> int:
        """Number of trainable scalars in params (or in the config's layout when params is None)."""
        if params is None:
            return sum(math.prod(shape) for shape in param_shapes(self.config).values())
        self.check_params(params)
        return sum(int(p.size) for p in params.values())

    def check_params(self, params, name: str = "params") -> None:
        """Keys and shapes as param_shapes(config), dtype config.dtype; ValueError/TypeError otherwise."""
        check_param_shapes(params, param_shapes(self.config), name)
        check_param_dtypes(params, self.config.np_dtype, name)

    def check_tokens(self, tokens, name: str = "tokens", *, max_len: int | None = None):
        """tokens as a 2-D integer array [B, T], 1 <= T <= max_len (default max_seq_len), ids in [0, V)."""
        config = self.config
        max_len = config.max_seq_len if max_len is None else max_len
        return as_token_batch(name, tokens, vocab_size=config.vocab_size, max_len=max_len,
                              range_note=OUT_OF_RANGE_NOTE)

    def position_embeddings(self, num_positions: int, xp: Any = np):
        """[T, H] Edifice's fixed position table in the model dtype."""
        table = edifice_positions(num_positions, self.config.hidden_size)
        return xp.asarray(table.astype(self.config.np_dtype))

    # -- forward and backward --------------------------------------------------------------------

    def forward(self, params: dict, tokens, *, train: bool = False, rng: np.random.Generator | None = None,
                keep_cache: bool = True, check: bool = True):
        """tokens [B, T] int -> (logits [B, T, V] in the model dtype, cache for backward).

        x = E[tokens] + PE[:T]; x = block_i(x) for i = 1..L; logits = lm_head(final_norm(x)).
        train=True applies dropout after each block's attention and feed-forward outputs (Edifice's
        placement: no embedding or attention-weight dropout), masks drawn from rng.
        keep_cache=False: forward only, the cache is None and each block's activations are freed.
        check=False skips the door's checks (for callers that checked once at their own door).
        """
        if check:
            self.check_params(params)
            check_bool("train", train)
            check_bool("keep_cache", keep_cache)
            if train and self.config.dropout > 0:
                check_rng(rng, "train=True and dropout > 0")
            tokens = self.check_tokens(tokens)
        return self._forward(params, tokens, train=train, rng=rng, keep_cache=keep_cache)

    def _forward(self, params: dict, tokens, *, train: bool, rng, keep_cache: bool):
        """The forward pass itself, on checked arguments."""
        config = self.config
        xp = array_module(params["lm_head.kernel"])
        tokens = xp.asarray(tokens)
        B, T = tokens.shape

        if config.token_embedding == "learned":
            x, token_embed_cache = embedding_forward(params["token_embed.kernel"], tokens)  # [B, T, H]
        else:
            x, token_embed_cache = fixed_token_embedding(tokens, config.vocab_size, config.hidden_size,
                                                         config.np_dtype), None
        x += self.position_embeddings(T, xp)  # [T, H] broadcast over B
        block_caches = []
        for index in range(1, config.num_layers + 1):
            x, block_cache = block_forward(params, index, x, config, train=train, rng=rng)
            if keep_cache:
                block_caches.append(block_cache)
        x_final, final_norm_cache = layernorm_forward(x, params["final_norm.gamma"], params["final_norm.beta"],
                                                      LAYERNORM_EPS)
        logits, lm_head_cache = linear_forward(x_final, params["lm_head.kernel"], params["lm_head.bias"])
        if not keep_cache:
            return logits, None
        cache = EdificeCache(tokens, token_embed_cache, block_caches, final_norm_cache, lm_head_cache,
                             tuple(logits.shape), config.np_dtype)
        return logits, cache

    def backward(self, dlogits, cache: EdificeCache, *, check: bool = True) -> dict:
        """dlogits [B, T, V] (d loss / d logits) -> grads, same keys and shapes as params.
        check=False skips the door's checks of the cache and of dlogits."""
        if check:
            if not isinstance(cache, EdificeCache):
                raise TypeError(f"cache must be the EdificeCache returned by forward, got {type(cache).__name__}")
            dlogits = as_float_array("dlogits", dlogits, ndim=3)
            if tuple(dlogits.shape) != cache.logits_shape:
                raise ValueError(f"dlogits must have the logits' shape {cache.logits_shape}, got "
                                 f"{tuple(dlogits.shape)}")
            if dlogits.dtype != cache.dtype:
                raise TypeError(f"dlogits must have the model dtype {cache.dtype}, got {dlogits.dtype}")
            dlogits = array_module(cache.lm_head.x).asarray(dlogits)
        return self._backward(dlogits, cache)

    def _backward(self, dlogits, cache: EdificeCache) -> dict:
        """The backward pass itself, the forward read bottom-up, on checked arguments."""
        config = self.config
        grads: dict = {}
        # logits = x_final @ lm_head.kernel + lm_head.bias
        dx_final, grads["lm_head.kernel"], grads["lm_head.bias"] = linear_backward(dlogits, cache.lm_head)
        # x_final = final_norm(x)
        dx, grads["final_norm.gamma"], grads["final_norm.beta"] = layernorm_backward(dx_final, cache.final_norm)
        for index in range(config.num_layers, 0, -1):
            dx = block_backward(dx, cache.blocks[index - 1], index, grads)
        # x = E[tokens] + PE: the position table is fixed; the fixed embedding too (nothing flows into it)
        if config.token_embedding == "learned":
            grads["token_embed.kernel"] = embedding_backward(dx, cache.token_embed)
        return {name: grads[name] for name in param_shapes(config)}


def build_edifice(hidden_size: int = 512, num_layers: int = 6, num_heads: int = 8, vocab_size: int = 32000,
                  dropout: float = 0.1, max_seq_len: int = 2048, *, dtype: str = "float32",
                  token_embedding: str = "fixed", fast: bool = False) -> Edifice:
    """Edifice.Meta.KTO.build/1's network (same options and defaults); token_embedding="learned" repairs
    the fixed embedding (see the module docstring)."""
    return Edifice(EdificeConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, hidden_size=hidden_size,
                                 num_layers=num_layers, num_heads=num_heads, dropout=dropout, dtype=dtype,
                                 token_embedding=token_embedding), fast=fast)
