"""Lesson 06: imbalanced feedback."""

import numpy as np


def balance_ratio(labels, desirable_weight, undesirable_weight):
    """06.balance_ratio: ρ = λ_D n_D / (λ_U n_U)."""
    labels = np.asarray(labels)
    return float(desirable_weight * np.sum(labels == 1) / (undesirable_weight * np.sum(labels != 1)))


def band_desirable_weights(labels, undesirable_weight):
    """06.band_weights: 1 ≤ λ_D n_D / (λ_U n_U) ≤ 4/3 ⇔ λ_U n_U / n_D ≤ λ_D ≤ (4/3) λ_U n_U / n_D."""
    labels = np.asarray(labels)
    base = undesirable_weight * np.sum(labels != 1) / np.sum(labels == 1)
    return float(base), float(4.0 / 3.0 * base)
