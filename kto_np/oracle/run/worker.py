"""The child side of the runner (runner.py): `python -m kto_np.oracle.run.worker MODE ...`.

  check REQUEST.json FD       one isolated check: imports the candidate named in the request, evaluates it
                              on each case and writes one JSON line per event to file descriptor FD:
                              loaded | load_error | import_exit, then start / done | error per case, finished.
  rank REQUEST.json EVENTS    one rank of a data_parallel check, with the torchrun environment (MASTER_ADDR=
                              127.0.0.1, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK; rank 0 also gets the
                              loopback socket to serve the rendezvous store on): imports the candidate, joins
                              the gloo process group, calls the candidate on its shard of each case and
                              appends one JSON line per event to EVENTS: importing | load_error, joining,
                              joined, start / done | error per case, finished.
  launcher FD                 imports torch once, then forks the ranks of each plan the parent sends on the
                              socket FD (and records "forked" and "exit" in each rank's events).

Every event is one JSON line of plain numbers (never a pickle), with the time it was sent. The worker
decides nothing: the parent compares (and, for the ranks, combines) the numbers and gives the verdict.

A rank calls the candidate with NumPy arrays first; when it raises or returns torch tensors (on any rank:
the ranks agree through an all-reduce), with torch float64 tensors, gradients by autograd. A NumPy candidate
that returns no gradient gets central differences of its own loss, every rank calling it in lockstep (so its
collectives stay matched), each perturbing one entry of its shard at a time.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time


def _channel(file):
    """send(**message): one JSON line, with the time it was sent, written and flushed at once."""
    def send(**message) -> None:
        file.write(json.dumps({**message, "time": time.time()}) + "\n")
        file.flush()
    return send


def _read_request(request_path: str) -> dict:
    """The request the parent wrote; the child takes on the parent's sys.path and working directory."""
    with open(request_path, encoding="utf-8") as file:
        request = json.load(file)
    sys.path[:] = request["sys_path"]
    os.chdir(request["cwd"])
    return request


# ---------------------------------------------------------------------------------------------------
# one isolated check (runner.run_in_child)


def check(request_path: str, fd: str) -> int:
    channel = os.fdopen(int(fd), "w", buffering=1, encoding="utf-8")
    send = _channel(channel)
    request = _read_request(request_path)

    from ..cases.store import load_cases  # noqa: PLC0415
    from .candidates import CandidateUnrunnable  # noqa: PLC0415
    from .loader import LoadError, load_candidate  # noqa: PLC0415
    from .runner import encode_values, evaluate_case, exit_message, summarise_notes  # noqa: PLC0415

    try:
        candidate, how = load_candidate(request["spec"], kind=request["kind"], convention=request.get("convention"))
    except SystemExit as exc:
        send(event="import_exit", code=repr(exc.code))
        channel.close()
        return 0
    except LoadError as exc:
        send(event="load_error", message=str(exc))
        channel.close()
        return 0
    send(event="loaded", how=how)
    wanted = request["case_names"]
    cases = {case.name: case for case in load_cases(request["cases_dir"]) if case.name in wanted}
    for name in wanted:
        send(event="start", case=name)
        try:
            evaluation, error = evaluate_case(candidate, cases[name], request["tolerance"])
        except CandidateUnrunnable as exc:  # cannot be run here: a load error (exit status 2), not a finding
            send(event="load_error", message=f"spec {request['spec']!r}: {exc}")
            channel.close()
            return 0
        if error is not None:
            send(event="error", case=name, message=error)
            continue
        try:
            send(event="done", case=name, values=encode_values(evaluation.values),
                 notes=summarise_notes(evaluation.notes))
        except (TypeError, ValueError) as exc:
            send(event="error", case=name, message=f"returned something the oracle cannot read: {exc}")
        except SystemExit as exc:  # pragma: no cover - an array's __array__ calling sys.exit
            send(event="error", case=name, message=exit_message(exc))
    send(event="finished")
    channel.close()
    return 0


# ---------------------------------------------------------------------------------------------------
# the data-parallel ranks (runner.run_data_parallel)


def run_rank(request_path: str, events_path: str) -> int:
    events = open(events_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open for the whole run
    send = _channel(events)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    request = _read_request(request_path)
    send(event="importing")
    from .candidates import short_error  # noqa: PLC0415
    from .loader import load_callable  # noqa: PLC0415

    try:
        candidate = load_callable(request["spec"])
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        send(event="load_error", message=str(exc))
        return 3
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    send(event="joining")
    join_timeout = datetime.timedelta(seconds=float(request["join_timeout"]))
    listen_fd = os.environ.get("KTO_NP_ORACLE_LISTEN_FD")
    store_options = {"master_listen_fd": int(listen_fd)} if rank == 0 and listen_fd else {}
    store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), world_size, rank == 0, timeout=join_timeout,
                          **store_options)
    # gloo's own collective timeout comes after the parent's time limit, which ends the group with a clearer
    # message (the ranks and where each was); it only matters if the parent is gone
    collective_timeout = datetime.timedelta(seconds=2 * float(request["timeout"]) + 10)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=collective_timeout)
    send(event="joined")
    runner = _Runner(candidate, torch, dist, rank, world_size, request["tolerance"])
    for payload in request["cases"]:
        send(event="start", case=payload["name"])
        try:
            result = runner.run(payload)
        except Exception as exc:  # noqa: BLE001 - a candidate's failure is a finding
            send(event="error", case=payload["name"], message=short_error(exc))
            return 3
        send(event="done", case=payload["name"], **result)
    dist.barrier()
    send(event="finished")
    return 0


class _Runner:
    def __init__(self, candidate, torch, dist, rank: int, world_size: int, tolerance: str):
        self.candidate, self.torch, self.dist = candidate, torch, dist
        self.rank, self.world_size, self.tolerance = rank, world_size, tolerance
        self.mode: str | None = None  # "numpy" or "torch", decided on the first case by every rank together

    # the oracle's all_reduce on the same group: NumPy arrays or torch tensors in, the same type out
    def all_reduce(self, x, op: str = "mean"):
        torch, dist = self.torch, self.dist
        if op not in ("mean", "sum"):
            raise ValueError(f"all_reduce: op must be 'mean' or 'sum', got {op!r}")
        if torch.is_tensor(x):
            reduced = x.detach().clone().contiguous()
            if not reduced.is_floating_point():
                reduced = reduced.double()
            dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
            local = x / self.world_size if op == "mean" else x
            if op == "mean":
                reduced = reduced / self.world_size
            # the value of the reduction; autograd sees the local term, as it does through dist.all_reduce
            return local + (reduced - local).detach() if x.requires_grad else reduced
        import numpy as np  # noqa: PLC0415

        scalar = isinstance(x, (int, float))
        arr = np.array(x, dtype=np.float64)
        tensor = torch.from_numpy(arr.copy())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        out = tensor.numpy() / (self.world_size if op == "mean" else 1)
        return float(out) if scalar else out

    def _shard(self, payload: dict) -> dict:
        import numpy as np  # noqa: PLC0415

        inputs = payload["inputs"]
        sizes = inputs["shard_sizes"]
        start = sum(sizes[:self.rank])
        part = slice(start, start + sizes[self.rank])
        shard = {k: np.array(inputs[k][part], dtype=bool if k == "labels" else np.float64)
                 for k in ("policy_logps", "ref_logps", "labels", "kl_policy_logps", "kl_ref_logps")}
        shard.update({k: float(inputs[k]) for k in ("beta", "desirable_weight", "undesirable_weight")})
        return shard

    def _call(self, shard: dict, overrides: dict | None = None, torch_inputs: bool = False):
        import numpy as np  # noqa: PLC0415

        arrays = {k: np.array(v, copy=True) for k, v in {**shard, **(overrides or {})}.items()
                  if not isinstance(v, float)}
        tensors = {}
        if torch_inputs:
            for name, value in arrays.items():
                tensor = self.torch.tensor(value)
                if name in ("policy_logps", "kl_policy_logps"):
                    tensor.requires_grad_(True)
                tensors[name] = tensor
            arrays = tensors
        out = self.candidate(arrays["policy_logps"], arrays["ref_logps"], arrays["labels"], arrays["kl_policy_logps"],
                             arrays["kl_ref_logps"], shard["beta"], shard["desirable_weight"],
                             shard["undesirable_weight"], rank=self.rank, world_size=self.world_size,
                             all_reduce=self.all_reduce)
        return out, arrays

    def _decide_mode(self, shard: dict):
        """NumPy first; torch when this rank's NumPy call raised or returned torch tensors. No collective of the
        oracle's own here: a candidate that raised may have left the others inside one of its collectives."""
        from .candidates import _holds_torch, short_error  # noqa: PLC0415

        try:
            first = self._call(shard)
        except Exception as exc:  # noqa: BLE001 - then torch inputs
            self.mode = "torch"
            return None, f"raised on NumPy input ({short_error(exc)}); called with torch tensors"
        self.mode = "torch" if _holds_torch(first[0]) else "numpy"
        return (first if self.mode == "numpy" else None), None

    def run(self, payload: dict) -> dict:
        import numpy as np  # noqa: PLC0415

        from .candidates import FD_STEP, _as_float64, _parse_output  # noqa: PLC0415

        shard = self._shard(payload)
        notes = []
        first = None
        if self.mode is None:
            first, note = self._decide_mode(shard)
            if note:
                notes.append(note)
        if self.mode == "torch":
            out, tensors = self._call(shard, torch_inputs=True)
        else:
            out, tensors = first if first is not None else self._call(shard)
        parsed = _parse_output("kto_loss", out)
        loss = float(_as_float64(parsed.primary, "loss"))
        grads, sources = {}, {"loss": "returned"}
        for name in ("policy_logps", "kl_policy_logps"):
            if name in parsed.grads:
                grads[name] = _as_float64(parsed.grads[name], f"grad/{name}").reshape(-1).tolist()
                sources[name] = "returned"
        missing = [n for n in ("policy_logps", "kl_policy_logps") if n not in grads]
        if missing and self.mode == "torch" and self.torch.is_tensor(parsed.primary) and parsed.primary.requires_grad:
            found = self.torch.autograd.grad(parsed.primary, [tensors[n] for n in missing], allow_unused=True)
            for name, grad in zip(missing, found):
                grads[name] = (np.zeros(len(shard[name])) if grad is None else _as_float64(grad, name)).tolist()
                sources[name] = "autograd"
            missing = []
        # central differences of the rank's own loss where it gave no gradient; every rank calls the candidate
        # in lockstep (its collectives stay matched) when any rank needs them
        needs = self.torch.tensor([1.0 if "policy_logps" in missing else 0.0])
        self.dist.all_reduce(needs, op=self.dist.ReduceOp.MAX)
        if needs.item() > 0:
            own = "policy_logps" in missing
            step = FD_STEP[self.tolerance]
            longest = int(max(payload["inputs"]["shard_sizes"]))
            grad = np.zeros(len(shard["policy_logps"]))
            for j in range(longest):
                values = []
                for sign in (1.0, -1.0):
                    perturbed = np.array(shard["policy_logps"], copy=True)
                    if j < perturbed.shape[0]:
                        perturbed[j] += sign * step
                    result, _ = self._call(shard, {"policy_logps": perturbed}, torch_inputs=self.mode == "torch")
                    values.append(float(_as_float64(_parse_output("kto_loss", result).primary, "loss")))
                if j < grad.shape[0]:
                    grad[j] = (values[0] - values[1]) / (2 * step)
            if own:
                grads["policy_logps"] = grad.tolist()
                sources["policy_logps"] = "finite differences"
        for name in ("policy_logps", "kl_policy_logps"):  # NaN/inf as None in JSON
            if name in grads:
                grads[name] = [v if np.isfinite(v) else None for v in grads[name]]
        return {"loss": loss if np.isfinite(loss) else None, "grads": grads, "sources": sources, "notes": notes}


def _append_event(path: str, **message) -> None:
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(message) + "\n")


def _rank_child(rank_spec: dict, listen_fds: list[int]) -> None:
    """In a forked child: become the rank (its environment, output file, process group), run, exit."""
    code = 4
    try:
        os.setpgid(0, 0)
        own_fd = rank_spec.get("listen_fd")
        for fd in listen_fds:
            if fd != own_fd:
                os.close(fd)
        os.environ.update(rank_spec["env"])
        output = os.open(rank_spec["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.close(output)
        code = run_rank(rank_spec["request"], rank_spec["events"])
    except BaseException:  # noqa: BLE001 - anything escaping main ends the rank, named by its exit status
        import traceback  # noqa: PLC0415

        traceback.print_exc()
        code = 4
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)  # no interpreter teardown: a process group torn down at exit can block


def _run_plan(plan_path: str, fds: list[int]) -> int:
    """Fork every rank of a plan (each its own process group); record how each ended in its events file."""
    with open(plan_path, encoding="utf-8") as file:
        plan = json.load(file)
    for rank_spec in plan["ranks"]:
        index = rank_spec.pop("listen_fd_index", None)
        rank_spec["listen_fd"] = None if index is None else fds[index]
        if rank_spec["listen_fd"] is not None:
            rank_spec["env"]["KTO_NP_ORACLE_LISTEN_FD"] = str(rank_spec["listen_fd"])
    children = {}
    for rank_spec in plan["ranks"]:
        pid = os.fork()
        if pid == 0:
            _rank_child(rank_spec, fds)
        _append_event(rank_spec["events"], event="forked", pid=pid, launcher=os.getpid())
        children[pid] = rank_spec
    for fd in fds:
        os.close(fd)
    while children:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        rank_spec = children.pop(pid, None)
        if rank_spec is not None:
            _append_event(rank_spec["events"], event="exit", code=os.waitstatus_to_exitcode(status))
    return 0


def launcher(channel_fd: int) -> int:
    """The launcher: import torch once, then for each plan the parent sends (a path, with the listening
    sockets as file descriptors) fork a process that forks that plan's ranks. Forking after the import saves
    each rank the seconds torch takes. Ends on "quit", or when the parent is gone."""
    import signal  # noqa: PLC0415
    import socket  # noqa: PLC0415

    parent = os.getppid()
    channel = socket.socket(fileno=channel_fd)
    channel.settimeout(1.0)
    import numpy  # noqa: F401, PLC0415
    import torch  # noqa: F401, PLC0415
    import torch.distributed  # noqa: F401, PLC0415

    from . import candidates  # noqa: F401, PLC0415

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the plan processes are reaped by the kernel
    channel.send(b"ready")
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(channel, 4096, 64)
        except TimeoutError:
            if os.getppid() != parent:
                return 0
            continue
        except OSError:
            return 0
        if not message or message == b"quit":
            return 0
        if os.fork() == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            channel.close()
            os._exit(_run_plan(message.decode(), list(fds)))
        for fd in fds:
            os.close(fd)


MODES = {"check": check, "rank": run_rank, "launcher": launcher}


if __name__ == "__main__":
    mode, arguments = sys.argv[1], sys.argv[2:]
    if mode == "launcher":
        sys.exit(launcher(int(arguments[0])))
    code = MODES[mode](*arguments)
    if mode == "check":
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # a rank: no interpreter teardown, a process group torn down at exit can block
