"""Lesson 05: training with binary feedback."""

import numpy as np


def sft_loss_and_grad(logits, targets, mask):
    """05.sft_loss: L = −Σ mask log p(target) / Σ mask; dL/dlogits = mask (softmax − onehot) / Σ mask."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    targets = np.asarray(targets, dtype=np.int64)
    mask = np.asarray(mask, dtype=np.float64)
    count = mask.sum()
    loss = -float((np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * mask).sum()) / count
    onehot = np.zeros_like(logp)
    np.put_along_axis(onehot, targets[..., None], 1.0, axis=-1)
    return loss, mask[..., None] * (np.exp(logp) - onehot) / count


def reward_metrics(policy_logps, ref_logps, labels, beta):
    """05.reward_metrics: the mean β r of each class and their difference."""
    rewards = beta * (np.asarray(policy_logps) - np.asarray(ref_logps))
    desirable = np.asarray(labels) == 1
    chosen, rejected = float(rewards[desirable].mean()), float(rewards[~desirable].mean())
    return chosen, rejected, chosen - rejected
