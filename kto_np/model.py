"""A GPT-2 style decoder-only transformer: configuration, parameters, forward and backward.

Shape letters: B batch, T time (sequence), C channels (hidden_size), V vocabulary, NH heads,
HS head size (C // NH), L layers.

Parameters are a flat dict keyed by Hugging Face GPT-2 names, linear weights in GPT-2's Conv1D
orientation [in, out], so a GPT-2 state dict maps 1:1 onto ours.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np

from . import backend, layers
from .backend import array_module, resolve_dtype
from .fast import layers as fast_layers
from .layers import LAYERNORM_EPS, AttentionCache, DropoutCache, EmbeddingCache, GeluCache, LayerNormCache, LinearCache
from .validation import (
    as_float_array,
    as_token_batch,
    check_bool,
    check_choice,
    check_fraction,
    check_param_dtypes,
    check_param_shapes,
    check_positive_int,
    check_rng,
)

POSITIONAL = ("learned", "sinusoidal")


# Sane bounds, checked before any array exists (a crafted checkpoint config cannot ask for 10**6 layers):
# far beyond any model this NumPy implementation can train, far below what would exhaust memory by
# bookkeeping alone.
MAX_SIZES = {"vocab_size": 1 << 24, "max_seq_len": 1 << 20, "hidden_size": 1 << 16, "num_layers": 1 << 12,
             "num_heads": 1 << 12}
MAX_PARAMETERS = 1 << 36


@dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of the model. Validated on construction."""

    vocab_size: int = 32000
    max_seq_len: int = 2048
    hidden_size: int = 512
    num_layers: int = 6
    num_heads: int = 8
    dropout: float = 0.1
    dtype: str = "float32"
    positional: str = "learned"
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "max_seq_len", "hidden_size", "num_layers", "num_heads"):
            value = check_positive_int(name, getattr(self, name))
            if value > MAX_SIZES[name]:
                raise ValueError(f"{name} must be <= {MAX_SIZES[name]}, got {value}")
            object.__setattr__(self, name, value)  # a plain int (np.int64 would not go into JSON)
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size must be divisible by num_heads, got hidden_size={self.hidden_size} "
                f"and num_heads={self.num_heads}"
            )
        object.__setattr__(self, "dropout", check_fraction("dropout", self.dropout))
        check_choice("dtype", self.dtype, ("float32", "float64"))
        check_choice("positional", self.positional, POSITIONAL)
        object.__setattr__(self, "tie_embeddings", check_bool("tie_embeddings", self.tie_embeddings))

        if self.num_params() > MAX_PARAMETERS:
            raise ValueError(f"the config gives {self.num_params():,} parameters, more than the {MAX_PARAMETERS:,} "
                             "this implementation takes")

    def num_params(self) -> int:
        """The number of parameters, from the sizes alone (sum of the sizes of param_shapes)."""
        V, T, C, L = self.vocab_size, self.max_seq_len, self.hidden_size, self.num_layers
        return (V * C * (1 if self.tie_embeddings else 2) + (T * C if self.positional == "learned" else 0)
                + L * (12 * C * C + 13 * C) + 2 * C)

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def np_dtype(self):
        return resolve_dtype(self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"config has unknown keys {sorted(unknown)}")
        return cls(**d)


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in a fixed order (the order of the forward pass)."""
    V, C, L = config.vocab_size, config.hidden_size, config.num_layers
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (V, C)}
    if config.positional == "learned":
        shapes["wpe.weight"] = (config.max_seq_len, C)
    for i in range(L):
        p = f"h.{i}."
        shapes[p + "ln_1.weight"] = (C,)
        shapes[p + "ln_1.bias"] = (C,)
        shapes[p + "attn.c_attn.weight"] = (C, 3 * C)
        shapes[p + "attn.c_attn.bias"] = (3 * C,)
        shapes[p + "attn.c_proj.weight"] = (C, C)
        shapes[p + "attn.c_proj.bias"] = (C,)
        shapes[p + "ln_2.weight"] = (C,)
        shapes[p + "ln_2.bias"] = (C,)
        shapes[p + "mlp.c_fc.weight"] = (C, 4 * C)
        shapes[p + "mlp.c_fc.bias"] = (4 * C,)
        shapes[p + "mlp.c_proj.weight"] = (4 * C, C)
        shapes[p + "mlp.c_proj.bias"] = (C,)
    shapes["ln_f.weight"] = (C,)
    shapes["ln_f.bias"] = (C,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (V, C)  # nn.Linear orientation, as in Hugging Face GPT2LMHeadModel
    return shapes


def check_params(params, config: GPTConfig, name: str = "params") -> None:
    """Raise ValueError naming every missing, extra or mis-shaped key of a params dict."""
    check_param_shapes(params, param_shapes(config), name)


INIT_STD = 0.02


def sinusoidal_positions(num_positions: int, hidden_size: int, start: int = 0) -> np.ndarray:
    """Fixed position table (Vaswani et al. 2017), float64 on the host: [T, C] for positions start..start+T-1.

    PE[pos, 2i] = sin(pos / 10000^(2i / C)),  PE[pos, 2i + 1] = cos(pos / 10000^(2i / C)).
    """
    positions = np.arange(start, start + num_positions, dtype=np.float64)[:, None]  # [T, 1]
    pair_index = np.arange(hidden_size) // 2  # [C]
    inverse_frequency = 10000.0 ** (-2.0 * pair_index / hidden_size)  # [C]
    angles = positions * inverse_frequency  # [T, C]
    return np.where(np.arange(hidden_size) % 2 == 0, np.sin(angles), np.cos(angles))


class BlockCache(NamedTuple):
    ln_1: LayerNormCache  # x [B, T, C]
    attn: AttentionCache  # ln_1 out [B, T, C]
    attn_dropout: DropoutCache  # after attn.c_proj [B, T, C]
    ln_2: LayerNormCache  # x_mid [B, T, C]
    fc: LinearCache  # ln_2 out [B, T, C] -> [B, T, 4C]
    gelu: GeluCache  # [B, T, 4C]
    mlp_proj: LinearCache  # gelu out [B, T, 4C] -> [B, T, C]
    mlp_dropout: DropoutCache  # after mlp.c_proj [B, T, C]


class GPTCache(NamedTuple):
    wte: EmbeddingCache  # token lookup
    embedding_dropout: DropoutCache  # on wte[tokens] + positions [B, T, C]
    blocks: list  # L x BlockCache
    ln_f: LayerNormCache  # [B, T, C]
    x_final: Any  # [B, T, C]  ln_f output, the input of the head
    head_weight: Any  # [V, C]  wte.weight (tied) or lm_head.weight
    logits_shape: tuple  # (B, T, V)
    dtype: Any  # the model dtype


def block_forward(params: dict, layer: int, x, config: GPTConfig, *, train: bool, rng, ops=layers):
    """One pre-LN transformer block.  x [B, T, C] -> out [B, T, C]

    x_mid = x + dropout(attn(ln_1(x)))
    out = x_mid + dropout(mlp.c_proj(gelu(mlp.c_fc(ln_2(x_mid)))))
    ops: the module of op pairs, kto_np.layers (the reading edition) or kto_np.fast.layers.
    """
    p = f"h.{layer}."
    ln_1_out, ln_1_cache = ops.layernorm_forward(x, params[p + "ln_1.weight"], params[p + "ln_1.bias"],
                                             LAYERNORM_EPS)
    attn_out, attn_cache = ops.attention_forward(
        ln_1_out, params[p + "attn.c_attn.weight"], params[p + "attn.c_attn.bias"],
        params[p + "attn.c_proj.weight"], params[p + "attn.c_proj.bias"], config.num_heads,
        dropout=config.dropout, train=train, rng=rng,
    )
    attn_out, attn_dropout_cache = ops.dropout_forward(attn_out, config.dropout, train=train, rng=rng)
    x_mid = x + attn_out
    ln_2_out, ln_2_cache = ops.layernorm_forward(x_mid, params[p + "ln_2.weight"], params[p + "ln_2.bias"],
                                             LAYERNORM_EPS)
    fc_out, fc_cache = ops.linear_forward(ln_2_out, params[p + "mlp.c_fc.weight"], params[p + "mlp.c_fc.bias"])
    gelu_out, gelu_cache = ops.gelu_forward(fc_out)
    mlp_out, mlp_proj_cache = ops.linear_forward(gelu_out, params[p + "mlp.c_proj.weight"],
                                             params[p + "mlp.c_proj.bias"])
    mlp_out, mlp_dropout_cache = ops.dropout_forward(mlp_out, config.dropout, train=train, rng=rng)
    out = x_mid + mlp_out
    cache = BlockCache(ln_1_cache, attn_cache, attn_dropout_cache, ln_2_cache, fc_cache, gelu_cache,
                       mlp_proj_cache, mlp_dropout_cache)
    return out, cache


def block_backward(dout, cache: BlockCache, layer: int, grads: dict, ops=layers):
    """Backward of block_forward: fills grads["h.{layer}.*"] and returns dx [B, T, C]."""
    p = f"h.{layer}."
    # out = x_mid + dropout(mlp_out)
    dmlp_out = ops.dropout_backward(dout, cache.mlp_dropout)
    dgelu_out, grads[p + "mlp.c_proj.weight"], grads[p + "mlp.c_proj.bias"] = ops.linear_backward(
        dmlp_out, cache.mlp_proj)
    dfc_out = ops.gelu_backward(dgelu_out, cache.gelu)
    dln_2_out, grads[p + "mlp.c_fc.weight"], grads[p + "mlp.c_fc.bias"] = ops.linear_backward(dfc_out, cache.fc)
    dx_mid, grads[p + "ln_2.weight"], grads[p + "ln_2.bias"] = ops.layernorm_backward(dln_2_out, cache.ln_2)
    dx_mid += dout  # the residual path of out = x_mid + ...
    # x_mid = x + dropout(attn_out)
    dattn_out = ops.dropout_backward(dx_mid, cache.attn_dropout)
    attn_grads = ops.attention_backward(dattn_out, cache.attn)
    grads[p + "attn.c_attn.weight"] = attn_grads.dc_attn_weight
    grads[p + "attn.c_attn.bias"] = attn_grads.dc_attn_bias
    grads[p + "attn.c_proj.weight"] = attn_grads.dc_proj_weight
    grads[p + "attn.c_proj.bias"] = attn_grads.dc_proj_bias
    dx, grads[p + "ln_1.weight"], grads[p + "ln_1.bias"] = ops.layernorm_backward(attn_grads.dx, cache.ln_1)
    dx += dx_mid  # the residual path of x_mid = x + ...
    return dx


def blocks_forward(params: dict, x, config: GPTConfig, *, train: bool, rng, keep_cache: bool, ops=layers):
    """The L blocks and the final LayerNorm: x [..., C] -> (x_final, [BlockCache] * L or [], ln_f cache)."""
    block_caches = []
    for layer in range(config.num_layers):
        x, block_cache = block_forward(params, layer, x, config, train=train, rng=rng, ops=ops)
        if keep_cache:
            block_caches.append(block_cache)
    x_final, ln_f_cache = ops.layernorm_forward(x, params["ln_f.weight"], params["ln_f.bias"], LAYERNORM_EPS)
    return x_final, block_caches, ln_f_cache


def blocks_backward(dx_final, block_caches: list, ln_f_cache: LayerNormCache, grads: dict, ops=layers):
    """Backward of blocks_forward: fills grads["ln_f.*"] and grads["h.*"] and returns dx."""
    dx, grads["ln_f.weight"], grads["ln_f.bias"] = ops.layernorm_backward(dx_final, ln_f_cache)
    for layer in reversed(range(len(block_caches))):
        dx = block_backward(dx, block_caches[layer], layer, grads, ops)
    return dx


class GPT:
    """A GPT-2 style model: a frozen GPTConfig plus pure functions of a params dict.

    params = model.init(seed); logits, cache = model.forward(params, tokens);
    grads = model.backward(dlogits, cache)  (same keys and shapes as params).
    """

    def __init__(self, config: GPTConfig, *, fast: bool = False):
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.fast = check_bool("fast", fast)
        self.ops = fast_layers if self.fast else layers  # the op pairs the forward and backward run on

    def __repr__(self) -> str:
        return f"GPT({self.config}{', fast=True' if self.fast else ''})"

    # -- parameters ------------------------------------------------------------------------------

    def init(self, seed: int) -> dict:
        """GPT-2 initialisation: normal(0, 0.02) weights, residual projections (attn.c_proj, mlp.c_proj)
        normal(0, 0.02 / sqrt(2 L)), biases 0, LayerNorm weights 1.

        Drawn in float64 from numpy.random.default_rng(seed) in param_shapes order, then cast to
        config.dtype and moved to the selected backend, so float32 and float64 models agree to rounding.
        """
        seed = check_positive_int("seed", seed, minimum=0)
        config = self.config
        rng = np.random.default_rng(seed)
        xp, dtype = backend.xp(), config.np_dtype
        residual_std = INIT_STD / math.sqrt(2 * config.num_layers)
        params = {}
        for name, shape in param_shapes(config).items():
            module_name, kind = name.rsplit(".", 1)
            if module_name.split(".")[-1].startswith("ln_"):
                values = np.ones(shape) if kind == "weight" else np.zeros(shape)
            elif kind == "bias":
                values = np.zeros(shape)
            elif module_name.endswith("c_proj"):
                values = rng.normal(0.0, residual_std, size=shape)
            else:
                values = rng.normal(0.0, INIT_STD, size=shape)
            params[name] = xp.asarray(values.astype(dtype))
        return params

    def num_params(self, params: dict | None = None) -> int:
        """Number of scalars in params (or in the config's parameter layout when params is None)."""
        if params is None:
            return sum(math.prod(shape) for shape in param_shapes(self.config).values())
        self.check_params(params)
        return sum(int(p.size) for p in params.values())

    def check_params(self, params, name: str = "params") -> None:
        """Keys and shapes as param_shapes(config), dtype config.dtype; ValueError/TypeError otherwise."""
        check_params(params, self.config, name)
        check_param_dtypes(params, self.config.np_dtype, name)

    def position_embeddings(self, params: dict, num_positions: int, start: int = 0):
        """[T, C] position vectors for positions start..start+T-1, in the model dtype."""
        config = self.config
        if config.positional == "learned":
            return params["wpe.weight"][start:start + num_positions]
        xp = array_module(params["wte.weight"])
        table = sinusoidal_positions(num_positions, config.hidden_size, start)
        return xp.asarray(table.astype(config.np_dtype))

    def check_tokens(self, tokens, name: str = "tokens"):
        """tokens as a 2-D integer array [B, T] with 1 <= T <= max_seq_len, ids in [0, V)."""
        return as_token_batch(name, tokens, vocab_size=self.config.vocab_size, max_len=self.config.max_seq_len)

    # -- forward and backward --------------------------------------------------------------------

    def forward(self, params: dict, tokens, *, train: bool = False, rng: np.random.Generator | None = None,
                keep_cache: bool = True, check: bool = True):
        """tokens [B, T] int -> (logits [B, T, V] in the model dtype, cache for backward).

        x = dropout(wte[tokens] + positions); x = block_l(x) for l = 0..L-1; x_final = ln_f(x);
        logits = x_final @ head.T with head = wte.weight (tied) or lm_head.weight.
        train=True applies dropout (GPT-2 placement) with masks drawn from rng.
        keep_cache=False is a forward-only pass (a frozen reference, no-gradient KL rows): the cache is
        None and each block's activations are freed as soon as the next block has run, so the pass
        holds about one block's activations instead of all L.
        check=False skips the door's checks of the arguments and of the logits' finiteness: for callers
        that checked once at their own door (step.kto_step).
        """
        if not check:
            return self._forward(params, tokens, train=train, rng=rng, keep_cache=keep_cache)
        self.check_params(params)
        tokens = self.check_tokens(tokens)
        check_bool("train", train)
        check_bool("keep_cache", keep_cache)
        if train and self.config.dropout > 0:
            check_rng(rng, "train=True and dropout > 0")
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite logits are reported below, by name
            logits, cache = self._forward(params, tokens, train=train, rng=rng, keep_cache=keep_cache)
            total = logits.sum()  # one pass, no temporary; a finite sum means finite logits
        xp = array_module(logits)
        if not bool(xp.isfinite(total)) and not bool(xp.isfinite(logits).all()):
            bad = [k for k, v in params.items() if not bool(array_module(v).isfinite(v).all())]
            raise ValueError(
                f"params give non-finite logits: params must be finite and small enough that the activations "
                f"do not overflow {self.config.dtype}" + (f" (non-finite params: {bad[:5]})" if bad else ""))
        return logits, cache

    def _forward(self, params: dict, tokens, *, train: bool, rng, keep_cache: bool):
        """The forward pass itself, on checked arguments: the body, then the head."""
        x_final, cache = self.body_forward(params, tokens, train=train, rng=rng, keep_cache=keep_cache)
        B, T, C = x_final.shape
        head_weight = self.head_weight(params)  # [V, C]
        logits = (x_final.reshape(B * T, C) @ head_weight.T).reshape(B, T, -1)  # [B, T, V]
        return logits, cache

    def head_weight(self, params: dict):
        """The head's [V, C] matrix: wte.weight (tied) or lm_head.weight."""
        return params["wte.weight"] if self.config.tie_embeddings else params["lm_head.weight"]

    def body_forward(self, params: dict, tokens, *, train: bool = False, rng=None, keep_cache: bool = True):
        """The forward pass up to the head, unchecked (forward checks; step.py calls this on arguments it
        checked at its door): tokens [B, T] -> (x_final [B, T, C], the cache backward needs, or None)."""
        config, ops = self.config, self.ops
        xp = array_module(params["wte.weight"])
        tokens = xp.asarray(tokens)
        B, T = tokens.shape

        token_vectors, wte_cache = ops.embedding_forward(params["wte.weight"], tokens)  # [B, T, C]
        x = token_vectors + self.position_embeddings(params, T)  # [T, C] broadcast over B
        x, embedding_dropout_cache = ops.dropout_forward(x, config.dropout, train=train, rng=rng)
        x_final, block_caches, ln_f_cache = blocks_forward(params, x, config, train=train, rng=rng,
                                                           keep_cache=keep_cache, ops=ops)
        if not keep_cache:
            return x_final, None
        head_weight = self.head_weight(params)
        cache = GPTCache(wte_cache, embedding_dropout_cache, block_caches, ln_f_cache, x_final,
                         head_weight, (B, T, head_weight.shape[0]), config.np_dtype)
        return x_final, cache

    def backward(self, dlogits, cache: GPTCache, *, check: bool = True) -> dict:
        """dlogits [B, T, V] (d loss / d logits) -> grads, same keys and shapes as params.

        check=False skips the door's checks (the cache's model, dlogits' shape, dtype and finiteness, the
        gradients' overflow), for callers that checked once at their own door (step.kto_step).
        """
        if not check:
            return self._backward(dlogits, cache)
        dlogits = self._check_dlogits(dlogits, cache)
        with np.errstate(invalid="ignore", over="ignore"):  # overflow is reported below, by name
            grads = self._backward(dlogits, cache)
        if not all(bool(array_module(g).isfinite(g).all()) for g in grads.values()):
            raise ValueError("dlogits are too large: the gradients overflowed to infinity on the way back "
                             f"({cache.dtype} cannot hold them); scale dlogits down")
        return grads

    def _check_dlogits(self, dlogits, cache):
        """The backward's door: the cache is this model's, dlogits finite, of the logits' shape and dtype."""
        config = self.config
        if not isinstance(cache, GPTCache):
            raise TypeError(f"cache must be the GPTCache returned by forward, got {type(cache).__name__}")
        cache_sizes = (len(cache.blocks), tuple(cache.head_weight.shape), np.dtype(cache.dtype))
        own_sizes = (config.num_layers, (config.vocab_size, config.hidden_size), config.np_dtype)
        if cache_sizes != own_sizes:
            raise ValueError(f"cache comes from another model ({cache_sizes[0]} layers, head {cache_sizes[1]}, "
                             f"{cache_sizes[2]}), not this one ({own_sizes[0]} layers, head {own_sizes[1]}, "
                             f"{own_sizes[2]})")
        dlogits = as_float_array("dlogits", dlogits, ndim=3)
        if tuple(dlogits.shape) != cache.logits_shape:
            raise ValueError(f"dlogits must have the logits' shape {cache.logits_shape}, got {tuple(dlogits.shape)}")
        if dlogits.dtype != cache.dtype:
            raise TypeError(f"dlogits must have the model dtype {cache.dtype}, got {dlogits.dtype}")
        return array_module(cache.x_final).asarray(dlogits)

    def _backward(self, dlogits, cache: GPTCache) -> dict:
        """The backward pass itself, the forward read bottom-up, on checked arguments: the head, then
        the body."""
        B, T, V = cache.logits_shape
        # logits = x_final @ head_weight.T
        dlogits_rows = dlogits.reshape(B * T, V)
        dx_final = (dlogits_rows @ cache.head_weight).reshape(B, T, -1)  # [B, T, C]
        dhead_weight = dlogits_rows.T @ cache.x_final.reshape(B * T, -1)  # [V, C]
        return self.body_backward(dx_final, dhead_weight, cache)

    def body_backward(self, dx_final, dhead_weight, cache: GPTCache) -> dict:
        """The backward pass below the head, unchecked: dx_final [B, T, C] and the head's gradient
        dhead_weight [V, C] -> grads, same keys and shapes as params."""
        config, ops = self.config, self.ops
        xp = array_module(cache.x_final)
        T = cache.logits_shape[1]
        grads: dict = {}
        # x_final = ln_f(block_L(...block_1(x)))
        dx = blocks_backward(dx_final, cache.blocks, cache.ln_f, grads, ops)
        # x = dropout(wte[tokens] + positions)
        dx = ops.dropout_backward(dx, cache.embedding_dropout)
        if config.positional == "learned":
            dwpe = xp.zeros(param_shapes(config)["wpe.weight"], dtype=cache.dtype)
            dwpe[:T] = dx.sum(axis=0)
            grads["wpe.weight"] = dwpe
        if config.tie_embeddings:
            # wte is used twice, lookup and head: the lookup's gradient is added to the head's in place
            grads["wte.weight"] = ops.embedding_backward(dx, cache.wte, out=dhead_weight)
        else:
            grads["wte.weight"] = ops.embedding_backward(dx, cache.wte)  # [V, C]
            grads["lm_head.weight"] = dhead_weight
        return {name: grads[name] for name in param_shapes(config)}
