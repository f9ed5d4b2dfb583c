"""Lesson 01's exercises (tutorials/01_kto_loss_by_hand.py): the KTO loss: z_ref from the mismatched (KL) pairs, then
the paper's loss and its gradient.

Each exercise lists its inputs (`calls`), its reference and the typical mistakes its grader names; the
machinery (Exercise, Call, the judges, grade()) is in kit.py and registry.py.
"""

from __future__ import annotations

import numpy as np

from .kit import Call, Exercise, Mistake, closed_form, oracle_calls, oracle_cases, oracle_judge


def _z_ref_calls():
    rng = np.random.default_rng(1)
    kl_policy = rng.normal(-30.0, 2.0, 6)
    return [
        Call("6 KL pairs whose mean log-ratio is positive", (kl_policy, kl_policy - rng.uniform(0.5, 2.5, 6)), {}),
        Call("6 KL pairs whose mean log-ratio is negative", (kl_policy, kl_policy + rng.uniform(0.5, 2.5, 6)), {}),
        Call("1 KL pair, log-ratio +0.7", (np.array([-12.3]), np.array([-13.0])), {}),
    ]


def _z_ref_reference(call):
    p, r = call.args
    return (max(0.0, float(np.mean(p - r))),)


def z_ref_stub(kl_policy_logps, kl_ref_logps):
    raise NotImplementedError("write z_ref")


Z_REF = Exercise(
    "01.z_ref", "z_ref", "z_ref(kl_policy_logps, kl_ref_logps) -> float",
    "KTO's reference point from the log-probs of the mismatched (KL) pairs: their mean log-ratio, clamped at 0",
    _z_ref_calls,
    closed_form(("z_ref",), _z_ref_reference, [
        Mistake("z_not_clamped", "the mean log-ratio without the clamp at 0 (a KL divergence is never negative)",
                lambda c: (float(np.mean(c.args[0] - c.args[1])),)),
        Mistake("ratio_reversed", "the log-ratio taken the wrong way round, log π_ref − log π",
                lambda c: (max(0.0, float(np.mean(c.args[1] - c.args[0]))),)),
        Mistake("sum_not_mean", "a sum over the pairs instead of their mean",
                lambda c: (max(0.0, float(np.sum(c.args[0] - c.args[1]))),)),
    ]),
    z_ref_stub,
)


def _kto_cases():
    return oracle_cases("kto_loss", "kto", keep=lambda c: "kl_policy_logps" in c.inputs)


def _kto_arguments(case):
    i = case.inputs
    return (), {"policy_logps": i["policy_logps"], "ref_logps": i["ref_logps"], "labels": i["labels"],
                "kl_policy_logps": i["kl_policy_logps"], "kl_ref_logps": i["kl_ref_logps"], "beta": float(i["beta"]),
                "desirable_weight": float(i["desirable_weight"]),
                "undesirable_weight": float(i["undesirable_weight"])}


def _kto_reference(call):
    from ..losses import kto_loss_and_grad  # noqa: PLC0415

    kw = dict(call.kwargs)
    loss, grad, _ = kto_loss_and_grad(kw.pop("policy_logps"), kw.pop("ref_logps"), kw.pop("labels"), variant="kto",
                                      warn_balance=False, **kw)
    return loss, grad


def kto_loss_stub(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                  undesirable_weight):
    raise NotImplementedError("write kto_loss_and_grad")


KTO_LOSS = Exercise(
    "01.kto_loss", "kto_loss_and_grad",
    "kto_loss_and_grad(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight, "
    "undesirable_weight) -> (loss, dloss_dpolicy_logps)",
    "the paper's KTO loss (z_ref from the KL pairs, clamped at 0, detached) and its gradient, NumPy in and out",
    oracle_calls(_kto_cases, _kto_arguments),
    oracle_judge("kto_loss", "kto", ("loss", "dloss_dpolicy_logps"), ("loss", "grad/policy_logps"), _kto_cases,
                 lambda case: ((), np.shape(case.inputs["policy_logps"])), extra=[
                     Mistake("gradient_sign_flipped", "the gradient with its sign flipped (dL/dπ is negative for a "
                             "desirable example: descent raises it)",
                             lambda c: (_kto_reference(c)[0], -_kto_reference(c)[1])),
                     Mistake("gradient_not_divided_by_n", "the gradient of the summed loss (the 1/n of the mean "
                             "is missing)",
                             lambda c: (_kto_reference(c)[0], _kto_reference(c)[1] * len(c.kwargs["labels"]))),
                 ]),
    kto_loss_stub, how="oracle",
)


EXERCISES = [Z_REF, KTO_LOSS]
