"""verify: run a candidate on the cases of one kind and variant, compare, diagnose; the command-line
entry points behind `kto-np oracle check` and `kto-np oracle export`."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence

from .. import __version__
from ..validation import check_choice
from .candidates import CandidateError, evaluate, load_callable, short_error
from .cases import Case, generate_cases, resolve_variant
from .report import TOLERANCES, Check, Report, compare, diagnose
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


def verify(candidate: Callable, kind: str = "kto_loss", variant: str | None = None, cases=None, *,
           tolerance: str = "float64", timeout: float | None = None) -> Report:
    """Check a candidate implementation against the reference cases; returns a Report.

    kind: "kto_loss" (variant "kto" by default, or "edifice", "edifice_stop_z_grad", "apo_zero_unpaired"),
    "dpo_loss", "logprobs", "sequence_logprobs", "model_kto" (variant "kto"); candidate signatures in
    docs/ORACLE.md. cases: None (generated in memory), a path to exported cases, or Cases.
    tolerance: "float64" or "float32" (see TOLERANCES). The candidate is called with NumPy arrays first;
    if it returns torch tensors or raises, with torch float64 tensors (gradients by autograd); gradients it
    neither returns nor lets autograd compute are taken by central finite differences.
    """
    if not callable(candidate):
        raise TypeError(f"candidate must be callable, got {type(candidate).__name__}")
    variant = resolve_variant(kind, variant)
    check_choice("tolerance", tolerance, tuple(TOLERANCES))
    selected = _select_cases(cases, kind, variant)
    report = Report(kind, variant, tolerance, [c.name for c in selected])
    candidate_values: dict[str, dict] = {}
    ranked = _run_ranks(candidate, kind, selected, tolerance, timeout)
    for case in selected:
        try:
            evaluation = evaluate(candidate, case, tolerance) if ranked is None else _ranked_result(ranked, case)
        except CandidateError as exc:
            report.errors[case.name] = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - a candidate's failure is a finding, not a crash
            report.errors[case.name] = f"failed: {short_error(exc)}"
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
    report.diagnosis = diagnose(kind, variant, selected, candidate_values, report)
    return report



def _run_ranks(candidate, kind: str, selected: list[Case], tolerance: str, timeout: float | None):
    """data_parallel: every case of every world size in one go (one process group per world size)."""
    if kind != "data_parallel":
        return None
    from .dp_launch import run_data_parallel  # noqa: PLC0415

    return run_data_parallel(candidate, selected, tolerance, timeout=timeout)


def _ranked_result(ranked: dict, case: Case):
    result = ranked[case.name]
    if isinstance(result, str):
        raise CandidateError(result)
    return result


def main_check(spec: str, kind: str = "kto_loss", variant: str | None = None, cases_dir=None,
               tolerance: str = "float64") -> int:
    """`kto-np oracle check`: load the candidate, verify it, print the report. Exit status 0 passed,
    1 failed, 2 when the candidate or the cases cannot be loaded."""
    try:
        candidate = load_callable(spec)
        report = verify(candidate, kind, variant, cases_dir, tolerance=tolerance)
    except (ValueError, TypeError, ImportError, AttributeError) as exc:
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
