"""Log-probabilities of token sequences and their gradient with respect to the logits.

Shape letters: B batch, T time, V vocabulary.

Two conventions:
- `compute_logprobs(logits, targets, mask)`: the seed contract, no shift. Position t's logits score
  targets[b, t]: logp[b] = sum_t mask[b, t] * log_softmax(logits[b, t])[targets[b, t]].
- `sequence_logprobs(logits, tokens, completion_mask)`: the language-model convention (as in TRL).
  The logits at position t score the next token t + 1, and only completion tokens count:
  logp[b] = sum_{t >= 1} completion_mask[b, t] * log_softmax(logits[b, t - 1])[tokens[b, t]].

The backward of both is dlogits = mask * (onehot(target) - softmax(logits)) * dlogp, written into one
[B, T, V] array (the result) without other [B, T, V] temporaries. The forward never holds more than
a chunk of rows of exp(logits) at a time.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .backend import array_module
from .validation import as_float_array, as_index_array, check_same_shape

__all__ = [
    "LogprobsCache",
    "compute_logprobs",
    "log_softmax",
    "logprobs_backward",
    "logprobs_forward",
    "sequence_logprobs",
    "sequence_logprobs_backward",
    "sequence_logprobs_forward",
]

# Rows of the [rows, V] logits processed at once by the forward: bounds the exp() temporary.
_CHUNK_ELEMENTS = 1 << 22


def log_softmax(logits, axis: int = -1):
    """log_softmax(x)_i = x_i - max(x) - log(sum_j exp(x_j - max(x))); same shape and dtype as x."""
    xp = array_module(logits)
    shifted = logits - xp.max(logits, axis=axis, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=axis, keepdims=True))


def _logsumexp_last(logits):
    """logsumexp over the last axis, [..., V] -> [...], a chunk of rows at a time."""
    xp = array_module(logits)
    V = logits.shape[-1]
    rows = logits.reshape(-1, V)  # a view when logits is contiguous
    out = xp.empty(rows.shape[0], dtype=logits.dtype)
    step = max(1, _CHUNK_ELEMENTS // max(V, 1))
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step]
        row_max = xp.max(chunk, axis=1)
        shifted = chunk - row_max[:, None]  # the one temporary, [step, V]
        xp.exp(shifted, out=shifted)
        out[start : start + step] = row_max + xp.log(xp.sum(shifted, axis=1))
    return out.reshape(logits.shape[:-1])


def _check_all_finite(name: str, arr) -> None:
    """Reject NaN/inf without a [B, T, V] boolean temporary: a float64 sum is finite iff every entry
    is (up to overflow of huge finite values, which the exact check below then rules out)."""
    xp = array_module(arr)
    if not bool(xp.isfinite(xp.sum(arr, dtype=np.float64))):
        bad = int((~xp.isfinite(arr)).sum())
        if bad:
            raise ValueError(f"{name} must be finite, got {bad} NaN or infinite value(s)")


class LogprobsCache(NamedTuple):
    logits: object  # [B, T, V] (a reference to the forward's input, not a copy)
    targets: object  # [B, T] int
    mask: object  # [B, T] in the logits dtype
    logsumexp: object  # [B, T]


def _validate(logits, targets, mask, logits_name="logits", targets_name="targets", mask_name="mask"):
    logits = as_float_array(logits_name, logits, ndim=3, finite=False)
    _check_all_finite(logits_name, logits)
    B, T, V = logits.shape
    targets = as_index_array(targets_name, targets, upper=V)
    if tuple(targets.shape) != (B, T):
        raise ValueError(
            f"{targets_name} must have shape (B, T) = {(B, T)} to match {logits_name} {(B, T, V)}, "
            f"got {tuple(targets.shape)}"
        )
    xp = array_module(logits)
    if mask is None:
        mask = xp.ones((B, T), dtype=logits.dtype)
    else:
        mask = as_float_array(mask_name, mask, allow_empty=True)
        check_same_shape(mask_name, mask, targets_name, targets)
        mask = xp.asarray(mask, dtype=logits.dtype)
    return logits, targets, mask


def logprobs_forward(logits, targets, mask=None):
    """Per-sequence log-probabilities, no shift: [B, T, V], [B, T], [B, T] -> [B], cache.

    logp[b] = sum_t mask[b, t] * (logits[b, t, targets[b, t]] - logsumexp(logits[b, t])).
    A fully masked row gives 0. The result has the dtype of logits.
    """
    logits, targets, mask = _validate(logits, targets, mask)
    xp = array_module(logits)
    lse = _logsumexp_last(logits)  # [B, T]
    target_logits = xp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    token_logps = (target_logits - lse) * mask  # [B, T]
    return token_logps.sum(axis=1), LogprobsCache(logits, targets, mask, lse)


def logprobs_backward(dlogps, cache: LogprobsCache, out=None):
    """dlogits[b, t, v] = mask[b, t] * dlogps[b] * (onehot(targets[b, t])_v - softmax(logits[b, t])_v).

    dlogps: [B]. Returns dlogits [B, T, V] in the logits dtype, written into `out` when given.
    """
    logits, targets, mask, lse = cache
    xp = array_module(logits)
    B = logits.shape[0]
    dlogps = as_float_array("dlogps", dlogps, ndim=1)
    if dlogps.shape[0] != B:
        raise ValueError(f"dlogps must have shape ({B},), got {tuple(dlogps.shape)}")
    scale = mask * xp.asarray(dlogps, dtype=logits.dtype)[:, None]  # [B, T]
    if out is None:
        out = xp.empty_like(logits)
    # softmax = exp(logits - lse), computed in the output buffer itself
    xp.subtract(logits, lse[..., None], out=out)
    xp.exp(out, out=out)
    out *= -scale[..., None]
    # + the one-hot term at each target
    b_idx, t_idx = xp.indices(targets.shape)
    out[b_idx, t_idx, targets] += scale
    return out


def compute_logprobs(logits, targets, mask=None):
    """Per-sequence sums [B] of log_softmax(logits)[b, t, targets[b, t]] * mask[b, t] (no shift).

    logits [B, T, V] float; targets [B, T] integers in [0, V); mask [B, T] or None (all ones).
    """
    return logprobs_forward(logits, targets, mask)[0]


def sequence_logprobs_forward(logits, tokens, completion_mask):
    """Shifted log-probabilities of the completion tokens: [B, T, V], [B, T], [B, T] -> [B], cache.

    logp[b] = sum_{t=1}^{T-1} completion_mask[b, t] * log_softmax(logits[b, t-1])[tokens[b, t]].
    completion_mask[b, 0] is ignored (the first token has no logits before it).
    """
    logits = as_float_array("logits", logits, ndim=3, finite=False)
    tokens = as_index_array("tokens", tokens, upper=logits.shape[2])
    if tokens.ndim != 2 or tuple(tokens.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"tokens must have shape (B, T) = {tuple(logits.shape[:2])} to match logits, "
            f"got {tuple(tokens.shape)}"
        )
    completion_mask = as_float_array("completion_mask", completion_mask, allow_empty=True)
    check_same_shape("completion_mask", completion_mask, "tokens", tokens)
    if logits.shape[1] < 2:
        raise ValueError(f"sequences need at least 2 tokens for a shifted log-prob, got T={logits.shape[1]}")
    return logprobs_forward(logits[:, :-1], tokens[:, 1:], completion_mask[:, 1:])


def sequence_logprobs_backward(dlogps, cache: LogprobsCache):
    """dlogits [B, T, V] of the shifted log-probs; the last position gets zero gradient."""
    logits_view = cache.logits  # logits[:, :-1]
    xp = array_module(logits_view)
    B, T_minus_1, V = logits_view.shape
    dlogits = xp.empty((B, T_minus_1 + 1, V), dtype=logits_view.dtype)
    dlogits[:, -1] = 0
    logprobs_backward(dlogps, cache, out=dlogits[:, :-1])
    return dlogits


def sequence_logprobs(logits, tokens, completion_mask):
    """Shifted completion log-probabilities [B] (see sequence_logprobs_forward)."""
    return sequence_logprobs_forward(logits, tokens, completion_mask)[0]
