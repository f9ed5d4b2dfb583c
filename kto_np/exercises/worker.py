"""The child side of `kto-np exercise check`: `python -m kto_np.exercises.worker REQUEST.json`.

Loads the function with the oracle's loader, runs it on the exercise's calls, writes the returned numbers
(or each call's error) to the result file the request names. It judges nothing: the parent does.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    (request_path,) = argv
    with open(request_path, encoding="utf-8") as file:
        request = json.load(file)
    sys.path[:] = request["sys_path"]
    os.chdir(request["cwd"])

    from ..oracle.run.loader import load_callable  # noqa: PLC0415
    from ..oracle.run.runner import encode_array  # noqa: PLC0415
    from .kit import run_calls  # noqa: PLC0415
    from .registry import get  # noqa: PLC0415

    def answer(document: dict) -> int:
        with open(request["result"], "w", encoding="utf-8") as file:
            json.dump(document, file)
        return 0

    try:
        function = load_callable(request["spec"])
    except SystemExit as exc:
        return answer({"import_exit": repr(exc.code)})
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        return answer({"load_error": str(exc), "type": type(exc).__name__})
    outcomes = run_calls(function, get(request["exercise"]).calls(), request["timeout"])
    return answer({"outcomes": [
        {"values": [encode_array(v) for v in o.values]} if o.values is not None
        else {"error": o.error, "not_implemented": o.not_implemented} for o in outcomes]})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
