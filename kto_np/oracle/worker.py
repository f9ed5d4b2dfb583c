"""The child side of an isolated check: `python -m kto_np.oracle.worker REQUEST.json FD`.

Imports the candidate named in the request, evaluates it on each case and writes one JSON line per event
to file descriptor FD: loaded | load_error | import_exit, then start / done | error per case, finished.
It decides nothing: the parent (isolation.py) compares the numbers and gives the verdict.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    request_path, fd = argv
    channel = os.fdopen(int(fd), "w", buffering=1, encoding="utf-8")

    def send(**message) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    with open(request_path, encoding="utf-8") as file:
        request = json.load(file)
    sys.path[:] = request["sys_path"]
    os.chdir(request["cwd"])

    from .candidates import CandidateUnrunnable  # noqa: PLC0415
    from .isolation import encode_values, evaluate_case, exit_message, summarise_notes  # noqa: PLC0415
    from .loader import LoadError, load_candidate  # noqa: PLC0415
    from .store import load_cases  # noqa: PLC0415

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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
