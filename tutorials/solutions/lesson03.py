"""Lesson 03: sequence log-probabilities."""

import numpy as np


def log_softmax(logits):
    """03.log_softmax: shift by the row maximum, then subtract log Σ exp."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def logprobs_backward(logits, targets, mask, dlogps):
    """03.logprobs_backward: dlogits[b, t] = mask[b, t] (onehot(targets[b, t]) − softmax(logits[b, t])) dlogps[b]."""
    probs = np.exp(log_softmax(logits))
    onehot = np.zeros_like(probs)
    np.put_along_axis(onehot, np.asarray(targets, dtype=np.int64)[..., None], 1.0, axis=-1)
    mask = np.asarray(mask, dtype=np.float64)
    return mask[..., None] * (onehot - probs) * np.asarray(dlogps, dtype=np.float64)[:, None, None]


def sequence_logprobs(logits, tokens, completion_mask):
    """03.sequence_logprobs: logits[:, t] score tokens[:, t + 1], counted where completion_mask[:, t + 1]."""
    logp = log_softmax(np.asarray(logits)[:, :-1])
    targets = np.asarray(tokens, dtype=np.int64)[:, 1:]
    token_logps = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return (token_logps * np.asarray(completion_mask, dtype=np.float64)[:, 1:]).sum(axis=1)
