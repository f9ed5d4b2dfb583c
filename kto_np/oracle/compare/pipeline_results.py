"""Results files for the pipeline kinds (kl_pairs, data_parallel, accumulation): what each case's entry holds,
and how it becomes the same values a candidate run by the oracle gives (so `oracle compare` reports and
diagnoses it as `check` does).

Per case, inside {"results": {"<case name>": ENTRY}}:
  kl_pairs       {"indices": {"<batch_size>": [j_0, ...] or null}} (whole_batch), keys "<batch_size>/<block_size>"
                 for the blocks variant; null means the code raised (the right answer for a block of one).
  data_parallel  {"ranks": [{"loss": L_r, "grad": {"policy_logps": [...], "kl_policy_logps": [...]}}, ...]}, one
                 entry per rank in rank order, each for its shard (shard_sizes in the case); the oracle averages
                 the losses and divides the gradients by R, as data-parallel training does.
  accumulation   {"micro_steps": [{"loss": L_k / A, "grad": {...}}, ...]}, one per micro-batch; the oracle sums.
"grad" is optional (then the gradients are not compared); null stands for NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from ..cases import kl_pairs
from ..cases.distributed import shard_inputs, shard_sizes
from ..cases.reference import Case

GRADIENTS = ("policy_logps", "kl_policy_logps")


class ResultsError(ValueError):
    """A results entry that does not fit its case."""


def _number(value, what: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ResultsError(f"{what} must be a number or null, got {type(value).__name__}")
    return float(value)


def _vector(value, size: int, what: str) -> np.ndarray:
    if not isinstance(value, list) or len(value) != size:
        raise ResultsError(f"{what} must be a list of {size} numbers")
    return np.array([_number(v, what) for v in value])


def grid_key(case: Case, batch_size: int, block_size: int) -> str:
    return f"{batch_size}/{block_size}" if "block_sizes" in case.inputs else str(batch_size)


def values_from_entry(case: Case, entry: Mapping) -> dict:
    """The values (quantity -> (array, "returned", None)) a results entry gives for a pipeline case."""
    if not isinstance(entry, Mapping):
        raise ResultsError(f"{case.name}: the entry must be an object")
    if case.kind == "kl_pairs":
        indices = entry.get("indices")
        if not isinstance(indices, Mapping):
            raise ResultsError(f"{case.name}: 'indices' must map each batch size to a list of indices or null")
        answers = []
        for batch_size, block_size in kl_pairs._grid(case):
            key = grid_key(case, batch_size, block_size)
            if key not in indices:
                raise ResultsError(f"{case.name}: 'indices' has no entry {key!r}")
            value = indices[key]
            answers.append(None if value is None else np.asarray(value))
        return {q: (v, "returned", None) for q, v in kl_pairs._stacked(case, answers).items()}
    key = "ranks" if case.kind == "data_parallel" else "micro_steps"
    parts = entry.get(key)
    sizes = shard_sizes(case)
    if not isinstance(parts, list) or len(parts) != len(sizes):
        raise ResultsError(f"{case.name}: {key!r} must be a list of {len(sizes)} entries (one per "
                           f"{'rank' if key == 'ranks' else 'micro-batch'})")
    losses, grads = [], {name: [] for name in GRADIENTS}
    for index, (part, size) in enumerate(zip(parts, sizes)):
        if not isinstance(part, Mapping) or "loss" not in part:
            raise ResultsError(f"{case.name}: {key}[{index}] must be an object with 'loss'")
        losses.append(_number(part["loss"], f"{case.name}: {key}[{index}].loss"))
        grad = part.get("grad") or {}
        for name in GRADIENTS:
            if name in grad:
                grads[name].append(_vector(grad[name], size, f"{case.name}: {key}[{index}].grad.{name}"))
    count = len(sizes)
    if case.kind == "data_parallel":
        values = {"loss": (np.float64(np.mean(losses)), "returned", None)}
        scale = 1.0 / count
    else:
        values = {"loss": (np.float64(np.sum(losses)), "returned", None)}
        scale = 1.0
    for name, pieces in grads.items():
        if len(pieces) == count:
            values[f"grad/{name}"] = (np.concatenate(pieces) * scale, "returned", None)
    return values


def _plain(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def entry_from_candidate(candidate: Callable, case: Case) -> dict:
    """A results entry computed by calling a NumPy candidate in this process (for our own candidates, to
    write a results file; data_parallel ranks are simulated with an all_reduce over the shards' values)."""
    if case.kind == "kl_pairs":
        indices = {}
        for batch_size, block_size in kl_pairs._grid(case):
            try:
                out = (candidate(batch_size, block_size) if kl_pairs._takes_block_size(candidate)
                       else candidate(batch_size))
                indices[grid_key(case, batch_size, block_size)] = np.asarray(out).astype(int).tolist()
            except Exception:  # noqa: BLE001 - an error is an answer here
                indices[grid_key(case, batch_size, block_size)] = None
        return {"indices": indices}
    count = len(shard_sizes(case))
    shards = [shard_inputs(case, k) for k in range(count)]
    if case.kind == "data_parallel":
        outs = _simulate_ranks(candidate, shards)
    else:
        outs = [candidate(s["policy_logps"], s["ref_logps"], s["labels"], s["kl_policy_logps"], s["kl_ref_logps"],
                          s["beta"], s["desirable_weight"], s["undesirable_weight"], micro_step=k,
                          accumulation_steps=count) for k, s in enumerate(shards)]
    parts = []
    for out in outs:
        loss, grad = (out if isinstance(out, tuple) else (out, None))[:2]
        part = {"loss": _plain(loss)}
        if grad is not None:
            grad = grad if isinstance(grad, Mapping) else {"policy_logps": grad}
            part["grad"] = {k: [_plain(v) for v in np.asarray(g, dtype=np.float64)] for k, g in grad.items()}
        parts.append(part)
    return {"ranks" if case.kind == "data_parallel" else "micro_steps": parts}


def _simulate_ranks(candidate: Callable, shards: list[dict]) -> list:
    """Call a rank's candidate for each shard, its all_reduce answered from every shard's value: each rank runs
    twice, first to collect what it reduces, then with the reductions (a candidate whose reductions depend on
    earlier ones is not supported here; run it with `oracle check` on real ranks)."""
    count = len(shards)
    recorded: list[list] = [[] for _ in range(count)]

    def recorder(rank):
        def all_reduce(x, op="mean"):
            recorded[rank].append((np.asarray(x, dtype=np.float64), op))
            return x
        return all_reduce

    for rank, s in enumerate(shards):
        candidate(s["policy_logps"], s["ref_logps"], s["labels"], s["kl_policy_logps"], s["kl_ref_logps"], s["beta"],
                  s["desirable_weight"], s["undesirable_weight"], rank=rank, world_size=count,
                  all_reduce=recorder(rank))
    outs = []
    for rank, s in enumerate(shards):
        calls = iter(range(len(recorded[rank])))

        def all_reduce(x, op="mean", _calls=calls):
            index = next(_calls)
            total = sum(recorded[r][index][0] for r in range(count))
            out = total / count if op == "mean" else total
            return float(out) if isinstance(x, (int, float)) else out

        outs.append(candidate(s["policy_logps"], s["ref_logps"], s["labels"], s["kl_policy_logps"], s["kl_ref_logps"],
                              s["beta"], s["desirable_weight"], s["undesirable_weight"], rank=rank, world_size=count,
                              all_reduce=all_reduce))
    return outs
