"""Lesson 11's exercises (tutorials/11_beta_in_training.py): β under AdamW: AdamW's first step, and the log-ratio at
which the gradient has faded.

Each exercise lists its inputs (`calls`), its reference and the typical mistakes its grader names; the
machinery (Exercise, Call, the judges, grade()) is in kit.py and registry.py.
"""

from __future__ import annotations

import numpy as np

from .kit import Call, Exercise, Mistake, closed_form


def _adam_calls():
    g = np.array([0.3, -2.0e-3, 5.0, -1.0e-7, 1.0e-9, 0.0])
    return [Call("6 gradients from 5 down to 0, lr = 1e-3, eps = 1e-8", (g, 1e-3, 1e-8), {}),
            Call("the same gradients × 100, lr = 3e-3, eps = 1e-8", (g * 100.0, 3e-3, 1e-8), {})]


def _adam(g, lr, eps, *, corrected=True, sign=1.0, eps_inside=False):
    g = np.asarray(g, dtype=np.float64)
    m, v = 0.1 * g, 0.001 * g * g  # one step of the moments from 0, β1 = 0.9, β2 = 0.999
    if corrected:
        m, v = m / 0.1, v / 0.001
    denominator = np.sqrt(v + eps) if eps_inside else np.sqrt(v) + eps
    return -sign * lr * m / denominator


def adam_stub(grad, lr, eps):
    raise NotImplementedError("write adamw_first_step")


ADAM_FIRST_STEP = Exercise(
    "11.adamw_first_step", "adamw_first_step",
    "adamw_first_step(grad, lr, eps) -> update",
    "the change of the parameters in AdamW's first step from zero moments (β1 = 0.9, β2 = 0.999, bias-corrected, "
    "no weight decay): what stays of the gradient once Adam has divided it by its own size",
    _adam_calls,
    closed_form(("update",), lambda c: (_adam(*c.args),), [
        Mistake("no_bias_correction", "the moments without the bias correction m / (1 − β1^t), v / (1 − β2^t)",
                lambda c: (_adam(*c.args, corrected=False),)),
        Mistake("sign_flipped", "the update with its sign flipped (a step goes against the gradient)",
                lambda c: (_adam(*c.args, sign=-1.0),)),
        Mistake("eps_inside_sqrt", "ε inside the square root, √(v + ε) (AdamW adds it after: √v + ε)",
                lambda c: (_adam(*c.args, eps_inside=True),)),
    ], rtol=1e-9),
    adam_stub,
)


def _saturation_calls():
    return [Call("β = 0.1, a half of the peak", (0.1, 0.5), {}), Call("β = 1, a tenth of the peak", (1.0, 0.1), {}),
            Call("β = 0.01, 90 % of the peak", (0.01, 0.9), {})]


def _saturation(beta, fraction, power=1):
    return 2.0 * np.arccosh(1.0 / np.sqrt(fraction)) / beta ** power


def saturation_stub(beta, fraction):
    raise NotImplementedError("write saturation_log_ratio")


SATURATION = Exercise(
    "11.saturation_log_ratio", "saturation_log_ratio",
    "saturation_log_ratio(beta, fraction) -> r",
    "the log-ratio r > 0 (with z_ref = 0) at which a desirable example's gradient β λ σ(βr) σ(−βr) has fallen to "
    "`fraction` of its peak β λ / 4: how far β lets the policy go",
    _saturation_calls,
    closed_form(("r",), lambda c: (_saturation(*c.args),), [
        Mistake("beta_forgotten", "the argument u = βr of the sigmoid, not the log-ratio r = u / β",
                lambda c: (_saturation(*c.args, power=0),)),
        Mistake("beta_twice", "u / β² (β divided out twice)", lambda c: (_saturation(*c.args, power=2),)),
        Mistake("half_width", "half of the answer (σ(u) σ(−u) = 1 / (4 cosh²(u/2)): mind the u/2)",
                lambda c: (_saturation(*c.args) / 2.0,)),
    ], hint="σ(u) σ(−u) = 1 / (4 cosh²(u/2)); solve for u, then r = u / β."),
    saturation_stub,
)


EXERCISES = [ADAM_FIRST_STEP, SATURATION]
