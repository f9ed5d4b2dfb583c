"""Log-probabilities of token sequences and their gradient with respect to the logits.

Shape letters: B batch, T time, V vocabulary.

Two conventions:
- `compute_logprobs(logits, targets, mask)`: the seed contract, no shift. Position t's logits score
  targets[b, t]: logp[b] = sum_t mask[b, t] * log_softmax(logits[b, t])[targets[b, t]].
- `sequence_logprobs(logits, tokens, completion_mask)`: the language-model convention (as in TRL).
  The logits at position t score the next token t + 1, and only completion tokens count:
  logp[b] = sum_{t >= 1} completion_mask[b, t] * log_softmax(logits[b, t - 1])[tokens[b, t]].

The backward of both is dlogits = mask * (onehot(target) - softmax(logits)) * dlogp, written into one
[B, T, V] array (the result, or the logits themselves when the caller hands them over) without other
[B, T, V] temporaries. Forward and backward go over the logits one block of rows at a time (about
1 MiB, cache-sized), so exp(logits) never exists for more than one block.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import array_module, to_numpy
from ..validation import as_float_array, as_index_array, check_bool, check_same_shape

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

# Entries of logits processed at once (1 MiB of float32): a block of rows small enough to stay in
# the L2 cache while max, exp and sum pass over it, so the [B, T, V] logits are read from memory
# about once per pass, and the one temporary stays small.
_CHUNK_ELEMENTS = 1 << 18


def log_softmax(logits, axis: int = -1):
    """log_softmax(x)_i = x_i - max(x) - log(sum_j exp(x_j - max(x))); same shape and dtype as x.

    The whole-array formula (tutorial 02 builds on it); the log-prob functions below compute the same
    one block of rows at a time.
    """
    logits = as_float_array("logits", logits)
    xp = array_module(logits)
    shifted = logits - xp.max(logits, axis=axis, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=axis, keepdims=True))


def _row_blocks(shape):
    """Index tuples cutting [B, T, V] into blocks of about _CHUNK_ELEMENTS entries along B and T.

    Each logits[index] is a view, [b, T, V] or [rows, V] (never a copy, even for the non-contiguous
    shifted view logits[:, :-1], which reshape(-1, V) would copy).
    """
    B, T, V = shape
    rows_per_block = max(1, _CHUNK_ELEMENTS // max(V, 1))
    if rows_per_block >= T:  # whole sequences per block
        sequences = rows_per_block // T
        return [(slice(b, b + sequences),) for b in range(0, B, sequences)]
    return [(b, slice(t, t + rows_per_block)) for b in range(B) for t in range(0, T, rows_per_block)]


def _logsumexp_last(logits, name: str = "logits"):
    """logsumexp over the last axis, [B, T, V] -> [B, T], one block of rows at a time.

    lse = max + log(sum(exp(logits - max))). Raises ValueError naming `name` when an entry is NaN or
    infinite: a NaN or +inf makes its row's max non-finite, a -inf makes (logits - max) non-finite.
    """
    xp = array_module(logits)
    B, T, V = logits.shape
    lse = xp.empty((B, T), dtype=logits.dtype)
    lowest = xp.empty((B, T), dtype=logits.dtype)  # min of logits - max per row: -inf flags a -inf entry
    buffer = xp.empty(min(logits.size, max(_CHUNK_ELEMENTS, V)), dtype=logits.dtype)
    with np.errstate(invalid="ignore"):  # inf - inf in a row with +inf: reported below
        for index in _row_blocks(logits.shape):
            block = logits[index]  # [rows, V] or [b, T, V], a view
            shifted = buffer[:block.size].reshape(block.shape)
            row_max = xp.max(block, axis=-1, keepdims=True)
            xp.subtract(block, row_max, out=shifted)
            lowest[index] = xp.min(shifted, axis=-1)
            xp.exp(shifted, out=shifted)
            lse[index] = row_max[..., 0] + xp.log(xp.sum(shifted, axis=-1))
    if not (bool(xp.isfinite(lse).all()) and bool(xp.isfinite(lowest).all())):
        bad = int((~xp.isfinite(logits)).sum())
        raise ValueError(f"{name} must be finite, got {bad} NaN or infinite value(s)" if bad else
                         f"{name} are finite but too large: their log-sum-exp overflows {logits.dtype}")
    return lse


class LogprobsCache(NamedTuple):
    logits: object  # [B, T, V] (a reference to the forward's input, not a copy)
    targets: object  # [B, T] int
    mask: object  # [B, T] in the logits dtype
    logsumexp: object  # [B, T]


def _validate(logits, targets, mask, targets_name="targets", mask_name="mask"):
    """The door check of both conventions: logits [B, T, V] float, targets [B, T] ids in [0, V), mask
    [B, T] (None: all ones) in the logits dtype. The finiteness of logits is checked by _logsumexp_last
    on its way."""
    logits = as_float_array("logits", logits, ndim=3, finite=False)
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


def logprobs_forward(logits, targets, mask=None):
    """Per-sequence log-probabilities, no shift: [B, T, V], [B, T], [B, T] -> [B], cache.

    logp[b] = sum_t mask[b, t] * (logits[b, t, targets[b, t]] - logsumexp(logits[b, t])).
    A fully masked row gives 0. The result has the dtype of logits.
    """
    return _logprobs_forward(*_validate(logits, targets, mask))


def _logprobs_forward(logits, targets, mask):
    """logprobs_forward on checked arguments (mask already in the logits dtype)."""
    xp = array_module(logits)
    lse = _logsumexp_last(logits, "logits")  # [B, T]
    target_logits = xp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    with np.errstate(over="ignore", invalid="ignore"):  # reported below, by name
        token_logps = (target_logits - lse) * mask  # [B, T]
        logps = token_logps.sum(axis=1)  # [B]
    if not bool(xp.isfinite(logps).all()):
        raise ValueError(f"logits are finite but too large: their log-probabilities overflow {logits.dtype} "
                         "(summed over the sequence)")
    return logps, LogprobsCache(logits, targets, mask, lse)


def logprobs_backward(dlogps, cache: LogprobsCache, out=None):
    """dlogits[b, t, v] = mask[b, t] * dlogps[b] * (onehot(targets[b, t])_v - softmax(logits[b, t])_v).

    dlogps: [B]. Returns dlogits [B, T, V] in the logits dtype, written into `out` when given.
    """
    if not isinstance(cache, LogprobsCache):
        raise TypeError(f"cache must be the LogprobsCache returned by logprobs_forward, got {type(cache).__name__}")
    return _logprobs_backward(_check_dlogps(dlogps, cache.logits.shape[0]), cache, out)


def _check_dlogps(dlogps, B: int):
    dlogps = as_float_array("dlogps", dlogps, ndim=1)
    if dlogps.shape[0] != B:
        raise ValueError(f"dlogps must have shape ({B},), got {tuple(dlogps.shape)}")
    return dlogps


def _logprobs_backward(dlogps, cache: LogprobsCache, out=None):
    """logprobs_backward on checked arguments."""
    logits, targets, mask, lse = cache
    xp = array_module(logits)
    scale = mask * xp.asarray(dlogps, dtype=logits.dtype)[:, None]  # [B, T]
    if out is None:
        out = xp.empty_like(logits)
    # -scale * softmax = -scale * exp(logits - lse), computed in the output buffer itself, a block of
    # rows at a time (out may be logits itself: each block is read before it is written)
    for index in _row_blocks(logits.shape):
        out_block = out[index]
        xp.subtract(logits[index], lse[index][..., None], out=out_block)
        xp.exp(out_block, out=out_block)
        out_block *= -scale[index][..., None]
    # + the one-hot term at each target
    b_idx, t_idx = xp.indices(targets.shape)
    out[b_idx, t_idx, targets] += scale
    return out


def compute_logprobs(logits, targets, mask=None):
    """Per-sequence sums [B] of log_softmax(logits)[b, t, targets[b, t]] * mask[b, t] (no shift).

    logits [B, T, V] float; targets [B, T] integers in [0, V); mask [B, T] or None (all ones).
    """
    return logprobs_forward(logits, targets, mask)[0]


class SequenceLogprobsCache(NamedTuple):
    shifted: LogprobsCache  # of logits[:, :-1] scoring tokens[:, 1:]
    logits: object  # [B, T, V] the forward's input (a reference, not a copy)


def sequence_logprobs_forward(logits, tokens, completion_mask):
    """Shifted log-probabilities of the completion tokens: [B, T, V], [B, T], [B, T] -> [B], cache.

    logp[b] = sum_{t=1}^{T-1} completion_mask[b, t] * log_softmax(logits[b, t-1])[tokens[b, t]].
    completion_mask[b, 0] is ignored (the first token has no logits before it).
    """
    if completion_mask is None:  # no default here: all ones would score the prompt tokens too
        raise TypeError("completion_mask must be an array of 0/1 (1 on completion tokens), got None")
    logits, tokens, completion_mask = _validate(logits, tokens, completion_mask, "tokens", "completion_mask")
    if logits.shape[1] < 2:
        raise ValueError(f"sequences need at least 2 tokens for a shifted log-prob, got T={logits.shape[1]}")
    logps, shifted_cache = _logprobs_forward(logits[:, :-1], tokens[:, 1:], completion_mask[:, 1:])
    return logps, SequenceLogprobsCache(shifted_cache, logits)


def sequence_logprobs_backward(dlogps, cache: SequenceLogprobsCache, *, overwrite_logits: bool = False):
    """dlogits [B, T, V] of the shifted log-probs; the last position gets zero gradient.

    overwrite_logits=True writes dlogits into the logits array that was passed to
    sequence_logprobs_forward and returns that same array, instead of allocating a new [B, T, V]
    one. Ownership: the caller hands its logits over; after this call that array holds dlogits, so
    use it only when nothing reads those logits again (train.py's step does not). Off by default.
    """
    if not isinstance(cache, SequenceLogprobsCache):
        raise TypeError(f"cache must be the cache of sequence_logprobs_forward, got {type(cache).__name__}")
    check_bool("overwrite_logits", overwrite_logits)
    logits = cache.logits  # [B, T, V]
    dlogps = _check_dlogps(dlogps, logits.shape[0])
    xp = array_module(logits)
    if overwrite_logits:
        if not getattr(logits.flags, "writeable", True):  # (CuPy arrays are always writeable)
            raise ValueError("overwrite_logits=True needs writeable logits; got a read-only array")
        dlogits = logits
    else:
        dlogits = xp.empty_like(logits)
    _logprobs_backward(dlogps, cache.shifted, out=dlogits[:, :-1])
    dlogits[:, -1] = 0
    return dlogits


def sequence_logprobs(logits, tokens, completion_mask):
    """Shifted completion log-probabilities [B] (see sequence_logprobs_forward)."""
    return sequence_logprobs_forward(logits, tokens, completion_mask)[0]
