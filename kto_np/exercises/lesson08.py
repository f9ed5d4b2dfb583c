"""Lesson 08's exercises (tutorials/08_the_seed_formula_in_training.py): the seed's formula, without and with a stop-
gradient on z.

Each exercise lists its inputs (`calls`), its reference and the typical mistakes its grader names; the
machinery (Exercise, Call, the judges, grade()) is in kit.py and registry.py.
"""

from __future__ import annotations

import numpy as np

from .kit import Exercise, oracle_calls, oracle_cases, oracle_judge


def _seed_cases(variant):
    return lambda: oracle_cases("kto_loss", variant)


def _seed_arguments(case):
    i = case.inputs
    return (), {"policy_logps": i["policy_logps"], "ref_logps": i["ref_logps"], "labels": i["labels"],
                "beta": float(i["beta"]), "desirable_weight": float(i["desirable_weight"]),
                "undesirable_weight": float(i["undesirable_weight"])}


def seed_loss_stub(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight):
    raise NotImplementedError("write seed_loss_and_grad")


def _seed_exercise(exercise_id, function, variant, words):
    return Exercise(
        exercise_id, function,
        f"{function}(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight) -> "
        "(loss, dloss_dpolicy_logps)",
        words,
        oracle_calls(_seed_cases(variant), _seed_arguments),
        oracle_judge("kto_loss", variant, ("loss", "dloss_dpolicy_logps"), ("loss", "grad/policy_logps"),
                     _seed_cases(variant), lambda case: ((), np.shape(case.inputs["policy_logps"]))),
        seed_loss_stub, how="oracle")


SEED_LOSS = _seed_exercise(
    "08.seed_loss", "seed_loss_and_grad", "edifice",
    "the seed's formula (z = mean β r of the batch itself, not clamped, not detached: gradient flows through z) "
    "and its gradient")
SEED_LOSS_STOP_Z = _seed_exercise(
    "08.seed_loss_stop_z", "seed_loss_stop_z_and_grad", "edifice_stop_z_grad",
    "the seed's formula with a stop-gradient on z (stop_z_grad=True: z is a constant in the gradient)")


EXERCISES = [SEED_LOSS, SEED_LOSS_STOP_Z]
