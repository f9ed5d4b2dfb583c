"""Appendix A1: verifying a KTO implementation with the oracle."""

import numpy as np


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def apo_zero_loss(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight):
    """A1.apo_zero_loss: desirable λ_D (1 − σ(β r)), undesirable λ_U σ(β r), the mean over the batch."""
    r = np.asarray(policy_logps, dtype=np.float64) - np.asarray(ref_logps, dtype=np.float64)
    desirable = np.asarray(labels) == 1
    losses = np.where(desirable, desirable_weight * (1.0 - sigmoid(beta * r)), undesirable_weight * sigmoid(beta * r))
    return float(losses.mean())


def first_mismatch(candidate, reference, rtol, atol):
    """A1.first_mismatch: the first flat index with |c − r| > atol + rtol max|r| (NaN included), else −1."""
    c, r = np.asarray(candidate, dtype=np.float64).ravel(), np.asarray(reference, dtype=np.float64).ravel()
    limit = atol + rtol * np.max(np.abs(r))
    bad = ~(np.abs(c - r) <= limit)
    return int(np.argmax(bad)) if bad.any() else -1
