"""Results from any language: `kto-np oracle compare CASES_DIR RESULTS.json`.

A user exports the cases, computes their numbers in any language and writes them to a JSON results file
(the format is docs/oracle-results.schema.json; docs/oracle/format.md shows it):

    {"format": "kto_np-oracle-results", "version": 1, "kind": "kto_loss", "variant": "kto",
     "results": {"kto_loss/kto/kl_pairs": {"loss": 0.63, "grad": {"policy_logps": [...]},
                                           "metrics": {"kl": 0.6, "rewards/chosen": null}}, ...}}

Every key of a case's entry but "loss" (or "logps" for the log-prob kinds) is optional; null stands for
None or NaN. The report and the diagnosis are the same as `check` gives. Only the json module reads the
file; nothing is executed.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ...checkpoint import HF_PREFIX
from ...files import atomic_write
from ...validation import check_choice
from ..cases.reference import KINDS, KL_ROTATION, KL_ROTATIONS, MODEL_KINDS, VARIANTS, resolve_variant
from ..check import _select_cases, build_report
from ..run.candidates import Evaluation, evaluate
from ..run.runner import Outcome
from .pipeline_results import ResultsError as PipelineResultsError
from .pipeline_results import entry_from_candidate, values_from_entry
from .report import TOLERANCES, Report

RESULTS_FORMAT = "kto_np-oracle-results"
RESULTS_VERSION = 1
TOP_LEVEL_KEYS = {"format", "version", "kind", "variant", "kl_rotation", "results"}
REQUIRED_KEYS = {"format", "version", "kind", "variant", "results"}
RESULT_KEYS = {"loss", "logps", "logits", "grad", "grads", "metrics", "indices", "ranks", "micro_steps"}
EDIFICE_INTERMEDIATES = ("logits", "logps")  # model_edifice entries may carry them: where a pipeline goes wrong
PIPELINE_RESULT_KEYS = {"kl_pairs": "indices", "data_parallel": "ranks", "accumulation": "micro_steps"}
LOGPROB_KINDS = ("logprobs", "sequence_logprobs")


class ResultsError(ValueError):
    """A results file that does not follow the format (exit status 2)."""


def _array(value, where: str) -> np.ndarray:
    """A JSON number or nested list as float64 (null: NaN); ragged lists and other types are refused."""
    if isinstance(value, bool) or not (value is None or isinstance(value, (int, float, list))):
        raise ResultsError(f"{where} must be a number, null or a nested list of numbers, got "
                           f"{type(value).__name__}")
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ResultsError(f"{where} must be a number or a rectangular nested list of numbers ({exc})") from None
    return arr


def _names(value, where: str) -> Mapping:
    if not isinstance(value, dict):
        raise ResultsError(f"{where} must be an object of name -> values, got {type(value).__name__}")
    return value


def _case_values(kind: str, entry, where: str) -> dict:
    """One case's entry as the quantities verify compares: quantity -> (array | None, "returned", None)."""
    if not isinstance(entry, dict):
        raise ResultsError(f"{where} must be an object, got {type(entry).__name__}")
    if kind in PIPELINE_RESULT_KEYS:  # read with the case (shard sizes, batch sizes) in compare_results
        key = PIPELINE_RESULT_KEYS[kind]
        if set(entry) != {key}:
            raise ResultsError(f"{where} must have exactly the key {key!r} for kind {kind!r}, got {sorted(entry)}")
        return {"(entry)": entry}
    unknown = sorted(set(entry) - RESULT_KEYS)
    if unknown:
        raise ResultsError(f"{where} has unknown keys {unknown}; allowed: {sorted(RESULT_KEYS)}")
    primary = "logps" if kind in LOGPROB_KINDS else "loss"
    if primary not in entry:
        raise ResultsError(f"{where} lacks {primary!r} (every case's entry has it)")
    values = {primary: (_array(entry[primary], f"{where}.{primary}"), "returned", None)}
    if kind == "model_edifice":
        values.update({key: (_array(entry[key], f"{where}.{key}"), "returned", None)
                       for key in EDIFICE_INTERMEDIATES if key in entry})
    elif "logits" in entry:
        raise ResultsError(f"{where}: 'logits' is for kind 'model_edifice' only, not {kind!r}")
    for group in ("grad", "grads"):
        for name, value in _names(entry.get(group, {}), f"{where}.{group}").items():
            if kind == "model_kto" and not (name.startswith(HF_PREFIX) or name == "lm_head.weight"):
                name = HF_PREFIX + name
            if kind == "model_edifice" and isinstance(value, dict):  # Axon's nested {layer: {param: values}}
                for param, array in value.items():
                    values[f"grad/{name}.{param}"] = (_array(array, f"{where}.{group}.{name}.{param}"), "returned",
                                                      None)
                continue
            values[f"grad/{name}"] = (_array(value, f"{where}.{group}.{name}"), "returned", None)
    for name, value in _names(entry.get("metrics", {}), f"{where}.metrics").items():
        values[f"metrics/{name}"] = (None if value is None else _array(value, f"{where}.metrics.{name}"),
                                     "returned", None)
    return values


def read_results(results) -> dict:
    """The results document (a path or an already-parsed dict), checked against the format."""
    where = "results"
    if isinstance(results, (str, os.PathLike)):
        where = os.fspath(results)
        try:
            results = json.loads(Path(results).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ResultsError(f"{where}: not a readable JSON file ({exc})") from None
    if not isinstance(results, dict):
        raise ResultsError(f"{where}: the document must be a JSON object, got {type(results).__name__}")
    if results.get("format") != RESULTS_FORMAT:
        raise ResultsError(f"{where}: 'format' must be {RESULTS_FORMAT!r}, got {results.get('format')!r}")
    version = results.get("version")
    if isinstance(version, bool) or version != RESULTS_VERSION:
        raise ResultsError(f"{where}: 'version' must be {RESULTS_VERSION}, got {version!r}")
    unknown = sorted(set(results) - TOP_LEVEL_KEYS)
    if unknown:
        raise ResultsError(f"{where}: unknown keys {unknown}; allowed: {sorted(TOP_LEVEL_KEYS)}")
    missing = sorted(REQUIRED_KEYS - set(results))
    if missing:
        raise ResultsError(f"{where}: lacks {missing} (required: {sorted(REQUIRED_KEYS)})")
    if results.get("kind") not in KINDS:
        raise ResultsError(f"{where}: 'kind' must be one of {KINDS}, got {results.get('kind')!r}")
    if results.get("variant") not in VARIANTS[results["kind"]]:
        raise ResultsError(f"{where}: 'variant' must be one of {VARIANTS[results['kind']]} for kind "
                           f"{results['kind']!r}, got {results.get('variant')!r}")
    rotation = results.get("kl_rotation", KL_ROTATION)
    if isinstance(rotation, bool) or rotation not in KL_ROTATIONS:
        raise ResultsError(f"{where}: 'kl_rotation' must be one of {KL_ROTATIONS}, got {rotation!r}")
    if not isinstance(results.get("results"), dict) or not results["results"]:
        raise ResultsError(f"{where}: 'results' must be a non-empty object of case name -> entry")
    return {"where": where, "kind": results["kind"], "variant": results["variant"], "kl_rotation": rotation,
            "values": {name: _case_values(results["kind"], entry, f"{where}: results[{name!r}]")
                       for name, entry in results["results"].items()}}


def compare_results(cases, results, *, tolerance: str = "float64") -> Report:
    """The report for a results document (path or dict) against the cases (a folder, Cases or None)."""
    check_choice("tolerance", tolerance, tuple(TOLERANCES))
    parsed = read_results(results)
    kind, variant = parsed["kind"], resolve_variant(parsed["kind"], parsed["variant"])
    rotation = parsed["kl_rotation"] if kind == "model_kto" else None
    selected, source, identical = _select_cases(cases, kind, variant, rotation)
    by_name = {case.name: case for case in selected}
    evaluations, errors, notes = {}, {}, [f"numbers from {parsed['where']} (computed outside kto_np)"]
    for name, values in parsed["values"].items():
        case = by_name.get(name)
        if case is None:
            notes.append(f"results for {name!r} not compared: no such case of kind {kind!r}, variant {variant!r}")
            continue
        if "(entry)" in values:  # a pipeline kind: the entry becomes values with its case
            try:
                values = values_from_entry(case, values["(entry)"])
            except PipelineResultsError as exc:
                raise ResultsError(f"{parsed['where']}: {exc}") from None
        if kind == "model_edifice":
            _check_axon_grads(parsed["where"], case, values)
        known = {q: v for q, v in values.items() if q in case.expected}
        notes += [f"{name}: {q!r} not compared (no reference value)" for q in values if q not in case.expected]
        evaluations[name] = Evaluation(known, [])
    for case in selected:
        if case.name not in evaluations:
            errors[case.name] = f"has no entry in {parsed['where']}"
    return build_report(kind, variant, tolerance, selected, Outcome(evaluations, errors, notes, None),
                        cases_source=source, cases_identical=identical, kl_rotation=rotation)


def _check_axon_grads(where: str, case, values: Mapping) -> None:
    """model_edifice results name gradients by the case's Axon parameters; anything else is refused."""
    unknown = sorted(q[len("grad/"):] for q in values if q.startswith("grad/") and q not in case.expected)
    if unknown:
        known = sorted(q[len("grad/"):] for q in case.expected if q.startswith("grad/"))
        raise ResultsError(f"{where}: results[{case.name!r}].grads has names that are not this case's parameters: "
                           f"{unknown[:4]}{' and more' if len(unknown) > 4 else ''}; model_edifice gradients use "
                           f"Axon's '<layer>.<param>' names (e.g. {known[:2]}), flat or nested "
                           "{layer: {param: values}}")


def _plain(value):
    """A float64 array as JSON numbers (NaN as null)."""
    arr = np.asarray(value, dtype=np.float64)
    data = np.where(np.isnan(arr), None, arr).tolist() if arr.dtype.kind == "f" else arr.tolist()
    return None if arr.ndim == 0 and data is None else (float(data) if arr.ndim == 0 else data)


def results_document(candidate, kind: str = "kto_loss", variant: str | None = None, cases=None, *,
                     tolerance: str = "float64", kl_rotation: int = KL_ROTATION) -> dict:
    """The results document a Python candidate's numbers make (for writing with json.dump); each case's
    loss or logps, the gradients it returns or autograd gives, and its metrics."""
    variant = resolve_variant(kind, variant)
    selected, _, _ = _select_cases(cases, kind, variant, kl_rotation if kind == "model_kto" else None)
    out = {}
    for case in selected:
        if kind in PIPELINE_RESULT_KEYS:
            out[case.name] = entry_from_candidate(candidate, case)
            continue
        evaluation = evaluate(candidate, case, tolerance)
        entry: dict = {}
        for quantity, (value, _source, projection) in evaluation.values.items():
            if quantity.startswith("metrics/"):
                entry.setdefault("metrics", {})[quantity[8:]] = None if value is None else _plain(value)
                continue
            if value is None or projection is not None:
                continue  # not checked, or a directional derivative: no gradient to write down
            if quantity in ("loss", "logps") or (kind == "model_edifice" and quantity in EDIFICE_INTERMEDIATES):
                entry[quantity] = _plain(value)
            elif quantity.startswith("grad/"):
                entry.setdefault("grads" if kind in MODEL_KINDS else "grad", {})[quantity[5:]] = _plain(value)
        out[case.name] = entry
    document = {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "kind": kind, "variant": variant}
    if kind == "model_kto":
        document["kl_rotation"] = kl_rotation
    document["results"] = out
    return document


def write_results(path, document: dict) -> Path:
    """Write a results document atomically (NaN written as null)."""
    read_results(document)  # refuse to write what compare would refuse to read
    with atomic_write(Path(path), "w") as file:
        file.write(json.dumps(document, indent=1, allow_nan=False) + "\n")
    return Path(path)


def main_compare(cases_dir, results_path, tolerance: str = "float64", show_all: bool = False) -> int:
    """`kto-np oracle compare`: print the report for a results file. Exit status 0 passed, 1 failed, 2 when
    the cases or the results cannot be read (or the cases are not kto_np's)."""
    try:
        report = compare_results(cases_dir, results_path, tolerance=tolerance)
    except (ValueError, TypeError) as exc:
        print(f"kto-np oracle compare: {exc}", file=sys.stderr)
        return 2
    print(report.format(show_all=show_all))
    if report.cases_identical is False:
        print(f"kto-np oracle compare: the cases in {cases_dir} differ from this kto_np's export; re-export them",
              file=sys.stderr)
        return 2
    return 0 if report.passed else 1


__all__ = ["RESULTS_FORMAT", "RESULTS_VERSION", "ResultsError", "compare_results", "main_compare",
           "read_results", "results_document", "write_results"]
