"""The head and the log-probs in one op pair, at the scored positions only (no twin in the reading
edition, which computes every logit: kto_np.model's head, then kto_np.logprobs).

A KTO step needs the log-probability of each completion token, so it needs the logits only at the
positions t whose next token t + 1 is a completion token (completion_mask[b, t + 1] != 0). The logits at
the prompt's and the padding's positions are multiplied by 0 in the sum, and their gradient is 0: this
pair never makes them. x_final [B, T, C] -> the N scored rows [N, C] -> logits [N, V] -> log-probs [B];
the backward goes the same way back and writes 0 into dx_final elsewhere.

In a batch whose completions fill ~60 % of the positions this saves ~40 % of the head's matrix products
(at GPT-2's vocabulary about half of a step's) and of the log-softmax over the vocabulary. The numbers
are those of the full logits (tests/test_fast.py compares them with model.forward + sequence_logprobs).
step.py uses the pair for a fast GPT (build(..., fast=True)); the rest of the log-prob work is
kto_np.fast.logprobs' (the blocked log-softmax and its backward, dlogits written into the logits).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..backend import array_module
from ..logprobs import LogprobsCache
from .logprobs import _logprobs_backward_into, _logsumexp_last

__all__ = ["HeadLogprobsCache", "head_logprobs_backward", "head_logprobs_forward"]


class HeadLogprobsCache(NamedTuple):
    logits: LogprobsCache  # of the [1, N, V] logits at the scored positions (the backward overwrites them)
    rows: Any  # [N] each scored position's row b (its dlogp scales it)
    positions: Any  # [N] its row in x_final.reshape(-1, C): b T + t (its logits score token t + 1), or packed
    x_rows: Any  # [N, C] the hidden states there
    head_weight: Any  # [V, C]
    x_shape: tuple  # x_final's: (B, T, C), or packed (M, C)


def head_logprobs_forward(x_final, head_weight, tokens, completion_mask, row_starts=None):
    """Shifted completion log-probs [B] from the last hidden states, logits = x_final @ head_weight.T
    computed only where completion_mask[b, t + 1] != 0 (the N positions whose logits score a completion
    token): x_final [B, T, C], head_weight [V, C], tokens and completion_mask [B, T] -> logps [B], cache.
    With row_starts [B] (kto_np.fast.packed), x_final is the packed rows [M, C]: position t of row b is
    x_final[row_starts[b] + t].

    The same numbers as sequence_logprobs_forward(x_final @ head_weight.T, tokens, completion_mask).
    """
    xp = array_module(x_final)
    B, T = tokens.shape
    C = x_final.shape[-1]
    tokens = xp.asarray(tokens)  # host arrays join the hidden states' module
    completion_mask = xp.asarray(completion_mask, dtype=x_final.dtype)
    # the scored entries of the shifted [B, T - 1] mask, flat: entry b (T - 1) + t is position b T + t
    scored = xp.flatnonzero(completion_mask[:, 1:])  # [N]
    rows = scored // max(T - 1, 1)
    positions = scored + rows  # b T + t
    x_positions = positions if row_starts is None else xp.asarray(row_starts).take(rows) + positions - rows * T
    x_rows = x_final.reshape(-1, C).take(x_positions, axis=0)  # [N, C]
    logits = (x_rows @ head_weight.T)[None]  # [1, N, V]
    targets = tokens.reshape(-1).take(positions + 1)[None]  # [1, N]
    weights = completion_mask.reshape(-1).take(positions + 1)[None]  # [1, N]
    lse = _logsumexp_last(logits)  # [1, N]
    target_logits = xp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [1, N]
    token_logps = xp.zeros(B * (T - 1), dtype=x_final.dtype)  # 0 where nothing is scored, as the mask makes it
    token_logps[scored] = ((target_logits - lse) * weights)[0]
    logps = token_logps.reshape(B, T - 1).sum(axis=1)  # [B]
    cache = HeadLogprobsCache(LogprobsCache(logits, targets, weights, lse), rows, x_positions, x_rows, head_weight,
                              tuple(x_final.shape))
    return logps, cache


def head_logprobs_backward(dlogps, cache: HeadLogprobsCache):
    """(dx_final of x_final's shape, dhead_weight [V, C]) of head_logprobs_forward: dlogits at the scored
    positions (written into the cached logits), then back through logits = x_rows @ head_weight.T;
    dx_final is 0 where nothing is scored."""
    logits, targets, weights, lse = cache.logits
    xp = array_module(logits)
    C = cache.x_shape[-1]
    # each scored position's scale: its mask value times its row's dlogp
    scale = weights * xp.asarray(dlogps, dtype=logits.dtype).take(cache.rows)[None]  # [1, N]
    dlogits = _logprobs_backward_into(xp.ones(1, dtype=logits.dtype), LogprobsCache(logits, targets, scale, lse),
                                      out=logits)[0]  # [N, V]
    dx_final = xp.zeros(cache.x_shape, dtype=logits.dtype)
    dx_final.reshape(-1, C)[cache.positions] = dlogits @ cache.head_weight  # [N, C]
    dhead_weight = dlogits.T @ cache.x_rows  # [V, C]
    return dx_final, dhead_weight
