"""The `kl_pairs` kind: how a candidate pairs prompts with completions for the KL estimate.

candidate(batch_size) -> indices [batch_size] (or candidate(batch_size, block_size) for code that pairs
within per-device blocks): for each prompt i, the index j of the completion it is paired with. Right: in
every block (the whole batch, or the blocks [k b, (k + 1) b) of size b, the last one possibly shorter)
each pair is mismatched (j != i), each completion is used once, and j lies in i's block; a block of one
example has no mismatched pair, so the right answer there is an error. Any such pairing is right: TRL's
(i - 1) and OpenRLHF's / HALOs' (i + 1) both are.

The candidate's answer for each batch size is turned into counts (raised, malformed, matched pairs,
completions reused, pairs across blocks) compared with the reference's (raised only where a block has one
example, every count 0), so the report and the diagnosis work as for the other kinds.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import numpy as np

from ..run import candidates
from .mistakes import _Mutant
from .reference import Case, _case

MAX_BATCH_SIZE = 64
BLOCK_SIZES = (2, 3, 4, 8)
QUANTITIES = ("pairs/raised", "pairs/malformed", "pairs/matched", "pairs/reused")
BLOCK_QUANTITY = "pairs/across_blocks"

FORMULA = (
    "KL pairs: candidate(batch_size) -> indices [batch_size] (candidate(batch_size, block_size) is called "
    "with block_size = batch_size), for batch sizes 1..64: indices[i] is the completion paired with prompt i. "
    "Right: a permutation with no fixed point (indices[i] != i, each completion used once); for batch size 1 "
    "an error (no mismatched pair exists). Compared per batch size: pairs/raised (1 where it raised; the "
    "reference 1 only for batch size 1), pairs/malformed (not an integer array of shape [B] in [0, B)), "
    "pairs/matched (number of i with indices[i] == i), pairs/reused (B - number of distinct indices); 0 "
    "where it raised."
)
BLOCK_FORMULA = (
    "KL pairs within per-device blocks: candidate(batch_size, block_size) -> indices [batch_size] for "
    "block sizes 2, 3, 4, 8 and batch sizes 1..64; the blocks are [k b, (k + 1) b) (the last one shorter when "
    "b does not divide the batch). Right: within every block a permutation with no fixed point; an error when "
    "any block holds one example. As the whole-batch case, plus pairs/across_blocks (number of i paired with a "
    "completion of another block)."
)


def _block_of(batch_size: int, block_size: int) -> np.ndarray:
    return np.arange(batch_size) // block_size


def _needs_error(batch_size: int, block_size: int) -> bool:
    """A block of one example: the whole batch of 1, or a last block of 1."""
    return batch_size % block_size == 1 or batch_size == 1


def counts(indices, batch_size: int, block_size: int, *, blocks: bool) -> dict[str, float]:
    """The compared counts for one answer: indices (an array) or None when the candidate raised."""
    out = dict.fromkeys(QUANTITIES + ((BLOCK_QUANTITY,) if blocks else ()), 0.0)
    if indices is None:
        out["pairs/raised"] = 1.0
        return out
    arr = np.asarray(indices)
    integral = arr.dtype.kind in "iu" or (arr.dtype.kind == "f" and np.all(np.isfinite(arr))
                                          and np.all(arr == np.round(arr)))
    if arr.shape != (batch_size,) or not integral or (arr.size and (arr.min() < 0 or arr.max() >= batch_size)):
        out["pairs/malformed"] = 1.0
        return out
    j = arr.astype(np.int64)
    i = np.arange(batch_size)
    out["pairs/matched"] = float(np.sum(j == i))
    out["pairs/reused"] = float(batch_size - np.unique(j).size)
    if blocks:
        block = _block_of(batch_size, block_size)
        out[BLOCK_QUANTITY] = float(np.sum(block[j] != block))
    return out


def _grid(case: Case) -> list[tuple[int, int]]:
    sizes = [int(b) for b in case.inputs["batch_sizes"]]
    if "block_sizes" in case.inputs:
        return list(zip(sizes, (int(b) for b in case.inputs["block_sizes"])))
    return [(b, b) for b in sizes]


def _stacked(case: Case, answers: list) -> dict[str, np.ndarray]:
    """answers[k]: indices (or None for an error) for grid row k -> quantity -> [K] counts."""
    blocks = "block_sizes" in case.inputs
    rows = [counts(a, b, s, blocks=blocks) for a, (b, s) in zip(answers, _grid(case))]
    return {q: np.array([r[q] for r in rows]) for q in rows[0]}


def reference_pairing(batch_size: int, block_size: int):
    """The reference: None (an error) where a block holds one example, else TRL's (i - 1) within blocks."""
    if _needs_error(batch_size, block_size):
        return None
    i = np.arange(batch_size)
    start = (i // block_size) * block_size
    size = np.minimum(block_size, batch_size - start)
    return start + (i - start - 1) % size


def _cases() -> list[Case]:
    sizes = np.arange(1, MAX_BATCH_SIZE + 1, dtype=np.int64)
    whole = Case("kl_pairs/whole_batch/batch_sizes_1_to_64", "kl_pairs", "whole_batch", FORMULA,
                 {"batch_sizes": sizes}, {})
    grid = [(b, s) for s in BLOCK_SIZES for b in sizes]
    blocked = Case("kl_pairs/blocks/block_sizes_2_3_4_8", "kl_pairs", "blocks", BLOCK_FORMULA,
                   {"batch_sizes": np.array([b for b, _ in grid], dtype=np.int64),
                    "block_sizes": np.array([s for _, s in grid], dtype=np.int64)}, {})
    out = []
    for case in (whole, blocked):
        expected = _stacked(case, [reference_pairing(b, s) for b, s in _grid(case)])
        out.append(_case(case.name, case.kind, case.variant, case.formula, dict(case.inputs), expected))
    return out


def _takes_block_size(candidate) -> bool:
    try:
        parameters = list(inspect.signature(candidate).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in parameters)


def _as_indices(value):
    if type(value).__module__.split(".")[0] == "torch":
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def evaluate(candidate: Callable, case: Case, tolerance: str):
    """Call the candidate for every batch size (and block size) of the case; the counts as values."""
    blocks = "block_sizes" in case.inputs
    takes_block = _takes_block_size(candidate)
    if blocks and not takes_block:
        raise TypeError("a kl_pairs candidate for variant 'blocks' takes (batch_size, block_size); this one takes "
                        "one argument: use variant 'whole_batch'")
    answers, notes, unexpected = [], [], []
    for batch_size, block_size in _grid(case):
        try:
            out = candidate(batch_size, block_size) if takes_block else candidate(batch_size)
            answers.append(_as_indices(out))
        except Exception as exc:  # noqa: BLE001 - raising is the right answer for a block of one
            answers.append(None)
            if not _needs_error(batch_size, block_size):
                unexpected.append(f"batch_size={batch_size}" + (f", block_size={block_size}" if blocks else "")
                                  + f": {candidates.short_error(exc)}")
    if unexpected:
        notes.append(f"{case.name}: the candidate raised where a mismatched pairing exists ({len(unexpected)} "
                     f"times), first: {unexpected[0]}")
    values = {q: (v, "returned", None) for q, v in _stacked(case, answers).items()}
    return values, notes + where_it_differs(case, values)


def where_it_differs(case: Case, values: Mapping) -> list[str]:
    """Notes naming the batch (and block) sizes behind the first differing rows of each count."""
    grid = _grid(case)
    blocks = "block_sizes" in case.inputs
    notes = []
    for quantity, (value, _, _) in values.items():
        rows = np.flatnonzero(np.asarray(value) != np.asarray(case.expected[quantity]))
        if rows.size:
            sizes = ", ".join(f"{grid[k][0]}/{grid[k][1]}" if blocks else str(grid[k][0]) for k in rows[:6])
            more = f" (+{rows.size - 6} more)" if rows.size > 6 else ""
            what = "batch_size/block_size" if blocks else "batch_size"
            notes.append(f"{case.name}: {quantity} differs at {what} {sizes}{more} (row index = position in the "
                         "case's batch_sizes)")
    return notes


# ---------------------------------------------------------------------------------------------------
# the known wrong pairings, as mutants


def _per_block(batch_size: int, block_size: int, pair_block: Callable[[int], np.ndarray]) -> np.ndarray:
    out = np.empty(batch_size, dtype=np.int64)
    for start in range(0, batch_size, block_size):
        size = min(block_size, batch_size - start)
        out[start:start + size] = start + pair_block(size)
    return out


def _pairing_mutant(mistake: str, pairing: Callable[[int, int], object], *, guarded: bool = False):
    """A wrong pairing; guarded: it raises where a block holds one example, as the reference does."""
    def answer(batch_size, block_size):
        return None if guarded and _needs_error(batch_size, block_size) else pairing(batch_size, block_size)

    def compute(case: Case) -> dict:
        return _stacked(case, [answer(b, s) for b, s in _grid(case)])

    return _Mutant(mistake, f"{mistake} (raises for a block of one)" if guarded else mistake, compute)


def _matched(batch_size, block_size):
    return np.arange(batch_size)


def _reversed(batch_size, block_size):
    return _per_block(batch_size, block_size, lambda size: np.arange(size)[::-1])


def _single_left(batch_size, block_size):
    return _per_block(batch_size, block_size, lambda size: (np.arange(size) - 1) % size)


def _across_blocks(batch_size, block_size):
    if batch_size == 1:
        return None
    return (np.arange(batch_size) - 1) % batch_size


def _random_permutation_rule(candidate_values: Mapping, cases_by_name: Mapping) -> bool:
    """Every answer a permutation, some with fixed points, but not the identity and not the reversal: the
    fixed points of a random permutation (random.sample, np.random.permutation) fall anywhere."""
    saw_fixed_point = False
    for case_name, quantities in candidate_values.items():
        values = {q: v for q, (v, _, _) in quantities.items()}
        if np.any(values["pairs/malformed"]) or np.any(values["pairs/reused"]):
            return False
        if values.get(BLOCK_QUANTITY) is not None and np.any(values[BLOCK_QUANTITY]):
            return False
        case = cases_by_name[case_name]
        answered = values["pairs/raised"] == 0
        for other in (_matched, _reversed, _single_left):
            mutated = _stacked(case, [other(b, s) for b, s in _grid(case)])
            if np.array_equal(mutated["pairs/matched"][answered], values["pairs/matched"][answered]):
                return False  # the fixed points of a deterministic pairing, named by its own mutant
        saw_fixed_point |= bool(np.any(values["pairs/matched"][answered] > 0))
    return saw_fixed_point


def mutants(kind: str, variant: str | None) -> list:
    out = [_pairing_mutant(mistake, pairing, guarded=guarded)
           for mistake, pairing in (("kl_pairs_not_mismatched", _matched), ("kl_pairs_reversed", _reversed))
           for guarded in (False, True)]
    out.append(_pairing_mutant("kl_pairs_single_block_matched", _single_left))
    if variant == "blocks":
        out += [_pairing_mutant("kl_pairs_across_blocks", _across_blocks, guarded=guarded) for guarded in (False, True)]
    out.append(_Mutant("kl_pairs_random_permutation", "kl_pairs_random_permutation", lambda case: {},
                       match=_random_permutation_rule))
    return out


def cases() -> list[Case]:
    return _cases()


def builtin_kl_pairs(batch_size: int, block_size: int | None = None) -> np.ndarray:
    """kto_np's pairing (step.kl_partner_indices: prompt i with completion i - 1) within blocks of block_size
    (default: the whole batch); ValueError where a block holds one example."""
    block_size = batch_size if block_size is None else block_size
    pairing = reference_pairing(batch_size, block_size)
    if pairing is None:
        raise ValueError(f"batch_size {batch_size} with block_size {block_size} leaves a block of one example: "
                         "it has no mismatched KL pair")
    return pairing



def builtin(kind: str, variant: str | None) -> Callable:
    """kto_np's own pairing, as the kind's built-in candidate (every variant)."""
    return builtin_kl_pairs
