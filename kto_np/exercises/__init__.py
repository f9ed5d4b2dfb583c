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

from .._facade import lazy_facade

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


__getattr__, __dir__ = lazy_facade(__name__, globals(), _EXPORTS)
