"""Autoregressive generation with a key/value cache (eval mode: no dropout).

Generation has its own forward path: `forward_with_cache` runs GPT-2's forward on the new tokens only,
appending each layer's keys and values to a KVCache and attending over everything cached, positions
continuing from the cache length, with the same logits as GPT.forward over the whole sequence. The
training ops (layers.attention_forward, GPT.forward) know nothing of it. generate() decodes greedily or
by sampling. Shape letters: B batch, T time, Tn new tokens, Tk cached keys, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import array_module, to_numpy
from .layers import LAYERNORM_EPS, causal_mask, merge_heads
from .model import GPT, GPTConfig
from .validation import check_finite_scalar, check_positive_int, check_rng

__all__ = ["KVCache", "forward_with_cache", "generate"]


@dataclass
class KVCache:
    """Keys and values of every layer for the first `length` positions (buffers of `capacity`)."""

    keys: list  # L x [B, NH, capacity, HS]
    values: list  # L x [B, NH, capacity, HS]
    length: int  # positions filled so far

    @classmethod
    def empty(cls, model: GPT, batch_size: int, capacity: int | None = None, xp: Any = np) -> KVCache:
        """Zeroed buffers for batch_size sequences of up to capacity (default max_seq_len) positions."""
        config = model.config
        capacity = config.max_seq_len if capacity is None else capacity
        check_positive_int("batch_size", batch_size)
        check_positive_int("capacity", capacity)
        if capacity > config.max_seq_len:
            raise ValueError(f"capacity must be <= max_seq_len={config.max_seq_len}, got {capacity}")
        shape = (batch_size, config.num_heads, capacity, config.head_size)
        keys = [xp.zeros(shape, dtype=config.np_dtype) for _ in range(config.num_layers)]
        values = [xp.zeros(shape, dtype=config.np_dtype) for _ in range(config.num_layers)]
        return cls(keys, values, 0)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def check_room(self, tokens, config: GPTConfig) -> None:
        """tokens [B, Tn] fit: the cache's batch size, and length + Tn <= capacity."""
        B, Tn = tokens.shape
        if B != self.batch_size:
            raise ValueError(f"tokens must have the cache's batch size {self.batch_size}, got {B}")
        if self.length + Tn > self.capacity:
            raise ValueError(
                f"tokens would fill positions up to {self.length + Tn}, beyond the cache capacity "
                f"{self.capacity} (max_seq_len={config.max_seq_len})")


def _cached_attention(x, params: dict, prefix: str, config: GPTConfig, ops, keys, values, start: int):
    """GPT-2 attention of new positions start..start+Tn-1 over every cached key (eval mode).

    k, v of the new positions are written into the cache buffers keys, values [B, NH, capacity, HS];
    the queries attend over the Tk = start + Tn keys so far.  x [B, Tn, C] -> out [B, Tn, C].
    """
    B, Tn, C = x.shape
    NH, HS = config.num_heads, config.head_size
    qkv, _ = ops.linear_forward(x, params[prefix + "attn.c_attn.weight"], params[prefix + "attn.c_attn.bias"])
    q, k, v = qkv.reshape(B, Tn, 3, NH, HS).transpose(2, 0, 3, 1, 4)  # 3 x [B, NH, Tn, HS]
    keys[:, :, start:start + Tn], values[:, :, start:start + Tn] = k, v
    k, v = keys[:, :, :start + Tn], values[:, :, :start + Tn]  # [B, NH, Tk, HS]
    scores = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(HS)  # [B, NH, Tn, Tk]
    probs, _ = ops.softmax_forward(scores, mask=causal_mask(Tn, start + Tn, array_module(x)))
    out, _ = ops.linear_forward(merge_heads(probs @ v), params[prefix + "attn.c_proj.weight"],
                                params[prefix + "attn.c_proj.bias"])
    return out


def _cached_forward(model: GPT, params: dict, tokens, kv_cache: KVCache):
    """GPT.forward in eval mode for tokens [B, Tn] at positions kv_cache.length.., on checked arguments;
    extends the cache. Returns logits [B, Tn, V]."""
    config, ops = model.config, model.ops
    xp = array_module(params["wte.weight"])
    tokens = xp.asarray(tokens)
    start = kv_cache.length
    x = params["wte.weight"][tokens] + model.position_embeddings(params, tokens.shape[1], start)
    for layer in range(config.num_layers):
        p = f"h.{layer}."
        h, _ = ops.layernorm_forward(x, params[p + "ln_1.weight"], params[p + "ln_1.bias"], LAYERNORM_EPS)
        x = x + _cached_attention(h, params, p, config, ops, kv_cache.keys[layer], kv_cache.values[layer], start)
        h, _ = ops.layernorm_forward(x, params[p + "ln_2.weight"], params[p + "ln_2.bias"], LAYERNORM_EPS)
        h, _ = ops.linear_forward(h, params[p + "mlp.c_fc.weight"], params[p + "mlp.c_fc.bias"])
        h, _ = ops.gelu_forward(h)
        h, _ = ops.linear_forward(h, params[p + "mlp.c_proj.weight"], params[p + "mlp.c_proj.bias"])
        x = x + h
    kv_cache.length = start + tokens.shape[1]
    x, _ = ops.layernorm_forward(x, params["ln_f.weight"], params["ln_f.bias"], LAYERNORM_EPS)
    head_weight = params["wte.weight"] if config.tie_embeddings else params["lm_head.weight"]  # [V, C]
    return x @ head_weight.T


def forward_with_cache(model: GPT, params: dict, tokens, kv_cache: KVCache | None = None):
    """Logits of the new tokens given everything already in kv_cache (eval mode).

    tokens [B, Tn] int are at positions kv_cache.length .. kv_cache.length + Tn - 1; the cache is
    extended in place. Returns (logits [B, Tn, V], kv_cache). With kv_cache=None a new one of capacity
    max_seq_len is made. Same numbers as GPT.forward on the whole sequence.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a GPT (Edifice's network has no key/value cache), got "
                        f"{type(model).__name__}")
    model.check_params(params)
    tokens = model.check_tokens(tokens)
    if kv_cache is None:
        kv_cache = KVCache.empty(model, tokens.shape[0], xp=array_module(params["wte.weight"]))
    elif not isinstance(kv_cache, KVCache):
        raise TypeError(f"kv_cache must be a KVCache, got {type(kv_cache).__name__}")
    kv_cache.check_room(tokens, model.config)
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite logits are reported below, by name
        logits = _cached_forward(model, params, tokens, kv_cache)
    if not bool(array_module(logits).isfinite(logits).all()):
        raise ValueError("params give non-finite logits: params must be finite and small enough that the "
                         "activations do not overflow")
    return logits, kv_cache


def _next_tokens(last_logits, temperature: float, top_k: int | None, rng) -> np.ndarray:
    """One token per row from last_logits [B, V]: argmax when temperature == 0, else a sample of
    softmax(logits / temperature) restricted to the top_k largest logits. Returns int64 [B] on the host."""
    logits = to_numpy(last_logits).astype(np.float64)
    if temperature == 0.0:
        return logits.argmax(axis=-1)
    with np.errstate(over="ignore", under="ignore"):  # a tiny temperature sends the others to -inf: greedy
        logits = (logits - logits.max(axis=-1, keepdims=True)) / temperature  # <= 0, the largest 0
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]  # [B, 1]
        logits = np.where(logits >= kth_largest, logits, -np.inf)
    probs = np.exp(logits)
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)


def generate(model: GPT, params: dict, prompt_tokens, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, rng: np.random.Generator | None = None,
             stop_token: int | None = None):
    """Extend prompt_tokens [B, T0] by up to max_new_tokens tokens -> tokens [B, T0 + n] (host int64).

    temperature 0 is greedy (argmax); temperature > 0 samples from softmax(logits / temperature),
    restricted to the top_k most likely tokens when top_k is given, with draws from rng (required).
    A row that has produced stop_token keeps producing stop_token; generation ends early (n <
    max_new_tokens) once every row has. T0 + max_new_tokens must not exceed max_seq_len.
    """
    if not all(callable(getattr(model, method, None)) for method in ("forward", "check_params", "check_tokens")):
        raise TypeError(f"model must be a model from kto_np (build, Edifice), got {type(model).__name__}")
    config = model.config
    prompt = to_numpy(model.check_tokens(prompt_tokens, "prompt_tokens")).astype(np.int64)
    B, T0 = prompt.shape
    max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens, minimum=0)
    if T0 + max_new_tokens > config.max_seq_len:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} with a prompt of {T0} tokens exceeds max_seq_len="
            f"{config.max_seq_len}; use max_new_tokens <= {config.max_seq_len - T0}")
    temperature = check_finite_scalar("temperature", temperature, nonnegative=True)
    if top_k is not None:
        top_k = check_positive_int("top_k", top_k)
        if top_k > config.vocab_size:
            raise ValueError(f"top_k must be <= vocab_size={config.vocab_size}, got {top_k}")
    if temperature > 0.0:
        check_rng(rng, "temperature > 0")
    if stop_token is not None:
        stop_token = check_positive_int("stop_token", stop_token, minimum=0)
        if stop_token >= config.vocab_size:
            raise ValueError(f"stop_token must be in [0, {config.vocab_size}), got {stop_token}")
    model.check_params(params)
    if max_new_tokens == 0:
        return prompt
    if not isinstance(model, GPT):  # Edifice's backbone has no key/value cache: re-run the whole forward
        return _generate_by_recomputation(model, params, prompt, max_new_tokens, temperature, top_k, rng,
                                          stop_token)

    # checked once above: each step runs the model's forward unchecked, on the new token only
    xp = array_module(params["wte.weight"])
    kv_cache = KVCache.empty(model, B, capacity=T0 + max_new_tokens, xp=xp)
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite logits are reported below, by name
        logits = _cached_forward(model, params, prompt, kv_cache)
    generated = []
    stopped = np.zeros(B, dtype=bool)
    for step in range(max_new_tokens):
        if not bool(xp.isfinite(logits[:, -1]).all()):
            raise ValueError(f"params give non-finite logits at generation step {step}: params must be finite "
                             "and small enough that the activations do not overflow")
        next_tokens = _next_tokens(logits[:, -1], temperature, top_k, rng)  # [B]
        if stop_token is not None:
            next_tokens = np.where(stopped, stop_token, next_tokens)
            stopped |= next_tokens == stop_token
        generated.append(next_tokens)
        if stopped.all() or step == max_new_tokens - 1:
            break
        with np.errstate(over="ignore", invalid="ignore"):
            logits = _cached_forward(model, params, next_tokens[:, None], kv_cache)
    return np.concatenate([prompt, np.stack(generated, axis=1)], axis=1)


def _generate_by_recomputation(model, params: dict, prompt: np.ndarray, max_new_tokens: int,
                               temperature: float, top_k: int | None, rng, stop_token: int | None) -> np.ndarray:
    """generate() for a model without a key/value cache: each new token runs model.forward on the whole
    sequence so far (the same tokens as a cached model would give, at T times the cost)."""
    tokens = prompt
    stopped = np.zeros(prompt.shape[0], dtype=bool)
    for _ in range(max_new_tokens):
        logits, _ = model.forward(params, tokens, keep_cache=False)  # [B, T, V]
        if not bool(array_module(logits).isfinite(logits[:, -1]).all()):
            raise ValueError("params give non-finite logits: params must be finite and small enough that the "
                             "activations do not overflow")
        next_tokens = _next_tokens(logits[:, -1], temperature, top_k, rng)  # [B]
        if stop_token is not None:
            next_tokens = np.where(stopped, stop_token, next_tokens)
            stopped |= next_tokens == stop_token
        tokens = np.concatenate([tokens, next_tokens[:, None]], axis=1)
        if stopped.all():
            break
    return tokens
