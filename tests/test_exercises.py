"""The graded exercises: every reference solution passes, every stub fails with a message (no traceback),
the typical wrong answers are named, and `kto-np exercise` lists and checks them in a child process."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from kto_np.cli import main
from kto_np.exercises import EXERCISES, LESSONS, CallOutcome, as_numbers, exercises, grade

REPO = Path(__file__).resolve().parents[1]
SOLUTIONS = REPO / "tutorials" / "solutions"
sys.path.insert(0, str(SOLUTIONS))
import lesson01  # noqa: E402
import lesson03  # noqa: E402
import lesson04  # noqa: E402
import lesson08  # noqa: E402

sys.path.remove(str(SOLUTIONS))


def solution_spec(exercise) -> str:
    return f"{SOLUTIONS / ('lesson' + exercise.lesson + '.py')}:{exercise.function}"


def test_at_least_two_exercises_per_lesson_and_24_in_all():
    assert len(EXERCISES) >= 24
    for lesson in LESSONS:
        assert len(exercises(lesson)) >= 2, lesson
    for required in ("01.kto_loss", "03.logprobs_backward", "04.layernorm_backward", "04.attention_backward"):
        assert required in EXERCISES


@pytest.mark.parametrize("exercise_id", list(EXERCISES))
def test_the_reference_solution_passes(exercise_id):
    result = grade(exercise_id, solution_spec(EXERCISES[exercise_id]))
    assert result.passed, result.message


@pytest.mark.parametrize("exercise_id", list(EXERCISES))
def test_the_stub_fails_with_a_message(exercise_id):
    exercise = EXERCISES[exercise_id]
    result = grade(exercise_id, exercise.stub)
    assert not result.passed
    assert result.message and "Traceback" not in result.message
    if "NotImplementedError" in result.message:
        assert exercise.signature in result.message  # it says what to write


@pytest.mark.parametrize("exercise_id", list(EXERCISES))
def test_every_typical_mistake_is_named(exercise_id):
    """A learner whose numbers are those of a typical mistake is told that mistake (each one tried)."""
    exercise = EXERCISES[exercise_id]
    calls = exercise.calls()
    for mistake in exercise.judge.mistakes:
        outcomes = [CallOutcome(as_numbers(mistake.compute(call))) for call in calls]
        verdict = exercise.judge(calls, outcomes)
        assert not verdict.passed, mistake.id
        assert mistake.id in verdict.mistakes, (mistake.id, verdict.message)


def test_each_lesson_shows_its_exercises():
    for exercise in EXERCISES.values():
        script = next((REPO / "tutorials").glob(f"{exercise.lesson}_*.py")).read_text(encoding="utf-8")
        assert f'grade("{exercise.id}"' in script, exercise.id
        assert f"def {exercise.function}(" in script, exercise.id


# ---------------------------------------------------------------------------------------------------
# typical wrong answers of the named exercises


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def kto_z_not_clamped(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                      undesirable_weight):
    desirable = np.asarray(labels) == 1
    z = float(np.mean(kl_policy_logps - kl_ref_logps))  # no max(0, .)
    u = beta * (policy_logps - ref_logps - z)
    s, w = np.where(desirable, 1.0, -1.0), np.where(desirable, desirable_weight, undesirable_weight)
    return float(np.mean(w * (1 - _sigmoid(s * u)))), -w * s * beta * _sigmoid(u) * _sigmoid(-u) / len(u)


def kto_weights_ignored(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                        undesirable_weight):
    return lesson01.kto_loss_and_grad(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, 1.0, 1.0)


def kto_beta_twice(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                   undesirable_weight):
    return lesson01.kto_loss_and_grad(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta * beta,
                                      desirable_weight, undesirable_weight)[0], np.zeros(len(policy_logps))


def logprobs_mask_ignored(logits, targets, mask, dlogps):
    return lesson03.logprobs_backward(logits, targets, np.ones_like(mask), dlogps)


def layernorm_only_mean_term(dout, x, gamma, eps):
    mean = x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    g = dout * gamma
    dx = rstd * (g - g.mean(-1, keepdims=True))  # the x̂ · mean(g x̂) term is missing
    _, dgamma, dbeta = lesson04.layernorm_backward(dout, x, gamma, eps)
    return dx, dgamma, dbeta


def attention_no_scale(dout, q, k, v):
    dq, dk, dv = lesson04.attention_backward(dout, q, k, v)
    return dq * np.sqrt(q.shape[-1]), dk * np.sqrt(q.shape[-1]), dv


@pytest.mark.parametrize(("exercise_id", "function", "mistake", "words"), [
    ("01.kto_loss", kto_z_not_clamped, "z_not_clamped", "not clamped"),
    ("01.kto_loss", kto_weights_ignored, "weights_ignored", "weights ignored"),
    ("03.logprobs_backward", logprobs_mask_ignored, "mask_ignored", "mask ignored"),
    ("04.layernorm_backward", layernorm_only_mean_term, "dx_missing_variance_term", "x̂ · mean(g x̂)"),
    ("04.attention_backward", attention_no_scale, "scale_missing", "1/√HS"),
    ("08.seed_loss", lesson08.seed_loss_stop_z_and_grad, "z_detached", "z is detached"),
    ("08.seed_loss_stop_z", lesson08.seed_loss_and_grad, "z_not_detached", "not detached"),
])
def test_a_typical_wrong_answer_is_named(exercise_id, function, mistake, words):
    result = grade(exercise_id, function)
    assert not result.passed
    assert mistake in result.mistakes, result.message
    assert words in result.message


def test_a_wrong_answer_no_mistake_explains_still_says_where():
    result = grade("01.kto_loss", kto_beta_twice)  # the loss of β², a zero gradient: no single known mistake
    assert not result.passed and "is wrong on the oracle's case" in result.message
    assert re.search(r"yours is .*, the right value is", result.message)


def test_a_wrong_shape_and_a_missing_return_are_said_in_words():
    result = grade("04.layernorm_backward", lambda dout, x, gamma, eps: (dout, dout * x, dout))
    assert not result.passed and "should have shape (5,)" in result.message and "sum it over" in result.message
    result = grade("01.z_ref", lambda a, b: None)
    assert not result.passed and "returned None" in result.message
    result = grade("01.z_ref", lambda a, b: 1 / 0)
    assert not result.passed and "ZeroDivisionError" in result.message


def test_bad_arguments_are_refused_at_the_door():
    with pytest.raises(ValueError, match="no exercise"):
        grade("99.nothing", lesson01.z_ref)
    with pytest.raises(TypeError, match="function must be callable"):
        grade("01.z_ref", 3)
    with pytest.raises(TypeError, match="isolate=True needs"):
        grade("01.z_ref", lambda a, b: 0.0, isolate=True)


# ---------------------------------------------------------------------------------------------------
# the command line: isolated, exit status 0 / 1 / 2


def test_cli_list(capsys):
    assert main(["exercise", "list"]) == 0
    out = capsys.readouterr().out
    for exercise_id in EXERCISES:
        assert re.search(rf"^{re.escape(exercise_id)}\s", out, re.M)
    assert main(["exercise", "list", "--lesson", "04"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(exercises("04"))


def test_cli_check_passes_fails_and_cannot_load(tmp_path, capsys):
    assert main(["exercise", "check", "01.kto_loss", solution_spec(EXERCISES["01.kto_loss"])]) == 0
    assert "PASSED" in capsys.readouterr().out
    wrong = tmp_path / "mine.py"
    wrong.write_text("import os\nimport numpy as np\n\n"
                     "def layernorm_backward(dout, x, gamma, eps):\n    raise NotImplementedError\n\n"
                     "def crash(a, b):\n    os._exit(7)\n", encoding="utf-8")
    assert main(["exercise", "check", "04.layernorm_backward", f"{wrong}:layernorm_backward"]) == 1
    assert "NotImplementedError" in capsys.readouterr().out
    assert main(["exercise", "check", "01.z_ref", f"{wrong}:crash"]) == 1
    assert "exit status 7" in capsys.readouterr().out
    assert main(["exercise", "check", "01.z_ref", f"{wrong}:missing"]) == 2
    assert "has no attribute" in capsys.readouterr().err
    assert main(["exercise", "check", "01.z_ref", str(tmp_path / "absent.py") + ":f"]) == 2
    assert main(["exercise", "check", "99.none", f"{wrong}:crash"]) == 2


def test_isolated_grade_of_a_module_level_function_names_the_mistake():
    result = grade("04.attention_backward", "tests.test_exercises:attention_no_scale", isolate=True)
    assert not result.passed and "scale_missing" in result.mistakes
