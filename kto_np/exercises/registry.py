"""The exercises of every lesson, in lesson order, grade() and the command line `kto-np exercise`.

    from kto_np.exercises import grade
    result = grade("01.kto_loss", my_kto_loss_and_grad)
    result.passed, result.message      # e.g. False, "... The oracle recognises the mistake: z_ref is not clamped ..."

Each lesson's exercises are in its own module (lesson01.py ... lessonA1.py); the machinery they share (the
Exercise record, running the learner's function here or in a child process, the judges) is in kit.py.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from . import (
    lesson01,
    lesson02,
    lesson03,
    lesson04,
    lesson05,
    lesson06,
    lesson07,
    lesson08,
    lesson09,
    lesson10,
    lesson11,
    lessonA1,
)
from .kit import DEFAULT_TIMEOUT, Exercise, Result, run_calls, run_isolated, verdict_on

LESSONS = ("01", "02", "03", "04", "05", "06", "07", "08", "09", "10", "11", "A1")
_MODULES = (lesson01, lesson02, lesson03, lesson04, lesson05, lesson06, lesson07, lesson08, lesson09, lesson10,
            lesson11, lessonA1)  # one per lesson, in the order of LESSONS
EXERCISES: dict[str, Exercise] = {  # in lesson order, then in the order the lesson asks for them
    e.id: e for module in _MODULES for e in module.EXERCISES}


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
