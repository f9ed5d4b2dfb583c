"""The grading kit: what an exercise is, how the learner's function is run, and the judges that grade it.

An exercise's grader never calls the learner's function itself: `calls()` lists the inputs (fixed,
seeded), the function is run on each of them (here: run_calls, or in a child process: run_isolated), and
only the returned numbers come back to `judge(calls, outcomes)`. The judges, shared by every lesson:

  closed_form    compares each returned value with a reference (a closed form, or central finite
                 differences of a forward pass: fd_vjp, for the backward passes) and names the typical
                 mistakes (Mistake) whose numbers the learner's reproduce on every call
  oracle_judge   hands the numbers to the gradient oracle (kto_np.oracle): its float64 cases, its
                 comparison and its diagnosis, which names the known mistake (z not clamped, weights
                 ignored, the undesirable sign, β twice, mask ignored, ...)

The file, in order: the records (Call, CallOutcome, Verdict, Result, Exercise), running the learner's
function in this process, comparing numbers and closed_form, the oracle as a grader, finite differences,
a few formulas several lessons use, and running the function in a child process (`kto-np exercise check`).
The exercises themselves are in lesson01.py ... lessonA1.py; registry.py collects them and holds grade().
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


# ---------------------------------------------------------------------------------------------------
# formulas several lessons use


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def log_softmax(x, axis=-1):
    x = np.asarray(x, dtype=np.float64)
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def label_counts(labels):
    """(n_D, n_U): the thumbs-up (label 1) and the thumbs-down examples, as floats."""
    labels = np.asarray(labels)
    return float(np.sum(labels == 1)), float(np.sum(labels != 1))


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
