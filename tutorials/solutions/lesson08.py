"""Lesson 08: the seed's formula."""

import numpy as np


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _seed(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, through_z):
    kl = beta * (np.asarray(policy_logps, dtype=np.float64) - np.asarray(ref_logps, dtype=np.float64))
    reward = kl - kl.mean()  # z = mean β r of the batch itself, not clamped
    desirable = np.asarray(labels) == 1
    s = np.where(desirable, 1.0, -1.0)
    w = np.where(desirable, desirable_weight, undesirable_weight)
    n = len(kl)
    loss = float(np.mean(-w * sigmoid(s * reward)))
    g = -w * s * sigmoid(reward) * sigmoid(-reward) / n  # dL / d reward_i
    return loss, beta * (g - g.mean()) if through_z else beta * g


def seed_loss_and_grad(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight):
    """08.seed_loss: loss_i = −λ_i σ(s_i (β r_i − z)), z = mean β r; dL/dr_j = β (g_j − mean g)."""
    return _seed(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, through_z=True)


def seed_loss_stop_z_and_grad(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight):
    """08.seed_loss_stop_z: the same loss, z a constant in the gradient: dL/dr_j = β g_j."""
    return _seed(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, through_z=False)
