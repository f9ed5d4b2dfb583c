"""Graded exercises for the tutorials: a function the learner writes, and a grader that says what is wrong.

    from kto_np.exercises import grade
    result = grade("01.kto_loss", my_kto_loss_and_grad)
    result.passed, result.message      # e.g. False, "... The oracle recognises the mistake: z_ref is not clamped ..."

`kto-np exercise list` lists them (id, lesson, one line each); `kto-np exercise check ID path/file.py:function`
grades a function in a file, run in a child process as the oracle runs its candidates (exit status 0 passed,
1 not yet, 2 cannot be loaded). The reference solutions are in tutorials/solutions/.

Where to read how an exercise is graded: in its lesson's module, lesson01.py ... lesson11.py and lessonA1.py
(the inputs its grader runs your function on, the reference, the typical mistakes it names). The rest:

  kit.py       the machinery every lesson shares: an exercise (Exercise, Call), running your function
               in this process or in a child process (worker.py is the child), and the judges: a closed
               form or finite differences (closed_form, fd_vjp), or the gradient oracle's diagnosis
               (oracle_judge)
  registry.py  the exercises of every lesson in lesson order (EXERCISES), grade(), and the command line

The names below are imported on first use (PEP 562), so this file imports none of its parts.
"""

from __future__ import annotations

import importlib

# exported name -> the module (below kto_np.exercises) that defines it
_EXPORTS = {
    "DEFAULT_TIMEOUT": "kit",
    "Call": "kit",
    "CallOutcome": "kit",
    "Exercise": "kit",
    "Mistake": "kit",
    "Result": "kit",
    "Verdict": "kit",
    "as_numbers": "kit",
    "EXERCISES": "registry",
    "LESSONS": "registry",
    "exercises": "registry",
    "format_list": "registry",
    "get": "registry",
    "grade": "registry",
    "main_check": "registry",
    "main_list": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:  # a submodule not imported yet: kto_np.exercises.kit, kto_np.exercises.lesson01, ...
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
