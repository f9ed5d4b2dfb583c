"""verify: run a candidate on the cases of one kind and variant (in a child process when it can be named),
compare, diagnose; the command-line entry points behind `kto-np oracle check` and `kto-np oracle export`."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..validation import check_choice
from . import report as report_module
from .cases import Case, generate_cases, resolve_variant
from .isolation import DEFAULT_TIMEOUT, candidate_spec, run_in_child, run_in_process, summarise_notes
from .loader import LoadError, load_candidate
from .report import TOLERANCES, Check, Diagnosis, Report, compare, diagnose
from .store import FORMAT_VERSION, export, load_cases


def _select_cases(cases, kind: str, variant: str | None) -> list[Case]:
    if cases is None:
        pool = generate_cases()
    elif isinstance(cases, (str, os.PathLike)):
        pool = load_cases(cases)
    elif isinstance(cases, Sequence) and all(isinstance(c, Case) for c in cases):
        pool = cases
    else:
        raise TypeError(f"cases must be None, a path to exported cases or a sequence of Case, got "
                        f"{type(cases).__name__}")
    selected = [c for c in pool if c.kind == kind and c.variant == variant]
    if not selected:
        raise ValueError(f"cases hold no case of kind {kind!r} and variant {variant!r}")
    return selected


def _check_timeout(timeout) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    return float(timeout)


def _oracle_state() -> list:
    """What an in-process candidate could patch to forge a verdict: the report's classes and functions."""
    return [(owner, dict(vars(owner))) for owner in (Report, Check, Diagnosis)] + [
        (report_module, dict(vars(report_module)))]


def _restore(state: list) -> list[str]:
    """Undo changes to the snapshot `state`; returns the names that were changed."""
    changed = []
    for owner, saved in state:
        now = vars(owner)
        for name in set(saved) | set(now):
            if saved.get(name, _MISSING) is not now.get(name, _MISSING):
                changed.append(f"{getattr(owner, '__name__', owner)}.{name}")
                if name in saved:
                    setattr(owner, name, saved[name])
                else:
                    delattr(owner, name)
    return sorted(changed)


_MISSING = object()


def verify(candidate, kind: str = "kto_loss", variant: str | None = None, cases=None, *,
           tolerance: str = "float64", timeout: float | None = DEFAULT_TIMEOUT, isolate: bool | None = None,
           convention: str | None = None) -> Report:
    """Check a candidate implementation against the reference cases; returns a Report.

    candidate: a callable, or a spec string "module:function" / "path/file.py:function".
    kind: "kto_loss" (variant "kto" by default, or "edifice", "edifice_stop_z_grad", "apo_zero_unpaired"),
    "dpo_loss", "logprobs", "sequence_logprobs", "model_kto" (variant "kto"); candidate signatures in
    docs/ORACLE.md. cases: None (generated in memory), a path to exported cases, or Cases.
    tolerance: "float64" or "float32" (see TOLERANCES). timeout: seconds per case (None: no limit).
    isolate: None runs the candidate in a child process when it can be named there (a spec, a module-level
    function or class) and in this process otherwise; True demands the child process; False this process.
    Any abnormal end of the candidate (an exception, sys.exit, os._exit, a signal, the time limit) fails
    the case it happened in. Raises LoadError when a spec cannot be imported.
    """
    if not isinstance(candidate, str) and not callable(candidate):
        raise TypeError(f"candidate must be callable or a spec string, got {type(candidate).__name__}")
    variant = resolve_variant(kind, variant)
    check_choice("tolerance", tolerance, tuple(TOLERANCES))
    timeout = _check_timeout(timeout)
    if isolate not in (None, True, False):
        raise TypeError(f"isolate must be None, True or False, got {isolate!r}")
    selected = _select_cases(cases, kind, variant)
    spec = candidate_spec(candidate) if isolate is not False else None
    if isolate and spec is None:
        raise TypeError("isolate=True needs a candidate a child process can import: a spec string or a "
                        f"module-level function or class, got {candidate!r} (a closure, lambda or instance)")
    if spec is not None:
        outcome = run_in_child(spec, selected, tolerance, timeout, convention=convention)
        if outcome.load_error is not None:
            raise LoadError(outcome.load_error)
    else:
        if isinstance(candidate, str):
            candidate = load_candidate(candidate, convention=convention)
        state = _oracle_state()
        reason = ("isolate=False" if isolate is False
                  else f"{getattr(candidate, '__qualname__', type(candidate).__name__)} cannot be named for a "
                       "child process (a closure, lambda or instance)")
        outcome = run_in_process(candidate, selected, tolerance, timeout, reason)
        changed = _restore(state)
        if changed:
            outcome.errors["(oracle)"] = (f"changed the oracle's own code ({', '.join(changed[:5])}); restored. "
                                          "Run it isolated (a module-level function or a spec)")
    report = Report(kind, variant, tolerance, [c.name for c in selected])
    report.notes += outcome.notes
    candidate_values: dict[str, dict] = {}
    for case in selected:
        if case.name in outcome.errors:
            report.errors[case.name] = outcome.errors[case.name]
            continue
        evaluation = outcome.evaluations.get(case.name)
        if evaluation is None:  # pragma: no cover - every case ends in an evaluation or an error
            report.errors[case.name] = "was not run"
            continue
        report.notes += evaluation.notes
        candidate_values[case.name] = evaluation.values
        expected_names = ["loss"] if "loss" in case.expected else ["logps"]
        expected_names += [k for k in case.expected if k.startswith("grad/")]
        for quantity in expected_names:
            if quantity not in evaluation.values:
                if kind == "model_kto" and quantity.startswith("grad/"):
                    report.checks.append(Check(case.name, quantity, "returned", (), math.inf, math.inf, 0.0, 0.0,
                                               False, note="missing from the candidate's gradients"))
                continue
            value, source, projection = evaluation.values[quantity]
            reference = case.expected[quantity]
            if projection is not None:
                reference = projection(reference)
            report.checks.append(compare(case.name, quantity, source, value, reference, tolerance))
        for quantity, (value, source, _) in evaluation.values.items():
            if quantity not in expected_names:
                report.checks.append(compare(case.name, quantity, source, value, case.expected[quantity],
                                             tolerance))
    report.errors.update({k: v for k, v in outcome.errors.items() if k not in report.errors})
    report.notes = summarise_notes(report.notes)
    report.diagnosis = diagnose(kind, variant, selected, candidate_values, report)
    return report


def main_check(spec: str, kind: str = "kto_loss", variant: str | None = None, cases_dir=None,
               tolerance: str = "float64", *, timeout: float | None = DEFAULT_TIMEOUT,
               convention: str | None = None) -> int:
    """`kto-np oracle check`: verify the candidate a spec names in a child process, print the report.
    Exit status 0 passed, 1 failed (any abnormal end of the candidate included), 2 when the candidate or the
    cases cannot be loaded."""
    try:
        report = verify(spec, kind, variant, cases_dir, tolerance=tolerance, timeout=timeout, isolate=True,
                        convention=convention)
    except (LoadError, ValueError, TypeError, ImportError, AttributeError) as exc:
        print(f"kto-np oracle check: {exc}", file=sys.stderr)
        return 2
    print(report)
    return 0 if report.passed else 1


def main_export(out_dir, overwrite: bool = False) -> int:
    """`kto-np oracle export`: write the cases, print where. Exit status 0, or 1 when refused."""
    try:
        manifest_path = export(out_dir, overwrite=overwrite)
    except (FileExistsError, ValueError, OSError) as exc:
        print(f"kto-np oracle export: {exc}", file=sys.stderr)
        return 1
    count = len(json.loads(manifest_path.read_text(encoding="utf-8"))["cases"])
    print(f"wrote {count} cases (format version {FORMAT_VERSION}, kto_np {__version__}) to {manifest_path.parent}; "
          f"manifest: {manifest_path}")
    return 0
