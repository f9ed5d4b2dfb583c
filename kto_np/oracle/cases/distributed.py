"""The `data_parallel` and `accumulation` kinds: the KTO loss over shards of one batch.

data_parallel: the candidate runs as R ranks (R = 2, 3, 4) in R local processes joined in a real
torch.distributed process group (gloo on 127.0.0.1, started the way torchrun starts them: MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK in the environment), each calling

    candidate(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
              undesirable_weight, *, rank, world_size, all_reduce)

on its shard. all_reduce(x, op="mean"|"sum") is the oracle's convenience on the same group. Each rank
returns its loss and dL/dpolicy_logps for its shard (or lets autograd take it); the oracle combines them
as data-parallel training does: loss = mean_r loss_r, gradient of example i (on rank r) = dloss_r/dp_i / R
(DDP averages gradients over ranks). The processes are started by run/runner.py (run_data_parallel), each
rank a run/worker.py.

accumulation: A micro-batches in sequence on one rank, candidate(..., *, micro_step, accumulation_steps)
returns the loss the trainer back-propagates for micro-batch k; the oracle sums them (and their gradients)
as accumulated backward passes do.

References (computed by the core's losses.kto_loss_and_grad, one call per shard):
  data_parallel, variant rank_means (TRL): z = max(0, mean_r m_r), m_r the mean KL-pair log-ratio of rank r's
    shard; loss = mean_r L_r, L_r the mean over rank r's shard. For equal shards this is the whole-batch loss.
  data_parallel, variant global_mean: z = max(0, mean over all KL pairs), loss = mean over all examples.
  accumulation: z_k = max(0, m_k) per micro-batch (TRL, HALOs), loss = sum_k L_k / A.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from ...losses import kto_loss_and_grad
from ..run import candidates
from .mistakes import _Mutant
from .reference import Case, _case

DP_FORMULA = (
    "Data-parallel KTO: the batch (policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, all [N]) is cut "
    "into R consecutive shards of sizes shard_sizes; rank r calls candidate(...) on shard r. m_r = mean of "
    "kl_policy_logps - kl_ref_logps over shard r. {z}. L_r = mean over shard r of desirable_weight (1 - sigma(beta "
    "(r_i - z))) or undesirable_weight (1 - sigma(beta (z - r_i))), r_i = policy_logps_i - ref_logps_i. {loss} "
    "grad/policy_logps_i = d loss_r / d policy_logps_i / R for i on rank r (gradients averaged over ranks); "
    "grad/kl_policy_logps = 0 (z detached)."
)
DP_Z = {"rank_means": "z = max(0, mean_r m_r) (TRL: per-device mean, gathered, mean of rank means, then clamp)",
        "global_mean": "z = max(0, mean of kl_policy_logps - kl_ref_logps over all N pairs)"}
DP_LOSS = {"rank_means": "loss = mean_r L_r, the value each rank returns being L_r.",
           "global_mean": "loss = sum_i loss_i / N: rank r returns L_r = (R / N) sum over its shard, so that "
                          "mean_r L_r is the global mean."}
ACCUMULATION_FORMULA = (
    "Gradient accumulation: the batch is cut into A consecutive micro-batches of sizes micro_batch_sizes; the "
    "candidate is called once per micro-batch k (micro_step=k, accumulation_steps=A) and returns the loss "
    "back-propagated for it. z_k = max(0, mean over micro-batch k of kl_policy_logps - kl_ref_logps) (z per "
    "micro-batch, detached); L_k = the KTO mean over micro-batch k; the reference returns L_k / A, so loss = "
    "sum_k L_k / A and grad/policy_logps_i = d L_k / d policy_logps_i / A (accumulated gradients). The KL pairs: "
    "prompt i with completion i - 1 within its micro-batch (start + (i - start - 1) mod size). pair_policy_logps and "
    "pair_ref_logps [N, N]: the log-probs of completion j after prompt i over the whole window (the diagonal is "
    "policy_logps / ref_logps, entry (i, its KL partner) kl_policy_logps / kl_ref_logps), for code that builds its "
    "own KL pairs: a candidate with a keyword 'window' gets {pair_policy_logps, pair_ref_logps, start, stop}."
)


class _ShardSpec(NamedTuple):
    case_id: str
    description: str
    seed: int
    sizes: tuple
    kl_means: tuple  # the mean KL-pair log-ratio of each shard
    single_class_shard: int | None = None  # a shard with desirable examples only


DP_SPECS = (
    _ShardSpec("R2_equal", "2 ranks, equal shards, KL means of opposite sign", 61, (4, 4), (0.8, -0.5)),
    _ShardSpec("R2_unequal", "2 ranks, shards of 5 and 3", 62, (5, 3), (0.7, -0.45)),
    _ShardSpec("R3_unequal", "3 ranks, shards of 4, 2, 3; the mean of rank means is negative (z = 0), the global "
               "mean positive", 63, (4, 2, 3), (0.4, -0.9, 0.2)),
    _ShardSpec("R4_equal", "4 ranks, equal shards", 64, (3, 3, 3, 3), (0.5, -0.7, 0.6, -0.2)),
    _ShardSpec("R4_unequal_one_class", "4 ranks, shards of 2, 4, 1, 3; rank 2 holds one desirable example; the "
               "mean of rank means is positive, the global mean negative", 65, (2, 4, 1, 3), (-0.3, -0.4, 0.9, 0.1),
               single_class_shard=2),
)
ACCUMULATION_SPECS = (
    _ShardSpec("A2", "2 micro-batches of 4", 71, (4, 4), (0.6, -0.3)),
    _ShardSpec("A3_unequal_one_class", "3 micro-batches of 3, 2, 3; the second holds desirable examples only", 72,
               (3, 2, 3), (0.5, 0.2, -0.4), single_class_shard=1),
    _ShardSpec("A4", "4 micro-batches of 2", 73, (2, 2, 2, 2), (0.3, -0.6, 0.9, 0.1)),
)
BETA, DESIRABLE_WEIGHT, UNDESIRABLE_WEIGHT = 0.5, 1.0, 1.4


def _shard_inputs(spec: _ShardSpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    n = sum(spec.sizes)
    labels = np.zeros(n, dtype=bool)
    kl_gap = np.empty(n)
    start = 0
    for index, (size, mean) in enumerate(zip(spec.sizes, spec.kl_means)):
        shard_labels = np.arange(size) % 2 == 0  # both classes where the shard has two examples or more
        rng.shuffle(shard_labels)
        if index == spec.single_class_shard:
            shard_labels[:] = True
        labels[start:start + size] = shard_labels
        gap = 0.3 * rng.standard_normal(size)
        kl_gap[start:start + size] = gap - gap.mean() + mean
        start += size
    log_ratios = rng.standard_normal(n) + 0.2
    ref_logps = -20.0 + 4.0 * rng.standard_normal(n)
    kl_ref_logps = -22.0 + 4.0 * rng.standard_normal(n)
    return {"policy_logps": ref_logps + log_ratios, "ref_logps": ref_logps, "labels": labels,
            "kl_policy_logps": kl_ref_logps + kl_gap, "kl_ref_logps": kl_ref_logps, "beta": np.float64(BETA),
            "desirable_weight": np.float64(DESIRABLE_WEIGHT), "undesirable_weight": np.float64(UNDESIRABLE_WEIGHT)}


def kl_partners(sizes) -> np.ndarray:
    """[N]: the KL partner of each prompt, completion i - 1 within its micro-batch (or shard)."""
    out = []
    start = 0
    for size in sizes:
        out += [start + (i - 1) % size for i in range(size)]
        start += size
    return np.array(out, dtype=np.int64)


def _pair_tables(spec: _ShardSpec, inputs: dict) -> dict[str, np.ndarray]:
    """Seeded log-probs of every (prompt i, completion j) pair of the window, consistent with the case's
    matched and KL log-probs."""
    rng = np.random.default_rng([spec.seed, 1])
    n = sum(spec.sizes)
    ref = -22.0 + 4.0 * rng.standard_normal((n, n))
    policy = ref + 0.2 + 0.3 * rng.standard_normal((n, n))
    rows, partners = np.arange(n), kl_partners(spec.sizes)
    policy[rows, rows], ref[rows, rows] = inputs["policy_logps"], inputs["ref_logps"]
    policy[rows, partners], ref[rows, partners] = inputs["kl_policy_logps"], inputs["kl_ref_logps"]
    return {"pair_policy_logps": policy, "pair_ref_logps": ref}


def shard_sizes(case: Case) -> list[int]:
    key = "shard_sizes" if case.kind == "data_parallel" else "micro_batch_sizes"
    return [int(s) for s in case.inputs[key]]


def shard_slices(case: Case) -> list[slice]:
    bounds = np.cumsum([0] + shard_sizes(case))
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def shard_inputs(case: Case, index: int) -> dict[str, np.ndarray]:
    """The arrays of shard `index` (fresh copies) and the scalars."""
    part = shard_slices(case)[index]
    out = {k: np.array(case.inputs[k][part]) for k in ("policy_logps", "ref_logps", "labels", "kl_policy_logps",
                                                        "kl_ref_logps")}
    out.update({k: float(case.inputs[k]) for k in ("beta", "desirable_weight", "undesirable_weight")})
    return out


def _kl_mean(shard: dict) -> float:
    return float(np.mean(shard["kl_policy_logps"] - shard["kl_ref_logps"]))


def _core_shard(shard: dict, z: float, scale: float) -> tuple[float, np.ndarray]:
    """scale x (the core's KTO loss of a shard with a given z, dL/dpolicy_logps): z enters as one KL pair."""
    loss, grad, _ = kto_loss_and_grad(
        shard["policy_logps"], shard["ref_logps"], shard["labels"], shard["beta"], shard["desirable_weight"],
        shard["undesirable_weight"], variant="kto", kl_policy_logps=np.array([z]), kl_ref_logps=np.zeros(1),
        warn_balance=False)
    return scale * loss, scale * grad


def reference_outputs(case: Case) -> dict[str, np.ndarray]:
    """The combined loss and gradients of a data_parallel or accumulation case, by the core, shard by shard."""
    count = len(shard_sizes(case))
    shards = [shard_inputs(case, k) for k in range(count)]
    means = [_kl_mean(s) for s in shards]
    total = sum(shard_sizes(case))
    if case.kind == "accumulation":
        zs, scale = [max(0.0, m) for m in means], 1.0
    elif case.variant == "rank_means":
        zs, scale = [max(0.0, float(np.mean(means)))] * count, 1.0
    else:  # global_mean: rank r's loss is (R / N) sum over its shard
        global_mean = float(np.sum(case.inputs["kl_policy_logps"] - case.inputs["kl_ref_logps"]) / total)
        zs = [max(0.0, global_mean)] * count
        scale = None
    losses, grads = [], []
    for shard, z, size in zip(shards, zs, shard_sizes(case)):
        loss, grad = _core_shard(shard, z, count * size / total if scale is None else scale)
        losses.append(loss)
        grads.append(grad / count)
    return {"loss": np.float64(np.mean(losses)), "grad/policy_logps": np.concatenate(grads),
            "grad/kl_policy_logps": np.zeros(total)}


def cases() -> list[Case]:
    out = []
    for variant in ("rank_means", "global_mean"):
        for spec in DP_SPECS:
            inputs = {**_shard_inputs(spec), "shard_sizes": np.array(spec.sizes, dtype=np.int64)}
            formula = DP_FORMULA.format(z=DP_Z[variant], loss=DP_LOSS[variant]) + f" Case: {spec.description}."
            provisional = Case(f"data_parallel/{variant}/{spec.case_id}", "data_parallel", variant, formula,
                               inputs, {})
            out.append(_case(provisional.name, "data_parallel", variant, formula, inputs,
                             reference_outputs(provisional)))
    for spec in ACCUMULATION_SPECS:
        inputs = {**_shard_inputs(spec), "micro_batch_sizes": np.array(spec.sizes, dtype=np.int64)}
        inputs.update(_pair_tables(spec, inputs))
        formula = f"{ACCUMULATION_FORMULA} Case: {spec.description}."
        provisional = Case(f"accumulation/kto/{spec.case_id}", "accumulation", "kto", formula, inputs, {})
        out.append(_case(provisional.name, "accumulation", "kto", formula, inputs, reference_outputs(provisional)))
    return out


# ---------------------------------------------------------------------------------------------------
# the mutated formulas: one shard's loss with switches, combined as the oracle combines the candidate's


def _sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -x))


def _shard_terms(shard: dict, z: float, *, reduction: str = "mean", undesirable_sign: float = 1.0,
                 beta_power: int = 1, global_scale: float = 1.0) -> tuple[float, np.ndarray, float]:
    """(loss, dloss/dpolicy_logps, dloss/dz) of one shard: loss_i = w_i (1 - sigma(s_i b (r_i - o_i z))),
    b = beta ** beta_power, o_i = 1 (desirable) or undesirable_sign; reduced by the shard mean ("mean"), sum,
    sum of weights ("weights"), per-class means ("class_means") or global_scale x sum ("global")."""
    labels = np.asarray(shard["labels"], dtype=bool)
    r = shard["policy_logps"] - shard["ref_logps"]  # [n]
    n = r.shape[0]
    b = shard["beta"] ** beta_power
    signs = np.where(labels, 1.0, -1.0)
    weights = np.where(labels, shard["desirable_weight"], shard["undesirable_weight"])
    offset = np.where(labels, 1.0, undesirable_sign)
    u = b * (r - offset * z)  # [n]
    per_example = weights * _sigmoid(-signs * u)
    if reduction == "mean":
        c = np.full(n, 1.0 / n)
    elif reduction == "sum":
        c = np.ones(n)
    elif reduction == "weights":
        c = np.full(n, 1.0 / weights.sum())
    elif reduction == "class_means":
        c = np.where(labels, 1.0 / max(int(labels.sum()), 1), 1.0 / max(int((~labels).sum()), 1))
    else:
        c = np.full(n, global_scale)
    dloss_du = -c * weights * signs * _sigmoid(u) * _sigmoid(-u)  # [n]
    return float(np.sum(c * per_example)), b * dloss_du, float(-b * np.sum(dloss_du * offset))


class Setting(NamedTuple):
    """How a mutant computes z and each shard's loss, and how the shards combine."""

    z_mode: str = "reference"  # reference | own | clamp_per_rank | global | rank_means | window_ref
    clamp: bool = True
    z_grad: bool = False
    shard_factor: float = 1.0  # x R: losses summed over ranks; x A: not divided by the accumulation steps
    reduction: str = "mean"
    undesirable_sign: float = 1.0
    beta_power: int = 1


def _z_values(case: Case, shards: list[dict], setting: Setting) -> tuple[list[float], list[float]]:
    """Per shard: z and dz/dkl_i for i in that shard (the local derivative, as autograd sees it through an
    all-reduce)."""
    count, sizes = len(shards), shard_sizes(case)
    means = [_kl_mean(s) for s in shards]
    mode = setting.z_mode
    if mode == "reference":
        mode = "own" if case.kind == "accumulation" else ("rank_means" if case.variant == "rank_means" else "global")
    clamp = (lambda x: max(0.0, x)) if setting.clamp else (lambda x: x)
    active = (lambda x: 1.0 if x > 0 else 0.0) if setting.clamp else (lambda x: 1.0)
    if mode == "window_ref":  # EasyDeL: the reference's KL completions rotated over the window
        n = sum(sizes)
        window_ref = np.asarray(case.inputs["pair_ref_logps"])[np.arange(n), (np.arange(n) - 1) % n]
        means = [float(np.mean(shard["kl_policy_logps"] - window_ref[part]))
                 for shard, part in zip(shards, shard_slices(case))]
        mode = "own"
    if mode == "own":
        return [clamp(m) for m in means], [active(m) / s for m, s in zip(means, sizes)]
    if mode == "clamp_per_rank":
        z = float(np.mean([clamp(m) for m in means]))
        return [z] * count, [active(m) / (s * count) for m, s in zip(means, sizes)]
    if mode == "rank_means":
        mean = float(np.mean(means))
        return [clamp(mean)] * count, [active(mean) / (s * count) for s in sizes]
    total = sum(sizes)
    mean = float(sum(m * s for m, s in zip(means, sizes)) / total)
    return [clamp(mean)] * count, [active(mean) / total] * count


def mutant_outputs(case: Case, setting: Setting) -> dict[str, np.ndarray]:
    count, sizes = len(shard_sizes(case)), shard_sizes(case)
    shards = [shard_inputs(case, k) for k in range(count)]
    zs, dz_dkl = _z_values(case, shards, setting)
    reduction = setting.reduction
    total = sum(sizes)
    global_variant = case.kind == "data_parallel" and case.variant == "global_mean"
    if global_variant and reduction == "mean":
        reduction = "global"
    losses, grads, kl_grads = [], [], []
    for shard, z, dz, size in zip(shards, zs, dz_dkl, sizes):
        loss, grad, dloss_dz = _shard_terms(shard, z, reduction=reduction, undesirable_sign=setting.undesirable_sign,
                                            beta_power=setting.beta_power, global_scale=count / total)
        losses.append(setting.shard_factor * loss)
        grads.append(setting.shard_factor * grad / count)
        kl_grads.append(np.full(size, setting.shard_factor * dloss_dz * dz / count if setting.z_grad else 0.0))
    return {"loss": np.float64(np.mean(losses)), "grad/policy_logps": np.concatenate(grads),
            "grad/kl_policy_logps": np.concatenate(kl_grads)}


_FORMULA_SETTINGS = (
    ("z_not_detached", Setting(z_grad=True)),
    ("z_not_clamped", Setting(clamp=False)),
    ("undesirable_sign", Setting(undesirable_sign=-1.0)),
    ("beta_twice", Setting(beta_power=2)),
    ("beta_missing", Setting(beta_power=0)),
    ("weights_normalise_mean", Setting(reduction="weights")),
    ("loss_summed", Setting(reduction="sum")),
    ("class_means_added", Setting(reduction="class_means")),
)


def _settings(kind: str, variant: str | None) -> list[tuple[str, Setting]]:
    if kind == "accumulation":
        return [("accumulation_not_divided", Setting(shard_factor=math.nan)),
                ("accumulation_kl_pairs_window", Setting(z_mode="window_ref")), *_FORMULA_SETTINGS]
    out = [("dp_z_not_all_reduced", Setting(z_mode="own")), ("dp_z_clamped_per_rank", Setting(z_mode="clamp_per_rank")),
           ("dp_losses_summed", Setting(shard_factor=math.nan))]
    if variant == "rank_means":
        out.append(("global_mean_convention", Setting(z_mode="global", reduction="global_convention")))
    else:
        out.append(("rank_means_convention", Setting(z_mode="rank_means", reduction="rank_means_convention")))
    return out + list(_FORMULA_SETTINGS)


def _mutant_compute(mistake: str, setting: Setting) -> Callable[[Case], dict]:
    def compute(case: Case) -> dict:
        if setting.z_mode == "window_ref" and "pair_ref_logps" not in case.inputs:
            return {}  # cases exported before format version 4 have no pair tables: nothing to compare
        resolved = setting
        if math.isnan(setting.shard_factor):  # x R (summed over ranks) or x A (not divided)
            resolved = setting._replace(shard_factor=float(len(shard_sizes(case))))
        if setting.reduction == "global_convention":  # the global mean, checked against rank means
            return _convention(case, "global_mean")
        if setting.reduction == "rank_means_convention":
            return _convention(case, "rank_means")
        return mutant_outputs(case, resolved)

    return compute


def _convention(case: Case, variant: str) -> dict:
    other = Case(case.name, case.kind, variant, case.formula, case.inputs, {}, case.config)
    return reference_outputs(other)


def mutants(kind: str, variant: str | None) -> list:
    return [_Mutant(mistake, mistake, _mutant_compute(mistake, setting))
            for mistake, setting in _settings(kind, variant)]


# ---------------------------------------------------------------------------------------------------
# evaluating a candidate


def _micro_batch_case(case: Case, index: int) -> Case:
    shard = shard_inputs(case, index)
    inputs = {k: (np.float64(v) if isinstance(v, float) else v) for k, v in shard.items()}
    return Case(f"{case.name}/micro_step_{index}", "kto_loss", "kto", "", inputs, {})


def _takes_window(candidate) -> bool:
    try:
        parameters = inspect.signature(candidate).parameters
    except (TypeError, ValueError):
        return False
    return "window" in parameters


def _evaluate_accumulation(candidate, case: Case, tolerance: str):
    steps = len(shard_sizes(case))
    values: dict[str, list] = {}
    notes: list[str] = []
    window = _takes_window(candidate) and "pair_ref_logps" in case.inputs
    for index, part in enumerate(shard_slices(case)):
        extra = {}
        if window:  # fresh copies: the whole window's pair log-probs and where this micro-batch lies in it
            extra["window"] = {"pair_policy_logps": np.array(case.inputs["pair_policy_logps"]),
                               "pair_ref_logps": np.array(case.inputs["pair_ref_logps"]),
                               "start": int(part.start), "stop": int(part.stop)}

        def micro_candidate(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                            kl_policy_logps=None, kl_ref_logps=None, _index=index, _extra=extra):
            return candidate(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                             undesirable_weight, micro_step=_index, accumulation_steps=steps, **_extra)

        evaluation = candidates.evaluate(micro_candidate, _micro_batch_case(case, index), tolerance)
        notes += [note.replace(f"{case.name}/micro_step_{index}", f"{case.name} (micro-step {index})")
                  for note in evaluation.notes]
        for quantity, (value, source, _) in evaluation.values.items():
            if quantity in ("loss", "grad/policy_logps", "grad/kl_policy_logps"):
                values.setdefault(quantity, []).append((value, source))
    combined = {}
    for quantity, parts in values.items():
        sources = sorted({source for _, source in parts})
        if len(parts) != steps or any(value is None for value, _ in parts):
            combined[quantity] = (None, "not checked", None)
            continue
        arrays = [np.asarray(value, dtype=np.float64) for value, _ in parts]
        value = np.float64(sum(float(a) for a in arrays)) if quantity == "loss" else np.concatenate(arrays)
        combined[quantity] = (value, "+".join(sources), None)
    return combined, list(dict.fromkeys(notes))


def builtin_accumulation(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                         undesirable_weight, *, micro_step, accumulation_steps):
    """kto_np's own loss for one micro-batch, divided by the accumulation steps: (loss, gradients)."""
    loss, grad, _ = kto_loss_and_grad(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                                      variant="kto", kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps,
                                      warn_balance=False)
    grads = {"policy_logps": grad / accumulation_steps, "kl_policy_logps": np.zeros(np.shape(kl_policy_logps))}
    return loss / accumulation_steps, grads


def builtin_data_parallel(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                          undesirable_weight, *, rank, world_size, all_reduce):
    """kto_np's own loss on a rank's shard, z from the all-reduced per-rank KL means (TRL's convention)."""
    mean = all_reduce(np.array(np.mean(kl_policy_logps - kl_ref_logps)), op="mean")
    loss, grad, _ = kto_loss_and_grad(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                                      variant="kto", kl_policy_logps=np.array([float(mean)]),
                                      kl_ref_logps=np.zeros(1), warn_balance=False)
    return loss, grad


def builtin_data_parallel_global_mean(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta,
                                      desirable_weight, undesirable_weight, *, rank, world_size, all_reduce):
    """The global-mean convention: z over all KL pairs, and L_r = (R / N) x the sum over the rank's shard."""
    total = float(all_reduce(np.array(float(len(policy_logps))), op="sum"))
    kl_sum = float(all_reduce(np.array(np.sum(kl_policy_logps - kl_ref_logps)), op="sum"))
    loss, grad, _ = kto_loss_and_grad(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                                      variant="kto", kl_policy_logps=np.array([kl_sum / total]),
                                      kl_ref_logps=np.zeros(1), warn_balance=False)
    scale = world_size * len(policy_logps) / total
    return scale * loss, scale * grad



def evaluate(candidate, case: Case, tolerance: str):
    """(values, notes) of one case: accumulation's micro-batches here, data_parallel's ranks by the runner."""
    if case.kind == "accumulation":
        return _evaluate_accumulation(candidate, case, tolerance)
    from ..run.runner import evaluate_data_parallel  # noqa: PLC0415  (the runner starts processes: on use only)

    return evaluate_data_parallel(candidate, case, tolerance)


def builtin(kind: str, variant: str | None) -> Callable:
    """kto_np's own candidate of the kind and variant."""
    if kind == "accumulation":
        return builtin_accumulation
    return builtin_data_parallel if variant == "rank_means" else builtin_data_parallel_global_mean
