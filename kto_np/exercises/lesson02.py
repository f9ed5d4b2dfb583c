"""Lesson 02's exercises (tutorials/02_loss_surfaces.py): loss surfaces: the per-example gradient and the desirable
class's share of the first step's gradient.

Each exercise lists its inputs (`calls`), its reference and the typical mistakes its grader names; the
machinery (Exercise, Call, the judges, grade()) is in kit.py and registry.py.
"""

from __future__ import annotations

import numpy as np

from .kit import Call, Exercise, Mistake, closed_form, label_counts, sigmoid


def _gradient_calls():
    rng = np.random.default_rng(2)
    labels = np.array([1, 0, 1, 0, 1, 1, 0])
    r = rng.normal(0.0, 6.0, 7)
    return [
        Call("7 examples, β = 0.1, z_ref = 0.5, λ_D = 1, λ_U = 1", (r, labels, 0.5, 0.1, 1.0, 1.0), {}),
        Call("7 examples, β = 0.5, z_ref = 0, λ_D = 2, λ_U = 1.5", (r, labels, 0.0, 0.5, 2.0, 1.5), {}),
        Call("7 examples, β = 2, z_ref = 1.3, λ_D = 0.5, λ_U = 3", (r / 4.0, labels, 1.3, 2.0, 0.5, 3.0), {}),
    ]


def _gradient(r, labels, z, beta, dw, uw, *, outer_beta=True, sign=1.0, weights=True, derivative=True):
    s = np.where(labels == 1, 1.0, -1.0)
    w = np.where(labels == 1, dw, uw) if weights else np.ones(len(labels))
    u = beta * (r - z)
    shape = sigmoid(u) * sigmoid(-u) if derivative else sigmoid(s * u)
    return -sign * w * s * (beta if outer_beta else 1.0) * shape


def gradient_stub(log_ratios, labels, z_ref, beta, desirable_weight, undesirable_weight):
    return np.zeros_like(log_ratios)  # a placeholder: the right shape, the wrong numbers


KTO_GRADIENT = Exercise(
    "02.kto_gradient", "kto_gradient",
    "kto_gradient(log_ratios, labels, z_ref, beta, desirable_weight, undesirable_weight) -> dloss_dr",
    "d loss_i / d r_i for each example, loss_i = λ_i (1 − σ(s_i β (r_i − z_ref))) (not divided by n): the curve "
    "whose peak is βλ/4",
    _gradient_calls,
    closed_form(("dloss_dr",), lambda c: (_gradient(*c.args),), [
        Mistake("beta_missing", "the chain rule without its factor β (d u / d r = β)",
                lambda c: (_gradient(*c.args, outer_beta=False),)),
        Mistake("sign_flipped", "the gradient with its sign flipped (a desirable example's loss falls as r rises)",
                lambda c: (_gradient(*c.args, sign=-1.0),)),
        Mistake("weights_ignored", "the gradient without the class weights λ_D, λ_U",
                lambda c: (_gradient(*c.args, weights=False),)),
        Mistake("sigmoid_not_derivative", "σ(s u) in place of its derivative σ(u) σ(−u)",
                lambda c: (_gradient(*c.args, derivative=False),)),
    ]),
    gradient_stub,
)


def _share_calls():
    return [
        Call("5 thumbs-up, 5 thumbs-down, λ_D = λ_U = 1", (np.array([1, 0] * 5), 1.0, 1.0), {}),
        Call("1 thumbs-up in 10, λ_D = 10, λ_U = 1", (np.array([1] + [0] * 9), 10.0, 1.0), {}),
        Call("6 thumbs-up, 2 thumbs-down, λ_D = 1, λ_U = 1.5", (np.array([1, 1, 0, 1, 1, 0, 1, 1]), 1.0, 1.5), {}),
        Call("3 thumbs-up only, λ_D = 2, λ_U = 1", (np.array([1, 1, 1]), 2.0, 1.0), {}),
    ]


def _share(labels, dw, uw):
    nd, nu = label_counts(labels)
    return dw * nd / (dw * nd + uw * nu)


def share_stub(labels, desirable_weight, undesirable_weight):
    raise NotImplementedError("write desirable_gradient_share")


DESIRABLE_SHARE = Exercise(
    "02.desirable_share", "desirable_gradient_share",
    "desirable_gradient_share(labels, desirable_weight, undesirable_weight) -> float",
    "the desirable class's share of the summed |gradient| at the first step (policy = reference, every u = 0)",
    _share_calls,
    closed_form(("share",), lambda c: (_share(*c.args),), [
        Mistake("ratio_not_share", "the ratio ρ = λ_D n_D / (λ_U n_U) instead of the share ρ / (1 + ρ)",
                lambda c: (c.args[1] * label_counts(c.args[0])[0] / (c.args[2] * label_counts(c.args[0])[1])
                           if label_counts(c.args[0])[1] else np.inf,)),
        Mistake("weights_ignored", "the fraction of thumbs-up examples n_D / n, without the weights",
                lambda c: (label_counts(c.args[0])[0] / len(c.args[0]),)),
        Mistake("undesirable_share", "the undesirable class's share",
                lambda c: (1.0 - _share(*c.args),)),
    ], hint="At u = 0 every example's |gradient| is λ_i β/(4n): add them up per class."),
    share_stub,
)


EXERCISES = [KTO_GRADIENT, DESIRABLE_SHARE]
