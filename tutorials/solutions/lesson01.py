"""Lesson 01: the KTO loss by hand."""

import numpy as np


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def z_ref(kl_policy_logps, kl_ref_logps):
    """01.z_ref: the mean log-ratio of the mismatched pairs, clamped at 0."""
    return max(0.0, float(np.mean(np.asarray(kl_policy_logps) - np.asarray(kl_ref_logps))))


def kto_loss_and_grad(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                      undesirable_weight):
    """01.kto_loss: loss_i = λ_i (1 − σ(s_i β (r_i − z_ref))), L = mean_i loss_i; z_ref is a constant."""
    policy_logps, ref_logps = np.asarray(policy_logps, dtype=np.float64), np.asarray(ref_logps, dtype=np.float64)
    desirable = np.asarray(labels) == 1
    z = z_ref(kl_policy_logps, kl_ref_logps)
    u = beta * (policy_logps - ref_logps - z)
    s = np.where(desirable, 1.0, -1.0)
    w = np.where(desirable, desirable_weight, undesirable_weight)
    n = len(policy_logps)
    loss = float(np.mean(w * (1.0 - sigmoid(s * u))))
    grad = -w * s * beta * sigmoid(u) * sigmoid(-u) / n
    return loss, grad
