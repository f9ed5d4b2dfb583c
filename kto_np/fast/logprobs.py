"""The fast room's twin of kto_np.logprobs: the same functions, names, signatures, caches and numbers
(float64 to 1e-12 relative, float32 to 1e-5; tests/test_fast.py checks every pair), made fast.

Read kto_np.logprobs first: it states each op as its formula over whole arrays. What this file changes,
and why:

- Forward and backward go over the [B, T, V] logits one block of rows at a time (about 1 MiB,
  cache-sized: see _CHUNK_ELEMENTS), so exp(logits) never exists for more than one block and the
  logits are read from memory about once per pass.
- The blocks run on the fast room's threads (kto_np.fast.threads), each with its own block-sized
  buffer; CuPy arrays go block after block through one buffer.
- The backward writes dlogits = mask * dlogp * (onehot - softmax) into one [B, T, V] array without
  other [B, T, V] temporaries.
- **sequence_logprobs_backward writes dlogits INTO the logits array that sequence_logprobs_forward was
  given, and returns that same array** (no second [B, T, V] array: at GPT-2's vocabulary the largest
  array of a step). This is the fast room's one contract difference from the reading edition: after
  the backward the caller's logits are gone. Training never reads its logits again; a caller that
  does must pass a copy, or use kto_np.logprobs.

No checks: nothing here rejects bad arguments (the doors in kto_np.logprobs do); the caches are the
reading edition's own classes.
"""

from __future__ import annotations

from ..backend import array_module
from ..logprobs import LogprobsCache, SequenceLogprobsCache
from . import threads

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
    """log_softmax(x)_i = x_i - max(x) - log(sum_j exp(x_j - max(x))); same shape and dtype as x
    (the whole-array formula, unchecked)."""
    xp = array_module(logits)
    shifted = logits - xp.max(logits, axis=axis, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=axis, keepdims=True))


def _row_blocks(shape):
    """Index tuples cutting [B, T, V] into blocks of about _CHUNK_ELEMENTS entries along B and T.

    Each logits[index] is a view, [b, T, V] or [rows, V] (never a copy, even for the non-contiguous
    shifted view logits[:, :-1], which reshape(-1, V) would copy).
    """
    B, T, V = shape
    if B * T == 0:  # no rows (the head at the scored positions, when nothing is scored)
        return []
    rows_per_block = max(1, _CHUNK_ELEMENTS // max(V, 1))
    if rows_per_block >= T:  # whole sequences per block
        sequences = rows_per_block // T
        return [(slice(b, b + sequences),) for b in range(0, B, sequences)]
    return [(b, slice(t, t + rows_per_block)) for b in range(B) for t in range(0, T, rows_per_block)]


def _logsumexp_last(logits):
    """logsumexp over the last axis, [B, T, V] -> [B, T], one block of rows at a time (over the threads,
    for NumPy): lse = max + log(sum(exp(logits - max))), with one block-sized buffer per thread."""
    xp = array_module(logits)
    B, T, V = logits.shape
    lse = xp.empty((B, T), dtype=logits.dtype)
    blocks = [(index,) for index in _row_blocks(logits.shape)]
    if not threads.numpy_only(logits):  # CuPy: the blocks one after the other, through one buffer
        buffer = xp.empty(min(logits.size, max(_CHUNK_ELEMENTS, V)), dtype=logits.dtype)
        for (index,) in blocks:
            piece = logits[index]
            _logsumexp_block(piece, lse[index], buffer[:piece.size].reshape(piece.shape))
        return lse

    def block(index):
        piece = logits[index]  # [rows, V] or [b, T, V], a view
        _logsumexp_block(piece, lse[index], threads.scratch(piece.size, logits.dtype).reshape(piece.shape))

    threads.run(block, blocks, logits.size)
    return lse


def _logsumexp_block(block, lse, shifted):
    xp = array_module(block)
    row_max = xp.max(block, axis=-1, keepdims=True)
    xp.subtract(block, row_max, out=shifted)
    xp.exp(shifted, out=shifted)
    lse[...] = row_max[..., 0] + xp.log(xp.sum(shifted, axis=-1))


def logprobs_forward(logits, targets, mask=None):
    """Per-sequence log-probabilities, no shift: [B, T, V], [B, T], [B, T] or None -> [B], cache
    (see kto_np.logprobs.logprobs_forward)."""
    xp = array_module(logits)
    targets = xp.asarray(targets)  # the backward compares and indexes with them: on the logits' module
    mask = xp.ones(targets.shape, dtype=logits.dtype) if mask is None else xp.asarray(mask, dtype=logits.dtype)
    lse = _logsumexp_last(logits)  # [B, T]
    target_logits = xp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    logps = ((target_logits - lse) * mask).sum(axis=1)  # [B]
    return logps, LogprobsCache(logits, targets, mask, lse)


def _logprobs_backward_into(dlogps, cache: LogprobsCache, out):
    """logprobs_backward written into out [B, T, V] (which may be the logits themselves: each block is
    read before it is written); returns out."""
    logits, targets, mask, lse = cache
    xp = array_module(logits)
    scale = mask * xp.asarray(dlogps, dtype=logits.dtype)[:, None]  # [B, T]
    # -scale * softmax = -scale * exp(logits - lse), computed in the output buffer itself, a block of
    # rows at a time (over the threads, for NumPy)
    minus_scale = -scale

    def block(index):
        out_block = out[index]
        xp.subtract(logits[index], lse[index][..., None], out=out_block)
        xp.exp(out_block, out=out_block)
        out_block *= minus_scale[index][..., None]

    if threads.numpy_only(logits, out):
        threads.run(block, [(index,) for index in _row_blocks(logits.shape)], logits.size)
    else:
        block((Ellipsis,))
    # + the one-hot term at each target
    b_idx, t_idx = xp.indices(targets.shape)
    out[b_idx, t_idx, targets] += scale
    return out


def logprobs_backward(dlogps, cache: LogprobsCache):
    """dlogits[b, t, v] = mask[b, t] * dlogps[b] * (onehot(targets[b, t])_v - softmax(logits[b, t])_v),
    a new [B, T, V] array in the logits dtype."""
    return _logprobs_backward_into(dlogps, cache, array_module(cache.logits).empty_like(cache.logits))


def compute_logprobs(logits, targets, mask=None):
    """Per-sequence sums [B] of log_softmax(logits)[b, t, targets[b, t]] * mask[b, t] (no shift), unchecked."""
    return logprobs_forward(logits, targets, mask)[0]


def sequence_logprobs_forward(logits, tokens, completion_mask):
    """Shifted log-probabilities of the completion tokens: [B, T, V], [B, T], [B, T] -> [B], cache
    (see kto_np.logprobs.sequence_logprobs_forward). The cache keeps a reference to logits: the
    backward overwrites them."""
    logps, shifted_cache = logprobs_forward(logits[:, :-1], tokens[:, 1:], completion_mask[:, 1:])
    return logps, SequenceLogprobsCache(shifted_cache, logits)


def sequence_logprobs_backward(dlogps, cache: SequenceLogprobsCache):
    """dlogits [B, T, V] of the shifted log-probs; the last position gets zero gradient.

    OVERWRITES THE LOGITS: dlogits is written into the logits array that was passed to
    sequence_logprobs_forward, and that same array is returned (no new [B, T, V] array). After this
    call the caller's logits hold dlogits. Training never reads its logits again; pass the forward a
    copy if you do (kto_np.logprobs.sequence_logprobs_backward returns a new array instead).
    """
    dlogits = cache.logits  # [B, T, V], overwritten
    _logprobs_backward_into(dlogps, cache.shifted, out=dlogits[:, :-1])
    dlogits[:, -1] = 0
    return dlogits


def sequence_logprobs(logits, tokens, completion_mask):
    """Shifted completion log-probabilities [B] (see sequence_logprobs_forward), unchecked."""
    return sequence_logprobs_forward(logits, tokens, completion_mask)[0]
