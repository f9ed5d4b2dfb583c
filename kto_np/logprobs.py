"""Log-probabilities of token sequences and their gradient with respect to the logits: the reading edition.

Shape letters: B batch, T time, V vocabulary.

Two conventions:
- `compute_logprobs(logits, targets, mask)`: the seed contract, no shift. Position t's logits score
  targets[b, t]: logp[b] = sum_t mask[b, t] * log_softmax(logits[b, t])[targets[b, t]].
- `sequence_logprobs(logits, tokens, completion_mask)`: the language-model convention (as in TRL).
  The logits at position t score the next token t + 1, and only completion tokens count:
  logp[b] = sum_{t >= 1} completion_mask[b, t] * log_softmax(logits[b, t - 1])[tokens[b, t]].

The backward of both is dlogits = mask * dlogp * (onehot(target) - softmax(logits)).

`log_softmax`, `compute_logprobs` and `sequence_logprobs` are the doors: they check their arguments.
The forward/backward pairs (`logprobs_*`, `sequence_logprobs_*`) assume valid arguments, written as
their formulas over whole arrays; `kto_np.fast.logprobs` computes the same numbers a block at a time.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .backend import array_module, to_numpy
from .validation import as_float_array, as_index_array, check_same_shape

__all__ = [
    "LogprobsCache",
    "SequenceLogprobsCache",
    "compute_logprobs",
    "log_softmax",
    "logprobs_backward",
    "logprobs_forward",
    "sequence_logprobs",
    "sequence_logprobs_backward",
    "sequence_logprobs_forward",
]


# ----------------------------------------------------------------------------------------------
# the ops (unchecked)


class LogprobsCache(NamedTuple):
    logits: object  # [B, T, V] (a reference to the forward's input, not a copy)
    targets: object  # [B, T] int
    mask: object  # [B, T] in the logits dtype
    logsumexp: object  # [B, T]


def logprobs_forward(logits, targets, mask=None):
    """Per-sequence log-probabilities, no shift: [B, T, V], [B, T], [B, T] or None -> [B], cache.

    logp[b] = sum_t mask[b, t] * (logits[b, t, targets[b, t]] - logsumexp(logits[b, t])),
    logsumexp(x) = max(x) + log(sum(exp(x - max(x)))). mask None counts every token; a fully masked
    row gives 0. The result has the dtype of logits.
    """
    xp = array_module(logits)
    targets = xp.asarray(targets)  # the backward compares and indexes with them: on the logits' module
    mask = xp.ones(targets.shape, dtype=logits.dtype) if mask is None else xp.asarray(mask, dtype=logits.dtype)
    row_max = logits.max(axis=-1, keepdims=True)  # [B, T, 1]
    logsumexp = row_max[..., 0] + xp.log(xp.exp(logits - row_max).sum(axis=-1))  # [B, T]
    target_logits = xp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    logps = ((target_logits - logsumexp) * mask).sum(axis=1)  # [B]
    return logps, LogprobsCache(logits, targets, mask, logsumexp)


def logprobs_backward(dlogps, cache: LogprobsCache):
    """dlogits[b, t, v] = mask[b, t] * dlogps[b] * (onehot(targets[b, t])_v - softmax(logits[b, t])_v).

    dlogps [B] -> dlogits [B, T, V] in the logits dtype.
    """
    logits, targets, mask, logsumexp = cache
    xp = array_module(logits)
    softmax = xp.exp(logits - logsumexp[..., None])  # [B, T, V]
    onehot = targets[..., None] == xp.arange(logits.shape[-1])  # [B, T, V] bool
    scale = (mask * xp.asarray(dlogps, dtype=logits.dtype)[:, None])[..., None]  # [B, T, 1]
    return scale * onehot - scale * softmax


class SequenceLogprobsCache(NamedTuple):
    shifted: LogprobsCache  # of logits[:, :-1] scoring tokens[:, 1:]
    logits: object  # [B, T, V] the forward's input (a reference, not a copy)


def sequence_logprobs_forward(logits, tokens, completion_mask):
    """Shifted log-probabilities of the completion tokens: [B, T, V], [B, T], [B, T] -> [B], cache.

    logp[b] = sum_{t=1}^{T-1} completion_mask[b, t] * log_softmax(logits[b, t-1])[tokens[b, t]]:
    logprobs_forward of logits[:, :-1] scoring tokens[:, 1:]. completion_mask[b, 0] is ignored
    (the first token has no logits before it).
    """
    logps, shifted_cache = logprobs_forward(logits[:, :-1], tokens[:, 1:], completion_mask[:, 1:])
    return logps, SequenceLogprobsCache(shifted_cache, logits)


def sequence_logprobs_backward(dlogps, cache: SequenceLogprobsCache):
    """dlogits [B, T, V] of the shifted log-probs: logprobs_backward at positions 0..T-2, and zero at the
    last position (its logits score no token)."""
    dlogits = array_module(cache.logits).zeros_like(cache.logits)
    dlogits[:, :-1] = logprobs_backward(dlogps, cache.shifted)
    return dlogits


# ----------------------------------------------------------------------------------------------
# the doors (checked)


def _check_logsumexp(logits, axis: int = -1) -> None:
    """Finite logits whose rows span more than the dtype holds (max - min overflows) overflow in
    logits - max(logits) on the way to the log-sum-exp: rejected by name."""
    xp = array_module(logits)
    with np.errstate(over="ignore"):  # reported below, by name
        spread = xp.max(logits, axis=axis) - xp.min(logits, axis=axis)
    if not bool(xp.isfinite(spread).all()):
        raise ValueError(f"logits are finite but too large: their log-sum-exp overflows {logits.dtype} "
                         "(max - min of a row is not finite)")


def log_softmax(logits, axis: int = -1):
    """log_softmax(x)_i = x_i - max(x) - log(sum_j exp(x_j - max(x))); same shape and dtype as x.

    The door-checked whole-array formula (tutorial 02 builds on it).
    """
    logits = as_float_array("logits", logits)
    _check_logsumexp(logits, axis)
    xp = array_module(logits)
    shifted = logits - xp.max(logits, axis=axis, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=axis, keepdims=True))


def _validate(logits, targets, mask, targets_name="targets", mask_name="mask"):
    """The door check of both conventions: logits [B, T, V] finite floats, targets [B, T] ids in [0, V),
    mask [B, T] (None: all ones) in [0, 1], in the logits dtype."""
    logits = as_float_array("logits", logits, ndim=3)
    _check_logsumexp(logits)
    B, T, V = logits.shape
    targets = as_index_array(targets_name, targets, upper=V)
    if tuple(targets.shape) != (B, T):
        raise ValueError(
            f"{targets_name} must have shape (B, T) = {(B, T)} to match logits {(B, T, V)}, "
            f"got {tuple(targets.shape)}"
        )
    xp = array_module(logits)
    if mask is None:
        mask = xp.ones((B, T), dtype=logits.dtype)
    else:
        mask = as_float_array(mask_name, mask, allow_empty=True)
        if mask.size and not bool(((mask >= 0) & (mask <= 1)).all()):  # 0/1, or weights in between
            bad = [float(v) for v in to_numpy(mask[(mask < 0) | (mask > 1)][:3]).tolist()]
            raise ValueError(f"{mask_name} must be in [0, 1] (1: the token counts, 0: it does not), got {bad}")
        check_same_shape(mask_name, mask, targets_name, targets)
        mask = xp.asarray(mask, dtype=logits.dtype)
    return logits, targets, mask


def _checked_logps(forward, logits, targets, mask):
    """forward(...)[0] on checked arguments; a sum over the sequence that overflows is rejected by name."""
    xp = array_module(logits)
    with np.errstate(over="ignore", invalid="ignore"):  # reported below, by name
        logps = forward(logits, targets, mask)[0]
    if not bool(xp.isfinite(logps).all()):
        raise ValueError(f"logits are finite but too large: their log-probabilities overflow {logits.dtype} "
                         "(summed over the sequence)")
    return logps


def compute_logprobs(logits, targets, mask=None):
    """Per-sequence sums [B] of log_softmax(logits)[b, t, targets[b, t]] * mask[b, t] (no shift).

    logits [B, T, V] float; targets [B, T] integers in [0, V); mask [B, T] in [0, 1] or None (all ones).
    """
    return _checked_logps(logprobs_forward, *_validate(logits, targets, mask))


def sequence_logprobs(logits, tokens, completion_mask):
    """Shifted completion log-probabilities [B] (see sequence_logprobs_forward).

    logits [B, T, V] float with T >= 2; tokens [B, T] integers in [0, V); completion_mask [B, T] in
    [0, 1], 1 on the completion tokens (no default: all ones would score the prompt tokens too).
    """
    if completion_mask is None:
        raise TypeError("completion_mask must be an array of 0/1 (1 on completion tokens), got None")
    logits, tokens, completion_mask = _validate(logits, tokens, completion_mask, "tokens", "completion_mask")
    if logits.shape[1] < 2:
        raise ValueError(f"sequences need at least 2 tokens for a shifted log-prob, got T={logits.shape[1]}")
    return _checked_logps(sequence_logprobs_forward, logits, tokens, completion_mask)
