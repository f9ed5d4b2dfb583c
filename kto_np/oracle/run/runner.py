"""Running a candidate where it cannot touch the verdict: child processes, a time limit on every path.

One runner, two shapes of child, both `python -m kto_np.oracle.run.worker` (worker.py), both reporting
events as JSON lines of plain numbers (never a pickle) -- loaded / load_error / import_exit, importing /
joining / joined, start, done | error per case, finished -- while this parent decides:

  run_in_child       one worker process runs the cases in turn and reports on a pipe of its own. Whatever
                     the candidate does there (sys.exit, os._exit, a crash, a signal, a hang, a flood of
                     output, patching the oracle's classes) ends at most that child: the parent names what
                     happened as a failed case and, after an abnormal end, starts a fresh child for the
                     cases left.
  run_data_parallel  the data_parallel kind: R ranks in one torch.distributed gloo process group on
                     127.0.0.1, started the way torchrun starts them (MASTER_ADDR=127.0.0.1, MASTER_PORT,
                     RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE in each rank's environment). The port is
                     found by binding a socket to 127.0.0.1 here; that listening socket is handed to rank 0,
                     which serves the rendezvous store on it (torch's TCPStore would otherwise listen on
                     every interface), and gloo is bound to the loopback interface (GLOO_SOCKET_IFNAME). A
                     launcher process imports torch once and forks the ranks (one process group per world
                     size, side by side); each rank writes its events to a file of its own. A rank that does
                     not join within join_timeout, or a case not finished by every rank within timeout
                     seconds (a hang, or a collective the other ranks never enter), ends the group with a
                     message naming the ranks and where they were; a rank that raises or exits ends it at
                     once. Every process is killed and waited for before this returns.

A candidate that cannot be named for a child (a closure, a lambda, an instance, a function of the running
script) runs in this process (run_in_process), with sys.exit caught and, in the main thread, the same time
limit (SIGALRM); the report says it was not isolated.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..cases.reference import Case
from ..cases.store import write_cases
from .candidates import (
    CandidateError,
    CandidateUnrunnable,
    DirectionalProjection,
    Evaluation,
    evaluate,
    fd_directions,
    fd_matches_reference,
    parameter_input_key,
    short_error,
)
from .loader import LoadError

DEFAULT_TIMEOUT = 60.0  # seconds per case (for every rank together): the slowest built-in case takes ~2 s
JOIN_TIMEOUT = 90.0  # seconds for every rank to import torch and the candidate and join the group
POLL_SECONDS = 0.02  # how often the ranks' event files are read
WORKER = "kto_np.oracle.run.worker"  # the child's module: `python -m kto_np.oracle.run.worker MODE ...`
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


def candidate_spec(candidate, *, script_path: bool = False) -> str | None:
    """"module:qualname" naming `candidate` for a child, or None when a child cannot (or should not) import
    it: closures, lambdas, instances, and functions of the running script (__main__), whose import would run
    the script again. With script_path (the data-parallel ranks, which import their candidate whatever the
    cost) a function of a script or of a module without an import spec is named by its file,
    "path/file.py:qualname"."""
    if os.environ.get(WORKER_ENV) and not script_path:
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
    found = module
    for part in (qualname + suffix).split("."):
        found = getattr(found, part, None)
    if module is None or (found is not candidate and not (owner is not None and found == candidate)):
        return None  # shadowed or rebound: the name does not lead back to this object
    script = module_name in ("__main__", "__mp_main__")
    if script_path and (script or getattr(module, "__spec__", None) is None):
        path = getattr(module, "__file__", None)
        return f"{path}:{qualname}{suffix}" if path else None
    return None if script else f"{module_name}:{qualname}{suffix}"


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


def _lines(path) -> list[str]:
    """The non-blank lines of a process's output file ([] when it cannot be read)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return [line.rstrip() for line in file if line.strip()]
    except OSError:
        return []


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
    return str(Path(__file__).resolve().parents[3])


def child_env() -> dict:
    """The environment of a child that imports a candidate: kto_np importable, warnings shown, and WORKER_ENV
    set (a verify() inside the candidate does not start another child)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_package_root()] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("PYTHONWARNINGS", "default")
    env[WORKER_ENV] = "1"
    return env


def stop_child(process: subprocess.Popen) -> int | None:
    """Kill a child started in a session of its own, and everything it started; returns its exit status."""
    if process.poll() is None:
        _kill(process.pid)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
        pass
    _kill(process.pid)  # grandchildren left in the session
    return process.returncode


def _kill(pid: int, group: bool = True) -> None:
    """SIGKILL to a process's group (group=True: it and everything it started) or to it alone; gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)


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
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", WORKER, "check", str(self.request_path), str(write_fd)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(write_fd,), env=child_env(),
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
        returncode = stop_child(self.process)
        if self.read_fd is not None:
            os.close(self.read_fd)
            self.read_fd = None
        return returncode

    def wait_end(self, seconds: float = 5.0) -> int | None:
        try:
            return self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return None


def run_in_child(spec: str, cases: Sequence[Case], tolerance: str, timeout: float, *, kind: str,
                 convention: str | None = None) -> Outcome:
    """Run the candidate named by `spec` on `cases` in child processes; the verdict stays here."""
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


# ---------------------------------------------------------------------------------------------------
# the data-parallel ranks: R processes in one torch.distributed process group


def loopback_interface() -> str:
    """The name of the loopback interface ("lo" on Linux, "lo0" on macOS), for gloo."""
    with contextlib.suppress(OSError, AttributeError):
        for _, name in socket.if_nameindex():
            if name.startswith("lo"):
                return name
    return "lo"


def _torch_missing_reason() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return ("kind data_parallel runs the candidate in a real torch.distributed process group and torch is not "
                "installed (pip install torch); skipped")
    return None


def _case_payload(case: Case) -> dict:
    inputs = {k: np.asarray(v).tolist() for k, v in case.inputs.items()}
    return {"name": case.name, "variant": case.variant, "inputs": inputs}


class _Rank:
    """One rank as the parent sees it: its events file (the zygote adds "forked" with its pid and "exit")."""

    def __init__(self, rank: int, events_path: str, output_path: str):
        self.rank, self.events_path, self.output_path = rank, events_path, output_path
        self.events: list[dict] = []
        self._offset = 0

    def read_events(self) -> None:
        try:
            with open(self.events_path, "rb") as file:
                file.seek(self._offset)
                data = file.read()
        except OSError:
            return
        complete = data[:data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.splitlines():
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))

    def last(self, name: str) -> dict | None:
        return next((e for e in reversed(self.events) if e.get("event") == name), None)

    def has(self, name: str, case: str | None = None) -> bool:
        return any(e.get("event") == name and (case is None or e.get("case") == case) for e in self.events)

    @property
    def pid(self) -> int | None:
        forked = self.last("forked")
        return None if forked is None else int(forked["pid"])

    @property
    def exit_code(self) -> int | None:
        ended = self.last("exit")
        return None if ended is None else int(ended["code"])

    def where(self) -> str:
        steps = [e for e in self.events if e.get("event") not in ("forked", "exit")]
        if not steps:
            return "not started"
        event = steps[-1]
        return {"importing": "importing the candidate", "joining": "joining the process group",
                "joined": "joined the process group", "start": f"in the candidate on {event.get('case')}",
                "done": f"finished {event.get('case')}", "finished": "finished"}.get(event.get("event"),
                                                                                    str(event.get("event")))

    def output(self) -> str:
        lines = _lines(self.output_path)
        kept = lines[:OUTPUT_LINES_KEPT]
        more = f" (+{len(lines) - len(kept)} more lines)" if len(lines) > len(kept) else ""
        return " | ".join(kept) + more

    def kill(self) -> None:
        pid = self.pid
        if pid is None or self.exit_code is not None:
            return
        _kill(pid)
        _kill(pid, group=False)


class _Group:
    """One process group: R ranks running the cases of world size R in order."""

    def __init__(self, world_size: int, cases: list[Case], spec: str, folder: str, tolerance: str,
                 timeout: float, join_timeout: float):
        self.world_size, self.cases, self.timeout, self.join_timeout = world_size, cases, timeout, join_timeout
        self.folder = os.path.join(folder, f"world{world_size}")
        os.makedirs(self.folder)
        self.request_path = os.path.join(self.folder, "request.json")
        with open(self.request_path, "w", encoding="utf-8") as file:
            json.dump({"spec": spec, "sys_path": list(sys.path), "cwd": os.getcwd(), "tolerance": tolerance,
                       "timeout": timeout, "join_timeout": join_timeout,
                       "cases": [_case_payload(c) for c in cases]}, file)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))  # a free port on the loopback address, served by rank 0
        self.listener.listen(64)
        self.ranks = [_Rank(r, os.path.join(self.folder, f"rank{r}.jsonl"), os.path.join(self.folder, f"rank{r}.out"))
                      for r in range(world_size)]
        self.failure: str | None = None  # why the group ended early
        self.load_error: str | None = None  # the candidate could not be imported (the same on every rank)
        self.ended = False
        self.started = 0.0
        self.case_seen: dict[str, float] = {}  # case -> when this parent first saw it in progress

    def rank_specs(self, fd_index: int) -> list[dict]:
        port = self.listener.getsockname()[1]
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(self.world_size),
               "LOCAL_WORLD_SIZE": str(self.world_size), "GROUP_RANK": "0", "GLOO_SOCKET_IFNAME": loopback_interface()}
        return [{"env": {**env, "RANK": str(r.rank), "LOCAL_RANK": str(r.rank)}, "request": self.request_path,
                 **({"listen_fd_index": fd_index} if r.rank == 0 else {}),
                 "events": r.events_path, "output": r.output_path} for r in self.ranks]

    def _case_in_progress(self) -> str | None:
        for case in self.cases:
            if not all(r.has("done", case.name) for r in self.ranks):
                return case.name
        return None

    def poll(self, now: float, launcher_ended: str | None) -> bool:
        """Read the ranks' events; True when the group has ended (finished or failed)."""
        if self.ended:
            return True
        self.ended = self._poll(now, launcher_ended)
        if self.ended:
            self.kill()
        return self.ended

    def _poll(self, now: float, launcher_ended: str | None) -> bool:
        for r in self.ranks:
            r.read_events()
        for r in self.ranks:
            if r.last("load_error") is not None:
                self.load_error = r.last("load_error")["message"]
                self.failure = f"rank {r.rank} could not load the candidate: {self.load_error}"
                return True
        errors = [(r.last("error")["time"], r.rank, r.last("error")) for r in self.ranks if r.last("error")]
        if errors:  # the first to raise; the others typically fail after it, in a collective it left
            _, rank, error = min(errors, key=lambda e: e[:2])
            where = f" on {error['case']}" if error.get("case") else ""
            others = sorted(r for _, r, _ in errors if r != rank)
            then = f" (then rank(s) {others} failed too)" if others else ""
            self.failure = f"rank {rank} raised{where}: {error.get('message')}{then}"
            return True
        for r in self.ranks:
            code = r.exit_code
            if code is not None and not r.has("finished"):
                how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
                output = r.output()
                self.failure = (f"rank {r.rank} {how} while {r.where()}"
                                + (f"; its output: {output}" if output else ""))
                return True
        if all(r.exit_code is not None for r in self.ranks):
            return True
        if launcher_ended is not None and any(r.pid is None for r in self.ranks):
            self.failure = f"the ranks could not be started: {launcher_ended}"
            return True
        if not all(r.has("joined") for r in self.ranks):
            if now - self.started > self.join_timeout:
                late = [r for r in self.ranks if not r.has("joined")]
                self.failure = (f"rank(s) {[r.rank for r in late]} did not join the process group within "
                                f"{self.join_timeout:g} s (" + "; ".join(f"rank {r.rank}: {r.where()}" for r in late)
                                + "): a rank that never joins")
                return True
            return False
        case = self._case_in_progress()
        if case is None:
            return False  # every case done: waiting for the ranks to exit
        first_seen = self.case_seen.setdefault(case, now)
        if now - first_seen > self.timeout:
            slow = [r for r in self.ranks if not r.has("done", case)]
            self.failure = (f"timed out after {self.timeout:g} s on {case}: rank(s) {[r.rank for r in slow]} did not "
                            "finish it (" + "; ".join(f"rank {r.rank}: {r.where()}" for r in slow)
                            + "): a hang in the candidate, or a collective the other ranks never entered")
            return True
        return False

    def kill(self) -> None:
        """Kill every rank still running and wait (bounded) until the launcher has seen each one end."""
        for r in self.ranks:
            r.read_events()
            r.kill()
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            for r in self.ranks:
                r.read_events()
            if all(r.pid is None or r.exit_code is not None for r in self.ranks) and not self._launcher_alive():
                return
            time.sleep(POLL_SECONDS)

    def _launcher_alive(self) -> bool:
        """Whether the process that forked this group's ranks (it ends once they have) is still there."""
        forked = next((r.last("forked") for r in self.ranks if r.last("forked")), None)
        if forked is None or "launcher" not in forked:
            return False
        try:
            os.kill(int(forked["launcher"]), 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def results(self) -> dict:
        for r in self.ranks:
            r.read_events()
        out: dict = {}
        failed = False
        for case in self.cases:
            done = [next((e for e in r.events if e.get("event") == "done" and e.get("case") == case.name), None)
                    for r in self.ranks]
            if all(d is not None for d in done):
                out[case.name] = Evaluation(*_combine(case, done))
                continue
            if not failed:
                out[case.name] = self.failure or "the process group ended without a result"
                failed = True
            else:
                out[case.name] = f"not run: the process group ended on an earlier case ({self.failure})"
        return out


def _combine(case: Case, done: Sequence[dict]) -> tuple[dict, list]:
    """The ranks' losses and gradients combined as data-parallel training does: mean loss, gradients / R."""
    world = len(done)
    sources = sorted({e["sources"]["loss"] for e in done})
    values = {"loss": (np.float64(np.mean([_number(e["loss"]) for e in done])), "+".join(sources), None)}
    for name in ("policy_logps", "kl_policy_logps"):
        parts = [e["grads"].get(name) for e in done]
        part_sources = sorted({e["sources"].get(name, "not checked") for e in done})
        if any(p is None for p in parts):
            values[f"grad/{name}"] = (None, "not checked", None)
            continue
        grad = np.concatenate([np.asarray(_numbers(p), dtype=np.float64).reshape(-1) for p in parts]) / world
        values[f"grad/{name}"] = (grad, "+".join(part_sources), None)
    by_note: dict[str, list[int]] = {}
    for rank, event in enumerate(done):
        for note in event["notes"]:
            by_note.setdefault(note, []).append(rank)
    notes = [f"{case.name}: rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {note}"
             for note, r in by_note.items()]
    return values, notes


def _number(x) -> float:
    return math.nan if x is None else float(x)


def _numbers(values) -> list:
    return [_number(v) for v in values]


def run_data_parallel(candidate, cases: Sequence[Case], tolerance: str = "float64", *,
                      timeout: float | None = None, join_timeout: float | None = None) -> dict:
    """Run the data_parallel cases: case name -> Evaluation, or a message saying why there is none.

    Raises ImportError when torch is missing, TypeError when the candidate cannot be named for a child
    process (a closure or a lambda), LoadError when the ranks cannot import it.
    """
    reason = _torch_missing_reason()
    if reason is not None:
        raise ImportError(reason)
    spec = candidate_spec(candidate, script_path=True)
    if spec is None:
        raise TypeError("a data_parallel candidate runs in R separate processes, so it must be importable by name: "
                        "a module-level function ('module:function' or 'path/file.py:function'), got "
                        f"{getattr(candidate, '__qualname__', type(candidate).__name__)!r}")
    timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    join_timeout = JOIN_TIMEOUT if join_timeout is None else float(join_timeout)
    by_world: dict[int, list[Case]] = {}
    for case in cases:
        by_world.setdefault(len(case.inputs["shard_sizes"]), []).append(case)
    folder = tempfile.mkdtemp(prefix="kto_np_data_parallel_")
    groups: list[_Group] = []
    launcher = _session or _Launcher(folder)
    try:
        for world, group_cases in sorted(by_world.items()):
            groups.append(_Group(world, group_cases, spec, folder, tolerance, timeout, join_timeout))
        plan_path = os.path.join(folder, "plan.json")
        with open(plan_path, "w", encoding="utf-8") as file:
            json.dump({"ranks": [s for i, g in enumerate(groups) for s in g.rank_specs(i)]}, file)
        started = time.monotonic()
        launcher.launch(plan_path, [g.listener.fileno() for g in groups])
        for group in groups:
            group.started = started
            group.listener.close()  # the launcher holds its own copy
        pending = list(groups)
        while pending:
            ended = launcher.ended()
            now = time.monotonic()
            pending = [g for g in pending if not g.poll(now, ended)]
            if pending:
                time.sleep(POLL_SECONDS)
        for group in groups:
            if group.load_error is not None:
                raise LoadError(group.load_error)
        out: dict = {}
        for group in groups:
            out.update(group.results())
        return out
    finally:
        for group in groups:
            group.kill()
            group.listener.close()
        if launcher is not _session:
            launcher.close()
        shutil.rmtree(folder, ignore_errors=True)


class _Launcher:
    """The process that imports torch once and forks the ranks of each plan sent to it (worker.launcher)."""

    def __init__(self, folder: str):
        self.output_path = os.path.join(folder, "launcher.out")
        self.channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            with open(self.output_path, "wb") as output:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", WORKER, "launcher", str(theirs.fileno())], env=env,
                    stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, pass_fds=(theirs.fileno(),),
                    start_new_session=True)
        except BaseException:
            self.channel.close()
            raise
        finally:
            theirs.close()
        self.ready = False

    def launch(self, plan_path: str, fds: list[int]) -> None:
        socket.send_fds(self.channel, [plan_path.encode()], fds)

    def ended(self) -> str | None:
        code = self.process.poll()
        return None if code is None else f"the launcher exited with status {code}: {_tail(self.output_path)}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.channel.send(b"quit")
        self.channel.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        if self.process.poll() is None:
            _kill(self.process.pid)
            self.process.wait()


_session: _Launcher | None = None


@contextlib.contextmanager
def data_parallel_session():
    """Keep one launcher (torch imported once) for every data_parallel check inside the block; each check
    still gets fresh rank processes. Without it, each check starts and ends its own launcher."""
    global _session  # noqa: PLW0603
    if _session is not None:
        yield
        return
    folder = tempfile.mkdtemp(prefix="kto_np_data_parallel_session_")
    _session = _Launcher(folder)
    try:
        yield
    finally:
        launcher, _session = _session, None
        launcher.close()
        shutil.rmtree(folder, ignore_errors=True)


def _tail(path: str) -> str:
    return " | ".join(_lines(path)[-OUTPUT_LINES_KEPT:])


def evaluate_data_parallel(candidate, case: Case, tolerance: str):
    """One data_parallel case on its own ranks, as (values, notes) (verify runs all cases in one go instead)."""
    result = run_data_parallel(candidate, [case], tolerance)[case.name]
    if isinstance(result, str):
        raise CandidateError(result)
    return result.values, result.notes
