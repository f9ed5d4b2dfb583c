"""The reference cases: seeded float64 inputs and what kto_np's own functions compute on them.

A Case holds named inputs (what a candidate is called with) and the expected outputs. Loss-level
cases come from losses.kto_loss_and_grad / dpo_loss_and_grad, log-prob cases from logprobs, and the
model cases from the core's KTO step (step.kto_step) on a small GPT-2, its KL rows built by
step.kl_partner_indices for the case's rotation. Shape letters: n batch of log-probs, B batch of
sequences, T time, V vocabulary.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ...backend import to_numpy
from ...checkpoint import HF_PREFIX, params_from_hf_gpt2, params_to_hf_gpt2
from ...dpo import dpo_loss_and_grad
from ...logprobs import (
    logprobs_backward,
    logprobs_forward,
    sequence_logprobs_backward,
    sequence_logprobs_forward,
)
from ...losses import KTOConfig, kto_loss_and_grad
from ...model import GPT, GPTConfig, param_shapes
from ...step import KL_ROTATION, Batch, kl_partner_indices, kto_step
from ...validation import check_choice
from .edifice_case import edifice_model_case_arrays

KINDS = ("kto_loss", "dpo_loss", "logprobs", "sequence_logprobs", "model_kto", "model_edifice")
MODEL_KINDS = ("model_kto", "model_edifice")  # a candidate gets a whole model's weights; grads for every one
VARIANTS = {
    "kto_loss": ("kto", "edifice", "edifice_stop_z_grad", "apo_zero_unpaired", "kto_pair"),
    "dpo_loss": (None,),
    "logprobs": (None,),
    "sequence_logprobs": (None,),
    "model_kto": ("kto",),
    "model_edifice": ("edifice",),
}
# kinds that check a piece of the training pipeline, each with a module of its own; those modules build on
# this one (and on the catalogue of mistakes and the candidates' calls), so they are named here, not imported,
# and imported where one of their parts is first asked for (pipeline_part). Each defines cases(),
# mutants(kind, variant), evaluate(candidate, case, tolerance) and builtin(kind, variant).
PIPELINE_KINDS = ("kl_pairs", "data_parallel", "accumulation")
KINDS += PIPELINE_KINDS
PIPELINE_MODULES = {"data_parallel": "kto_np.oracle.cases.distributed",
                    "accumulation": "kto_np.oracle.cases.distributed",
                    "kl_pairs": "kto_np.oracle.cases.kl_pairs"}
VARIANTS.update({"kl_pairs": ("whole_batch", "blocks"), "data_parallel": ("rank_means", "global_mean"),
                 "accumulation": ("kto",)})


@dataclass(frozen=True, eq=False)
class Case:
    """One reference case: named float64 inputs and the expected outputs.

    inputs: what the candidate is called with (0-d arrays for beta and the weights; the model state dict
    as "state_dict/<Hugging Face name>", an Edifice model's weights as "params/<Axon layer>.<param>").
    expected: "loss" or "logps", "grad/<input or parameter name>",
    "metrics/<TRL name>" (None when a class is absent), and model intermediates. config: the Hugging Face
    GPT2Config fields of a model_kto case, EdificeConfig.to_dict() of a model_edifice case, else None.
    """

    name: str
    kind: str
    variant: str | None
    formula: str
    inputs: Mapping[str, np.ndarray]
    expected: Mapping[str, np.ndarray | None]
    config: Mapping[str, Any] | None = None

    @property
    def file_name(self) -> str:
        return self.name.replace("/", "-") + ".npz"

    @property
    def kl_rotation(self) -> int | None:
        """A model case's KL-row rotation: KL row i pairs prompt i with completion (i + rotation) mod B."""
        if self.kind != "model_kto":
            return None
        return int(self.inputs["kl_rotation"]) if "kl_rotation" in self.inputs else KL_ROTATION


def _frozen(arrays: Mapping[str, Any]) -> dict[str, np.ndarray | None]:
    out = {}
    for name, value in arrays.items():
        if value is None:
            out[name] = None
            continue
        arr = np.array(value, copy=True)
        arr.flags.writeable = False
        out[name] = arr
    return out


def _case(name, kind, variant, formula, inputs, expected, config=None) -> Case:
    return Case(name, kind, variant, formula, _frozen(inputs), _frozen(expected), config)


VARIANT_FORMULAS = {
    "edifice": (
        "Edifice seed formula: r_i = policy_logps_i - ref_logps_i, KL_i = beta r_i, z = mean_i KL_i over the "
        "whole batch (not clamped; gradient flows through z), reward_i = KL_i - z; loss_i = -desirable_weight "
        "sigma(reward_i) if labels_i else -undesirable_weight sigma(-(KL_i - z)); L = mean_i loss_i. "
        "metrics/kl is z (reward units)."
    ),
    "edifice_stop_z_grad": (
        "Edifice seed formula with z detached: as 'edifice' (z = mean_i beta r_i, not clamped) but no gradient "
        "flows through z, so dL/dr_j = beta g_j with g_j = d loss_j / d reward_j / n."
    ),
    "kto": (
        "KTO paper / TRL: r_i = policy_logps_i - ref_logps_i; z_ref = max(0, mean_j(kl_policy_logps_j - "
        "kl_ref_logps_j)), detached (0 without KL pairs); loss_i = desirable_weight (1 - sigma(beta (r_i - "
        "z_ref))) if labels_i else undesirable_weight (1 - sigma(beta (z_ref - r_i))); L = mean over all n. "
        "grad/kl_policy_logps is zero (z_ref is detached). metrics/kl is z_ref (log-ratio units)."
    ),
    "apo_zero_unpaired": (
        "APO-zero, unpaired (TRL): loss_i = desirable_weight (1 - sigma(beta r_i)) if labels_i else "
        "undesirable_weight sigma(beta r_i); no z; L = mean_i loss_i."
    ),
    "kto_pair": (
        "kto_pair (TRL <= 0.9 DPOTrainer loss_type='kto_pair', a variant, not KTO): z_D = max(0, mean r over the "
        "desirable examples), z_U = max(0, mean r over the undesirable ones), NOT detached (gradient flows through "
        "them into the other class); loss_i = desirable_weight (1 - sigma(beta (r_i - z_U))) if labels_i else "
        "undesirable_weight (1 - sigma(beta (z_D - r_i))); L = mean over all n (TRL's form has unit weights). "
        "Both classes present (each case holds both). metrics: rewards/ and logps/ per class, as for 'kto'."
    ),
}
DPO_FORMULA = (
    "DPO: h_i = beta ((policy_chosen_logps_i - ref_chosen_logps_i) - (policy_rejected_logps_i - "
    "ref_rejected_logps_i)); L = mean_i -log sigma(h_i)."
)
LOGPROBS_FORMULA = (
    "Seed contract, no shift: logps_b = sum_t mask[b, t] log_softmax(logits[b, t])[targets[b, t]]; "
    "grad/logits = d(sum_b upstream_b logps_b) / d logits."
)
SEQUENCE_FORMULA = (
    "Language-model convention (TRL): logps_b = sum_{t >= 1} completion_mask[b, t] "
    "log_softmax(logits[b, t - 1])[tokens[b, t]] (completion_mask[b, 0] is ignored); "
    "grad/logits = d(sum_b upstream_b logps_b) / d logits (zero at the last position)."
)
MODEL_FORMULA = (
    "GPT-2 (config; pre-LN, LayerNorm eps 1e-5, gelu_new, learned positions, tied head, no dropout) on "
    "tokens_i = [prompt_tokens_i ; completion_tokens_i] with sequence_mask_i = [0 ... 0 ; completion_mask_i]. "
    "KL pairs (TRL): kl_tokens_i = [prompt_tokens_i ; completion_tokens_{i-1 mod B}], the completion mask "
    "rotated with its completion. policy_logps and kl_policy_logps by the language-model convention "
    "(logits at t score token t + 1, summed over completion tokens); loss = the 'kto' variant with these and "
    "the given ref_logps, kl_ref_logps (z_ref detached: no gradient through the KL pairs); grad/<name> = "
    "dL/d parameter for every parameter (the tied head's contribution is in transformer.wte.weight)."
)


class _KTOSpec(NamedTuple):
    case_id: str
    description: str
    seed: int
    labels: tuple
    beta: float
    desirable_weight: float
    undesirable_weight: float
    log_ratio_shift: float = 0.3
    kl_pairs: str | None = "positive"  # "positive", "negative" (the clamp matters), "zero" (exactly) or None
    extreme: bool = False


KTO_SPECS = {
    "basic": _KTOSpec("basic", "both classes, unequal weights", 11, (1, 0, 1, 1, 0, 1, 0, 1), 0.5, 1.0, 1.5),
    "no_kl_pairs": _KTOSpec("no_kl_pairs", "no KL pairs: kl_policy_logps = kl_ref_logps = None, z_ref = 0",
                            11, (1, 0, 1, 1, 0, 1, 0, 1), 0.5, 1.0, 1.5, kl_pairs=None),
    "kl_pairs": _KTOSpec("kl_pairs", "KL pairs with a positive KL estimate", 11, (1, 0, 1, 1, 0, 1, 0, 1),
                         0.5, 1.0, 1.5),
    "kl_pairs_negative": _KTOSpec("kl_pairs_negative", "KL pairs with a negative KL estimate: the clamp "
                                  "sets z_ref = 0", 12, (1, 0, 1, 1, 0, 1, 0, 1), 0.5, 1.0, 1.5,
                                  kl_pairs="negative"),
    "negative_mean_log_ratio": _KTOSpec("negative_mean_log_ratio", "mean log-ratio below 0 (z < 0, not "
                                        "clamped)", 13, (1, 0, 0, 1, 0, 1, 1), 0.5, 1.0, 1.5,
                                        log_ratio_shift=-0.4),
    "batch_of_1": _KTOSpec("batch_of_1", "a batch of one undesirable example", 14, (0,), 0.1, 1.0, 1.5),
    "desirable_only": _KTOSpec("desirable_only", "desirable examples only", 15, (1, 1, 1, 1, 1), 0.2, 1.3, 1.0),
    "undesirable_only": _KTOSpec("undesirable_only", "undesirable examples only", 16, (0, 0, 0, 0, 0), 0.2,
                                 1.0, 0.7),
    "extreme_log_ratios": _KTOSpec("extreme_log_ratios", "|beta r| up to ~1.5e3 (saturated sigmoids) next to "
                                   "moderate ones", 17, (1, 0, 1, 0, 0, 1), 0.1, 1.0, 1.2, extreme=True),
    "imbalanced_weights": _KTOSpec("imbalanced_weights", "imbalanced weights desirable_weight=3, "
                                   "undesirable_weight=0.5", 18, (1, 1, 1, 1, 1, 1, 0, 0), 0.3, 3.0, 0.5),
    "unit_weights": _KTOSpec("unit_weights", "unit class weights (desirable_weight = undesirable_weight = 1): "
                             "a case an implementation without class weights can pass", 19,
                             (1, 0, 1, 0, 0, 1, 1), 0.3, 1.0, 1.0),
    "kl_zero": _KTOSpec("kl_zero", "KL log-ratios exactly zero (kl_policy_logps == kl_ref_logps): z_ref = "
                        "max(0, 0) = 0 at the clamp's corner", 20, (1, 0, 0, 1, 1, 0), 0.4, 1.0, 1.5,
                        kl_pairs="zero"),
}
KTO_CASES_PER_VARIANT = {
    "edifice": ("basic", "negative_mean_log_ratio", "batch_of_1", "desirable_only", "undesirable_only",
                "extreme_log_ratios", "imbalanced_weights", "unit_weights"),
    "kto": ("no_kl_pairs", "kl_pairs", "kl_pairs_negative", "batch_of_1", "desirable_only",
            "undesirable_only", "extreme_log_ratios", "imbalanced_weights", "unit_weights", "kl_zero"),
    "apo_zero_unpaired": ("basic", "batch_of_1", "desirable_only", "undesirable_only", "extreme_log_ratios",
                          "imbalanced_weights", "unit_weights"),
}
KTO_CASES_PER_VARIANT["edifice_stop_z_grad"] = KTO_CASES_PER_VARIANT["edifice"]
KTO_CASES_PER_VARIANT["kto_pair"] = ("basic", "negative_mean_log_ratio", "extreme_log_ratios", "imbalanced_weights",
                                     "unit_weights")
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "count/chosen", "count/rejected")


def kto_pair_loss_and_grad(policy_logps, ref_logps, labels, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """The kto_pair variant from the core's KTO loss: (loss, dL/dpolicy_logps [n], metrics).

    Each class is the core's 'kto' loss with the other class's z as its one KL pair (so z enters as max(0, z)),
    weighted by its share n_c / n; the gradient through z_U (into the undesirable examples) is
    dL/dz_U dz_U/dr_k = (-sum_{i in D} dL/dr_i) [mean_U r > 0] / n_U, since a desirable loss depends on
    r_i - z_U only; the same for z_D. Both classes must be present."""
    desirable = np.asarray(labels, dtype=bool)
    policy_logps = np.asarray(policy_logps, dtype=np.float64)
    ref_logps = np.asarray(ref_logps, dtype=np.float64)
    if desirable.all() or not desirable.any():
        raise ValueError("labels must hold both classes for variant 'kto_pair' (its z comes from the other class)")
    r = policy_logps - ref_logps  # [n]
    n = r.shape[0]
    means = {True: float(r[desirable].mean()), False: float(r[~desirable].mean())}
    grad = np.zeros(n)
    loss = 0.0
    for label in (True, False):
        members = desirable == label
        part_loss, part_grad, _ = kto_loss_and_grad(
            policy_logps[members], ref_logps[members], desirable[members], beta, desirable_weight,
            undesirable_weight, variant="kto", kl_policy_logps=np.array([means[not label]]),
            kl_ref_logps=np.zeros(1), warn_balance=False)
        share = members.sum() / n
        loss += share * part_loss
        grad[members] += share * part_grad
    direct = grad.copy()
    for label in (True, False):  # through z of class `label` (max(0, mean r over it)), used by the other class
        users, owners = desirable != label, desirable == label
        if means[label] > 0:
            grad[owners] -= float(direct[users].sum()) / int(owners.sum())
    _, _, metrics = kto_loss_and_grad(policy_logps, ref_logps, desirable, beta, desirable_weight, undesirable_weight,
                                      variant="kto", warn_balance=False)
    return float(loss), grad, {k: metrics[k] for k in PAIR_METRICS}


def kto_pair_candidate(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight):
    """kto_np's kto_pair as a kto_loss candidate (variant 'kto_pair'): (loss, gradients, metrics)."""
    loss, grad, metrics = kto_pair_loss_and_grad(policy_logps, ref_logps, labels, beta, desirable_weight,
                                                 undesirable_weight)
    return loss, {"policy_logps": grad}, metrics


def _kto_inputs(spec: _KTOSpec) -> dict[str, np.ndarray]:
    """Seeded float64 inputs of one loss-level KTO case (the same numbers for every variant)."""
    rng = np.random.default_rng(spec.seed)
    n = len(spec.labels)
    if spec.extreme:
        log_ratios = rng.choice([-1.0, 1.0], n) * rng.uniform(5e3, 1.5e4, n)
        log_ratios[-2:] = rng.uniform(-3.0, 3.0, 2)
        ref_logps = -2.0e4 + 100.0 * rng.standard_normal(n)
    else:
        log_ratios = rng.standard_normal(n)
        if n > 1:
            log_ratios += spec.log_ratio_shift - log_ratios.mean()
        ref_logps = -20.0 + 4.0 * rng.standard_normal(n)
    inputs = {
        "policy_logps": ref_logps + log_ratios,
        "ref_logps": ref_logps,
        "labels": np.array(spec.labels, dtype=bool),
        "beta": np.float64(spec.beta),
        "desirable_weight": np.float64(spec.desirable_weight),
        "undesirable_weight": np.float64(spec.undesirable_weight),
    }
    if spec.kl_pairs == "zero":
        kl_ref_logps = -22.0 + 4.0 * rng.standard_normal(n)
        inputs["kl_policy_logps"] = kl_ref_logps.copy()
        inputs["kl_ref_logps"] = kl_ref_logps
    elif spec.kl_pairs is not None:
        kl_ref_logps = -22.0 + 4.0 * rng.standard_normal(n)
        kl_gap = 0.3 * rng.standard_normal(n)
        kl_gap += (0.6 if spec.kl_pairs == "positive" else -0.6) - kl_gap.mean()
        inputs["kl_policy_logps"] = kl_ref_logps + kl_gap
        inputs["kl_ref_logps"] = kl_ref_logps
    return inputs


def kto_keywords(inputs: Mapping[str, np.ndarray], variant: str) -> dict:
    kwargs = dict(
        policy_logps=inputs["policy_logps"], ref_logps=inputs["ref_logps"], labels=inputs["labels"],
        beta=float(inputs["beta"]), desirable_weight=float(inputs["desirable_weight"]),
        undesirable_weight=float(inputs["undesirable_weight"]), warn_balance=False,
    )
    if variant == "edifice_stop_z_grad":
        kwargs.update(variant="edifice", stop_z_grad=True)
    else:
        kwargs["variant"] = variant
    if variant == "kto" and "kl_policy_logps" in inputs:
        kwargs.update(kl_policy_logps=inputs["kl_policy_logps"], kl_ref_logps=inputs["kl_ref_logps"])
    return kwargs


def metric_entries(metrics: Mapping[str, Any]) -> dict[str, np.ndarray | None]:
    return {f"metrics/{k}": (None if v is None else np.float64(v)) for k, v in metrics.items()}


def _kto_loss_cases() -> list[Case]:
    cases = []
    for variant in VARIANTS["kto_loss"]:
        for case_id in KTO_CASES_PER_VARIANT[variant]:
            spec = KTO_SPECS[case_id]
            inputs = _kto_inputs(spec)
            if variant != "kto":
                inputs = {k: v for k, v in inputs.items() if not k.startswith("kl_")}
            if variant == "kto_pair":
                loss, grad, metrics = kto_pair_loss_and_grad(
                    inputs["policy_logps"], inputs["ref_logps"], inputs["labels"], float(inputs["beta"]),
                    float(inputs["desirable_weight"]), float(inputs["undesirable_weight"]))
            else:
                loss, grad, metrics = kto_loss_and_grad(**kto_keywords(inputs, variant))
            expected = {"loss": np.float64(loss), "grad/policy_logps": grad}
            if "kl_policy_logps" in inputs:
                expected["grad/kl_policy_logps"] = np.zeros_like(inputs["kl_policy_logps"])
            expected.update(metric_entries(metrics))
            formula = f"{VARIANT_FORMULAS[variant]} Case: {spec.description}."
            cases.append(_case(f"kto_loss/{variant}/{case_id}", "kto_loss", variant, formula, inputs, expected))
    return cases


def make_kto_case(policy_logps, ref_logps, labels, *, beta: float, desirable_weight: float = 1.0,
                  undesirable_weight: float = 1.0, variant: str = "kto", kl_policy_logps=None, kl_ref_logps=None,
                  name: str = "custom") -> Case:
    """A kto_loss case from one's own inputs, its reference values computed by kto_np in float64:
    verify(candidate, "kto_loss", variant, cases=[make_kto_case(...)]).

    policy_logps, ref_logps [n]; labels [n] bool or 0/1 (True = desirable); kl_policy_logps and
    kl_ref_logps [n] for variant "kto" only (both or neither). Bad input raises ValueError/TypeError
    naming the argument (kto_np.losses validates it).
    """
    variant = check_choice("variant", variant, VARIANTS["kto_loss"])
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be a non-empty string without '/', got {name!r}")
    if variant != "kto" and (kl_policy_logps is not None or kl_ref_logps is not None):
        raise ValueError(f"kl_policy_logps and kl_ref_logps are for variant 'kto' only, got variant {variant!r}")
    if (kl_policy_logps is None) != (kl_ref_logps is None):
        raise ValueError("kl_policy_logps and kl_ref_logps go together: pass both or neither")
    inputs = {"policy_logps": policy_logps, "ref_logps": ref_logps, "labels": labels, "beta": beta,
              "desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight}
    if kl_policy_logps is not None:
        inputs.update(kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps)
    options = dict(variant="edifice", stop_z_grad=True) if variant == "edifice_stop_z_grad" else dict(variant=variant)
    loss, grad, metrics = kto_loss_and_grad(**inputs, **({"variant": "kto"} if variant == "kto_pair" else options),
                                            warn_balance=False)  # validates every argument
    if variant == "kto_pair":
        loss, grad, metrics = kto_pair_loss_and_grad(*(to_numpy(inputs[k]) for k in ("policy_logps", "ref_logps")),
                                                     to_numpy(labels), beta, desirable_weight, undesirable_weight)
    inputs = {k: np.array(to_numpy(v), dtype=np.float64) for k, v in inputs.items() if k != "labels"}
    inputs["labels"] = np.asarray(to_numpy(labels)).astype(bool)
    expected = {"loss": np.float64(loss), "grad/policy_logps": np.asarray(to_numpy(grad), dtype=np.float64)}
    if "kl_policy_logps" in inputs:
        expected["grad/kl_policy_logps"] = np.zeros_like(inputs["kl_policy_logps"])
    expected.update(metric_entries(metrics))
    formula = f"{VARIANT_FORMULAS[variant]} Case: built with make_kto_case."
    return _case(f"kto_loss/{variant}/{name}", "kto_loss", variant, formula, inputs, expected)


def _dpo_cases() -> list[Case]:
    specs = [("basic", "five pairs", 21, 5, 0.1, False), ("batch_of_1", "a single pair", 22, 1, 0.5, False),
             ("extreme_margins", "|h| up to ~2e3 (saturated)", 23, 4, 0.1, True)]
    cases = []
    for case_id, description, seed, n, beta, extreme in specs:
        rng = np.random.default_rng(seed)
        base, scale = (-5.0e4, 1.0e4) if extreme else (-20.0, 1.0)
        ref_chosen = base + 3.0 * rng.standard_normal(n)
        ref_rejected = base + 3.0 * rng.standard_normal(n)
        inputs = {
            "policy_chosen_logps": ref_chosen + scale * rng.standard_normal(n),
            "policy_rejected_logps": ref_rejected + scale * rng.standard_normal(n),
            "ref_chosen_logps": ref_chosen,
            "ref_rejected_logps": ref_rejected,
            "beta": np.float64(beta),
        }
        loss, (grad_chosen, grad_rejected), metrics = dpo_loss_and_grad(
            inputs["policy_chosen_logps"], inputs["policy_rejected_logps"], inputs["ref_chosen_logps"],
            inputs["ref_rejected_logps"], beta)
        expected = {"loss": np.float64(loss), "grad/policy_chosen_logps": grad_chosen,
                    "grad/policy_rejected_logps": grad_rejected, **metric_entries(metrics)}
        cases.append(_case(f"dpo_loss/{case_id}", "dpo_loss", None, f"{DPO_FORMULA} Case: {description}.",
                           inputs, expected))
    return cases


def _logprobs_cases() -> list[Case]:
    cases = []
    for case_id, description, seed, (B, T, V), scale in [
        ("random_mask", "random 0/1 mask, logits ~ 2 N(0, 1)", 31, (3, 5, 7), 2.0),
        ("large_logits", "random 0/1 mask, logits ~ 50 N(0, 1)", 32, (2, 4, 6), 50.0),
    ]:
        rng = np.random.default_rng(seed)
        logits = scale * rng.standard_normal((B, T, V))
        targets = rng.integers(0, V, (B, T))
        mask = (rng.random((B, T)) > 0.3).astype(np.float64)
        mask[:, 0] = 1.0  # no fully masked row
        upstream = rng.standard_normal(B)
        logps, cache = logprobs_forward(logits, targets, mask)
        inputs = {"logits": logits, "targets": targets, "mask": mask, "upstream": upstream}
        expected = {"logps": logps, "grad/logits": logprobs_backward(upstream, cache)}
        cases.append(_case(f"logprobs/{case_id}", "logprobs", None, f"{LOGPROBS_FORMULA} Case: {description}.",
                           inputs, expected))
    return cases


def _completion_mask(prompt_lengths, completion_lengths, T: int) -> np.ndarray:
    """[B, T] float64: 1 on completion tokens, 0 on the prompt and the right padding."""
    mask = np.zeros((len(prompt_lengths), T))
    for b, (p, k) in enumerate(zip(prompt_lengths, completion_lengths)):
        mask[b, p:p + k] = 1.0
    return mask


def _sequence_logprobs_cases() -> list[Case]:
    cases = []
    for case_id, description, seed, (B, T, V), prompt_lengths, completion_lengths in [
        ("prompt_and_padding", "prompts of 2, 3, 1 tokens, right padding", 41, (3, 7, 9), (2, 3, 1), (3, 2, 5)),
        ("no_padding", "prompts of 2 and 1 tokens, no padding", 42, (2, 5, 6), (2, 1), (3, 4)),
    ]:
        rng = np.random.default_rng(seed)
        logits = 2.0 * rng.standard_normal((B, T, V))
        tokens = rng.integers(0, V, (B, T))
        mask = _completion_mask(prompt_lengths, completion_lengths, T)
        upstream = rng.standard_normal(B)
        logps, cache = sequence_logprobs_forward(logits, tokens, mask)
        inputs = {"logits": logits, "tokens": tokens, "completion_mask": mask, "upstream": upstream}
        expected = {"logps": logps, "grad/logits": sequence_logprobs_backward(upstream, cache)}
        cases.append(_case(f"sequence_logprobs/{case_id}", "sequence_logprobs", None,
                           f"{SEQUENCE_FORMULA} Case: {description}.", inputs, expected))
    return cases



MODEL_CONFIG = {  # Hugging Face GPT2Config fields
    "vocab_size": 11, "n_positions": 8, "n_embd": 12, "n_layer": 2, "n_head": 3,
    "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "tie_word_embeddings": True,
    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
}
MODEL_PROMPT_LENGTH = 3
MODEL_COMPLETION_LENGTH = 5


def hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else HF_PREFIX + name


def model_params(config: GPTConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Float64 parameters large enough for non-uniform logits: weights ~ 0.3 N(0, 1), LayerNorm 1 + 0.1 N."""
    params = {}
    for name, shape in param_shapes(config).items():
        if ".ln_" in name or name.startswith("ln_"):
            params[name] = (1.0 if name.endswith("weight") else 0.0) + 0.1 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            params[name] = 0.1 * rng.standard_normal(shape)
        else:
            params[name] = 0.3 * rng.standard_normal(shape)
    return params


def state_dict_inputs(params: dict, config: GPTConfig) -> dict[str, np.ndarray]:
    return {f"state_dict/{k}": v for k, v in params_to_hf_gpt2(params, config).items()}


def state_dict_from_inputs(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    prefix = "state_dict/"
    return {k[len(prefix):]: v for k, v in inputs.items() if k.startswith(prefix)}


def model_from_case(case: Case) -> tuple[GPT, dict]:
    params, config = params_from_hf_gpt2(state_dict_from_inputs(case.inputs), num_heads=case.config["n_head"],
                                         config_overrides={"dropout": 0.0})
    return GPT(config), {k: to_numpy(v) for k, v in params.items()}


def trainable_names(case: Case) -> list[str]:
    """Hugging Face names of the parameters (named_parameters: the tied lm_head.weight is not one)."""
    names = sorted(state_dict_from_inputs(case.inputs))
    if case.config and case.config.get("tie_word_embeddings", True):
        names = [n for n in names if n != "lm_head.weight"]
    return names


def joined(prompt_tokens, completion_tokens, completion_mask):
    """[B, P], [B, K], [B, K] -> tokens [B, P + K], sequence_mask [B, P + K] (0 on the prompt)."""
    tokens = np.concatenate([prompt_tokens, completion_tokens], axis=1)
    sequence_mask = np.concatenate([np.zeros(prompt_tokens.shape), completion_mask], axis=1)
    return tokens, sequence_mask


def model_case_batch(case: Case, rotation: int = KL_ROTATION):
    """The tensor batch of a model case: matched rows [prompt_i ; completion_i] and KL rows
    [prompt_i ; completion_(i + rotation) mod B], masks 0 on the prompt."""
    inputs = case.inputs
    prompt, completion, completion_mask = (np.asarray(inputs[k]) for k in
                                           ("prompt_tokens", "completion_tokens", "completion_mask"))
    partners = kl_partner_indices(prompt.shape[0], rotation)
    tokens, sequence_mask = joined(prompt, completion, completion_mask)
    kl_tokens, kl_sequence_mask = joined(prompt, completion[partners], completion_mask[partners])
    return Batch(tokens, sequence_mask, np.asarray(inputs["labels"]), kl_tokens, kl_sequence_mask, (), (), ())


def model_reference_outputs(case: Case, rotation: int | None = None) -> dict[str, np.ndarray]:
    """Loss, intermediates and every parameter's gradient of a model case, by the core's KTO step, with the
    KL rows of `rotation` (default: the case's own)."""
    inputs = case.inputs
    model, params = model_from_case(case)
    batch = model_case_batch(case, case.kl_rotation if rotation is None else rotation)
    config = KTOConfig("kto", beta=float(inputs["beta"]), desirable_weight=float(inputs["desirable_weight"]),
                       undesirable_weight=float(inputs["undesirable_weight"]))
    loss, metrics, grads = kto_step(model, params, batch, np.asarray(inputs["ref_logps"]),
                                    np.asarray(inputs["kl_ref_logps"]), config)
    logits = model.forward(params, batch.tokens)[0]  # [B, T, V]: the intermediates a candidate may return
    kl_logits = model.forward(params, batch.kl_tokens)[0]
    out = {
        "loss": np.float64(loss), "tokens": batch.tokens, "sequence_mask": batch.completion_mask,
        "kl_tokens": batch.kl_tokens, "kl_sequence_mask": batch.kl_completion_mask, "logits": logits,
        "policy_logps": sequence_logprobs_forward(logits, batch.tokens, batch.completion_mask)[0],
        "kl_policy_logps": sequence_logprobs_forward(kl_logits, batch.kl_tokens, batch.kl_completion_mask)[0],
    }
    out.update({f"grad/{hf_name(name)}": g for name, g in grads.items()})
    out.update(metric_entries(metrics))
    return out


KL_ROTATIONS = (-1, 1)  # -1: TRL (prompt i with completion i - 1); +1: OpenRLHF, HALOs (completion i + 1)


def _model_cases() -> list[Case]:
    hf = MODEL_CONFIG
    config = GPTConfig(vocab_size=hf["vocab_size"], max_seq_len=hf["n_positions"], hidden_size=hf["n_embd"],
                       num_layers=hf["n_layer"], num_heads=hf["n_head"], dropout=0.0, dtype="float64")
    B, P, K, V = 4, MODEL_PROMPT_LENGTH, MODEL_COMPLETION_LENGTH, hf["vocab_size"]
    cases = []
    for rotation in KL_ROTATIONS:
        for case_id, description, seed, labels, beta, weights, completion_lengths, kl_sign in [
            ("kl_positive", "a positive KL estimate (z_ref > 0)", 51, (1, 0, 1, 0), 0.5, (1.0, 1.3), (5, 3, 4, 2),
             1),
            ("kl_negative", "a negative KL estimate: the clamp sets z_ref = 0", 52, (1, 1, 0, 0), 0.5, (1.2, 0.8),
             (4, 5, 2, 3), -1),
        ]:
            cases.append(_model_case(config, rotation, case_id, description, seed, labels, beta, weights,
                                     completion_lengths, kl_sign, B, P, K, V))
    return cases


def _model_case(config, rotation, case_id, description, seed, labels, beta, weights, completion_lengths, kl_sign,
                B, P, K, V) -> Case:
    hf = MODEL_CONFIG
    rng = np.random.default_rng(seed)
    policy_params = model_params(config, rng)
    prompt = rng.integers(0, V, (B, P))
    completion_mask = _completion_mask([0] * B, completion_lengths, K)
    completion = np.where(completion_mask > 0, rng.integers(1, V, (B, K)), 0)  # pad token 0
    base = {"prompt_tokens": prompt, "completion_tokens": completion, "completion_mask": completion_mask,
            "labels": np.array(labels, dtype=bool), "beta": np.float64(beta),
            "desirable_weight": np.float64(weights[0]), "undesirable_weight": np.float64(weights[1])}
    model = GPT(config)
    tokens, sequence_mask = joined(prompt, completion, completion_mask)
    partners = kl_partner_indices(B, rotation)
    kl_tokens, kl_mask = joined(prompt, completion[partners], completion_mask[partners])
    policy_kl_logps = sequence_logprobs_forward(model.forward(policy_params, kl_tokens)[0], kl_tokens, kl_mask)[0]
    for ref_seed in range(1000):  # deterministic search for a reference with the KL sign this case needs
        ref_rng = np.random.default_rng([seed, ref_seed])
        ref_params = {k: v + 0.05 * ref_rng.standard_normal(v.shape) for k, v in policy_params.items()}
        kl_ref_logps = sequence_logprobs_forward(model.forward(ref_params, kl_tokens)[0], kl_tokens, kl_mask)[0]
        if kl_sign * float(np.mean(policy_kl_logps - kl_ref_logps)) > 0.02:
            break
    else:  # pragma: no cover - the search succeeds for the seeds above
        raise RuntimeError(f"no reference model with KL sign {kl_sign} for model case {case_id}")
    ref_logps = sequence_logprobs_forward(model.forward(ref_params, tokens)[0], tokens, sequence_mask)[0]
    inputs = {**state_dict_inputs(policy_params, config), **base, "ref_logps": ref_logps,
              "kl_ref_logps": kl_ref_logps}
    name = f"model_kto/kto/{case_id}"
    formula = MODEL_FORMULA
    if rotation != KL_ROTATION:  # the TRL-rotation cases keep their names and files from format version 1
        inputs["kl_rotation"] = np.int64(rotation)
        name += f"_rotation_{'plus' if rotation > 0 else 'minus'}_{abs(rotation)}"
        formula = formula.replace("completion_tokens_{i-1 mod B}", "completion_tokens_{i+1 mod B}").replace(
            "KL pairs (TRL)", "KL pairs (kl_rotation = +1, as OpenRLHF and HALOs build them)")
    provisional = Case(name, "model_kto", "kto", "", inputs, {}, dict(hf))
    expected = model_reference_outputs(provisional)
    return _case(name, "model_kto", "kto", f"{formula} Case: {description}.", inputs, expected, dict(hf))


EDIFICE_FORMULA = (
    "Edifice.Meta.KTO.build/1's network (config: EdificeConfig fields; pre-LN, LayerNorm eps 1e-5, exact-erf "
    "GELU, separate q/k/v/out dense layers with biases, softmax exp(s - max) / (sum + 1e-8), causal mask -1e9, "
    "[sin | cos] positions, untied biased lm_head, no dropout) with weights params/<Axon layer>.<param> "
    "(dense kernels [in, out]). logits = model(tokens) [B, T, V]; logps_b = sum_t mask[b, t] "
    "log_softmax(logits[b, t])[targets[b, t]], the seed's compute_logprobs contract: NO shift (logits[:, t] "
    "score targets[:, t]; targets are the next tokens, so the shift is in the data); loss = the 'edifice' "
    "variant of kto_loss on (logps, ref_logps, labels) with z = mean_i beta r_i over the batch, not clamped, "
    "gradient through z; grad/<layer>.<param> = dL/d parameter for every parameter (the fixed token "
    "embedding and the position table are not parameters)."
)
EDIFICE_SPECS = (  # (case id, description, seed, token_embedding)
    ("fixed_embedding", "Edifice's network as built: the fixed token embedding (t H + j) / sqrt(V)", 0, "fixed"),
    ("learned_embedding", "the repair: a learned token embedding (token_embed.kernel)", 1, "learned"),
)


def edifice_params_from_inputs(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{"<layer>.<param>": array} of a model_edifice case's inputs ("params/<layer>.<param>")."""
    prefix = "params/"
    return {k[len(prefix):]: v for k, v in inputs.items() if k.startswith(prefix)}


def _edifice_cases() -> list[Case]:
    cases = []
    for case_id, description, seed, token_embedding in EDIFICE_SPECS:
        arrays = edifice_model_case_arrays(seed, token_embedding)
        options = arrays["loss_options"]
        inputs = {f"params/{name}": value for name, value in sorted(arrays["weights"].items())}
        inputs.update(tokens=arrays["tokens"], targets=arrays["targets"], mask=arrays["mask"],
                      labels=arrays["labels"].astype(bool), ref_logps=arrays["ref_logps"],
                      beta=np.float64(options["beta"]), desirable_weight=np.float64(options["desirable_weight"]),
                      undesirable_weight=np.float64(options["undesirable_weight"]))
        expected_arrays = arrays["expected"]
        expected = {"loss": np.float64(expected_arrays["loss"]), "logits": expected_arrays["logits"],
                    "logps": expected_arrays["logps"]}
        expected.update({f"grad/{name}": g for name, g in sorted(expected_arrays["grads"].items())})
        cases.append(_case(f"model_edifice/edifice/{case_id}", "model_edifice", "edifice",
                           f"{EDIFICE_FORMULA} Case: {description}.", inputs, expected, arrays["config"]))
    return cases


def resolve_variant(kind: str, variant: str | None) -> str | None:
    check_choice("kind", kind, KINDS)
    allowed = VARIANTS[kind]
    if variant is None:
        return allowed[0]
    if allowed == (None,):
        raise ValueError(f"variant must be None for kind {kind!r} (it has no variants), got {variant!r}")
    return check_choice("variant", variant, allowed)



def pipeline_part(kind: str, part: str):
    """One part (cases, mutants, evaluate, builtin) of a pipeline kind's module, imported on first use."""
    return getattr(importlib.import_module(PIPELINE_MODULES[kind]), part)


@functools.lru_cache(maxsize=1)
def _cached_cases() -> tuple[Case, ...]:
    modules = dict.fromkeys(PIPELINE_MODULES.values())
    pipeline = [case for module in modules for case in importlib.import_module(module).cases()]
    return tuple(_kto_loss_cases() + _dpo_cases() + _logprobs_cases() + _sequence_logprobs_cases()
                 + _model_cases() + _edifice_cases() + pipeline)


def generate_cases() -> tuple[Case, ...]:
    """Every reference case, computed in memory with kto_np's own functions (deterministic, read-only)."""
    return _cached_cases()

