"""Lesson 06's exercises (tutorials/06_imbalanced_feedback.py): imbalanced feedback: the paper's ρ and the band of λ_D
that puts it in [1, 4/3].

Each exercise lists its inputs (`calls`), its reference and the typical mistakes its grader names; the
machinery (Exercise, Call, the judges, grade()) is in kit.py and registry.py.
"""

from __future__ import annotations

import numpy as np

from .kit import Call, Exercise, Mistake, closed_form, label_counts


def _balance_calls():
    return [
        Call("1 thumbs-up in 10, λ_D = λ_U = 1", (np.array([1] + [0] * 9), 1.0, 1.0), {}),
        Call("1 thumbs-up in 10, λ_D = 10, λ_U = 1", (np.array([1] + [0] * 9), 10.0, 1.0), {}),
        Call("6 thumbs-up, 2 thumbs-down, λ_D = 1, λ_U = 1.5", (np.array([1, 1, 0, 1, 1, 0, 1, 1]), 1.0, 1.5), {}),
    ]


def _share(labels, dw, uw):  # 02's gradient share, a typical mistake here
    nd, nu = label_counts(labels)
    return dw * nd / (dw * nd + uw * nu)


def _rho(labels, dw, uw):
    nd, nu = label_counts(labels)
    return dw * nd / (uw * nu)


def balance_stub(labels, desirable_weight, undesirable_weight):
    return 1.0  # a placeholder: right for balanced data with equal weights only


BALANCE_RATIO = Exercise(
    "06.balance_ratio", "balance_ratio",
    "balance_ratio(labels, desirable_weight, undesirable_weight) -> float",
    "the paper's ρ = λ_D n_D / (λ_U n_U), which its Eq. 8 asks to keep in [1, 4/3]",
    _balance_calls,
    closed_form(("rho",), lambda c: (_rho(*c.args),), [
        Mistake("inverted", "the inverse, λ_U n_U / (λ_D n_D)", lambda c: (1.0 / _rho(*c.args),)),
        Mistake("weights_ignored", "the count ratio n_D / n_U without the weights",
                lambda c: (_rho(c.args[0], 1.0, 1.0),)),
        Mistake("fraction", "the weighted fraction λ_D n_D / (λ_D n_D + λ_U n_U) (the gradient share, not ρ)",
                lambda c: (_share(*c.args),)),
    ]),
    balance_stub,
)


def _band_calls():
    return [
        Call("1 thumbs-up in 10, λ_U = 1", (np.array([1] + [0] * 9), 1.0), {}),
        Call("3 thumbs-up, 5 thumbs-down, λ_U = 2", (np.array([1, 0, 0, 1, 0, 1, 0, 0]), 2.0), {}),
        Call("4 thumbs-up, 1 thumbs-down, λ_U = 1", (np.array([1, 1, 1, 0, 1]), 1.0), {}),
    ]


def _band(labels, uw, low=1.0, high=4.0 / 3.0):
    nd, nu = label_counts(labels)
    return low * uw * nu / nd, high * uw * nu / nd


def band_stub(labels, undesirable_weight):
    raise NotImplementedError("write band_desirable_weights")


BAND_WEIGHTS = Exercise(
    "06.band_weights", "band_desirable_weights",
    "band_desirable_weights(labels, undesirable_weight) -> (low, high)",
    "the range of λ_D that puts ρ = λ_D n_D / (λ_U n_U) in the paper's band [1, 4/3]",
    _band_calls,
    closed_form(("low", "high"), lambda c: _band(*c.args), [
        Mistake("inverted", "solving ρ with the counts inverted (λ_U n_D / n_U)",
                lambda c: tuple(b * (label_counts(c.args[0])[0] / label_counts(c.args[0])[1]) ** 2
                                for b in _band(*c.args))),
        Mistake("undesirable_weight_ignored", "the band for λ_U = 1 whatever λ_U is",
                lambda c: _band(c.args[0], 1.0)),
        Mistake("band_inverted", "the band [3/4, 1] (ρ's bounds inverted)",
                lambda c: _band(*c.args, low=0.75, high=1.0)),
    ]),
    band_stub,
)


EXERCISES = [BALANCE_RATIO, BAND_WEIGHTS]
