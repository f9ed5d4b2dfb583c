"""Starting the ranks of a data_parallel check: R local processes in one torch.distributed process group.

Each rank is `python -m kto_np.oracle.dp_worker REQUEST.json`, started the way torchrun starts one:
MASTER_ADDR=127.0.0.1, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE in its environment.
Loopback only: the port is found by binding a socket to 127.0.0.1 here; that listening socket is handed to
rank 0, which serves the rendezvous store on it (torch's TCPStore would otherwise listen on every
interface), and gloo is bound to the loopback interface (GLOO_SOCKET_IFNAME). One process group per world
size; the groups run side by side.

Every rank reports events (importing, joined, start/done/error per case, finished) as JSON lines in a file
of its own; this parent decides. Bounded time on every path: a rank that does not join within
join_timeout, or a case not finished by every rank within timeout seconds (a hang, or a collective the
other ranks never enter), ends the group with a message naming the ranks and where they were; a rank that
raises or exits ends it at once. Every process is killed and waited for before this returns.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from . import candidates
from .cases import Case
from .distributed import shard_sizes
from .loader import LoadError

DEFAULT_TIMEOUT = 60.0  # seconds per case, for every rank together
JOIN_TIMEOUT = 90.0  # seconds for every rank to import torch and the candidate and join the group
POLL_SECONDS = 0.02
OUTPUT_LINES_KEPT = 5


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


def candidate_spec(candidate) -> str | None:
    """"module:qualname" or "path/file.py:qualname" naming a module-level function, else None."""
    if isinstance(candidate, str):
        return candidate
    module_name = getattr(candidate, "__module__", None)
    qualname = getattr(candidate, "__qualname__", None)
    if not isinstance(module_name, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    module = sys.modules.get(module_name)
    found = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not candidate:
        return None
    if module_name == "__main__" or module_name not in sys.modules or getattr(module, "__spec__", None) is None:
        path = getattr(module, "__file__", None)
        return f"{path}:{qualname}" if path else None
    return f"{module_name}:{qualname}"


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
        try:
            with open(self.output_path, encoding="utf-8", errors="replace") as file:
                lines = [line.rstrip() for line in file.readlines() if line.strip()]
        except OSError:
            return ""
        kept = lines[:OUTPUT_LINES_KEPT]
        more = f" (+{len(lines) - len(kept)} more lines)" if len(lines) > len(kept) else ""
        return " | ".join(kept) + more

    def kill(self) -> None:
        pid = self.pid
        if pid is None or self.exit_code is not None:
            return
        for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill()


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
                out[case.name] = candidates.Evaluation(*_combine(case, done))
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
    spec = candidate_spec(candidate)
    if spec is None:
        raise TypeError("a data_parallel candidate runs in R separate processes, so it must be importable by name: "
                        "a module-level function ('module:function' or 'path/file.py:function'), got "
                        f"{getattr(candidate, '__qualname__', type(candidate).__name__)!r}")
    timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    join_timeout = JOIN_TIMEOUT if join_timeout is None else float(join_timeout)
    by_world: dict[int, list[Case]] = {}
    for case in cases:
        by_world.setdefault(len(shard_sizes(case)), []).append(case)
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
    """The process that imports torch once and forks the ranks of each plan sent to it (dp_worker.zygote)."""

    def __init__(self, folder: str):
        self.output_path = os.path.join(folder, "launcher.out")
        self.channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            with open(self.output_path, "wb") as output:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "kto_np.oracle.dp_worker", "--zygote", str(theirs.fileno())], env=env,
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
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
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
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = [line.rstrip() for line in file if line.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-OUTPUT_LINES_KEPT:])


def _evaluate_one(candidate, case: Case, tolerance: str):
    """One data_parallel case on its own ranks (verify runs all cases in one go instead)."""
    result = run_data_parallel(candidate, [case], tolerance)[case.name]
    if isinstance(result, str):
        raise candidates.CandidateError(result)
    return result.values, result.notes


candidates.PIPELINE_EVALUATORS["data_parallel"] = _evaluate_one
