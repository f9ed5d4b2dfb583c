"""Lesson A1's exercises (tutorials/A1_verify_a_pytorch_kto.py): the oracle: a candidate for it (TRL's unpaired APO-
zero loss) and its comparison rule.

Each exercise lists its inputs (`calls`), its reference and the typical mistakes its grader names; the
machinery (Exercise, Call, the judges, grade()) is in kit.py and registry.py.
"""

from __future__ import annotations

import numpy as np

from .kit import Call, Exercise, Mistake, closed_form, oracle_calls, oracle_cases, oracle_judge


def _apo_cases():
    return oracle_cases("kto_loss", "apo_zero_unpaired")


def _apo_arguments(case):
    i = case.inputs
    return (), {"policy_logps": i["policy_logps"], "ref_logps": i["ref_logps"], "labels": i["labels"],
                "beta": float(i["beta"]), "desirable_weight": float(i["desirable_weight"]),
                "undesirable_weight": float(i["undesirable_weight"])}


def _apo_stub(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight):
    raise NotImplementedError("write apo_zero_loss")


APO_ZERO = Exercise(
    "A1.apo_zero_loss", "apo_zero_loss",
    "apo_zero_loss(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight) -> loss",
    "a candidate for the oracle: TRL's unpaired APO-zero loss (desirable λ_D(1 − σ(βr)), undesirable λ_U σ(βr), "
    "mean over the batch), the loss only",
    oracle_calls(_apo_cases, _apo_arguments),
    oracle_judge("kto_loss", "apo_zero_unpaired", ("loss",), ("loss",), _apo_cases, lambda case: ((),)),
    _apo_stub, how="oracle",
)


def _mismatch_calls():
    reference = np.array([[1.0, -200.0, 3.0], [0.5, 1e-3, -2.0]])
    close = reference + np.array([[1e-12, -3e-10, 0.0], [0.0, 1e-10, 2e-11]])  # within 1e-9 of max|r| = 200
    far = reference.copy()
    far[1, 1] += 1e-4
    far[1, 2] += 1.0
    return [Call("a candidate within tolerance of the reference", (close, reference, 1e-9, 1e-12), {}),
            Call("a candidate off in two entries", (far, reference, 1e-9, 1e-12), {}),
            Call("a candidate off in two entries, looser tolerance", (far, reference, 1e-6, 1e-12), {}),
            Call("a NaN in the candidate", (np.array([0.0, np.nan]), np.array([0.0, 1.0]), 1e-9, 1e-12), {})]


def _mismatch(c, r, rtol, atol, per_element=False):
    c, r = np.asarray(c, dtype=np.float64), np.asarray(r, dtype=np.float64)
    limit = atol + rtol * (np.abs(r) if per_element else np.max(np.abs(r)))
    bad = ~(np.abs(c - r) <= limit)
    return int(np.flatnonzero(bad)[0]) if bad.any() else -1


def mismatch_stub(candidate, reference, rtol, atol):
    return -1  # a placeholder: "they agree", whatever they are


FIRST_MISMATCH = Exercise(
    "A1.first_mismatch", "first_mismatch",
    "first_mismatch(candidate, reference, rtol, atol) -> int",
    "the oracle's rule: the flat index of the first entry with |c − r| > atol + rtol · max|r| (NaN never "
    "agrees), or −1 when every entry agrees",
    _mismatch_calls,
    closed_form(("index",), lambda c: (_mismatch(*c.args),), [
        Mistake("per_element_tolerance", "a tolerance per entry, atol + rtol · |r_i| (the oracle scales by max|r|, "
                "so a tiny entry next to a large one is not held to a tiny tolerance)",
                lambda c: (_mismatch(*c.args, per_element=True),)),
    ], rtol=0.0, atol=0.0),
    mismatch_stub,
)


EXERCISES = [APO_ZERO, FIRST_MISMATCH]
