"""Running the learner's function in a child process, as the oracle runs its candidates (oracle/isolation.py).

The parent writes the request (exercise id, spec, time limit) and starts `python -m kto_np.exercises.worker`.
The child loads the function with the oracle's loader (kto_np.oracle.load_callable), runs it on the
exercise's calls under the oracle's time limit, and writes back plain numbers (the oracle's wire format:
shape and data, never a pickle). The parent judges. Whatever the function does in the child (sys.exit,
os._exit, a crash, a hang, patching the grader) ends at most that child; the parent names it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from .core import Call, CallOutcome

IMPORT_TIMEOUT = 60.0  # seconds for the child to start and import the function


def run_isolated(exercise_id: str, spec: str, calls: list[Call], timeout: float | None
                 ) -> tuple[list[CallOutcome], tuple[str, ...]]:
    """(one outcome per call, notes) from a child process. ImportError / AttributeError / TypeError when the
    spec cannot be loaded there (the loader's own message)."""
    from ..oracle.isolation import WORKER_ENV, _describe_end, _package_root, decode_array, summarise_output  # noqa: PLC0415

    limit = (timeout if timeout and math.isfinite(timeout) else 1e9) * max(1, len(calls)) + IMPORT_TIMEOUT
    with tempfile.TemporaryDirectory(prefix="kto_np-exercise-") as tmp:
        folder = Path(tmp)
        request, result_path = folder / "request.json", folder / "result.json"
        request.write_text(json.dumps({"exercise": exercise_id, "spec": spec, "timeout": timeout,
                                       "cwd": os.getcwd(), "result": str(result_path),
                                       "sys_path": [p for p in sys.path if isinstance(p, str)]}), encoding="utf-8")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([_package_root()] + [p for p in [env.get("PYTHONPATH")] if p])
        env.setdefault("PYTHONWARNINGS", "default")
        env[WORKER_ENV] = "1"
        stdout, stderr = folder / "stdout.txt", folder / "stderr.txt"
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            process = subprocess.Popen([sys.executable, "-m", "kto_np.exercises.worker", str(request)],
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                       start_new_session=True)
        try:
            returncode = process.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            returncode, timed_out = None, True
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
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
