"""Lesson 07: Edifice's backbone."""

import numpy as np


def fixed_embedding(vocab_size, hidden_size):
    """07.fixed_embedding: E[t, j] = (t H + j) / √V."""
    t = np.arange(vocab_size)[:, None]
    j = np.arange(hidden_size)[None, :]
    return (t * hidden_size + j) / np.sqrt(vocab_size)


def position_entropy(tokens):
    """07.position_entropy: the mean over positions of −Σ p log p of the tokens at that position (nats)."""
    tokens = np.asarray(tokens)
    entropies = []
    for t in range(tokens.shape[1]):
        _, counts = np.unique(tokens[:, t], return_counts=True)
        p = counts / counts.sum()
        entropies.append(-(p * np.log(p)).sum())
    return float(np.mean(entropies))
