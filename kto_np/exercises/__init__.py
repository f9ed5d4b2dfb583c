"""Graded exercises for the tutorials: a function the learner writes, and a grader that says what is wrong.

    from kto_np.exercises import grade
    result = grade("01.kto_loss", my_kto_loss_and_grad)
    result.passed, result.message      # e.g. False, "... The oracle recognises the mistake: z_ref is not clamped ..."

`kto-np exercise list` lists them (id, lesson, one line each); `kto-np exercise check ID path/file.py:function`
grades a function in a file, run in a child process as the oracle runs its candidates (exit status 0 passed,
1 not yet, 2 cannot be loaded). The reference solutions are in tutorials/solutions/.

Each exercise (Exercise) lists the inputs its grader runs the function on and judges the numbers that
come back: through the gradient oracle's diagnosis where one fits (kto_np.oracle: z not clamped, weights
ignored, the undesirable sign, β twice, mask ignored, ...), through central finite differences of a forward
pass for the backward passes (kto_np.gradcheck), through a closed form otherwise; and it recognises the
typical wrong answers by their numbers.

The file, in order: the machinery (an exercise, the calls its grader makes, running the learner's
function here or in a child process, the judges), the exercises about the losses (lessons 01, 02, 06,
08, 09, 10, 11, A1), those about the network (03, 04, 05, 07), then the registry and grade().
An exercise's grader never calls the learner's function itself: `calls()` lists the inputs (fixed,
seeded), the function is run on each of them (here, or in a child process: run_isolated), and only the
returned numbers come back to `judge(calls, outcomes)`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

DEFAULT_TIMEOUT = 60.0  # seconds for all the calls of one exercise


class Call(NamedTuple):
    """One set of inputs the grader runs the learner's function on; `label` says in words what it is."""

    label: str
    args: tuple
    kwargs: dict


class CallOutcome(NamedTuple):
    """What one call gave: the returned numbers (a tuple of float64 arrays) or an error message."""

    values: tuple | None
    error: str | None = None
    not_implemented: bool = False


@dataclass(frozen=True)
class Verdict:
    """What a judge decides: passed or not, the message, and the known mistakes it names."""

    passed: bool
    message: str
    mistakes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Result:
    """The result of grade(): `.passed`, `.message` (what is wrong, in words), the mistakes named."""

    exercise: str
    passed: bool
    message: str
    mistakes: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        head = f"{self.exercise}: {'PASSED' if self.passed else 'not yet'}"
        return "\n".join([head, self.message] + [f"note: {n}" for n in self.notes])


@dataclass(frozen=True)
class Exercise:
    """A function the learner writes (`signature`), its stub, and how it is graded."""

    id: str  # "01.kto_loss": lesson, then a name
    function: str  # the name of the function the learner writes
    signature: str  # "kto_loss_and_grad(policy_logps, ...) -> (loss, dloss_dpolicy_logps)"
    summary: str  # one line: what it computes
    calls: Callable[[], list[Call]]
    judge: Callable[[list[Call], list[CallOutcome]], Verdict]
    stub: Callable
    how: str = "closed form"  # how the grader knows the answer: closed form, finite differences, oracle

    @property
    def lesson(self) -> str:
        return self.id.split(".", 1)[0]


# ---------------------------------------------------------------------------------------------------
# running the learner's function


class ReturnError(TypeError):
    """The learner's function returned something that is not numbers."""


def as_numbers(out) -> tuple:
    """A return value as a tuple of float64 arrays: a tuple or list gives one array per item, anything
    else one array. TypeError when an item is not numbers."""
    items = out if isinstance(out, (tuple, list)) else (out,)
    values = []
    for position, item in enumerate(items):
        if item is None:
            raise ReturnError(f"returned None{' as item ' + str(position) if len(items) > 1 else ''} "
                            "(a missing `return`?)")
        try:
            arr = np.array(item, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ReturnError(f"returned a {type(item).__name__}{' as item ' + str(position) if len(items) > 1 else ''}"
                            f", not numbers ({exc})") from exc
        values.append(arr)
    return tuple(values)


def run_calls(function: Callable, calls: Sequence[Call], timeout: float | None = DEFAULT_TIMEOUT) -> list[CallOutcome]:
    """Run `function` on every call in this process, each on fresh copies of its inputs; every way out of it
    (an exception, sys.exit, the time limit) becomes that call's error."""
    from ..oracle.run.candidates import short_error  # noqa: PLC0415
    from ..oracle.run.runner import CandidateTimeout, _time_limit  # noqa: PLC0415

    outcomes = []
    for call in calls:
        args, kwargs = copy.deepcopy(call.args), copy.deepcopy(call.kwargs)
        try:
            with _time_limit(timeout):
                out = function(*args, **kwargs)
            outcomes.append(CallOutcome(as_numbers(out)))
        except NotImplementedError:
            outcomes.append(CallOutcome(None, "raised NotImplementedError", not_implemented=True))
        except ReturnError as exc:
            outcomes.append(CallOutcome(None, str(exc)))
        except CandidateTimeout:
            outcomes.append(CallOutcome(None, f"was still running after {timeout:g} s"))
        except SystemExit as exc:
            outcomes.append(CallOutcome(None, f"called sys.exit({exc.code!r}) (an exit is a failure, not an answer)"))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - the learner's failure is a finding, not a crash
            outcomes.append(CallOutcome(None, f"raised {short_error(exc)}"))
    return outcomes


def verdict_on(exercise: Exercise, calls: list[Call], outcomes: list[CallOutcome]) -> Verdict:
    """The judge's verdict, after the failures every exercise shares: the stub, an exception, a wrong count
    or shape of returned values (the judges then see well-formed numbers only)."""
    if outcomes and all(o.not_implemented for o in outcomes):
        return Verdict(False, f"{exercise.function} still raises NotImplementedError: replace the stub's body "
                              f"with your code. It should compute {exercise.signature}: {exercise.summary}.")
    for call, outcome in zip(calls, outcomes):
        if outcome.error is not None:
            return Verdict(False, f"{exercise.function} gave no answer on {call.label}: it {outcome.error}. Run it on "
                                  "that input yourself to see where.")
    return exercise.judge(calls, outcomes)


# ---------------------------------------------------------------------------------------------------
# comparing numbers


def fmt(x: float) -> str:
    return f"{x:.6g}"


def first_difference(value: np.ndarray, reference: np.ndarray, rtol: float, atol: float) -> tuple | None:
    """(index, value, reference) of the first entry outside atol + rtol max|reference|, or None."""
    value, reference = np.asarray(value, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    finite = reference[np.isfinite(reference)]
    limit = atol + rtol * (float(np.max(np.abs(finite))) if finite.size else 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        bad = ~((value == reference) | (np.abs(value - reference) <= limit))  # NaN counts as bad
    if not bad.any():
        return None
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    return index, float(value[index]), float(reference[index])


def agree(values: tuple, reference: tuple, rtol: float, atol: float) -> bool:
    return len(values) == len(reference) and all(
        np.shape(v) == np.shape(r) and first_difference(v, r, rtol, atol) is None for v, r in zip(values, reference))


class Mistake(NamedTuple):
    """A typical wrong answer: its id, what it is in words, and the numbers it gives on a call."""

    id: str
    words: str
    compute: Callable[[Call], tuple]


def where(index: tuple) -> str:
    return f" at index {list(index)}" if index else ""


def check_form(names: Sequence[str], calls: list[Call], outcomes: list[CallOutcome], reference: Callable
               ) -> tuple[Verdict | None, list[tuple]]:
    """(a verdict when the count or a shape of the returned values is wrong, else None; the references)."""
    references = []
    for call, outcome in zip(calls, outcomes):
        expected = tuple(np.asarray(r, dtype=np.float64) for r in reference(call))
        references.append(expected)
        got = outcome.values
        if len(got) != len(expected):
            wanted = ", ".join(names)
            return Verdict(False, f"it returned {len(got)} value{'s' if len(got) != 1 else ''}; it should return "
                                  f"{len(expected)}: {wanted}" + (" (as a tuple)" if len(expected) > 1 else "")
                           ), references
        for name, g, e in zip(names, got, expected):
            if g.shape != e.shape:
                unsummed = g.ndim > e.ndim and g.shape[g.ndim - e.ndim:] == e.shape
                return Verdict(False, f"{name} has shape {g.shape} on {call.label}; it should have shape "
                                      f"{e.shape}" + (" (a scalar)" if e.shape == () else "")
                               + (": sum it over the leading axes (every example and position adds to it)"
                                  if unsummed else "") + ".", ("not_summed",) if unsummed else ()), references
    return None, references


def closed_form(names: Sequence[str], reference: Callable[[Call], tuple], mistakes: Sequence[Mistake] = (), *,
                rtol: float = 1e-8, atol: float = 1e-12, mistake_rtol: float = 1e-6, hint: str = ""
                ) -> Callable[[list[Call], list[CallOutcome]], Verdict]:
    """A judge comparing each returned value with `reference(call)` (a closed form, or finite differences of
    a forward pass), and naming the typical mistakes whose numbers the learner's reproduce on every call."""

    def judge(calls: list[Call], outcomes: list[CallOutcome]) -> Verdict:
        verdict, references = check_form(names, calls, outcomes, reference)
        if verdict is not None:
            return verdict
        for call, outcome, expected in zip(calls, outcomes, references):
            for name, got, ref in zip(names, outcome.values, expected):
                diff = first_difference(got, ref, rtol, atol)
                if diff is None:
                    continue
                index, value, right = diff
                text = (f"{name} is wrong on {call.label}: yours is {fmt(value)}{where(index)}, "
                        f"the right value is {fmt(right)}.")
                named = name_mistakes(calls, outcomes, mistakes, mistake_rtol)
                if named:
                    return Verdict(False, text + " " + typical(named), tuple(m.id for m in named))
                return Verdict(False, text + (" " + hint if hint else ""))
        return Verdict(True, f"right on all {len(calls)} inputs: {'; '.join(c.label for c in calls)}.")

    judge.mistakes = tuple(mistakes)  # the typical mistakes it names (tests/test_exercises.py tries each one)
    return judge


def typical(named: Sequence[Mistake]) -> str:
    return " ".join(f"Your numbers are those of a typical mistake: {m.words}." for m in named)


def name_mistakes(calls, outcomes, mistakes: Sequence[Mistake], rtol: float = 1e-6) -> list[Mistake]:
    """The typical mistakes whose numbers the learner's agree with on every call."""
    named = []
    for mistake in mistakes:
        try:
            if all(agree(o.values, tuple(np.asarray(v, dtype=np.float64) for v in mistake.compute(c)), rtol, 1e-12)
                   for c, o in zip(calls, outcomes)):
                named.append(mistake)
        except (ValueError, FloatingPointError, ZeroDivisionError):  # pragma: no cover - a mutant undefined here
            continue
    return named


# ---------------------------------------------------------------------------------------------------
# the oracle as a grader


_ORACLE_CASES: dict = {}


def oracle_cases(kind: str, variant: str | None, keep: Callable | None = None) -> list:
    """The oracle's reference cases of one kind and variant (generated once), those `keep` accepts."""
    from ..oracle import generate_cases  # noqa: PLC0415

    if "all" not in _ORACLE_CASES:
        _ORACLE_CASES["all"] = generate_cases()
    return [c for c in _ORACLE_CASES["all"] if c.kind == kind and c.variant == variant and (keep is None or keep(c))]


QUANTITY_WORDS = {
    "loss": "the loss",
    "logps": "the log-probabilities",
    "grad/policy_logps": "the gradient dL/d policy_logps",
    "grad/logits": "dlogits",
    "grad/policy_chosen_logps": "the gradient dL/d policy_chosen_logps",
    "grad/policy_rejected_logps": "the gradient dL/d policy_rejected_logps",
}


def oracle_judge(kind: str, variant: str | None, names: Sequence[str], quantities: Sequence[str],
                 cases: Callable[[], list], shapes: Callable[[Any], tuple], extra: Sequence[Mistake] = (),
                 sources: Sequence[str] | None = None) -> Callable[[list[Call], list[CallOutcome]], Verdict]:
    """A judge that hands the learner's numbers to the gradient oracle (kto_np.oracle): its float64 cases,
    its comparison and its diagnosis, which names the known mistake the numbers reproduce. `names` are the
    returned values in words, `quantities` the oracle's names for them; `extra` are typical mistakes the
    oracle's catalogue does not hold, tried when it names none."""
    from ..oracle.cases.mistakes import KNOWN_MISTAKES  # noqa: PLC0415
    from ..oracle.check import build_report  # noqa: PLC0415
    from ..oracle.run.candidates import Evaluation  # noqa: PLC0415
    from ..oracle.run.runner import Outcome  # noqa: PLC0415

    def judge(calls: list[Call], outcomes: list[CallOutcome]) -> Verdict:
        selected = cases()
        by_label = {c.name: c for c in selected}
        for call, outcome in zip(calls, outcomes):
            expected = shapes(by_label[call.label])
            if len(outcome.values) != len(expected):
                return Verdict(False, f"it returned {len(outcome.values)} value(s); it should return "
                                      f"{len(expected)}: {', '.join(names)}" + (" (as a tuple)" if len(expected) > 1
                                                                                else ""))
            for name, got, shape in zip(names, outcome.values, expected):
                if got.shape != shape:
                    return Verdict(False, f"{name} has shape {got.shape} on case {call.label}; it should have "
                                          f"shape {shape}" + (" (a scalar)" if shape == () else ""))
        evaluations = {}
        for call, outcome in zip(calls, outcomes):
            how = sources or ["returned"] * len(quantities)
            evaluations[call.label] = Evaluation(
                {q: (v, s, None) for q, v, s in zip(quantities, outcome.values, how)}, [])
        report = build_report(kind, variant, "float64", selected, Outcome(evaluations, {}, [], None),
                              cases_source="kto_np's own cases", cases_identical=True)
        if report.passed:
            return Verdict(True, f"all {len(report.checks)} checks of the oracle's {len(selected)} float64 cases "
                                 f"pass ({kind}{'/' + variant if variant else ''}).")
        failure = next(c for c in report.failures)
        words = QUANTITY_WORDS.get(failure.quantity, failure.quantity)
        words = "T" + words[1:] if words.startswith("the ") else words
        index = where(failure.mismatch_index) if failure.mismatch_index else ""
        text = (f"{words} is wrong on the oracle's case {failure.case!r}: yours is "
                f"{fmt(failure.candidate_value)}{index}, the right value is {fmt(failure.reference_value)}"
                f" ({len(report.failures)} of {len(report.checks)} checks fail).")
        ids = report.diagnosis.mistakes
        if ids:
            said = " ".join(f"The oracle recognises the mistake: {KNOWN_MISTAKES[i].title}. "
                            f"Fix: {KNOWN_MISTAKES[i].fix}." for i in ids)
            return Verdict(False, text + " " + said, ids)
        named = name_mistakes(calls, outcomes, extra)
        if named:
            return Verdict(False, text + " " + typical(named), tuple(m.id for m in named))
        return Verdict(False, text + f" The oracle's diagnosis: {report.diagnosis.message}.")

    judge.mistakes = tuple(extra)
    return judge


def oracle_calls(cases: Callable[[], list], arguments: Callable[[Any], tuple[tuple, dict]]) -> Callable[[], list[Call]]:
    def calls() -> list[Call]:
        out = []
        for case in cases():
            args, kwargs = arguments(case)
            out.append(Call(case.name, args, kwargs))
        return out
    return calls


# ---------------------------------------------------------------------------------------------------
# finite differences of a forward pass: the reference for a backward exercise


def fd_vjp(forward: Callable, inputs: Sequence[np.ndarray], dout: np.ndarray, which: Sequence[int]) -> tuple:
    """d sum(forward(*inputs) * dout) / d inputs[i] for i in `which`, by central differences (kto_np.gradcheck)."""
    from ..gradcheck import numerical_gradient  # noqa: PLC0415

    work = [np.array(x, dtype=np.float64, copy=True) for x in inputs]
    grads = []
    for i in which:
        grads.append(numerical_gradient(lambda: float(np.sum(forward(*work) * dout)), work[i]))
    return tuple(grads)


# ===================================================================================================
# running the learner's function in a child process (`kto-np exercise check`)
# ===================================================================================================


# Running the learner's function in a child process, as the oracle runs its candidates (oracle/run/runner.py:
# its child's environment and its stop).
#
# The parent writes the request (exercise id, spec, time limit) and starts `python -m kto_np.exercises.worker`.
# The child loads the function with the oracle's loader (kto_np.oracle.load_callable), runs it on the
# exercise's calls under the oracle's time limit, and writes back plain numbers (the oracle's wire format:
# shape and data, never a pickle). The parent judges. Whatever the function does in the child (sys.exit,
# os._exit, a crash, a hang, patching the grader) ends at most that child; the parent names it.

IMPORT_TIMEOUT = 60.0  # seconds for the child to start and import the function


def run_isolated(exercise_id: str, spec: str, calls: list[Call], timeout: float | None
                 ) -> tuple[list[CallOutcome], tuple[str, ...]]:
    """(one outcome per call, notes) from a child process. ImportError / AttributeError / TypeError when the
    spec cannot be loaded there (the loader's own message)."""
    from ..oracle.run.runner import _describe_end, child_env, decode_array, stop_child, summarise_output  # noqa: PLC0415

    limit = (timeout if timeout and math.isfinite(timeout) else 1e9) * max(1, len(calls)) + IMPORT_TIMEOUT
    with tempfile.TemporaryDirectory(prefix="kto_np-exercise-") as tmp:
        folder = Path(tmp)
        request, result_path = folder / "request.json", folder / "result.json"
        request.write_text(json.dumps({"exercise": exercise_id, "spec": spec, "timeout": timeout,
                                       "cwd": os.getcwd(), "result": str(result_path),
                                       "sys_path": [p for p in sys.path if isinstance(p, str)]}), encoding="utf-8")
        stdout, stderr = folder / "stdout.txt", folder / "stderr.txt"
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            process = subprocess.Popen([sys.executable, "-m", "kto_np.exercises.worker", str(request)],
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=child_env(),
                                       start_new_session=True)
        try:
            returncode = process.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            returncode, timed_out = None, True
        finally:
            stop_child(process)
        notes = tuple(n for n in (summarise_output("stdout", stdout), summarise_output("stderr", stderr)) if n)
        try:
            answer = json.loads(result_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            answer = None
    if timed_out:
        what = f"was still running after {limit:g} s"
    elif not isinstance(answer, dict):
        what = _describe_end(returncode).replace("its process", "its process (a child)")
    else:
        what = None
    if what is not None:
        return [CallOutcome(None, what) for _ in calls], notes
    if "load_error" in answer:
        kinds = {"ImportError": ImportError, "AttributeError": AttributeError, "TypeError": TypeError,
                 "ValueError": ValueError}
        raise kinds.get(answer.get("type"), ImportError)(str(answer["load_error"]))
    if "import_exit" in answer:
        return [CallOutcome(None, f"called sys.exit({answer['import_exit']}) while its file was imported")
                for _ in calls], notes
    outcomes = []
    items = answer.get("outcomes")
    if not isinstance(items, list) or len(items) != len(calls):
        return [CallOutcome(None, "sent back something the grader cannot read") for _ in calls], notes
    for item in items:
        try:
            if item.get("values") is not None:
                outcomes.append(CallOutcome(tuple(decode_array(v) for v in item["values"])))
            else:
                outcomes.append(CallOutcome(None, str(item.get("error"))[:2000], bool(item.get("not_implemented"))))
        except (ValueError, TypeError, AttributeError):
            outcomes.append(CallOutcome(None, "sent back something the grader cannot read"))
    return outcomes, notes


# ===================================================================================================
# the exercises about the losses: lessons 01, 02, 06, 08, 09, 10, 11, A1
# ===================================================================================================


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


# ---------------------------------------------------------------------------------------------------
# 01: the KTO loss


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


# ---------------------------------------------------------------------------------------------------
# 02: loss surfaces


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
    shape = _sigmoid(u) * _sigmoid(-u) if derivative else _sigmoid(s * u)
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


def _counts(labels):
    labels = np.asarray(labels)
    return float(np.sum(labels == 1)), float(np.sum(labels != 1))


def _share(labels, dw, uw):
    nd, nu = _counts(labels)
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
                lambda c: (c.args[1] * _counts(c.args[0])[0] / (c.args[2] * _counts(c.args[0])[1])
                           if _counts(c.args[0])[1] else np.inf,)),
        Mistake("weights_ignored", "the fraction of thumbs-up examples n_D / n, without the weights",
                lambda c: (_counts(c.args[0])[0] / len(c.args[0]),)),
        Mistake("undesirable_share", "the undesirable class's share",
                lambda c: (1.0 - _share(*c.args),)),
    ], hint="At u = 0 every example's |gradient| is λ_i β/(4n): add them up per class."),
    share_stub,
)


# ---------------------------------------------------------------------------------------------------
# 06: imbalanced feedback


def _balance_calls():
    return [
        Call("1 thumbs-up in 10, λ_D = λ_U = 1", (np.array([1] + [0] * 9), 1.0, 1.0), {}),
        Call("1 thumbs-up in 10, λ_D = 10, λ_U = 1", (np.array([1] + [0] * 9), 10.0, 1.0), {}),
        Call("6 thumbs-up, 2 thumbs-down, λ_D = 1, λ_U = 1.5", (np.array([1, 1, 0, 1, 1, 0, 1, 1]), 1.0, 1.5), {}),
    ]


def _rho(labels, dw, uw):
    nd, nu = _counts(labels)
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
    nd, nu = _counts(labels)
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
                lambda c: tuple(b * (_counts(c.args[0])[0] / _counts(c.args[0])[1]) ** 2 for b in _band(*c.args))),
        Mistake("undesirable_weight_ignored", "the band for λ_U = 1 whatever λ_U is",
                lambda c: _band(c.args[0], 1.0)),
        Mistake("band_inverted", "the band [3/4, 1] (ρ's bounds inverted)",
                lambda c: _band(*c.args, low=0.75, high=1.0)),
    ]),
    band_stub,
)


# ---------------------------------------------------------------------------------------------------
# 08: the seed's formula


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


# ---------------------------------------------------------------------------------------------------
# 09: the KL estimate


def _rotation_calls():
    rng = np.random.default_rng(9)
    return [
        Call("4 completions of 5 tokens", (rng.integers(0, 12, (4, 5)),), {}),
        Call("3 completions of 2 tokens", (np.array([[1, 2], [3, 4], [5, 6]]),), {}),
        Call("5 completions of 1 token", (np.arange(5)[:, None] + 10,), {}),
    ]


def rotation_stub(completions):
    return completions  # a placeholder: the matched pairs, which is the mistake to avoid


KL_COMPLETIONS = Exercise(
    "09.kl_completions", "kl_completions",
    "kl_completions(completions) -> kl_completions",
    "the completion each prompt is paired with for the KL estimate: prompt i with completion i − 1 "
    "(TRL's rotation by one; completions is [B, T], one row per example)",
    _rotation_calls,
    closed_form(("kl_completions",), lambda c: (np.roll(c.args[0], 1, axis=0),), [
        Mistake("kl_pairs_not_mismatched", "matched pairs, prompt i with its own completion i (the KL estimate "
                "then measures the rewards being scored)", lambda c: (c.args[0],)),
        Mistake("kl_pairs_rotated_wrong_way", "the rotation the other way, completion i + 1",
                lambda c: (np.roll(c.args[0], -1, axis=0),)),
        Mistake("kl_pairs_reversed", "reversing the batch: the middle example of an odd batch keeps its own "
                "completion", lambda c: (c.args[0][::-1],)),
        Mistake("rotated_tokens", "rotating the tokens inside each completion (axis 1) instead of the rows",
                lambda c: (np.roll(c.args[0], 1, axis=1),)),
    ], rtol=0.0, atol=0.0),
    rotation_stub,
)


def _sampled_calls():
    rng = np.random.default_rng(19)
    p = rng.normal(-8.0, 2.0, 64)
    return [
        Call("64 samples", (p, p - rng.gamma(2.0, 0.4, 64)), {}),
        Call("5 samples", (p[:5], p[:5] + rng.normal(0.0, 1.0, 5)), {}),
    ]


def _sampled(p, r, ddof=1, se=True, sign=1.0):
    d = sign * (np.asarray(p) - np.asarray(r))
    std = float(np.std(d, ddof=ddof))
    return float(d.mean()), std / np.sqrt(len(d)) if se else std


def sampled_stub(policy_logps, ref_logps):
    raise NotImplementedError("write sampled_kl")


SAMPLED_KL = Exercise(
    "09.sampled_kl", "sampled_kl",
    "sampled_kl(policy_logps, ref_logps) -> (estimate, standard_error)",
    "KL(π ‖ π_ref) from completions sampled from π: the mean of log π − log π_ref over the samples, and its "
    "standard error (sample standard deviation, ddof=1, over √n)",
    _sampled_calls,
    closed_form(("estimate", "standard_error"), lambda c: _sampled(*c.args), [
        Mistake("std_not_standard_error", "the standard deviation of the samples, not of their mean (÷ √n missing)",
                lambda c: _sampled(*c.args, se=False)),
        Mistake("ddof_0", "the standard deviation with ddof=0 (the biased one: use ddof=1)",
                lambda c: _sampled(*c.args, ddof=0)),
        Mistake("ratio_reversed", "the log-ratio the wrong way round, log π_ref − log π",
                lambda c: _sampled(*c.args, sign=-1.0)),
    ]),
    sampled_stub,
)


# ---------------------------------------------------------------------------------------------------
# 10: DPO


def _dpo_cases():
    return oracle_cases("dpo_loss", None)


def _dpo_arguments(case):
    i = case.inputs
    return (i["policy_chosen_logps"], i["policy_rejected_logps"], i["ref_chosen_logps"], i["ref_rejected_logps"],
            float(i["beta"])), {}


def _dpo_reference(call):
    from ..dpo import dpo_loss_and_grad  # noqa: PLC0415

    loss, (dc, dr), _ = dpo_loss_and_grad(*call.args)
    return loss, dc, dr


def dpo_stub(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    raise NotImplementedError("write dpo_loss_and_grad")


DPO_LOSS = Exercise(
    "10.dpo_loss", "dpo_loss_and_grad",
    "dpo_loss_and_grad(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta) "
    "-> (loss, dloss_dpolicy_chosen_logps, dloss_dpolicy_rejected_logps)",
    "DPO's loss mean_i −log σ(h_i), h_i = β((πc − refc) − (πr − refr)), and its gradient for both sides",
    oracle_calls(_dpo_cases, _dpo_arguments),
    oracle_judge("dpo_loss", None, ("loss", "dloss_dpolicy_chosen_logps", "dloss_dpolicy_rejected_logps"),
                 ("loss", "grad/policy_chosen_logps", "grad/policy_rejected_logps"), _dpo_cases,
                 lambda case: ((), np.shape(case.inputs["policy_chosen_logps"]),
                               np.shape(case.inputs["policy_chosen_logps"])), extra=[
                     Mistake("rejected_same_sign", "the rejected side's gradient with the chosen side's sign "
                             "(h falls as πr rises: its gradient is the negative of the chosen one's)",
                             lambda c: (lambda ref: (ref[0], ref[1], ref[1]))(_dpo_reference(c))),
                     Mistake("gradient_not_divided_by_n", "the gradient of the summed loss (the 1/n of the mean "
                             "is missing)", lambda c: (lambda ref, n: (ref[0], ref[1] * n, ref[2] * n))(
                                 _dpo_reference(c), len(c.args[0]))),
                     Mistake("sigma_not_complement", "σ(h) in place of σ(−h) (d/dh −log σ(h) = −σ(−h))",
                             lambda c: (lambda ref, h, n: (ref[0], -call_beta(c) * _sigmoid(h) / n,
                                                           call_beta(c) * _sigmoid(h) / n))(
                                 _dpo_reference(c), _margins(*c.args), len(c.args[0]))),
                 ]),
    dpo_stub, how="oracle",
)


def call_beta(call):
    return call.args[4]


def _margins(pc, pr, rc, rr, beta, *, use_beta=True, sign=1.0, reference=True):
    pc, pr, rc, rr = (np.asarray(a, dtype=np.float64) for a in (pc, pr, rc, rr))
    if not reference:
        rc, rr = np.zeros_like(rc), np.zeros_like(rr)
    return sign * (beta if use_beta else 1.0) * ((pc - rc) - (pr - rr))


def _margin_calls():
    rng = np.random.default_rng(10)
    pc, pr = rng.normal(-9, 2, 6), rng.normal(-9, 2, 6)
    rc, rr = pc + rng.normal(0, 1.5, 6), pr + rng.normal(0, 1.5, 6)
    return [Call("6 pairs, β = 0.1", (pc, pr, rc, rr, 0.1), {}), Call("6 pairs, β = 0.5", (pc, pr, rc, rr, 0.5), {})]


def margin_stub(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    raise NotImplementedError("write reward_margins")


REWARD_MARGIN = Exercise(
    "10.reward_margins", "reward_margins",
    "reward_margins(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta) "
    "-> margins",
    "the implied reward margin of each pair, β[(log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)]",
    _margin_calls,
    closed_form(("margins",), lambda c: (_margins(*c.args),), [
        Mistake("beta_missing", "the margin without β", lambda c: (_margins(*c.args, use_beta=False),)),
        Mistake("sign_flipped", "rejected minus chosen", lambda c: (_margins(*c.args, sign=-1.0),)),
        Mistake("reference_ignored", "the policy's log-probs alone, without the reference's",
                lambda c: (_margins(*c.args, reference=False),)),
    ]),
    margin_stub,
)


# ---------------------------------------------------------------------------------------------------
# 11: β under AdamW


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


# ---------------------------------------------------------------------------------------------------
# A1: the oracle


def _apo_cases():
    return oracle_cases("kto_loss", "apo_zero_unpaired")


def _apo_stub(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight):
    raise NotImplementedError("write apo_zero_loss")


APO_ZERO = Exercise(
    "A1.apo_zero_loss", "apo_zero_loss",
    "apo_zero_loss(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight) -> loss",
    "a candidate for the oracle: TRL's unpaired APO-zero loss (desirable λ_D(1 − σ(βr)), undesirable λ_U σ(βr), "
    "mean over the batch), the loss only",
    oracle_calls(_apo_cases, _seed_arguments),
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


LOSS_EXERCISES = [Z_REF, KTO_LOSS, KTO_GRADIENT, DESIRABLE_SHARE, BALANCE_RATIO, BAND_WEIGHTS, SEED_LOSS,
             SEED_LOSS_STOP_Z, KL_COMPLETIONS, SAMPLED_KL, DPO_LOSS, REWARD_MARGIN, ADAM_FIRST_STEP, SATURATION,
             APO_ZERO, FIRST_MISMATCH]


# ===================================================================================================
# the exercises about the network: lessons 03, 04, 05, 07
# ===================================================================================================


# ---------------------------------------------------------------------------------------------------
# 03: sequence log-probabilities


def _log_softmax(x, axis=-1):
    x = np.asarray(x, dtype=np.float64)
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def _log_softmax_calls():
    rng = np.random.default_rng(3)
    return [Call("random logits [2, 3, 5]", (rng.normal(0, 2, (2, 3, 5)),), {}),
            Call("large logits [2, 4] (around ±1000)", (np.array([[1000.0, 999.0, 990.0, -5.0],
                                                                  [-1000.0, -1001.0, -998.0, -999.5]]),), {})]


def log_softmax_stub(logits):
    raise NotImplementedError("write log_softmax")


def _log_softmax_judge():
    inner = closed_form(("log_softmax",), lambda c: (_log_softmax(c.args[0]),), [
        Mistake("softmax_not_log", "softmax itself, not its logarithm",
                lambda c: (np.exp(_log_softmax(c.args[0])),)),
        Mistake("wrong_axis", "normalising over the first axis instead of the last (the vocabulary)",
                lambda c: (_log_softmax(c.args[0], axis=0),)),
        Mistake("not_normalised", "the logits minus their maximum, without subtracting log Σ exp",
                lambda c: (c.args[0] - np.max(c.args[0], axis=-1, keepdims=True),)),
    ])

    def judge(calls, outcomes):
        for call, outcome in zip(calls, outcomes):
            if outcome.values and not np.all(np.isfinite(outcome.values[0])):
                return Verdict(False, f"log_softmax gives inf or NaN on {call.label}: exp(1000) overflows. "
                                      "Subtract each row's maximum before the exponential (log_softmax(x) = "
                                      "log_softmax(x − max x)).", ("not_stable",))
        return inner(calls, outcomes)

    judge.mistakes = inner.mistakes
    return judge


LOG_SOFTMAX = Exercise(
    "03.log_softmax", "log_softmax", "log_softmax(logits) -> log_probs",
    "log softmax over the last axis, stable for logits in the thousands",
    _log_softmax_calls, _log_softmax_judge(), log_softmax_stub,
)


def _logprobs_cases():
    return oracle_cases("logprobs", None)


def _logprobs_arguments(case):
    i = case.inputs
    return (i["logits"], i["targets"], i["mask"], i["upstream"]), {}


def _logprobs_grad(logits, targets, mask, dlogps, *, sign=1.0, upstream=True, softmax=True):
    probs = np.exp(_log_softmax(logits))
    onehot = np.zeros_like(probs)
    np.put_along_axis(onehot, np.asarray(targets, dtype=np.int64)[..., None], 1.0, axis=-1)
    d = np.asarray(dlogps, dtype=np.float64) if upstream else np.ones(len(dlogps))
    mask = np.asarray(mask, dtype=np.float64)[..., None]
    return sign * mask * (onehot - (probs if softmax else 0.0)) * d[:, None, None]


def logprobs_backward_stub(logits, targets, mask, dlogps):
    raise NotImplementedError("write logprobs_backward")


LOGPROBS_BACKWARD = Exercise(
    "03.logprobs_backward", "logprobs_backward", "logprobs_backward(logits, targets, mask, dlogps) -> dlogits",
    "the backward of compute_logprobs (logps[b] = Σ_t mask[b,t] log softmax(logits[b,t])[targets[b,t]], the "
    "seed's unshifted contract): dlogits [B, T, V] from dlogps [B]",
    oracle_calls(_logprobs_cases, _logprobs_arguments),
    oracle_judge("logprobs", None, ("dlogits",), ("grad/logits",), _logprobs_cases,
                 lambda case: (np.shape(case.inputs["logits"]),), sources=("vjp",), extra=[
                     Mistake("sign_flipped", "softmax − onehot: the sign flipped (raising the target's logit "
                             "raises its log-prob)", lambda c: (_logprobs_grad(*c.args, sign=-1.0),)),
                     Mistake("dlogps_ignored", "the gradient of the plain sum (dlogps taken as 1: the upstream "
                             "gradient is not multiplied in)", lambda c: (_logprobs_grad(*c.args, upstream=False),)),
                     Mistake("softmax_term_missing", "onehot alone, without the softmax term (the log Σ exp "
                             "depends on every logit)", lambda c: (_logprobs_grad(*c.args, softmax=False),)),
                 ]),
    logprobs_backward_stub, how="oracle",
)


def _sequence_cases():
    return oracle_cases("sequence_logprobs", None)


def _sequence_arguments(case):
    i = case.inputs
    return (i["logits"], i["tokens"], i["completion_mask"]), {}


def sequence_stub(logits, tokens, completion_mask):
    raise NotImplementedError("write sequence_logprobs")


SEQUENCE_LOGPROBS = Exercise(
    "03.sequence_logprobs", "sequence_logprobs", "sequence_logprobs(logits, tokens, completion_mask) -> logps",
    "log π(completion | prompt) per sequence with the language-model shift: logits[:, t] score tokens[:, t + 1], "
    "counted where completion_mask[:, t + 1] is 1",
    oracle_calls(_sequence_cases, _sequence_arguments),
    oracle_judge("sequence_logprobs", None, ("logps",), ("logps",), _sequence_cases,
                 lambda case: ((np.shape(case.inputs["tokens"])[0],),)),
    sequence_stub, how="oracle",
)


# ---------------------------------------------------------------------------------------------------
# 04: backward passes


GELU_C = np.sqrt(2.0 / np.pi)
GELU_K = 0.044715


def _gelu(x):
    return 0.5 * x * (1.0 + np.tanh(GELU_C * (x + GELU_K * x ** 3)))


def _gelu_grad(dout, x, *, first=True, chain=True, square=True):
    t = np.tanh(GELU_C * (x + GELU_K * x ** 3))
    inner = GELU_C * (1.0 + (3.0 * GELU_K * x ** 2 if chain else 0.0))
    return dout * ((0.5 * (1.0 + t) if first else 0.0) + 0.5 * x * ((1.0 - t * t) if square else (1.0 - t)) * inner)


def _gelu_calls():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1.5, (3, 4))
    return [Call("x [3, 4], a random upstream gradient", (rng.normal(0, 1, (3, 4)), x), {}),
            Call("x from −4 to 4, upstream 1", (np.ones(9), np.linspace(-4, 4, 9)), {})]


def gelu_backward_stub(dout, x):
    raise NotImplementedError("write gelu_backward")


GELU_BACKWARD = Exercise(
    "04.gelu_backward", "gelu_backward", "gelu_backward(dout, x) -> dx",
    "the backward of GELU's tanh approximation 0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))",
    _gelu_calls,
    closed_form(("dx",), lambda c: fd_vjp(_gelu, (c.args[1],), c.args[0], (0,)), [
        Mistake("product_rule_first_term", "only the tanh's derivative: the product rule's first term "
                "0.5(1 + tanh(·)) is missing", lambda c: (_gelu_grad(*c.args, first=False),)),
        Mistake("chain_rule_inner", "the derivative of tanh's argument without its 3 · 0.044715 x² term",
                lambda c: (_gelu_grad(*c.args, chain=False),)),
        Mistake("tanh_derivative", "1 − tanh in place of tanh's derivative 1 − tanh²",
                lambda c: (_gelu_grad(*c.args, square=False),)),
    ], rtol=1e-6, atol=1e-9),
    gelu_backward_stub, how="finite differences",
)


def _layernorm(x, gamma, beta, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _layernorm_grad(dout, x, gamma, eps, *, mean_term=True, projection=True, gamma_in_dx=True):
    mean = x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
    x_hat = (x - mean) * rstd
    g = dout * gamma if gamma_in_dx else dout
    dx = g - (g.mean(axis=-1, keepdims=True) if mean_term else 0.0)
    if projection:
        dx = dx - x_hat * (g * x_hat).mean(axis=-1, keepdims=True)
    C = x.shape[-1]
    return rstd * dx, (dout * x_hat).reshape(-1, C).sum(axis=0), dout.reshape(-1, C).sum(axis=0)


def _layernorm_calls():
    rng = np.random.default_rng(5)
    x = rng.normal(0.5, 2.0, (2, 3, 5))
    return [Call("x [2, 3, 5], eps = 1e-5", (rng.normal(0, 1, (2, 3, 5)), x, rng.normal(1, 0.3, 5), 1e-5), {}),
            Call("x [4, 6], eps = 0.1", (rng.normal(0, 1, (4, 6)), x.reshape(-1)[:24].reshape(4, 6),
                                         rng.normal(1, 0.3, 6), 0.1), {})]


def _layernorm_reference(call):
    dout, x, gamma, eps = call.args
    beta = np.zeros_like(gamma)
    return fd_vjp(lambda x_, g_, b_: _layernorm(x_, g_, b_, eps), (x, gamma, beta), dout, (0, 1, 2))


def layernorm_backward_stub(dout, x, gamma, eps):
    raise NotImplementedError("write layernorm_backward")


LAYERNORM_BACKWARD = Exercise(
    "04.layernorm_backward", "layernorm_backward", "layernorm_backward(dout, x, gamma, eps) -> (dx, dgamma, dbeta)",
    "the backward of LayerNorm over the last axis, out = (x − mean) / √(var + eps) · gamma + beta (biased "
    "variance); dgamma and dbeta summed over every leading axis",
    _layernorm_calls,
    closed_form(("dx", "dgamma", "dbeta"), _layernorm_reference, [
        Mistake("dx_missing_mean_term", "dx without the − mean(g) term (the mean depends on every x; g = dout · "
                "gamma)", lambda c: _layernorm_grad(*c.args, mean_term=False)),
        Mistake("dx_missing_variance_term", "dx without the − x̂ · mean(g x̂) term (the variance depends on every x)",
                lambda c: _layernorm_grad(*c.args, projection=False)),
        Mistake("dx_only_scaled", "dx = g / √(var + eps), as if the mean and the variance were constants",
                lambda c: _layernorm_grad(*c.args, mean_term=False, projection=False)),
        Mistake("gamma_missing_in_dx", "dx computed from dout instead of g = dout · gamma",
                lambda c: _layernorm_grad(*c.args, gamma_in_dx=False)),
    ], rtol=1e-6, atol=1e-9),
    layernorm_backward_stub, how="finite differences",
)


def _attention(q, k, v):
    T, hs = q.shape[-2], q.shape[-1]
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(hs)
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p = p / p.sum(axis=-1, keepdims=True)
    return p @ v


def _attention_grad(dout, q, k, v, *, scale=True, rowsum=True, dv_transposed=True, dk_transposed=True):
    T, hs = q.shape[-2], q.shape[-1]
    s = 1.0 / np.sqrt(hs)
    scores = q @ np.swapaxes(k, -1, -2) * s
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p = p / p.sum(axis=-1, keepdims=True)
    dv = np.swapaxes(p, -1, -2) @ dout if dv_transposed else p @ dout
    dp = dout @ np.swapaxes(v, -1, -2)
    ds = p * (dp - ((dp * p).sum(axis=-1, keepdims=True) if rowsum else 0.0))
    factor = s if scale else 1.0
    dq = ds @ k * factor
    dk = (np.swapaxes(ds, -1, -2) @ q if dk_transposed else ds @ q) * factor
    return dq, dk, dv


def _attention_calls():
    rng = np.random.default_rng(6)
    shape = (1, 2, 4, 3)
    return [Call("q, k, v [1, 2, 4, 3] (B, NH, T, HS)", (rng.normal(0, 1, shape), rng.normal(0, 1, shape),
                                                        rng.normal(0, 1, shape), rng.normal(0, 1, shape)), {}),
            Call("q, k, v [2, 1, 3, 4]", tuple(rng.normal(0, 1, (2, 1, 3, 4)) for _ in range(4)), {})]


def _attention_reference(call):
    dout, q, k, v = call.args
    return fd_vjp(_attention, (q, k, v), dout, (0, 1, 2))


def attention_backward_stub(dout, q, k, v):
    raise NotImplementedError("write attention_backward")


ATTENTION_BACKWARD = Exercise(
    "04.attention_backward", "attention_backward", "attention_backward(dout, q, k, v) -> (dq, dk, dv)",
    "the backward of causal softmax attention on [B, NH, T, HS]: out = softmax(q kᵀ / √HS, keys after the query "
    "masked) v",
    _attention_calls,
    closed_form(("dq", "dk", "dv"), _attention_reference, [
        Mistake("scale_missing", "dq and dk without the 1/√HS of the scores", lambda c: _attention_grad(*c.args,
                                                                                                       scale=False)),
        Mistake("softmax_backward_rowsum",
                "the softmax backward without its row-sum term (the right one is dS = P · (dP − Σ_j P dP))",
                lambda c: _attention_grad(*c.args, rowsum=False)),
        Mistake("dv_not_transposed", "dv = P dout instead of Pᵀ dout", lambda c: _attention_grad(*c.args,
                                                                                              dv_transposed=False)),
        Mistake("dk_not_transposed", "dk = dS q instead of dSᵀ q", lambda c: _attention_grad(*c.args,
                                                                                          dk_transposed=False)),
    ], rtol=1e-6, atol=1e-9),
    attention_backward_stub, how="finite differences",
)


# ---------------------------------------------------------------------------------------------------
# 05: SFT and the metrics of a run


def _sft(logits, targets, mask, *, per_sequence=False, mask_used=True, sign=1.0):
    logp = _log_softmax(logits)
    m = np.asarray(mask, dtype=np.float64) if mask_used else np.ones(np.shape(targets))
    token = np.take_along_axis(logp, np.asarray(targets, dtype=np.int64)[..., None], axis=-1)[..., 0]
    count = float(m.shape[0]) if per_sequence else float(m.sum())
    loss = -float((token * m).sum()) / count
    probs = np.exp(logp)
    onehot = np.zeros_like(probs)
    np.put_along_axis(onehot, np.asarray(targets, dtype=np.int64)[..., None], 1.0, axis=-1)
    return loss, sign * m[..., None] * (probs - onehot) / count


def _sft_calls():
    rng = np.random.default_rng(55)
    targets = rng.integers(0, 6, (3, 5))
    mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=np.float64)
    return [Call("logits [3, 5, 6], prompt and padding masked", (rng.normal(0, 1.5, (3, 5, 6)), targets, mask), {}),
            Call("logits [2, 4, 7], every token counted", (rng.normal(0, 1.5, (2, 4, 7)), targets[:2, :4],
                                                          np.ones((2, 4))), {})]


def _sft_reference(call):
    logits, targets, mask = call.args
    from ..logprobs import compute_logprobs  # noqa: PLC0415

    count = float(np.sum(mask))

    def loss_of(x):
        return -float(np.sum(compute_logprobs(x, targets, mask))) / count

    work = np.array(logits, dtype=np.float64, copy=True)
    from ..gradcheck import numerical_gradient  # noqa: PLC0415

    return loss_of(work), numerical_gradient(lambda: loss_of(work), work)


def sft_stub(logits, targets, mask):
    raise NotImplementedError("write sft_loss_and_grad")


SFT_LOSS = Exercise(
    "05.sft_loss", "sft_loss_and_grad", "sft_loss_and_grad(logits, targets, mask) -> (loss, dlogits)",
    "the SFT loss of the reference, the mean negative log-likelihood per counted token (mask 1; logits[b, t] "
    "score targets[b, t]), and its gradient with respect to the logits",
    _sft_calls,
    closed_form(("loss", "dlogits"), _sft_reference, [
        Mistake("per_sequence_mean", "the mean over sequences instead of over the counted tokens",
                lambda c: _sft(*c.args, per_sequence=True)),
        Mistake("mask_ignored", "every token counted, the prompt and the padding included (the mask ignored)",
                lambda c: _sft(*c.args, mask_used=False)),
        Mistake("gradient_sign_flipped", "the gradient with its sign flipped (onehot − softmax is the gradient of "
                "the log-likelihood, not of the loss)", lambda c: (lambda r: (r[0], -r[1]))(_sft(*c.args))),
    ], rtol=1e-6, atol=1e-9),
    sft_stub, how="finite differences",
)


def _rewards(policy, ref, labels, beta, *, use_beta=True, swapped=False):
    r = (beta if use_beta else 1.0) * (np.asarray(policy) - np.asarray(ref))
    d = np.asarray(labels) == 1
    chosen, rejected = float(r[d].mean()), float(r[~d].mean())
    if swapped:
        chosen, rejected = rejected, chosen
    return chosen, rejected, chosen - rejected


def _rewards_calls():
    rng = np.random.default_rng(15)
    p = rng.normal(-10, 3, 7)
    return [Call("7 examples, 3 thumbs-up, β = 0.1", (p, p + rng.normal(0, 2, 7), np.array([1, 0, 0, 1, 0, 1, 0]),
                                                      0.1), {}),
            Call("4 examples, 1 thumbs-up, β = 1", (p[:4], p[:4] - 1.0, np.array([0, 0, 1, 0]), 1.0), {})]


def rewards_stub(policy_logps, ref_logps, labels, beta):
    raise NotImplementedError("write reward_metrics")


REWARD_METRICS = Exercise(
    "05.reward_metrics", "reward_metrics",
    "reward_metrics(policy_logps, ref_logps, labels, beta) -> (rewards_chosen, rewards_rejected, rewards_margins)",
    "the training metrics of metrics.jsonl (TRL's names): the mean implied reward β r of the thumbs-up and of "
    "the thumbs-down examples, and their difference",
    _rewards_calls,
    closed_form(("rewards_chosen", "rewards_rejected", "rewards_margins"), lambda c: _rewards(*c.args), [
        Mistake("beta_missing", "the log-ratios without β (the reward is β r)",
                lambda c: _rewards(*c.args, use_beta=False)),
        Mistake("classes_swapped", "the classes swapped (chosen = thumbs-up, label 1)",
                lambda c: _rewards(*c.args, swapped=True)),
    ]),
    rewards_stub,
)


# ---------------------------------------------------------------------------------------------------
# 07: Edifice's backbone


def _embedding(V, H, *, sqrt=True, order="row"):
    t, j = np.meshgrid(np.arange(V), np.arange(H), indexing="ij")
    value = t * H + j if order == "row" else t + j * V
    return value / (np.sqrt(V) if sqrt else 1.0)


def fixed_embedding_stub(vocab_size, hidden_size):
    raise NotImplementedError("write fixed_embedding")


FIXED_EMBEDDING = Exercise(
    "07.fixed_embedding", "fixed_embedding", "fixed_embedding(vocab_size, hidden_size) -> E",
    "Edifice's fixed token embedding, E[t, j] = (t H + j) / √V, a [V, H] array",
    lambda: [Call("V = 5, H = 3", (5, 3), {}), Call("V = 16, H = 8", (16, 8), {})],
    closed_form(("E",), lambda c: (_embedding(*c.args),), [
        Mistake("sqrt_missing", "t H + j without the division by √V", lambda c: (_embedding(*c.args, sqrt=False),)),
        Mistake("column_order", "t + j V (the numbering runs down the columns instead of along the rows)",
                lambda c: (_embedding(*c.args, order="column"),)),
    ]),
    fixed_embedding_stub,
)


def _entropy(tokens, *, base=np.e, pooled=False, summed=False):
    tokens = np.asarray(tokens)
    columns = [tokens.reshape(-1)] if pooled else [tokens[:, t] for t in range(tokens.shape[1])]
    entropies = []
    for column in columns:
        _, counts = np.unique(column, return_counts=True)
        p = counts / counts.sum()
        entropies.append(float(-(p * np.log(p)).sum() / np.log(base)))
    return float(np.sum(entropies) if summed else np.mean(entropies))


def _entropy_calls():
    rng = np.random.default_rng(7)
    return [Call("200 sequences of 4 tokens from 6", (rng.integers(0, 6, (200, 4)),), {}),
            Call("3 sequences of 3 tokens", (np.array([[1, 2, 2], [1, 3, 2], [1, 2, 5]]),), {})]


def entropy_stub(tokens):
    return 0.0  # a placeholder: the entropy of a model that is always right


POSITION_ENTROPY = Exercise(
    "07.position_entropy", "position_entropy", "position_entropy(tokens) -> float",
    "H(token | position) in nats for tokens [N, T]: the mean over positions of the entropy of the tokens seen "
    "there, the lowest mean NLL a model that ignores the tokens can reach on them",
    _entropy_calls,
    closed_form(("entropy",), lambda c: (_entropy(*c.args),), [
        Mistake("bits", "the entropy in bits (log₂) instead of nats (ln), the unit of the NLL",
                lambda c: (_entropy(*c.args, base=2.0),)),
        Mistake("pooled", "the entropy of all the tokens pooled, which ignores the positions",
                lambda c: (_entropy(*c.args, pooled=True),)),
        Mistake("summed", "the sum over positions instead of the mean",
                lambda c: (_entropy(*c.args, summed=True),)),
    ]),
    entropy_stub,
)


NETWORK_EXERCISES = [LOG_SOFTMAX, LOGPROBS_BACKWARD, SEQUENCE_LOGPROBS, GELU_BACKWARD, LAYERNORM_BACKWARD,
             ATTENTION_BACKWARD, SFT_LOSS, REWARD_METRICS, FIXED_EMBEDDING, POSITION_ENTROPY]


# ===================================================================================================
# the registry, grade() and the command line
# ===================================================================================================


LESSONS = ("01", "02", "03", "04", "05", "06", "07", "08", "09", "10", "11", "A1")
_ALL = LOSS_EXERCISES + NETWORK_EXERCISES
EXERCISES: dict[str, Exercise] = {  # in lesson order, then in the order the lesson asks for them
    e.id: e for e in sorted(_ALL, key=lambda e: (LESSONS.index(e.lesson), _ALL.index(e)))}


def exercises(lesson: str | None = None) -> list[Exercise]:
    """Every exercise, in lesson order, or those of one lesson ("01", ..., "A1")."""
    if lesson is not None and lesson not in LESSONS:
        raise ValueError(f"lesson must be one of {', '.join(LESSONS)}, got {lesson!r}")
    return [e for e in EXERCISES.values() if lesson is None or e.lesson == lesson]


def get(exercise_id: str) -> Exercise:
    if not isinstance(exercise_id, str):
        raise TypeError(f"exercise_id must be a string such as '01.kto_loss', got {type(exercise_id).__name__}")
    if exercise_id not in EXERCISES:
        raise ValueError(f"no exercise {exercise_id!r}; the exercises are: {', '.join(EXERCISES)}")
    return EXERCISES[exercise_id]


def grade(exercise_id: str, function: Callable | str, *, isolate: bool = False,
          timeout: float | None = DEFAULT_TIMEOUT) -> Result:
    """Grade the learner's `function` (a callable, or a spec "path/file.py:function" / "module:function") for
    the exercise `exercise_id`; returns a Result with .passed and .message.

    isolate=False runs it in this process (a function defined in a notebook); isolate=True in a child
    process, like the oracle's candidates, which needs a spec or a module-level function. A function that
    raises, exits or runs past `timeout` seconds fails with a message saying so; a spec that cannot be loaded
    raises ImportError, AttributeError or TypeError (exit status 2 of `kto-np exercise check`).
    """
    from ..oracle.run.loader import load_callable  # noqa: PLC0415
    from ..oracle.run.runner import candidate_spec  # noqa: PLC0415

    exercise = get(exercise_id)
    if not isinstance(function, str) and not callable(function):
        raise TypeError(f"function must be callable or a spec 'path/file.py:function', got {type(function).__name__}")
    if isolate not in (True, False):
        raise TypeError(f"isolate must be True or False, got {isolate!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    calls = exercise.calls()
    notes: tuple[str, ...] = ()
    if isolate:
        spec = function if isinstance(function, str) else candidate_spec(function)
        if spec is None:
            raise TypeError("isolate=True needs a spec string or a module-level function, got "
                            f"{getattr(function, '__qualname__', function)!r}")
        outcomes, notes = run_isolated(exercise.id, spec, calls, timeout)
    else:
        target = load_callable(function) if isinstance(function, str) else function
        outcomes = run_calls(target, calls, timeout)
    verdict = verdict_on(exercise, calls, outcomes)
    return Result(exercise.id, verdict.passed, verdict.message, verdict.mistakes, notes)


def format_list() -> str:
    rows = [f"{'id':<26}{'lesson':<8}what you write"]
    for e in EXERCISES.values():
        rows.append(f"{e.id:<26}{e.lesson:<8}{e.signature}")
    rows.append(f"{len(EXERCISES)} exercises in {len(LESSONS)} lessons; check one with "
                "kto-np exercise check ID path/file.py:function")
    return "\n".join(rows)


def main_list(lesson: str | None = None) -> int:
    """`kto-np exercise list`."""
    try:
        chosen = exercises(lesson)
    except ValueError as exc:
        print(f"kto-np exercise list: {exc}", file=sys.stderr)
        return 2
    if lesson is None:
        print(format_list())
    else:
        for e in chosen:
            print(f"{e.id:<26}{e.lesson:<8}{e.signature}")
    return 0


def main_check(exercise_id: str, spec: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> int:
    """`kto-np exercise check ID SPEC`: grade in a child process, print the result. Exit status 0 passed, 1 not
    yet (an exception, exit, crash or timeout of the function included), 2 when it cannot be loaded."""
    try:
        result = grade(exercise_id, spec, isolate=True, timeout=timeout)
    except (ValueError, TypeError, ImportError, AttributeError) as exc:
        print(f"kto-np exercise check: {exc}", file=sys.stderr)
        return 2
    print(result)
    return 0 if result.passed else 1


__all__ = ["DEFAULT_TIMEOUT", "EXERCISES", "LESSONS", "Call", "CallOutcome", "Exercise", "Result", "exercises",
           "format_list", "get", "grade", "main_check", "main_list"]
