"""Lesson 02: loss surfaces."""

import numpy as np


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def kto_gradient(log_ratios, labels, z_ref, beta, desirable_weight, undesirable_weight):
    """02.kto_gradient: d loss_i / d r_i = −λ_i s_i β σ(u_i) σ(−u_i), u_i = β (r_i − z_ref)."""
    desirable = np.asarray(labels) == 1
    s = np.where(desirable, 1.0, -1.0)
    w = np.where(desirable, desirable_weight, undesirable_weight)
    u = beta * (np.asarray(log_ratios, dtype=np.float64) - z_ref)
    return -w * s * beta * sigmoid(u) * sigmoid(-u)


def desirable_gradient_share(labels, desirable_weight, undesirable_weight):
    """02.desirable_share: at u = 0 every |gradient| is λ_i β / (4n), so the share is λ_D n_D / Σ_i λ_i."""
    labels = np.asarray(labels)
    n_d, n_u = np.sum(labels == 1), np.sum(labels != 1)
    return float(desirable_weight * n_d / (desirable_weight * n_d + undesirable_weight * n_u))
