"""Autoregressive generation with a key/value cache (eval mode: no dropout).

forward_with_cache runs the model on new tokens only, appending each layer's keys and values to a
KVCache and attending over everything cached; positions continue from the cache length. Its logits
equal those of GPT.forward on the whole sequence. generate() decodes greedily or by sampling.
Shape letters: B batch, T time, C channels, V vocabulary, NH heads, HS head size, L layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import array_module, to_numpy
from .layers import (
    causal_mask,
    gelu_forward,
    layernorm_forward,
    linear_forward,
    merge_heads,
    softmax_forward,
    split_heads,
)
from .model import GPT, LAYERNORM_EPS
from .validation import check_finite_scalar, check_positive_int

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
    def capacity(self) -> int:
        return self.keys[0].shape[2]


def _cached_attention(params: dict, prefix: str, x, kv_cache: KVCache, layer: int, num_heads: int):
    """Attention of the new positions over cached + new keys.  x [B, Tn, C] -> [B, Tn, C].

    Writes this layer's new keys and values at positions start..start+Tn-1 of the cache.
    """
    xp = array_module(x)
    B, Tn, C = x.shape
    start = kv_cache.length
    end = start + Tn
    qkv, _ = linear_forward(x, params[prefix + "attn.c_attn.weight"], params[prefix + "attn.c_attn.bias"])
    q, k, v = (xp.ascontiguousarray(split_heads(part, num_heads))
               for part in xp.split(qkv, 3, axis=-1))  # [B, NH, Tn, HS]
    kv_cache.keys[layer][:, :, start:end] = k
    kv_cache.values[layer][:, :, start:end] = v
    keys = kv_cache.keys[layer][:, :, :end]  # [B, NH, end, HS]
    values = kv_cache.values[layer][:, :, :end]
    scores = q @ keys.transpose(0, 1, 3, 2)  # [B, NH, Tn, end]
    scores *= 1.0 / math.sqrt(C // num_heads)
    probs, _ = softmax_forward(scores, mask=causal_mask(Tn, end, xp))
    y = merge_heads(probs @ values)  # [B, Tn, C]
    out, _ = linear_forward(y, params[prefix + "attn.c_proj.weight"], params[prefix + "attn.c_proj.bias"])
    return out


def forward_with_cache(model: GPT, params: dict, tokens, kv_cache: KVCache | None = None):
    """Logits of the new tokens given everything already in kv_cache (eval mode).

    tokens [B, Tn] int are at positions kv_cache.length .. kv_cache.length + Tn - 1; the cache is
    extended in place. Returns (logits [B, Tn, V], kv_cache). With kv_cache=None a new one of capacity
    max_seq_len is made. Same numbers as GPT.forward on the whole sequence.
    """
    config = model.config
    model.check_params(params)
    xp = array_module(params["wte.weight"])
    tokens = xp.asarray(model.check_tokens(tokens))
    B, Tn = tokens.shape
    if kv_cache is None:
        kv_cache = KVCache.empty(model, B, xp=xp)
    if not isinstance(kv_cache, KVCache):
        raise TypeError(f"kv_cache must be a KVCache, got {type(kv_cache).__name__}")
    if kv_cache.keys[0].shape[0] != B:
        raise ValueError(f"tokens must have the cache's batch size {kv_cache.keys[0].shape[0]}, got {B}")
    start = kv_cache.length
    if start + Tn > kv_cache.capacity:
        raise ValueError(
            f"tokens would fill positions up to {start + Tn}, beyond the cache capacity {kv_cache.capacity} "
            f"(max_seq_len={config.max_seq_len})")

    x = params["wte.weight"][tokens]  # [B, Tn, C]
    x += model.position_embeddings(params, Tn, start)
    for layer in range(config.num_layers):
        p = f"h.{layer}."
        ln_1_out, _ = layernorm_forward(x, params[p + "ln_1.weight"], params[p + "ln_1.bias"], LAYERNORM_EPS)
        x = x + _cached_attention(params, p, ln_1_out, kv_cache, layer, config.num_heads)
        ln_2_out, _ = layernorm_forward(x, params[p + "ln_2.weight"], params[p + "ln_2.bias"], LAYERNORM_EPS)
        fc_out, _ = linear_forward(ln_2_out, params[p + "mlp.c_fc.weight"], params[p + "mlp.c_fc.bias"])
        gelu_out, _ = gelu_forward(fc_out)
        mlp_out, _ = linear_forward(gelu_out, params[p + "mlp.c_proj.weight"], params[p + "mlp.c_proj.bias"])
        x = x + mlp_out
    kv_cache.length = start + Tn
    x_final, _ = layernorm_forward(x, params["ln_f.weight"], params["ln_f.bias"], LAYERNORM_EPS)
    head_weight = params["wte.weight"] if config.tie_embeddings else params["lm_head.weight"]  # [V, C]
    logits = x_final @ head_weight.T  # [B, Tn, V]
    return logits, kv_cache


def _next_tokens(last_logits, temperature: float, top_k: int | None, rng) -> np.ndarray:
    """One token per row from last_logits [B, V]: argmax when temperature == 0, else a sample of
    softmax(logits / temperature) restricted to the top_k largest logits. Returns int64 [B] on the host."""
    logits = to_numpy(last_logits).astype(np.float64)
    if temperature == 0.0:
        return logits.argmax(axis=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]  # [B, 1]
        logits = np.where(logits >= kth_largest, logits, -np.inf)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
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
        if rng is None:
            raise ValueError("rng must be a numpy.random.Generator when temperature > 0, got None")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if stop_token is not None:
        stop_token = check_positive_int("stop_token", stop_token, minimum=0)
        if stop_token >= config.vocab_size:
            raise ValueError(f"stop_token must be in [0, {config.vocab_size}), got {stop_token}")
    if max_new_tokens == 0:
        return prompt
    if not isinstance(model, GPT):  # Edifice's backbone has no key/value cache: re-run the whole forward
        return _generate_by_recomputation(model, params, prompt, max_new_tokens, temperature, top_k, rng,
                                          stop_token)

    xp = array_module(params["wte.weight"])
    kv_cache = KVCache.empty(model, B, capacity=T0 + max_new_tokens, xp=xp)
    logits, kv_cache = forward_with_cache(model, params, prompt, kv_cache)
    generated = []
    stopped = np.zeros(B, dtype=bool)
    for step in range(max_new_tokens):
        next_tokens = _next_tokens(logits[:, -1], temperature, top_k, rng)  # [B]
        if stop_token is not None:
            next_tokens = np.where(stopped, stop_token, next_tokens)
            stopped |= next_tokens == stop_token
        generated.append(next_tokens)
        if stopped.all() or step == max_new_tokens - 1:
            break
        logits, kv_cache = forward_with_cache(model, params, next_tokens[:, None], kv_cache)
    return np.concatenate([prompt, np.stack(generated, axis=1)], axis=1)


def _generate_by_recomputation(model, params: dict, prompt: np.ndarray, max_new_tokens: int,
                               temperature: float, top_k: int | None, rng, stop_token: int | None) -> np.ndarray:
    """generate() for a model without a key/value cache: each new token runs model.forward on the whole
    sequence so far (the same tokens as a cached model would give, at T times the cost)."""
    tokens = prompt
    stopped = np.zeros(prompt.shape[0], dtype=bool)
    for _ in range(max_new_tokens):
        logits, _ = model.forward(params, tokens, keep_cache=False)  # [B, T, V]
        next_tokens = _next_tokens(logits[:, -1], temperature, top_k, rng)  # [B]
        if stop_token is not None:
            next_tokens = np.where(stopped, stop_token, next_tokens)
            stopped |= next_tokens == stop_token
        tokens = np.concatenate([tokens, next_tokens[:, None]], axis=1)
        if stopped.all():
            break
    return tokens
