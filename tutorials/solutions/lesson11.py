"""Lesson 11: β in training."""

import numpy as np


def adamw_first_step(grad, lr, eps):
    """11.adamw_first_step: m̂ = g, v̂ = g² after the bias correction, so the step is −lr g / (|g| + eps)."""
    g = np.asarray(grad, dtype=np.float64)
    m_hat = (0.1 * g) / (1.0 - 0.9)
    v_hat = (0.001 * g * g) / (1.0 - 0.999)
    return -lr * m_hat / (np.sqrt(v_hat) + eps)


def saturation_log_ratio(beta, fraction):
    """11.saturation_log_ratio: σ(u) σ(−u) = 1 / (4 cosh²(u/2)) = fraction / 4 ⇒ u = 2 arccosh(1/√fraction)."""
    return float(2.0 * np.arccosh(1.0 / np.sqrt(fraction)) / beta)
