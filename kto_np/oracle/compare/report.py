"""Comparing a candidate's numbers with the reference, the report, and the diagnosis.

A quantity passes when max|c - r| <= atol + rtol max|r| (gradcheck.reference_error); the diagnosis names
the known mistakes (mistakes.py) whose mutated formulas reproduce every failing number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ... import __version__
from ...gradcheck import reference_error
from ..cases.mistakes import KNOWN_MISTAKES, failed_only_on_single_class, mistake_ids, mutants
from ..cases.reference import Case

# (rtol, atol) per quantity class; a quantity passes when max|c - r| <= atol + rtol * max|r|.
TOLERANCES = {
    "float64": {
        "loss": (1e-9, 1e-12),
        "metric": (1e-9, 1e-12),
        "logps": (1e-9, 1e-12),
        "logits": (1e-9, 1e-12),
        "grad": (1e-8, 1e-12),
        "finite_differences": (1e-5, 1e-9),
        "exact": (0.0, 0.0),
    },
    "float32": {
        "loss": (1e-5, 1e-6),
        "metric": (1e-5, 1e-6),
        "logps": (1e-5, 1e-5),
        "logits": (1e-5, 1e-5),
        "grad": (1e-4, 1e-6),
        "finite_differences": (1e-2, 1e-4),
        "exact": (0.0, 0.0),
    },
}


@dataclass(frozen=True)
class Check:
    """One quantity of one case compared with the reference."""

    case: str
    quantity: str
    source: str  # "returned", "autograd", "vjp", "finite differences[ (K directions)]", "not checked"
    shape: tuple
    max_abs_error: float
    rel_error: float  # max|c - r| / max|r|
    rtol: float
    atol: float
    passed: bool
    mismatch_index: tuple | None = None  # first index with |c - r| > atol + rtol max|r|
    candidate_value: float | None = None
    reference_value: float | None = None
    note: str = ""

    @property
    def skipped(self) -> bool:
        return self.source == "not checked"


def quantity_class(quantity: str, source: str) -> str:
    if source.startswith("finite differences"):
        return "finite_differences"
    if quantity == "loss":
        return "loss"
    if quantity.startswith("grad/"):
        return "grad"
    if quantity.startswith("metrics/"):
        return "metric"
    if quantity in ("tokens", "kl_tokens", "sequence_mask", "kl_sequence_mask"):
        return "exact"
    if quantity == "logits":
        return "logits"
    return "logps"


def agrees(candidate, reference, rtol: float, atol: float) -> bool:
    if candidate is None or reference is None:
        return candidate is None and reference is None
    if candidate.shape != reference.shape:
        return False
    both_nan = np.isnan(candidate) & np.isnan(reference)
    if np.any(np.isnan(candidate) != np.isnan(reference)):
        return False
    c, r = np.where(both_nan, 0.0, candidate), np.where(both_nan, 0.0, reference)
    max_abs, scale, _ = reference_error(c, r)
    return max_abs <= atol + rtol * scale


def compare(case: str, quantity: str, source: str, candidate, reference, tolerance: str) -> Check:
    rtol, atol = TOLERANCES[tolerance][quantity_class(quantity, source)]
    if source == "not checked":
        return Check(case, quantity, source, (), math.nan, math.nan, rtol, atol, True,
                     note="finite differences see the gradient through z, which this variant stops: "
                          "return the gradient or use torch")
    if reference is None:
        ok = candidate is None or bool(candidate.size and np.isnan(candidate).all())
        return Check(case, quantity, source, (), 0.0 if ok else math.inf, 0.0 if ok else math.inf, rtol, atol,
                     ok, candidate_value=None if candidate is None else float(candidate.ravel()[0]),
                     note="reference is None (class absent)" + ("" if ok else "; the candidate gave a number"))
    if candidate is None:
        return Check(case, quantity, source, tuple(reference.shape), math.inf, math.inf, rtol, atol, False,
                     note="the candidate returned None")
    if candidate.shape != reference.shape:
        return Check(case, quantity, source, tuple(reference.shape), math.inf, math.inf, rtol, atol, False,
                     note=f"shape {tuple(candidate.shape)}, expected {tuple(reference.shape)}")
    max_abs, scale, rel = reference_error(candidate, reference)
    bound = atol + rtol * scale
    passed = bool(max_abs <= bound)
    index = c_value = r_value = None
    note = ""
    if not passed:
        bad = ~(np.abs(candidate - reference) <= bound)
        index = tuple(int(i) for i in np.argwhere(bad)[0]) if candidate.ndim else ()
        c_value, r_value = float(candidate[index]), float(reference[index])
        if not np.all(np.isfinite(candidate)):
            note = "the candidate has NaN or inf"
    return Check(case, quantity, source, tuple(reference.shape), max_abs, rel, rtol, atol, passed, index,
                 c_value, r_value, note)


MAX_FAILING_ROWS = 8  # failing rows a report shows by default (the rest: show_all / --all)


@dataclass(frozen=True)
class Diagnosis:
    """Which known mistakes a failing candidate's numbers match (empty when none or when it passed)."""

    mistakes: tuple[str, ...]
    message: str
    closest: str | None = None

    def __str__(self) -> str:
        return self.message


@dataclass
class Report:
    """The result of verify: one Check per case and quantity, errors, notes and the diagnosis."""

    kind: str
    variant: str | None
    tolerance: str
    cases: list[str]
    checks: list[Check] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # case -> what the candidate raised
    notes: list[str] = field(default_factory=list)
    diagnosis: Diagnosis = field(default_factory=lambda: Diagnosis((), "not run"))
    cases_source: str = ""  # where the cases came from, and whether they are kto_np's own
    cases_identical: bool | None = None  # False: a case folder that differs from what kto_np exports
    not_verified: tuple[str, ...] = ()  # known mistakes the checks that ran cannot rule out
    kl_rotation: int | None = None  # model_kto: the KL pairs the candidate was checked for

    @property
    def passed(self) -> bool:
        compared = [c for c in self.checks if not c.skipped]
        return (bool(compared) and not self.errors and all(c.passed for c in compared)
                and self.cases_identical is not False)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def verdict(self) -> str:
        """The first line of the report: PASSED or FAILED, the diagnosis, and the counts."""
        compared = [c for c in self.checks if not c.skipped]
        failed = [c for c in compared if not c.passed]
        counts = f"{len(compared) - len(failed)}/{len(compared)} checks passed"
        if self.errors:
            counts += f", {len(self.errors)} case(s) raised"
        return f"{'PASSED' if self.passed else 'FAILED'}, diagnosis: {self.diagnosis} ({counts})"

    def __str__(self) -> str:
        return self.format()

    def format(self, show_all: bool = False, max_rows: int | None = MAX_FAILING_ROWS) -> str:
        """The report: the verdict line, then the failing checks (show_all: every check; at most max_rows of
        them, None: no limit), the errors, the notes and the counts."""
        title = (f"kto_np {__version__} gradient oracle: kind={self.kind}"
                 + (f" variant={self.variant}" if self.variant else "")
                 + (f" kl_rotation={self.kl_rotation:+d}" if self.kl_rotation is not None else "")
                 + f", {len(self.cases)} cases, tolerance {self.tolerance}")
        rows = self.checks if show_all else sorted(  # the loss and gradients first, then the metrics
            (c for c in self.checks if not c.passed), key=lambda c: c.quantity.startswith("metrics/"))
        limit = None if show_all else max_rows
        shown = rows if limit is None else rows[:limit]
        case_width = max([len("case")] + [len(c.case) for c in shown]) + 2
        quantity_width = max([len("quantity")] + [len(c.quantity) for c in shown]) + 2
        header = (f"{'case':<{case_width}}{'quantity':<{quantity_width}}{'source':<20}{'max abs err':>12}"
                  f"{'rel err':>10}{'rtol':>8}  result")
        lines = [self.verdict, title] + ([f"cases: {self.cases_source}"] if self.cases_source else [])
        if shown:
            lines += [header, "-" * len(header)]
        for c in shown:
            result = "skip" if c.skipped else ("pass" if c.passed else "FAIL")
            lines.append(f"{c.case:<{case_width}}{c.quantity:<{quantity_width}}{c.source:<20}"
                         f"{c.max_abs_error:>12.2e}{c.rel_error:>10.2e}{c.rtol:>8.0e}  {result}")
            if c.mismatch_index is not None:
                where = f" at {list(c.mismatch_index)}" if c.mismatch_index else ""
                lines.append(f"{'':<{case_width}}  first mismatch{where}: candidate {c.candidate_value:.12g}"
                             f"  reference {c.reference_value:.12g}")
            if c.note and (not c.passed or c.skipped):
                lines.append(f"{'':<{case_width}}  {c.note}")
        hidden = []
        if len(shown) < len(rows):
            hidden.append(f"{len(rows) - len(shown)} more failing")
        if not show_all and len(rows) < len(self.checks):
            skipped = sum(c.skipped for c in self.checks)
            hidden.append(f"{len(self.checks) - len(rows) - skipped} passing" + (f", {skipped} skipped" if skipped
                                                                                 else ""))
        if hidden:
            lines.append(f"({' and '.join(hidden)} check(s) not shown: --all, or report.format(show_all=True), "
                         "shows every row)")
        for case, message in self.errors.items():
            lines.append(f"{case}: ERROR, the candidate {message}")
        lines += [f"note: {n}" for n in self.notes]
        compared = [c for c in self.checks if not c.skipped]
        failed = [c for c in compared if not c.passed]
        verdict = "PASSED" if self.passed else "FAILED"
        lines.append(f"{verdict}: {len(compared) - len(failed)}/{len(compared)} checks passed, "
                     f"{len(self.errors)} case(s) raised, {len(self.checks) - len(compared)} skipped"
                     + (" (the cases are not kto_np's: see 'cases:')" if self.cases_identical is False else ""))
        if self.not_verified:
            lines.append(f"not verified: {', '.join(self.not_verified)} (no number compared tells "
                         f"{'them' if len(self.not_verified) > 1 else 'it'} from the reference: the deciding "
                         "checks were skipped or their cases did not run)")
        return "\n".join(lines)


def _mutant_table(kind, variant, by_name, candidate_values, tolerance) -> list[tuple]:
    """Per mutant: (mutant, agrees with the candidate everywhere, differs from the reference somewhere among
    the numbers compared, the (case, quantity) pairs it reproduces, how many numbers were compared).

    A metrics mutant that changes no metric the candidate returned, case by case, counts as told apart: its
    outputs could not have shown the mistake (a function that reports no log-prob metrics cannot swap them;
    one that leaves out an absent class's rewards cannot report them as 0)."""
    table = []
    for mutant in mutants(kind, variant):
        if mutant.match is not None:  # a mistake without fixed numbers (a random pairing): a rule decides
            matched = bool(candidate_values) and mutant.match(candidate_values, by_name)
            table.append((mutant, matched, True, None, int(matched)))
            continue
        agree, distinguishable, explained, compared, changed_metrics = True, False, set(), 0, set()
        applicable = False
        for case_name, quantities in candidate_values.items():
            outputs = mutant.compute(by_name[case_name])
            applicable |= bool(outputs)
            if mutant.metrics:  # the metrics it changes on this case that the candidate returned on this case
                changed_metrics |= {q for q, v in outputs.items() if q.startswith("metrics/") and q in quantities
                                    and not _agrees_or_absent(v, by_name[case_name].expected.get(q), 0.0, 0.0)}
            for quantity, (value, source, projection) in quantities.items():
                is_metric = quantity.startswith("metrics/")  # compared only for the mutants about metrics
                if quantity not in outputs or is_metric != mutant.metrics or (value is None and not is_metric):
                    continue
                mutated = outputs[quantity]
                if mutated is None:  # any value is this mutant's (a subgradient at a corner)
                    explained.add((case_name, quantity))
                    continue
                reference = by_name[case_name].expected[quantity]
                if projection is not None:
                    mutated, reference = projection(mutated), projection(reference)
                rtol, atol = TOLERANCES[tolerance][quantity_class(quantity, source)]
                compared += 1
                if _agrees_or_absent(value, mutated, rtol, atol):
                    explained.add((case_name, quantity))
                else:
                    agree = False
                if not _agrees_or_absent(mutated, reference, rtol, atol):
                    distinguishable = True
        if mutant.metrics and not changed_metrics:  # nothing the candidate returned shows it
            distinguishable = True
        if not applicable:  # the cases hold nothing this mutant can be computed on (an older export)
            distinguishable = True
        table.append((mutant, agree, distinguishable, explained, compared))
    return table


def _agrees_or_absent(value, other, rtol: float, atol: float) -> bool:
    """agrees, with None (an absent metric) equal to None or a NaN number."""
    def normal(x):
        if x is None:
            return None
        x = np.asarray(x, dtype=np.float64)
        return None if x.ndim == 0 and np.isnan(x) else x
    return agrees(normal(value), normal(other), rtol, atol)


def _within_float32(report: Report, by_name, candidate_values) -> bool:
    """Whether every failing check of a float64 report would pass at float32 tolerance."""
    if report.tolerance != "float32" and report.failures:
        for check in report.failures:
            value, source, projection = candidate_values.get(check.case, {}).get(check.quantity, (None, "", None))
            reference = by_name[check.case].expected.get(check.quantity)
            if value is None or reference is None:
                return False
            if projection is not None:
                reference = projection(reference)
            if not compare(check.case, check.quantity, source, value, np.asarray(reference), "float32").passed:
                return False
        return True
    return False


def _ids(mutant) -> tuple[str, ...]:
    return mistake_ids(mutant)


def _named(ids: Sequence[str]) -> str:
    return "; ".join(f"{i}: {KNOWN_MISTAKES[i].title} (fix: {KNOWN_MISTAKES[i].fix})" for i in ids)


def _matching(table, failing, all_failing) -> tuple[str, ...]:
    """The ids of the mutants that agree with the candidate everywhere, differ from the reference, and account
    for every failing check; a single mistake before two together."""
    def accounts(mutant, explained) -> bool:  # a rule-decided mutant accounts for everything it matched
        return explained is None or (all_failing if mutant.metrics else failing) <= explained

    matches = [m for m, agree, distinguishable, explained, compared in table
               if agree and distinguishable and accounts(m, explained) and compared]
    single = [m for m in matches if len(_ids(m)) == 1]
    return tuple(dict.fromkeys(i for m in (single or matches) for i in _ids(m)))


def diagnose(kind: str, variant: str | None, cases: Sequence[Case], candidate_values: dict,
             report: Report) -> tuple[Diagnosis, tuple[str, ...]]:
    """(the diagnosis, the known mistakes not verified).

    A mutant matches when, on every case and quantity the candidate gave (loss, gradients, log-probs,
    intermediates; metrics aside), the candidate agrees with the mutant within the tolerance, the mutant
    differs from the reference somewhere there, and every failing check is one the mutant accounts for.
    In order: such a match; a NaN, inf or error only on batches of one class (single_class_nan); every
    failing number within float32 tolerance (float32 rounding alone); a match at float32 tolerance (float32
    rounding and a mistake, named together); else the closest mutant, with how much of the failure it
    reproduces ("a weak resemblance" under half). A mistake is not verified when none of the numbers compared
    tells its mutant from the reference (the deciding gradient was not checked, or the cases that show it did
    not run); a metrics mistake only where the candidate returns the metrics it changes.
    """
    by_name = {case.name: case for case in cases}
    table = _mutant_table(kind, variant, by_name, candidate_values, report.tolerance) if candidate_values else []
    not_verified = tuple(dict.fromkeys(i for m, _, distinguishable, _, _ in table if not distinguishable
                                       for i in _ids(m)))
    if report.passed:
        if not_verified:
            return Diagnosis((), "every compared check passed, but the checks that decide "
                                 f"{', '.join(not_verified)} could not run: those mistakes are not verified"
                             ), not_verified
        return Diagnosis((), "all checks passed"), ()
    all_failing = {(c.case, c.quantity) for c in report.failures}
    failing = {(c.case, c.quantity) for c in report.failures if not c.quantity.startswith("metrics/")}
    single_class = failed_only_on_single_class(by_name, report.errors, {c.case for c in report.failures},
                                               candidate_values)
    if single_class and not all_failing:  # it raised there and only there
        mistake = KNOWN_MISTAKES["single_class_nan"]
        return Diagnosis((mistake.id,), f"matches known mistake {mistake.id}: {mistake.title}: it raised on the "
                                        f"cases with one class and only there (fix: {mistake.fix})"), not_verified
    if not candidate_values:
        return Diagnosis((), "no case ran to the end (the ERROR lines below): nothing to compare with the known "
                             "mistakes"), ()
    if not all_failing and not report.errors and report.cases_identical is False:
        return Diagnosis((), "every number compared matches the reference, but on cases that differ from kto_np's "
                             "export (see 'cases:'): no verdict"), not_verified
    if not all_failing and report.errors:
        return Diagnosis((), f"every number compared matches the reference, but {len(report.errors)} case(s) did "
                             "not run to the end (the ERROR lines below)"), not_verified
    ids = _matching(table, failing, all_failing)
    if ids:
        if all(i.endswith("_convention") for i in ids):  # data_parallel's other unequal-shard convention
            return Diagnosis(ids, f"follows another convention, not a mistake: {_named(ids)}"), not_verified
        together = any("+" in m.mistake for m, *_ in table if set(_ids(m)) == set(ids))
        what = "two known mistakes together" if together and len(ids) > 1 else (
            f"known mistake{'s' if len(ids) > 1 else ''}")
        return Diagnosis(ids, f"matches {what} {_named(ids)}"), not_verified
    if single_class:
        mistake = KNOWN_MISTAKES["single_class_nan"]
        return Diagnosis((mistake.id,), f"matches known mistake {mistake.id}: {mistake.title}: NaN or inf (or an "
                                        "error) on the cases with a batch of one class, and only there; every "
                                        f"other case passed (fix: {mistake.fix})"), not_verified
    if _within_float32(report, by_name, candidate_values):
        return Diagnosis((), "every failing number is within float32 tolerance: an intermediate is computed in "
                             "float32 (a float32 cast, head or parameter); if that is meant, rerun with "
                             "--tolerance float32 (verify(..., tolerance='float32'))"), not_verified
    if report.tolerance != "float32":
        loose = _mutant_table(kind, variant, by_name, candidate_values, "float32")
        ids = tuple(i for i in _matching(loose, failing, all_failing) if not i.endswith("_convention"))
        if ids:
            return Diagnosis(ids, "two causes together: float32 rounding (an intermediate is computed in float32) "
                                  f"and known mistake{'s' if len(ids) > 1 else ''} {_named(ids)}; at float32 "
                                  "tolerance the numbers match the mistake exactly (rerun with --tolerance float32 "
                                  "to see it alone)"), not_verified
    scores = [(len((all_failing if m.metrics else failing) & explained), len(all_failing if m.metrics else failing),
               m) for m, _, _, explained, _ in table if explained is not None]
    best_count, total, best = max(scores, key=lambda s: s[0] / max(s[1], 1)) if scores else (0, 0, None)
    if best is None or best_count == 0:
        return Diagnosis((), "no known mistake matches these numbers"), not_verified
    named = " + ".join(_ids(best))
    if 2 * best_count < total:
        return Diagnosis((), f"no known mistake matches these numbers (the nearest, {named}, reproduces only "
                             f"{best_count} of {total} failing checks: a weak resemblance, not a diagnosis)",
                         closest=best.mistake), not_verified
    return Diagnosis((), f"no known mistake matches every failing number; closest: {named} "
                         f"({'; '.join(KNOWN_MISTAKES[i].title for i in _ids(best))}) reproduces {best_count} of "
                         f"{total} failing checks", closest=best.mistake), not_verified
