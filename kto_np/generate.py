"""Autoregressive generation with a key/value cache (eval mode: no dropout).

The model's own forward runs the new tokens only: GPT.forward(..., kv_cache=...) appends each
layer's keys and values to a KVCache and attends over everything cached, positions continuing from
the cache length, with the same logits as a forward over the whole sequence. generate() decodes
greedily or by sampling. Shape letters: B batch, T time, V vocabulary.
"""

from __future__ import annotations

import numpy as np

from .backend import array_module, to_numpy
from .model import GPT, KVCache
from .validation import check_finite_scalar, check_positive_int, check_rng

__all__ = ["KVCache", "forward_with_cache", "generate"]


def forward_with_cache(model: GPT, params: dict, tokens, kv_cache: KVCache | None = None):
    """Logits of the new tokens given everything already in kv_cache (eval mode).

    tokens [B, Tn] int are at positions kv_cache.length .. kv_cache.length + Tn - 1; the cache is
    extended in place. Returns (logits [B, Tn, V], kv_cache). With kv_cache=None a new one of capacity
    max_seq_len is made. Same numbers as GPT.forward on the whole sequence.
    """
    if kv_cache is None:
        model.check_params(params)
        tokens = model.check_tokens(tokens)
        kv_cache = KVCache.empty(model, tokens.shape[0], xp=array_module(params["wte.weight"]))
    logits, _ = model.forward(params, tokens, kv_cache=kv_cache)
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
        logits, _ = model._forward(params, prompt, keep_cache=False, kv_cache=kv_cache)
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
            logits, _ = model._forward(params, next_tokens[:, None], keep_cache=False, kv_cache=kv_cache)
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
