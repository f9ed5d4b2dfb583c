"""Running a candidate where it cannot touch the verdict: a child process per run, a time limit per case.

The parent (this module) writes the selected cases to a temporary folder and starts
`python -m kto_np.oracle.worker`. The child imports the candidate, calls it on each case and sends back,
over a pipe of its own, one JSON line per event: plain numbers only, never a pickle. The parent compares
and decides. Whatever the candidate does in the child (sys.exit, os._exit, a crash, a signal, a hang, a
flood of output, patching the oracle's classes) ends at most that child: the parent names what happened
as a failed case and, after an abnormal end, starts a fresh child for the cases left.

A candidate that cannot be named for a child (a closure, a lambda, an instance, a function of the running
script) runs in this process, with
sys.exit caught and, in the main thread, the same time limit (SIGALRM); the report says it was not isolated.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .candidates import (
    CandidateError,
    CandidateUnrunnable,
    DirectionalProjection,
    evaluate,
    fd_directions,
    parameter_input_key,
    short_error,
)
from .cases import Case

DEFAULT_TIMEOUT = 60.0  # seconds per case: the slowest built-in case (finite differences of a model) takes ~2 s
IMPORT_TIMEOUT = 60.0  # seconds for the child to import the candidate (torch alone can take several)
OUTPUT_LINES_KEPT = 5  # first lines of the candidate's stdout / stderr quoted in the report
NOTES_KEPT = 20  # notes kept per run; the rest are counted
LINE_LIMIT = 64 * 2**20  # bytes of one message from the child


class Outcome(NamedTuple):
    """What running a candidate on the cases gave: per case an evaluation or an error message."""

    evaluations: dict  # case name -> Evaluation (values, notes)
    errors: dict  # case name -> message
    notes: list  # run-level notes: isolation, the candidate's output
    load_error: str | None  # the candidate could not be loaded (exit status 2), else None


# ---------------------------------------------------------------------------------------------------
# naming a candidate so that a child can import it


WORKER_ENV = "KTO_NP_ORACLE_WORKER"  # set in the child: a verify() inside a candidate does not start another


def candidate_spec(candidate) -> str | None:
    """"module:qualname" naming `candidate` for a child, or None when a child cannot (or should not) import
    it: closures, lambdas, instances, and functions of the running script (__main__), whose import would run
    the script again."""
    if os.environ.get(WORKER_ENV):
        return None
    if isinstance(candidate, str):
        return candidate
    target, suffix = candidate, ""
    owner = getattr(candidate, "__self__", None)
    if owner is not None:  # a bound method: only a class's (classmethod) can be named
        if not isinstance(owner, type):
            return None
        target, suffix = owner, "." + candidate.__name__
    module_name = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None)
    if not isinstance(module_name, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    module = sys.modules.get(module_name)
    if module is None or module_name in ("__main__", "__mp_main__"):
        return None
    found = module
    for part in (qualname + suffix).split("."):
        found = getattr(found, part, None)
    if found is not candidate and not (owner is not None and found == candidate):
        return None  # shadowed or rebound: the name does not lead back to this object
    return f"{module_name}:{qualname}{suffix}"


# ---------------------------------------------------------------------------------------------------
# the wire format: JSON lines of plain numbers


def encode_array(value) -> dict | None:
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float64)
    return {"shape": list(arr.shape), "data": arr.ravel().tolist()}


def decode_array(data) -> np.ndarray | None:
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("shape"), list) or not isinstance(data.get("data"), list):
        raise ValueError("an array must be {'shape': [...], 'data': [...]}")
    shape = tuple(int(d) for d in data["shape"])
    if any(d < 0 for d in shape) or math.prod(shape) != len(data["data"]):
        raise ValueError(f"shape {shape} does not fit {len(data['data'])} numbers")
    flat = np.array(data["data"], dtype=np.float64)
    return flat.reshape(shape)


def encode_values(values: dict) -> dict:
    out = {}
    for quantity, (value, source, projection) in values.items():
        out[quantity] = {"value": encode_array(value), "source": source,
                         "projection": None if projection is None else "directions"}
    return out


SOURCES = ("returned", "autograd", "jax.grad", "vjp", "finite differences", "not checked")


def decode_values(case: Case, encoded) -> dict:
    """The child's values for one case, checked: known quantities and sources; directional projections
    rebuilt here from the case (the parent decides what a directional derivative is compared with)."""
    from .candidates import fd_matches_reference  # noqa: PLC0415

    if not isinstance(encoded, dict):
        raise ValueError("values must be a dict")
    values = {}
    for quantity, item in encoded.items():
        if quantity not in case.expected or not isinstance(item, dict):
            raise ValueError(f"unknown quantity {quantity!r}")
        source = item.get("source")
        if not isinstance(source, str) or not source.startswith(SOURCES):
            raise ValueError(f"unknown source {source!r} for {quantity!r}")
        name = quantity[len("grad/"):] if quantity.startswith("grad/") else None
        if source == "not checked" and (name is None or fd_matches_reference(case, name)):
            raise ValueError(f"{quantity!r} marked 'not checked' where it can be checked")
        projection = None
        if item.get("projection") == "directions":
            key = parameter_input_key(case, name)
            projection = DirectionalProjection(fd_directions(case.name, name, np.shape(case.inputs[key])))
        values[quantity] = (decode_array(item.get("value")), source, projection)
    return values


# ---------------------------------------------------------------------------------------------------
# summaries of what the candidate printed and warned


def summarise_output(stream: str, path: Path) -> str | None:
    """One note for a captured stream: its line count and first lines, or None when empty."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            head = file.read(64 * 1024).decode("utf-8", "replace")
    except OSError:
        return None
    if size == 0:
        return None
    lines = head.splitlines()
    with open(path, "rb") as file:
        count = sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))
    count = max(count, len(lines))
    shown = [line[:200] for line in lines[:OUTPUT_LINES_KEPT]]
    more = f" (first {len(shown)} shown)" if count > len(shown) else ""
    return (f"the candidate wrote {count} line{'s' if count != 1 else ''} to {stream}{more}: "
            + " | ".join(shown))


def summarise_notes(notes: Sequence[str], keep: int = NOTES_KEPT) -> list[str]:
    """Distinct notes in order, the first `keep` kept and the rest counted in one last note."""
    distinct = list(dict.fromkeys(notes))
    if len(distinct) <= keep:
        return distinct
    warned = sum("candidate warned" in n for n in distinct[keep:])
    return distinct[:keep] + [f"... and {len(distinct) - keep} more notes ({warned} of them warnings) not shown"]


# ---------------------------------------------------------------------------------------------------
# in this process (candidates that cannot be sent to a child)


class CandidateTimeout(BaseException):
    """Raised into an in-process candidate that ran past the time limit (BaseException: not swallowed by
    a candidate's `except Exception`)."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    usable = (seconds and math.isfinite(seconds) and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise CandidateTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def exit_message(exc: SystemExit) -> str:
    return f"called sys.exit({exc.code!r}): an exit is a failure, not a verdict"


def evaluate_case(candidate, case: Case, tolerance: str, timeout: float | None = None):
    """(evaluation, None) or (None, error message) for one case; every way out of the candidate is caught
    except KeyboardInterrupt."""
    try:
        with _time_limit(timeout):
            return evaluate(candidate, case, tolerance), None
    except CandidateError as exc:
        return None, str(exc)
    except CandidateUnrunnable:
        raise  # not a finding about the candidate: the caller reports it as a load error (exit status 2)
    except CandidateTimeout:
        return None, f"timed out: still running after {timeout:g} s (--timeout)"
    except SystemExit as exc:
        return None, exit_message(exc)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a candidate's failure is a finding, not a crash
        return None, f"failed: {short_error(exc)}"


def run_in_process(candidate: Callable, cases: Sequence[Case], tolerance: str, timeout: float | None,
                   reason: str, how: str) -> Outcome:
    from .loader import LoadError  # noqa: PLC0415

    evaluations, errors = {}, {}
    for case in cases:
        try:
            evaluation, error = evaluate_case(candidate, case, tolerance, timeout)
        except CandidateUnrunnable as exc:
            raise LoadError(str(exc)) from exc
        if error is None:
            evaluations[case.name] = evaluation
        else:
            errors[case.name] = error
    notes = [f"called as {how}"] if how else []
    return Outcome(evaluations, errors, notes + [f"not isolated: {reason}; the candidate ran in this process"], None)


# ---------------------------------------------------------------------------------------------------
# in a child process


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def _describe_end(returncode: int | None) -> str:
    if returncode is None:
        return "its process stopped answering"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"its process was killed by {name}" + (" (a crash)" if name in ("SIGSEGV", "SIGBUS", "SIGABRT",
                                                                               "SIGFPE", "SIGILL") else "")
    return f"its process ended with exit status {returncode} (os._exit, or a crash in native code)"


class _Child:
    """One worker process and the pipe it reports on."""

    def __init__(self, request: dict, folder: Path, index: int):
        self.request_path = folder / f"request-{index}.json"
        self.request_path.write_text(json.dumps(request), encoding="utf-8")
        self.stdout_path, self.stderr_path = folder / f"stdout-{index}.txt", folder / f"stderr-{index}.txt"
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([_package_root()] + [p for p in [env.get("PYTHONPATH")] if p])
        env.setdefault("PYTHONWARNINGS", "default")
        env[WORKER_ENV] = "1"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kto_np.oracle.worker", str(self.request_path), str(write_fd)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(write_fd,), env=env,
                start_new_session=True)
        os.close(write_fd)
        self.read_fd = read_fd
        self.buffer = b""

    def next_message(self, deadline: float):
        """The next JSON message, "eof" when the child closed the pipe, or "timeout"."""
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            ready, _, _ = select.select([self.read_fd], [], [], remaining)
            if not ready:
                return "timeout"
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                return "eof"
            self.buffer += chunk
            if len(self.buffer) > LINE_LIMIT and b"\n" not in self.buffer:
                return "eof"
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return {"event": "garbled"}
        return message if isinstance(message, dict) else {"event": "garbled"}

    def stop(self) -> int | None:
        """Kill the child and everything it started; returns its exit status."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # grandchildren left in the session
        if self.read_fd is not None:
            os.close(self.read_fd)
            self.read_fd = None
        return self.process.returncode

    def wait_end(self, seconds: float = 5.0) -> int | None:
        try:
            return self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return None


def run_in_child(spec: str, cases: Sequence[Case], tolerance: str, timeout: float, *, kind: str,
                 convention: str | None = None) -> Outcome:
    """Run the candidate named by `spec` on `cases` in child processes; the verdict stays here."""
    from .store import write_cases  # noqa: PLC0415

    by_name = {case.name: case for case in cases}
    evaluations, errors, notes = {}, {}, []
    case_timeout = timeout if timeout and math.isfinite(timeout) else 1e9
    with tempfile.TemporaryDirectory(prefix="kto_np-oracle-") as tmp:
        folder = Path(tmp)
        cases_dir = folder / "cases"
        write_cases(cases_dir, cases)
        remaining = [case.name for case in cases]
        index = 0
        while remaining:
            request = {"spec": spec, "kind": kind, "convention": convention, "tolerance": tolerance,
                       "cases_dir": str(cases_dir), "case_names": remaining, "cwd": os.getcwd(),
                       "sys_path": [p for p in sys.path if isinstance(p, str)]}
            child = _Child(request, folder, index)
            index += 1
            current, loaded, finished = None, False, False
            import_timeout = max(case_timeout, IMPORT_TIMEOUT)
            deadline = time.monotonic() + import_timeout
            try:
                while True:
                    message = child.next_message(deadline)
                    if message == "timeout":
                        what = (f"timed out: still running after {timeout:g} s (--timeout)" if loaded
                                else f"timed out while importing the candidate ({import_timeout:g} s)")
                        break
                    if message == "eof":
                        status = child.wait_end()
                        what = _describe_end(status)
                        what = ("while importing the candidate, " if not loaded else "") + what
                        break
                    event = message.get("event")
                    if event == "load_error":
                        child.stop()
                        return Outcome({}, {}, [], str(message.get("message", "cannot load the candidate")))
                    if event == "import_exit":
                        what = f"called sys.exit({message.get('code')}) while being imported"
                        break
                    if event == "loaded":
                        loaded = True
                        how = f"called as {str(message.get('how'))[:300]}"
                        if message.get("how") and how not in notes:
                            notes.append(how)
                        deadline = time.monotonic() + case_timeout
                        continue
                    if event == "start" and message.get("case") in by_name:
                        current = message["case"]
                        deadline = time.monotonic() + case_timeout
                        continue
                    if event in ("done", "error") and message.get("case") == current and current in remaining:
                        case = by_name[current]
                        if event == "error":
                            errors[current] = str(message.get("message"))[:2000]
                        else:
                            try:
                                values = decode_values(case, message.get("values"))
                                case_notes = [str(n)[:500] for n in message.get("notes", [])][:NOTES_KEPT + 1]
                            except (ValueError, TypeError, KeyError) as exc:
                                errors[current] = f"sent a result the oracle cannot read ({exc})"
                            else:
                                from .candidates import Evaluation  # noqa: PLC0415

                                evaluations[current] = Evaluation(values, case_notes)
                        remaining.remove(current)
                        current = None
                        continue
                    if event == "finished":
                        finished = True
                        what = None
                        break
                    if event == "garbled":
                        what = "its process sent a message the oracle cannot read"
                        break
            finally:
                child.stop()
            for stream, path in (("stdout", child.stdout_path), ("stderr", child.stderr_path)):
                summary = summarise_output(stream, path)
                if summary:
                    notes.append(summary)
            if finished:
                for name in remaining:  # pragma: no cover - the worker reports every case it was given
                    errors[name] = "was not run"
                break
            if not loaded:  # the same import would end the same way: every case left fails with it
                for name in remaining:
                    errors[name] = what
                break
            if current is not None:
                errors[current] = what
                remaining.remove(current)
            elif remaining:  # ended between cases
                errors[remaining.pop(0)] = what
    return Outcome(evaluations, errors, notes, None)
