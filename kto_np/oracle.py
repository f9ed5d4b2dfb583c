"""The gradient oracle: float64 reference cases for KTO implementations, and a checker that names mistakes.

Someone writing KTO in PyTorch, JAX or TRL checks their loss, rewards and gradients against ours:

    report = verify(my_kto_loss, kind="kto_loss", variant="kto")
    print(report)                 # per case and quantity: max abs / rel error, first mismatch
    report.diagnosis.mistakes     # e.g. ("z_not_detached",): the known mistake the numbers match

`export(out_dir)` writes the same cases as one .npz per case (NumPy only, no pickle) plus a
manifest.json; `load_cases(out_dir)` reads them back and refuses anything that does not match.
Shape letters: n batch of log-probs, B batch of sequences, T time, V vocabulary, C channels, K
finite-difference directions. docs/ORACLE.md describes the format, the candidate signatures per kind
and the diagnosable mistakes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import io
import json
import math
import os
import sys
import traceback
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import __version__
from .backend import to_numpy
from .checkpoint import HF_PREFIX, params_from_hf_gpt2, params_to_hf_gpt2
from .files import atomic_write, write_npy_entry
from .logprobs import (
    logprobs_backward,
    logprobs_forward,
    sequence_logprobs_backward,
    sequence_logprobs_forward,
)
from .losses import dpo_loss_and_grad, kto_loss_and_grad, sigmoid
from .model import GPT, GPTConfig, param_shapes
from .validation import check_bool, check_choice

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KINDS",
    "MISTAKES",
    "TOLERANCES",
    "VARIANTS",
    "Case",
    "Check",
    "Diagnosis",
    "Mistake",
    "Report",
    "builtin_candidate",
    "export",
    "generate_cases",
    "load_callable",
    "load_cases",
    "main_check",
    "main_export",
    "verify",
]

FORMAT_NAME = "kto_np-oracle-cases"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

KINDS = ("kto_loss", "dpo_loss", "logprobs", "sequence_logprobs", "model_kto")
VARIANTS = {
    "kto_loss": ("kto", "edifice", "edifice_stop_z_grad", "apo_zero_unpaired"),
    "dpo_loss": (None,),
    "logprobs": (None,),
    "sequence_logprobs": (None,),
    "model_kto": ("kto",),
}

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
FD_STEP = {"float64": 1e-5, "float32": 1e-2}
FD_FULL_MAX_ENTRIES = 512  # larger tensors, and model parameters, are checked along random directions
FD_DIRECTIONS = 2


# ---------------------------------------------------------------------------------------------------
# cases


@dataclass(frozen=True, eq=False)
class Case:
    """One reference case: named float64 inputs and the expected outputs.

    inputs: what the candidate is called with (0-d arrays for beta and the weights; the model state dict
    as "state_dict/<Hugging Face name>"). expected: "loss" or "logps", "grad/<input or parameter name>",
    "metrics/<TRL name>" (None when a class is absent), and model intermediates. config: the Hugging Face
    GPT2Config fields of a model case, else None.
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
    kl_pairs: str | None = "positive"  # "positive", "negative" (the clamp matters) or None
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
}
KTO_CASES_PER_VARIANT = {
    "edifice": ("basic", "negative_mean_log_ratio", "batch_of_1", "desirable_only", "undesirable_only",
                "extreme_log_ratios", "imbalanced_weights"),
    "kto": ("no_kl_pairs", "kl_pairs", "kl_pairs_negative", "batch_of_1", "desirable_only",
            "undesirable_only", "extreme_log_ratios", "imbalanced_weights"),
    "apo_zero_unpaired": ("basic", "batch_of_1", "desirable_only", "undesirable_only", "extreme_log_ratios",
                          "imbalanced_weights"),
}
KTO_CASES_PER_VARIANT["edifice_stop_z_grad"] = KTO_CASES_PER_VARIANT["edifice"]


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
    if spec.kl_pairs is not None:
        kl_ref_logps = -22.0 + 4.0 * rng.standard_normal(n)
        kl_gap = 0.3 * rng.standard_normal(n)
        kl_gap += (0.6 if spec.kl_pairs == "positive" else -0.6) - kl_gap.mean()
        inputs["kl_policy_logps"] = kl_ref_logps + kl_gap
        inputs["kl_ref_logps"] = kl_ref_logps
    return inputs


def _kto_keywords(inputs: Mapping[str, np.ndarray], variant: str) -> dict:
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


def _metric_entries(metrics: Mapping[str, Any]) -> dict[str, np.ndarray | None]:
    return {f"metrics/{k}": (None if v is None else np.float64(v)) for k, v in metrics.items()}


def _kto_loss_cases() -> list[Case]:
    cases = []
    for variant in VARIANTS["kto_loss"]:
        for case_id in KTO_CASES_PER_VARIANT[variant]:
            spec = KTO_SPECS[case_id]
            inputs = _kto_inputs(spec)
            if variant != "kto":
                inputs = {k: v for k, v in inputs.items() if not k.startswith("kl_")}
            loss, grad, metrics = kto_loss_and_grad(**_kto_keywords(inputs, variant))
            expected = {"loss": np.float64(loss), "grad/policy_logps": grad}
            if "kl_policy_logps" in inputs:
                expected["grad/kl_policy_logps"] = np.zeros_like(inputs["kl_policy_logps"])
            expected.update(_metric_entries(metrics))
            formula = f"{VARIANT_FORMULAS[variant]} Case: {spec.description}."
            cases.append(_case(f"kto_loss/{variant}/{case_id}", "kto_loss", variant, formula, inputs, expected))
    return cases


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
                    "grad/policy_rejected_logps": grad_rejected, **_metric_entries(metrics)}
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


# ---------------------------------------------------------------------------------------------------
# model-level cases and the shared pipeline (reference and mutants)

MODEL_CONFIG = {  # Hugging Face GPT2Config fields
    "vocab_size": 11, "n_positions": 8, "n_embd": 12, "n_layer": 2, "n_head": 3,
    "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "tie_word_embeddings": True,
    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
}
MODEL_PROMPT_LENGTH = 3
MODEL_COMPLETION_LENGTH = 5


def _hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else HF_PREFIX + name


def _model_params(config: GPTConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
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


def _state_dict_inputs(params: dict, config: GPTConfig) -> dict[str, np.ndarray]:
    return {f"state_dict/{k}": v for k, v in params_to_hf_gpt2(params, config).items()}


def _state_dict_from_inputs(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    prefix = "state_dict/"
    return {k[len(prefix):]: v for k, v in inputs.items() if k.startswith(prefix)}


def _model_from_case(case: Case) -> tuple[GPT, dict]:
    params, config = params_from_hf_gpt2(_state_dict_from_inputs(case.inputs), num_heads=case.config["n_head"],
                                         config_overrides={"dropout": 0.0})
    return GPT(config), {k: to_numpy(v) for k, v in params.items()}


def _trainable_names(case: Case) -> list[str]:
    """Hugging Face names of the parameters (named_parameters: the tied lm_head.weight is not one)."""
    names = sorted(_state_dict_from_inputs(case.inputs))
    if case.config and case.config.get("tie_word_embeddings", True):
        names = [n for n in names if n != "lm_head.weight"]
    return names


def _joined(prompt_tokens, completion_tokens, completion_mask):
    """[B, P], [B, K], [B, K] -> tokens [B, P + K], sequence_mask [B, P + K] (0 on the prompt)."""
    tokens = np.concatenate([prompt_tokens, completion_tokens], axis=1)
    sequence_mask = np.concatenate([np.zeros(prompt_tokens.shape), completion_mask], axis=1)
    return tokens, sequence_mask


def _token_logps(logits, tokens, mask, *, shift: int = 1, reduction: str = "sum", mask_ignored: bool = False):
    """Per-sequence log-probs where logits at t score tokens[t + shift], and a backward dlogps -> dlogits.

    shift=1, reduction="sum", mask_ignored=False is sequence_logprobs itself; the other settings are the
    known mistakes (shift 0 or 2, "masked_mean" or "mean_over_time", the mask ignored).
    """
    if shift == 1 and reduction == "sum" and not mask_ignored:
        logps, cache = sequence_logprobs_forward(logits, tokens, mask)
        return logps, lambda dlogps: sequence_logprobs_backward(dlogps, cache)
    B, T, V = logits.shape
    weights = np.ones((B, T - shift)) if mask_ignored else np.asarray(mask, dtype=np.float64)[:, shift:]
    if reduction == "masked_mean":
        weights = weights / weights.sum(axis=1, keepdims=True)
    elif reduction == "mean_over_time":
        weights = weights / (T - shift)
    logps, cache = logprobs_forward(logits[:, :T - shift], tokens[:, shift:], weights)

    def backward(dlogps):
        dlogits = np.zeros_like(logits)
        dlogits[:, :T - shift] = logprobs_backward(dlogps, cache)
        return dlogits

    return logps, backward


def _model_kto_outputs(case: Case, *, kl_rotation: int = 1, logps_options: Mapping | None = None,
                       loss_mistakes: Mapping | None = None) -> dict[str, np.ndarray]:
    """Loss, intermediates and every parameter's gradient of a model case.

    Defaults: the reference (kto_np's own functions). kl_rotation 0 or -1, logps_options (for
    _token_logps) and loss_mistakes (for _kto_family) compute the known mistakes instead.
    """
    inputs = case.inputs
    model, params = _model_from_case(case)
    prompt, completion, completion_mask = (np.asarray(inputs[k]) for k in
                                           ("prompt_tokens", "completion_tokens", "completion_mask"))
    tokens, sequence_mask = _joined(prompt, completion, completion_mask)
    kl_tokens, kl_sequence_mask = _joined(prompt, np.roll(completion, kl_rotation, axis=0),
                                          np.roll(completion_mask, kl_rotation, axis=0))
    logits, cache = model.forward(params, tokens)  # [B, T, V]
    kl_logits, kl_cache = model.forward(params, kl_tokens)
    options = dict(logps_options or {})
    policy_logps, policy_backward = _token_logps(logits, tokens, sequence_mask, **options)
    kl_policy_logps, kl_backward = _token_logps(kl_logits, kl_tokens, kl_sequence_mask, **options)
    arguments = dict(policy_logps=policy_logps, ref_logps=np.asarray(inputs["ref_logps"]),
                     labels=np.asarray(inputs["labels"]), beta=float(inputs["beta"]),
                     desirable_weight=float(inputs["desirable_weight"]),
                     undesirable_weight=float(inputs["undesirable_weight"]),
                     kl_policy_logps=kl_policy_logps, kl_ref_logps=np.asarray(inputs["kl_ref_logps"]))
    metrics = {}
    if loss_mistakes is None:
        loss, dpolicy, metrics = kto_loss_and_grad(**arguments, variant="kto", warn_balance=False)
        dkl = np.zeros_like(kl_policy_logps)
    else:
        knobs = {**_VARIANT_KNOBS["kto"], **loss_mistakes}
        loss, dpolicy, dkl = _kto_family(**arguments, **knobs)
    grads = model.backward(policy_backward(dpolicy), cache)
    if np.any(dkl != 0):
        kl_grads = model.backward(kl_backward(dkl), kl_cache)
        grads = {name: grads[name] + kl_grads[name] for name in grads}
    out = {
        "loss": np.float64(loss), "tokens": tokens, "sequence_mask": sequence_mask, "kl_tokens": kl_tokens,
        "kl_sequence_mask": kl_sequence_mask, "logits": logits, "policy_logps": policy_logps,
        "kl_policy_logps": kl_policy_logps,
    }
    out.update({f"grad/{_hf_name(name)}": g for name, g in grads.items()})
    out.update(_metric_entries(metrics))
    return out


def _model_cases() -> list[Case]:
    hf = MODEL_CONFIG
    config = GPTConfig(vocab_size=hf["vocab_size"], max_seq_len=hf["n_positions"], hidden_size=hf["n_embd"],
                       num_layers=hf["n_layer"], num_heads=hf["n_head"], dropout=0.0, dtype="float64")
    B, P, K, V = 4, MODEL_PROMPT_LENGTH, MODEL_COMPLETION_LENGTH, hf["vocab_size"]
    cases = []
    for case_id, description, seed, labels, beta, weights, completion_lengths, kl_sign in [
        ("kl_positive", "a positive KL estimate (z_ref > 0)", 51, (1, 0, 1, 0), 0.5, (1.0, 1.3), (5, 3, 4, 2), 1),
        ("kl_negative", "a negative KL estimate: the clamp sets z_ref = 0", 52, (1, 1, 0, 0), 0.5, (1.2, 0.8),
         (4, 5, 2, 3), -1),
    ]:
        rng = np.random.default_rng(seed)
        policy_params = _model_params(config, rng)
        prompt = rng.integers(0, V, (B, P))
        completion_mask = _completion_mask([0] * B, completion_lengths, K)
        completion = np.where(completion_mask > 0, rng.integers(1, V, (B, K)), 0)  # pad token 0
        base = {"prompt_tokens": prompt, "completion_tokens": completion, "completion_mask": completion_mask,
                "labels": np.array(labels, dtype=bool), "beta": np.float64(beta),
                "desirable_weight": np.float64(weights[0]), "undesirable_weight": np.float64(weights[1])}
        model = GPT(config)
        tokens, sequence_mask = _joined(prompt, completion, completion_mask)
        kl_tokens, kl_mask = _joined(prompt, np.roll(completion, 1, axis=0), np.roll(completion_mask, 1, axis=0))
        policy_kl_logps = sequence_logprobs_forward(model.forward(policy_params, kl_tokens)[0], kl_tokens,
                                                    kl_mask)[0]
        for ref_seed in range(1000):  # deterministic search for a reference with the KL sign this case needs
            ref_rng = np.random.default_rng([seed, ref_seed])
            ref_params = {k: v + 0.05 * ref_rng.standard_normal(v.shape) for k, v in policy_params.items()}
            kl_ref_logps = sequence_logprobs_forward(model.forward(ref_params, kl_tokens)[0], kl_tokens, kl_mask)[0]
            if kl_sign * float(np.mean(policy_kl_logps - kl_ref_logps)) > 0.02:
                break
        else:  # pragma: no cover - the search succeeds for the seeds above
            raise RuntimeError(f"no reference model with KL sign {kl_sign} for model case {case_id}")
        ref_logps = sequence_logprobs_forward(model.forward(ref_params, tokens)[0], tokens, sequence_mask)[0]
        inputs = {**_state_dict_inputs(policy_params, config), **base, "ref_logps": ref_logps,
                  "kl_ref_logps": kl_ref_logps}
        provisional = Case(f"model_kto/kto/{case_id}", "model_kto", "kto", "", inputs, {}, dict(hf))
        expected = _model_kto_outputs(provisional)
        cases.append(_case(provisional.name, "model_kto", "kto", f"{MODEL_FORMULA} Case: {description}.",
                           inputs, expected, dict(hf)))
    return cases


@functools.lru_cache(maxsize=1)
def _cached_cases() -> tuple[Case, ...]:
    return tuple(_kto_loss_cases() + _dpo_cases() + _logprobs_cases() + _sequence_logprobs_cases()
                 + _model_cases())


def generate_cases() -> tuple[Case, ...]:
    """Every reference case, computed in memory with kto_np's own functions (deterministic, read-only)."""
    return _cached_cases()


# ---------------------------------------------------------------------------------------------------
# known mistakes and their mutated formulas


@dataclass(frozen=True)
class Mistake:
    """A known implementation mistake the diagnosis can name."""

    id: str
    title: str
    fix: str


MISTAKES = {m.id: m for m in (
    Mistake("z_not_detached", "z (the KL estimate / reference point) is not detached: gradient flows through it",
            "detach z (TRL: kl = kl.detach()); with z_ref from KL pairs, kl_policy_logps get no gradient"),
    Mistake("z_detached", "z is detached, but the Edifice formula passes gradient through z = mean(beta r)",
            "keep z in the graph (dL/dr_j = beta (g_j - mean_i g_i)), or use stop_z_grad on purpose"),
    Mistake("z_not_clamped", "z_ref is not clamped at 0", "z_ref = max(0, mean(kl_policy_logps - kl_ref_logps))"),
    Mistake("z_clamped", "z is clamped at 0, but the Edifice formula uses the raw batch mean",
            "z = mean_i(beta r_i), negative values included"),
    Mistake("undesirable_sign", "undesirable branch written sigma(-KL - z) instead of sigma(z - KL)",
            "undesirable loss uses sigma(beta (z_ref - r)) (Edifice: sigma(-(KL - z)))"),
    Mistake("beta_twice", "beta applied twice (beta^2 r in the sigmoid)",
            "multiply the log-ratio by beta once"),
    Mistake("beta_missing", "beta not applied (r instead of beta r in the sigmoid)",
            "the sigmoid argument is beta (r - z)"),
    Mistake("weights_normalise_mean", "weights normalise the mean: sum_i w_i loss_i / sum_i w_i",
            "L = mean_i(w_i loss_i): divide by the batch size n, not by the sum of weights"),
    Mistake("logps_mean_not_sum", "token log-probs averaged (over the masked tokens or over T) instead of summed",
            "sum the masked token log-probs per sequence"),
    Mistake("logits_not_shifted", "logits not shifted: position t's logits score token t",
            "logits[:, :-1] score tokens[:, 1:], with completion_mask[:, 1:]"),
    Mistake("logits_shifted_twice", "logits shifted twice: position t's logits score token t + 2",
            "shift once: logits[:, :-1] score tokens[:, 1:] (do not pre-shift the labels as well)"),
    Mistake("logits_shifted", "logits shifted, but the seed contract has no shift: logits[t] score targets[t]",
            "compute_logprobs pairs logits[b, t] with targets[b, t]; shifting is sequence_logprobs' job"),
    Mistake("mask_ignored", "mask ignored: prompt and padding tokens are counted",
            "multiply the token log-probs by the (completion) mask before summing"),
    Mistake("kl_pairs_not_mismatched", "KL estimate from matched pairs (prompt_i, completion_i)",
            "KL pairs are mismatched: prompt_i with completion_{i-1} (TRL rotates completions by one)"),
    Mistake("kl_pairs_rotated_wrong_way", "KL completions rotated the wrong way (completion_{i+1}, not i-1)",
            "kl_completion_i = completion_{i-1 mod B}, as kl_ref_logps were computed (torch.roll(c, 1, 0))"),
)}


class _Mutant(NamedTuple):
    mistake: str
    label: str
    compute: Callable[[Case], dict]


_VARIANT_KNOBS = {
    "edifice": dict(form="edifice", z_source="batch", clamp=False, z_grad=True),
    "edifice_stop_z_grad": dict(form="edifice", z_source="batch", clamp=False, z_grad=False),
    "kto": dict(form="kto", z_source="kl_pairs", clamp=True, z_grad=False),
    "apo_zero_unpaired": dict(form="kto", z_source=None, clamp=False, z_grad=False),
}


def _kto_family(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, *, form, z_source,
                clamp, z_grad, kl_policy_logps=None, kl_ref_logps=None, beta_power=1, undesirable_z_sign=1.0,
                normalise_by_weights=False):
    """The KTO family with switches for the known mistakes: (loss, dL/dpolicy_logps [n], dL/dkl_policy_logps).

    In log-ratio units: u_i = b (r_i - o_i), b = beta ** beta_power, o_i = zr (desirable) or
    undesirable_z_sign * zr (undesirable); zr = mean(r) (z_source "batch", Edifice: z = b zr),
    mean(kl_policy - kl_ref) ("kl_pairs"; 0 without them) or 0, clamped at 0 when clamp.
    loss_i = -w_i sigma(s_i u_i) (form "edifice") or w_i sigma(-s_i u_i) ("kto"; APO-zero is "kto" with
    zr = 0); L = sum_i loss_i / D with D = n, or sum_i w_i when normalise_by_weights.
    """
    labels = np.asarray(labels, dtype=bool)
    r = np.asarray(policy_logps, dtype=np.float64) - np.asarray(ref_logps, dtype=np.float64)  # [n]
    n = r.shape[0]
    b = beta ** beta_power
    signs = np.where(labels, 1.0, -1.0)  # [n] s
    weights = np.where(labels, desirable_weight, undesirable_weight)  # [n] w
    has_kl = kl_policy_logps is not None
    if z_source == "batch":
        raw = float(np.mean(r))
    elif z_source == "kl_pairs" and has_kl:
        raw = float(np.mean(np.asarray(kl_policy_logps) - np.asarray(kl_ref_logps)))
    else:
        raw = 0.0
    z = max(0.0, raw) if clamp else raw
    dz_draw = 1.0 if (not clamp or raw > 0) else 0.0
    offset_sign = np.where(labels, 1.0, undesirable_z_sign)  # [n]
    u = b * (r - offset_sign * z)  # [n]
    per_example = -weights * sigmoid(signs * u) if form == "edifice" else weights * sigmoid(-signs * u)
    denominator = float(weights.sum()) if normalise_by_weights else float(n)
    loss = float(per_example.sum() / denominator)
    dloss_du = -weights * signs * sigmoid(u) * sigmoid(-u) / denominator  # [n] dL/du_i
    dpolicy = b * dloss_du
    dz = -b * float(np.sum(dloss_du * offset_sign))  # dL/dz
    if z_grad and z_source == "batch":
        dpolicy = dpolicy + dz * dz_draw / n
    dkl = np.zeros(np.shape(kl_policy_logps)) if has_kl else None
    if z_grad and z_source == "kl_pairs" and has_kl:
        dkl = np.full(dkl.shape, dz * dz_draw / dkl.shape[0])
    return loss, dpolicy, dkl


def _kto_loss_mutant(mistake: str, knobs: dict) -> _Mutant:
    def compute(case: Case) -> dict:
        inputs = case.inputs
        has_kl = "kl_policy_logps" in inputs
        loss, dpolicy, dkl = _kto_family(
            inputs["policy_logps"], inputs["ref_logps"], inputs["labels"], float(inputs["beta"]),
            float(inputs["desirable_weight"]), float(inputs["undesirable_weight"]),
            kl_policy_logps=inputs.get("kl_policy_logps"), kl_ref_logps=inputs.get("kl_ref_logps"),
            **{**_VARIANT_KNOBS[case.variant], **knobs})
        out = {"loss": np.float64(loss), "grad/policy_logps": dpolicy}
        if has_kl:
            out["grad/kl_policy_logps"] = dkl
        return out

    return _Mutant(mistake, mistake, compute)


_LOSS_MISTAKE_KNOBS = {
    "z_not_detached": dict(z_grad=True),
    "z_detached": dict(z_grad=False),
    "z_not_clamped": dict(clamp=False),
    "z_clamped": dict(clamp=True),
    "undesirable_sign": dict(undesirable_z_sign=-1.0),
    "beta_twice": dict(beta_power=2),
    "beta_missing": dict(beta_power=0),
    "weights_normalise_mean": dict(normalise_by_weights=True),
}
_KTO_VARIANT_MISTAKES = {
    "edifice": ("z_detached", "z_clamped", "undesirable_sign", "beta_twice", "beta_missing",
                "weights_normalise_mean"),
    "edifice_stop_z_grad": ("z_not_detached", "z_clamped", "undesirable_sign", "beta_twice", "beta_missing",
                            "weights_normalise_mean"),
    "kto": ("z_not_detached", "z_not_clamped", "undesirable_sign", "beta_twice", "beta_missing",
            "weights_normalise_mean"),
    "apo_zero_unpaired": ("beta_twice", "beta_missing", "weights_normalise_mean"),
}


def _dpo_mutant(mistake: str, beta_power: int) -> _Mutant:
    def compute(case: Case) -> dict:
        inputs = case.inputs
        loss, (grad_chosen, grad_rejected), _ = dpo_loss_and_grad(
            inputs["policy_chosen_logps"], inputs["policy_rejected_logps"], inputs["ref_chosen_logps"],
            inputs["ref_rejected_logps"], float(inputs["beta"]) ** beta_power)
        return {"loss": np.float64(loss), "grad/policy_chosen_logps": grad_chosen,
                "grad/policy_rejected_logps": grad_rejected}

    return _Mutant(mistake, mistake, compute)


def _logprobs_mutant(mistake: str, label: str, *, shift: int, **options) -> _Mutant:
    def compute(case: Case) -> dict:
        inputs = case.inputs
        tokens = inputs["targets"] if case.kind == "logprobs" else inputs["tokens"]
        mask = inputs["mask"] if case.kind == "logprobs" else inputs["completion_mask"]
        logits = np.asarray(inputs["logits"])
        if case.kind == "logprobs" and shift == 0 and not options:
            logps, cache = logprobs_forward(logits, tokens, mask)
            return {"logps": logps, "grad/logits": logprobs_backward(inputs["upstream"], cache)}
        logps, backward = _token_logps(logits, np.asarray(tokens), mask, shift=shift, **options)
        return {"logps": logps, "grad/logits": backward(np.asarray(inputs["upstream"]))}

    return _Mutant(mistake, label, compute)


def _model_mutant(mistake: str, label: str, **settings) -> _Mutant:
    def compute(case: Case) -> dict:
        outputs = _model_kto_outputs(case, **settings)
        return {k: v for k, v in outputs.items() if not k.startswith("metrics/")}

    return _Mutant(mistake, label, compute)


def _mutants(kind: str, variant: str | None) -> list[_Mutant]:
    """The built-in mutated formulas for a kind and variant, one per known mistake (or form of it)."""
    if kind == "kto_loss":
        return [_kto_loss_mutant(m, _LOSS_MISTAKE_KNOBS[m]) for m in _KTO_VARIANT_MISTAKES[variant]]
    if kind == "dpo_loss":
        return [_dpo_mutant("beta_twice", 2), _dpo_mutant("beta_missing", 0)]
    mean_forms = [("logps_mean_not_sum", "masked mean", dict(reduction="masked_mean")),
                  ("logps_mean_not_sum", "mean over T", dict(reduction="mean_over_time")),
                  ("mask_ignored", "mask_ignored", dict(mask_ignored=True))]
    if kind == "logprobs":
        return ([_logprobs_mutant(m, label, shift=0, **o) for m, label, o in mean_forms]
                + [_logprobs_mutant("logits_shifted", "logits_shifted", shift=1)])
    if kind == "sequence_logprobs":
        return ([_logprobs_mutant(m, label, shift=1, **o) for m, label, o in mean_forms]
                + [_logprobs_mutant("logits_not_shifted", "logits_not_shifted", shift=0),
                   _logprobs_mutant("logits_shifted_twice", "logits_shifted_twice", shift=2)])
    if kind == "model_kto":
        mutants = [
            _model_mutant("kl_pairs_not_mismatched", "kl_pairs_not_mismatched", kl_rotation=0),
            _model_mutant("kl_pairs_rotated_wrong_way", "kl_pairs_rotated_wrong_way", kl_rotation=-1),
            _model_mutant("logits_not_shifted", "logits_not_shifted", logps_options=dict(shift=0)),
            _model_mutant("logits_shifted_twice", "logits_shifted_twice", logps_options=dict(shift=2)),
        ]
        mutants += [_model_mutant(m, label, logps_options=dict(shift=1, **o)) for m, label, o in mean_forms]
        mutants += [_model_mutant(m, m, loss_mistakes=_LOSS_MISTAKE_KNOBS[m])
                    for m in _KTO_VARIANT_MISTAKES["kto"]]
        return mutants
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


# ---------------------------------------------------------------------------------------------------
# export and load


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An .npz (zip of .npy, no pickle) with fixed timestamps and order: the same bytes every time."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, value in arrays.items():
            write_npy_entry(archive, key, value)
    return buffer.getvalue()


def _case_arrays(case: Case) -> dict[str, np.ndarray]:
    arrays = {f"inputs/{k}": v for k, v in case.inputs.items()}
    arrays.update({f"expected/{k}": v for k, v in case.expected.items() if v is not None})
    return arrays


def _array_signature(arr: np.ndarray) -> str:
    """dtype and shape in one string: "float64[4,8,11]", "bool[5]", "float64[]" for a 0-d array."""
    return f"{arr.dtype}[{','.join(str(d) for d in arr.shape)}]"


def _manifest_entry(case: Case, arrays: Mapping[str, np.ndarray], sha256: str) -> dict:
    entry = {
        "name": case.name,
        "file": case.file_name,
        "kind": case.kind,
        "variant": case.variant,
        "formula": case.formula,
        "absent": [k for k, v in case.expected.items() if v is None],
        "arrays": {k: _array_signature(v) for k, v in arrays.items()},
        "sha256": sha256,
    }
    if case.config is not None:
        entry["config"] = dict(case.config)
    return entry


def _manifest(entries: list[dict]) -> dict:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kto_np_version": __version__,
        "dtype": "float64",
        "description": (
            "Reference cases for KTO implementations, computed by kto_np in float64. One .npz per case "
            "(np.load(file, allow_pickle=False)): 'inputs/<name>' are the candidate's arguments, "
            "'expected/<name>' the outputs: loss or logps, grad/<name> = dL/d<name>, metrics/<TRL name>, "
            "model intermediates. labels are bool (True = desirable). A metric listed in 'absent' is None "
            "(its class is absent from the batch). Model state dicts use Hugging Face GPT2LMHeadModel names."
        ),
        "tolerances": {
            "rule": "max|candidate - reference| <= atol + rtol * max|reference|, per array",
            "float64": {k: {"rtol": r, "atol": a} for k, (r, a) in TOLERANCES["float64"].items()},
            "float32": {k: {"rtol": r, "atol": a} for k, (r, a) in TOLERANCES["float32"].items()},
            "note": ("float64 is for candidates computing in float64; float32 for candidates that compute in "
                     "float32 (or bfloat16 upcast): looser, and gradients looser than losses. "
                     "finite_differences applies when the oracle differentiates a loss-only candidate."),
        },
        "cases": entries,
    }


def export(out_dir, *, overwrite: bool = False) -> Path:
    """Write every reference case to out_dir (one .npz each plus manifest.json); returns the manifest path.

    Deterministic (the same bytes on every run) and atomic per file. Refuses a non-empty out_dir unless
    overwrite=True; with overwrite, case files listed by an old manifest and not rewritten are removed.
    """
    check_bool("overwrite", overwrite)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir must be a directory, got the file {str(out)!r}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"out_dir {str(out)!r} is not empty; pass overwrite=True "
                              "(kto-np oracle export --overwrite) to replace its cases")
    out.mkdir(parents=True, exist_ok=True)
    old_files = _old_case_files(out / MANIFEST_NAME)
    entries = []
    for case in generate_cases():
        arrays = _case_arrays(case)
        data = _npz_bytes(arrays)
        with atomic_write(out / case.file_name, "wb") as file:
            file.write(data)
        entries.append(_manifest_entry(case, arrays, hashlib.sha256(data).hexdigest()))
    with atomic_write(out / MANIFEST_NAME, "w") as file:
        file.write(json.dumps(_manifest(entries), indent=1) + "\n")
    for stale in old_files - {e["file"] for e in entries}:
        (out / stale).unlink(missing_ok=True)
    return out / MANIFEST_NAME


def _old_case_files(manifest_path: Path) -> set[str]:
    """Case files an existing kto_np manifest lists (plain names only), to clean up on overwrite."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = {e["file"] for e in manifest["cases"]} if manifest.get("format") == FORMAT_NAME else set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {f for f in files if isinstance(f, str) and f.endswith(".npz") and Path(f).name == f}


def _read_manifest(path) -> tuple[Path, dict]:
    path = Path(path)
    manifest_path = path / MANIFEST_NAME if path.is_dir() else path
    if not manifest_path.is_file():
        raise ValueError(f"{manifest_path}: missing file (no oracle manifest; run export first)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{manifest_path}: not a readable JSON manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{manifest_path}: not a {FORMAT_NAME} manifest (format = "
                         f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{manifest_path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{manifest_path}: format_version {version} is newer than this kto_np "
                         f"({__version__}) reads (up to {FORMAT_VERSION}); upgrade kto_np")
    if not isinstance(manifest.get("cases"), list) or not manifest["cases"]:
        raise ValueError(f"{manifest_path}: the manifest lists no cases")
    return manifest_path, manifest


def _load_case(folder: Path, entry: Mapping) -> Case:
    try:
        name, file_name, kind, variant, formula = (entry[k] for k in ("name", "file", "kind", "variant", "formula"))
        declared, absent, sha256 = entry["arrays"], entry["absent"], entry["sha256"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{folder / MANIFEST_NAME}: case entry {entry!r:.80} lacks {exc}") from exc
    if kind not in KINDS or variant not in VARIANTS[kind]:
        raise ValueError(f"{folder / MANIFEST_NAME}: case {name!r} has unknown kind/variant {kind!r}/{variant!r}")
    if not isinstance(file_name, str) or Path(file_name).name != file_name:
        raise ValueError(f"{folder / MANIFEST_NAME}: case {name!r} has an invalid file name {file_name!r}")
    path = folder / file_name
    if not path.is_file():
        raise ValueError(f"{path}: missing file (listed in the manifest for case {name!r})")
    data = path.read_bytes()
    arrays = {}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            for key in npz.files:
                arrays[key] = npz[key]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise ValueError(f"{path}: cannot read the arrays (truncated or corrupt file?): {exc}") from exc
    if set(arrays) != set(declared):
        missing, extra = sorted(set(declared) - set(arrays)), sorted(set(arrays) - set(declared))
        raise ValueError(f"{path}: arrays do not match the manifest (missing {missing}, unexpected {extra})")
    for key, signature in declared.items():
        if _array_signature(arrays[key]) != signature:
            raise ValueError(f"{path}: array {key!r} has shape and dtype {_array_signature(arrays[key])}, the "
                             f"manifest says {signature} (truncated or modified file?)")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: content does not match the manifest's sha256 (modified file?)")
    inputs = {k[len("inputs/"):]: v for k, v in arrays.items() if k.startswith("inputs/")}
    expected = {k[len("expected/"):]: v for k, v in arrays.items() if k.startswith("expected/")}
    expected.update({k: None for k in absent})
    return _case(name, kind, variant, formula, inputs, expected, entry.get("config"))


def load_cases(path) -> tuple[Case, ...]:
    """Read cases written by export (path: the folder or its manifest.json).

    Raises ValueError naming the file for a newer format version, a missing file, an unreadable or
    truncated array, or arrays that do not match the manifest (names, shapes, dtypes, sha256).
    """
    manifest_path, manifest = _read_manifest(path)
    return tuple(_load_case(manifest_path.parent, entry) for entry in manifest["cases"])


# ---------------------------------------------------------------------------------------------------
# calling a candidate: NumPy first, then torch (autograd), then finite differences


def _is_torch(value) -> bool:
    return type(value).__module__.split(".")[0] == "torch"


def _holds_torch(value) -> bool:
    if _is_torch(value):
        return True
    if isinstance(value, Mapping):
        return any(_holds_torch(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return any(_holds_torch(v) for v in value)
    return False


def _import_torch():
    try:
        import torch  # noqa: PLC0415  (optional: only for torch candidates)
    except ImportError:
        return None
    return torch


def _as_float64(value, what: str) -> np.ndarray:
    """A candidate's number or array as a float64 NumPy array (torch tensors detached)."""
    if _is_torch(value):
        value = value.detach().cpu()
        if value.is_floating_point() or value.is_complex():
            value = value.double()
        value = value.numpy()
    try:
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"dtype {arr.dtype}")
        return arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be a number or an array of numbers, got {type(value).__name__}") from exc


def _dtype_of(value) -> str:
    return str(getattr(value, "dtype", type(value).__name__)).replace("torch.", "")


class _Arguments(NamedTuple):
    args: list
    kwargs: dict
    differentiable: dict  # gradient name -> the object handed to the candidate


def _call_arguments(case: Case, mode: str, overrides: Mapping[str, np.ndarray] | None = None,
                    requires_grad: bool = False) -> _Arguments:
    """The candidate's arguments for `case` as fresh NumPy copies (mode "numpy") or torch float64 tensors.

    overrides replace differentiable inputs (finite differences); requires_grad marks them for autograd.
    """
    torch = _import_torch() if mode == "torch" else None
    inputs = {**case.inputs, **(overrides or {})}
    differentiable: dict[str, Any] = {}

    def convert(name, grad_name=None):
        value = inputs[name]
        if torch is None:
            arr = np.array(value, copy=True)
        else:
            arr = torch.tensor(np.array(value, copy=True))
            if grad_name is not None and requires_grad:
                arr.requires_grad_(True)
        if grad_name is not None:
            differentiable[grad_name] = arr
        return arr

    kind = case.kind
    if kind == "kto_loss":
        kwargs = {"policy_logps": convert("policy_logps", "policy_logps"), "ref_logps": convert("ref_logps"),
                  "labels": convert("labels")}
        kwargs.update({k: float(inputs[k]) for k in ("beta", "desirable_weight", "undesirable_weight")})
        if case.variant == "kto":
            has_kl = "kl_policy_logps" in inputs
            kwargs["kl_policy_logps"] = convert("kl_policy_logps", "kl_policy_logps") if has_kl else None
            kwargs["kl_ref_logps"] = convert("kl_ref_logps") if has_kl else None
        return _Arguments([], kwargs, differentiable)
    if kind == "dpo_loss":
        args = [convert("policy_chosen_logps", "policy_chosen_logps"),
                convert("policy_rejected_logps", "policy_rejected_logps"),
                convert("ref_chosen_logps"), convert("ref_rejected_logps"), float(inputs["beta"])]
        return _Arguments(args, {}, differentiable)
    if kind == "logprobs":
        return _Arguments([convert("logits", "logits"), convert("targets"), convert("mask")], {}, differentiable)
    if kind == "sequence_logprobs":
        args = [convert("logits", "logits"), convert("tokens"), convert("completion_mask")]
        return _Arguments(args, {}, differentiable)
    # model_kto
    trainable = set(_trainable_names(case))
    state_dict = {}
    for key in sorted(k for k in inputs if k.startswith("state_dict/")):
        name = key[len("state_dict/"):]
        if name not in trainable:
            continue
        state_dict[name] = convert(key, name)
    if "lm_head.weight" not in trainable:  # tied: the same object as the embedding, as in GPT2LMHeadModel
        state_dict["lm_head.weight"] = state_dict[HF_PREFIX + "wte.weight"]
    kwargs = {"state_dict": state_dict, "config": dict(case.config)}
    for name in ("prompt_tokens", "completion_tokens", "completion_mask", "labels", "ref_logps", "kl_ref_logps"):
        kwargs[name] = convert(name)
    kwargs.update({k: float(inputs[k]) for k in ("beta", "desirable_weight", "undesirable_weight")})
    return _Arguments([], kwargs, differentiable)


class _Output(NamedTuple):
    primary: Any  # the loss (scalar) or the per-sequence log-probs [B]
    grads: dict  # gradient name -> array, as returned by the candidate
    vjp: Callable | None  # logprobs kinds: dlogps -> dlogits
    extras: dict  # metrics and intermediates the candidate returned


def _parse_output(kind: str, out) -> _Output:
    """Split a candidate's return value: loss | (loss, grad) | (loss, grad, metrics) | dict; for the
    log-prob kinds: logps | (logps, vjp)."""
    if kind in ("logprobs", "sequence_logprobs"):
        if isinstance(out, tuple):
            if len(out) != 2 or not callable(out[1]):
                raise TypeError(f"a {kind} candidate returns logps [B] or (logps, vjp) with vjp(dlogps) -> "
                                f"dlogits, got a tuple of {len(out)}")
            return _Output(out[0], {}, out[1], {})
        return _Output(out, {}, None, {})
    extras: dict = {}
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise TypeError(f"a candidate returning a dict must include 'loss', got keys {sorted(out)}")
        primary, grads = out["loss"], out.get("grads", out.get("grad"))
        extras = {k: v for k, v in out.items() if k not in ("loss", "grads", "grad")}
    elif isinstance(out, (tuple, list)):
        if len(out) not in (2, 3):
            raise TypeError(f"a {kind} candidate returns loss, (loss, grad) or (loss, grad, metrics), "
                            f"got a sequence of {len(out)}")
        primary, grads = out[0], out[1]
        if len(out) == 3 and out[2] is not None:
            if not isinstance(out[2], Mapping):
                raise TypeError(f"the third returned value must be a dict of metrics, got {type(out[2]).__name__}")
            extras = dict(out[2])
    else:
        primary, grads = out, None
    return _Output(primary, _grad_dict(kind, grads), None, extras)


def _grad_dict(kind: str, grads) -> dict:
    if grads is None:
        return {}
    if kind == "kto_loss":
        return dict(grads) if isinstance(grads, Mapping) else {"policy_logps": grads}
    if kind == "dpo_loss":
        if isinstance(grads, Mapping):
            return dict(grads)
        if isinstance(grads, (tuple, list)) and len(grads) == 2:
            return {"policy_chosen_logps": grads[0], "policy_rejected_logps": grads[1]}
        raise TypeError("a dpo_loss candidate's gradient is (grad_chosen, grad_rejected) or a dict")
    if not isinstance(grads, Mapping):
        raise TypeError(f"a model_kto candidate's gradients are a dict name -> array, got {type(grads).__name__}")
    out = {}
    for name, value in grads.items():
        out[name if name.startswith(HF_PREFIX) or name == "lm_head.weight" else HF_PREFIX + name] = value
    return out


class _Evaluation(NamedTuple):
    values: dict  # quantity -> (candidate float64 array, source, projection or None)
    notes: list


class CandidateError(Exception):
    """The candidate raised, or returned something the oracle cannot read."""


def _short(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _call(candidate, case: Case, mode: str, notes: list, overrides=None, requires_grad=False):
    arguments = _call_arguments(case, mode, overrides, requires_grad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = candidate(*arguments.args, **arguments.kwargs)
    for w in caught:
        message = f"{case.name}: candidate warned ({mode} inputs): {w.category.__name__}: {w.message}"
        if message not in notes:
            notes.append(message)
    return out, arguments


def _objective(kind: str, case: Case, primary):
    """The scalar that gradients are taken of: the loss, or sum_b upstream_b logps_b."""
    if kind in ("logprobs", "sequence_logprobs"):
        upstream = case.inputs["upstream"]
        if _is_torch(primary):
            return (primary * primary.new_tensor(np.array(upstream))).sum()
        return float(np.sum(_as_float64(primary, "logps") * upstream))
    return primary


def _evaluate(candidate, case: Case, tolerance: str) -> _Evaluation:
    """Call the candidate on one case and collect every quantity it yields, with where it came from."""
    kind, notes = case.kind, []
    numpy_error = None
    try:
        out, arguments = _call(candidate, case, "numpy", notes)
        mode = "torch" if _holds_torch(out) else "numpy"
    except Exception as exc:  # noqa: BLE001 - any failure on NumPy input means: try torch
        numpy_error, mode = exc, "torch"
    if mode == "torch":
        if _import_torch() is None:
            raise CandidateError(f"raised on NumPy input ({_short(numpy_error)}) and torch is not installed")
        try:
            out, arguments = _call(candidate, case, "torch", notes, requires_grad=True)
        except Exception as exc:  # noqa: BLE001
            first = f"on NumPy input: {_short(numpy_error)}; " if numpy_error else ""
            raise CandidateError(f"raised {first}on torch input: {_short(exc)}") from exc
    try:
        parsed = _parse_output(kind, out)
    except TypeError as exc:
        raise CandidateError(str(exc)) from exc

    values: dict[str, tuple] = {}
    primary_name = "logps" if kind in ("logprobs", "sequence_logprobs") else "loss"
    values[primary_name] = (_as_float64(parsed.primary, primary_name), "returned", None)
    if tolerance == "float64" and _dtype_of(parsed.primary) in ("float32", "float16", "bfloat16"):
        notes.append(f"{case.name}: the candidate returned {_dtype_of(parsed.primary)}; "
                     "for a float32 implementation use tolerance='float32'")
    grad_names = list(arguments.differentiable)
    for name, value in parsed.grads.items():
        if name in grad_names:
            values[f"grad/{name}"] = (_as_float64(value, f"grad/{name}"), "returned", None)
        else:
            notes.append(f"{case.name}: returned gradient {name!r} not compared (no such input)")
    for name, value in parsed.extras.items():
        key = name if name in case.expected else f"metrics/{name}"
        if key in case.expected:
            values[key] = (None if value is None else _as_float64(value, key), "returned", None)
        else:
            notes.append(f"{case.name}: returned {name!r} not compared (no reference value)")
    missing = [n for n in grad_names if f"grad/{n}" not in values]
    if kind == "model_kto" and parsed.grads:  # a returned gradient dict must be complete: no filling in
        missing = []
    if parsed.vjp is not None and "logits" in missing:
        upstream = case.inputs["upstream"]
        if mode == "torch":
            upstream = _import_torch().tensor(np.array(upstream))
        values["grad/logits"] = (_as_float64(parsed.vjp(upstream), "vjp(upstream)"), "vjp", None)
        missing.remove("logits")
    if not missing:
        return _Evaluation(values, notes)
    objective = _objective(kind, case, parsed.primary)
    if mode == "torch" and _is_torch(objective) and objective.requires_grad:
        torch = _import_torch()
        tensors = [arguments.differentiable[n] for n in missing]
        grads = torch.autograd.grad(objective, tensors, allow_unused=True)
        for name, tensor, grad in zip(missing, tensors, grads):
            values[f"grad/{name}"] = (np.zeros(tuple(tensor.shape)) if grad is None
                                      else _as_float64(grad, f"grad/{name}"), "autograd", None)
        return _Evaluation(values, notes)
    values.update(_finite_difference_grads(candidate, case, mode, missing, tolerance, notes))
    return _Evaluation(values, notes)


def _fd_matches_reference(case: Case, name: str) -> bool:
    """Whether d(loss)/d(name) by finite differences is the reference gradient: not where the reference
    stops a gradient the loss value depends on (detached z)."""
    if case.kind == "kto_loss":
        return case.variant != "edifice_stop_z_grad" and name != "kl_policy_logps"
    if case.kind == "model_kto":
        raw_kl = np.mean(case.expected["kl_policy_logps"] - case.inputs["kl_ref_logps"])
        return bool(raw_kl < 0)  # clamped: z_ref is locally constant
    return True


def _finite_difference_grads(candidate, case: Case, mode: str, names: list, tolerance: str, notes: list) -> dict:
    """Central differences of the candidate's objective: every entry of small inputs, K random unit
    directions of large ones and of model parameters (the quantity is then the K directional derivatives)."""
    step = FD_STEP[tolerance]

    def objective_at(overrides) -> float:
        out, _ = _call(candidate, case, mode, notes, overrides)
        return float(_as_float64(_objective(case.kind, case, _parse_output(case.kind, out).primary), "objective"))

    values = {}
    for name in names:
        input_key = f"state_dict/{name}" if case.kind == "model_kto" else name
        if not _fd_matches_reference(case, name):
            values[f"grad/{name}"] = (None, "not checked", None)
            continue
        base = np.asarray(case.inputs[input_key], dtype=np.float64)
        if base.size <= FD_FULL_MAX_ENTRIES and case.kind != "model_kto":
            grad = np.zeros(base.shape)
            for index in np.ndindex(*base.shape):
                plus, minus = base.copy(), base.copy()
                plus[index] += step
                minus[index] -= step
                grad[index] = (objective_at({input_key: plus}) - objective_at({input_key: minus})) / (2 * step)
            values[f"grad/{name}"] = (grad, "finite differences", None)
            continue
        rng = np.random.default_rng(_stable_seed(case.name, name))
        directions = rng.standard_normal((FD_DIRECTIONS, *base.shape))  # [K, ...]
        directions /= np.sqrt((directions ** 2).reshape(FD_DIRECTIONS, -1).sum(axis=1)).reshape(
            -1, *([1] * base.ndim))
        derivatives = np.array([
            (objective_at({input_key: base + step * u}) - objective_at({input_key: base - step * u})) / (2 * step)
            for u in directions])
        values[f"grad/{name}"] = (derivatives, f"finite differences ({FD_DIRECTIONS} directions)",
                                  _DirectionalProjection(directions))
    return values


def _stable_seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("/".join(parts).encode()).digest()[:4], "little")


class _DirectionalProjection(NamedTuple):
    directions: np.ndarray  # [K, *shape] unit vectors

    def __call__(self, full: np.ndarray) -> np.ndarray:
        return np.array([float(np.sum(full * u)) for u in self.directions])


# ---------------------------------------------------------------------------------------------------
# comparing, reporting, diagnosing


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


def _quantity_class(quantity: str, source: str) -> str:
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


def _errors(candidate: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    """(max|c - r|, max|r|, max|c - r| / max|r|); NaN in c, or any error against an all-zero r, is inf."""
    if candidate.size == 0:
        return 0.0, 0.0, 0.0
    diff = np.abs(candidate - reference)
    max_abs = float(np.max(np.where(np.isfinite(diff), diff, np.inf)))
    scale = float(np.max(np.abs(reference)))
    if max_abs == 0:
        return 0.0, scale, 0.0
    return max_abs, scale, (max_abs / scale if scale > 0 else math.inf)


def _agrees(candidate, reference, rtol: float, atol: float) -> bool:
    if candidate is None or reference is None:
        return candidate is None and reference is None
    if candidate.shape != reference.shape:
        return False
    both_nan = np.isnan(candidate) & np.isnan(reference)
    if np.any(np.isnan(candidate) != np.isnan(reference)):
        return False
    c, r = np.where(both_nan, 0.0, candidate), np.where(both_nan, 0.0, reference)
    max_abs, scale, _ = _errors(c, r)
    return max_abs <= atol + rtol * scale


def _compare(case: str, quantity: str, source: str, candidate, reference, tolerance: str) -> Check:
    rtol, atol = TOLERANCES[tolerance][_quantity_class(quantity, source)]
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
    max_abs, scale, rel = _errors(candidate, reference)
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

    @property
    def passed(self) -> bool:
        compared = [c for c in self.checks if not c.skipped]
        return bool(compared) and not self.errors and all(c.passed for c in compared)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def __str__(self) -> str:
        title = (f"kto_np {__version__} gradient oracle: kind={self.kind}"
                 + (f" variant={self.variant}" if self.variant else "")
                 + f", {len(self.cases)} cases, tolerance {self.tolerance}")
        case_width = max([len("case")] + [len(c.case) for c in self.checks]) + 2
        quantity_width = max([len("quantity")] + [len(c.quantity) for c in self.checks]) + 2
        header = (f"{'case':<{case_width}}{'quantity':<{quantity_width}}{'source':<20}{'max abs err':>12}"
                  f"{'rel err':>10}{'rtol':>8}  result")
        lines = [title, header, "-" * len(header)]
        for c in self.checks:
            result = "skip" if c.skipped else ("pass" if c.passed else "FAIL")
            lines.append(f"{c.case:<{case_width}}{c.quantity:<{quantity_width}}{c.source:<20}"
                         f"{c.max_abs_error:>12.2e}{c.rel_error:>10.2e}{c.rtol:>8.0e}  {result}")
            if c.mismatch_index is not None:
                where = f" at {list(c.mismatch_index)}" if c.mismatch_index else ""
                lines.append(f"{'':<{case_width}}  first mismatch{where}: candidate {c.candidate_value:.12g}"
                             f"  reference {c.reference_value:.12g}")
            if c.note and (not c.passed or c.skipped):
                lines.append(f"{'':<{case_width}}  {c.note}")
        for case, message in self.errors.items():
            lines.append(f"{case}: ERROR, the candidate {message}")
        lines += [f"note: {n}" for n in self.notes]
        compared = [c for c in self.checks if not c.skipped]
        failed = [c for c in compared if not c.passed]
        verdict = "PASSED" if self.passed else "FAILED"
        lines.append(f"{verdict}: {len(compared) - len(failed)}/{len(compared)} checks passed, "
                     f"{len(self.errors)} case(s) raised, {len(self.checks) - len(compared)} skipped")
        lines.append(f"diagnosis: {self.diagnosis}")
        return "\n".join(lines)


def _diagnose(kind: str, variant: str | None, cases: Sequence[Case], candidate_values: dict,
              report: Report) -> Diagnosis:
    """Name the known mistakes whose mutated formulas reproduce every failing number of the candidate.

    A mutant matches when, on every case and quantity the candidate gave (loss, gradients, log-probs,
    intermediates; metrics aside), the candidate agrees with the mutant within the tolerance, the mutant
    differs from the reference somewhere there, and every failing check is one the mutant accounts for.
    """
    if report.passed:
        return Diagnosis((), "all checks passed")
    failing = {(c.case, c.quantity) for c in report.failures if not c.quantity.startswith("metrics/")}
    if not candidate_values:
        return Diagnosis((), "the candidate raised on every case: nothing to compare with the known mistakes")
    by_name = {case.name: case for case in cases}
    matches, scores = [], []
    for mutant in _mutants(kind, variant):
        agree, distinguishable, explained, compared = True, False, set(), 0
        for case_name, quantities in candidate_values.items():
            outputs = mutant.compute(by_name[case_name])
            for quantity, (value, source, projection) in quantities.items():
                if quantity not in outputs or value is None or quantity.startswith("metrics/"):
                    continue
                mutated = outputs[quantity]
                reference = by_name[case_name].expected[quantity]
                if projection is not None:
                    mutated, reference = projection(mutated), projection(reference)
                rtol, atol = TOLERANCES[report.tolerance][_quantity_class(quantity, source)]
                compared += 1
                if _agrees(value, np.asarray(mutated, dtype=np.float64), rtol, atol):
                    explained.add((case_name, quantity))
                else:
                    agree = False
                if not _agrees(np.asarray(mutated, dtype=np.float64), np.asarray(reference, dtype=np.float64),
                               rtol, atol):
                    distinguishable = True
        covered = failing <= explained
        if agree and distinguishable and covered and compared:
            matches.append(mutant)
        scores.append((len(failing & explained), mutant))
    if matches:
        ids = tuple(dict.fromkeys(m.mistake for m in matches))
        text = "; ".join(f"{i}: {MISTAKES[i].title} (fix: {MISTAKES[i].fix})" for i in ids)
        return Diagnosis(ids, f"matches known mistake{'s' if len(ids) > 1 else ''} {text}")
    best_count, best = max(scores, key=lambda s: s[0]) if scores else (0, None)
    if best is None or best_count == 0:
        return Diagnosis((), "no known mistake matches these numbers")
    return Diagnosis((), f"no known mistake matches every failing number; closest: {best.mistake} "
                         f"({MISTAKES[best.mistake].title}) reproduces {best_count} of {len(failing)} "
                         "failing checks", closest=best.mistake)


def _resolve_variant(kind: str, variant: str | None) -> str | None:
    check_choice("kind", kind, KINDS)
    allowed = VARIANTS[kind]
    if variant is None:
        return allowed[0]
    if allowed == (None,):
        raise ValueError(f"variant must be None for kind {kind!r} (it has no variants), got {variant!r}")
    return check_choice("variant", variant, allowed)


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
           tolerance: str = "float64") -> Report:
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
    variant = _resolve_variant(kind, variant)
    check_choice("tolerance", tolerance, tuple(TOLERANCES))
    selected = _select_cases(cases, kind, variant)
    report = Report(kind, variant, tolerance, [c.name for c in selected])
    candidate_values: dict[str, dict] = {}
    for case in selected:
        try:
            evaluation = _evaluate(candidate, case, tolerance)
        except CandidateError as exc:
            report.errors[case.name] = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - a candidate's failure is a finding, not a crash
            report.errors[case.name] = f"failed: {_short(exc)}"
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
            report.checks.append(_compare(case.name, quantity, source, value, reference, tolerance))
        for quantity, (value, source, _) in evaluation.values.items():
            if quantity not in expected_names:
                report.checks.append(_compare(case.name, quantity, source, value, case.expected[quantity],
                                              tolerance))
    report.diagnosis = _diagnose(kind, variant, selected, candidate_values, report)
    return report


# ---------------------------------------------------------------------------------------------------
# our own implementation as a candidate, and the command-line entry points


def builtin_candidate(kind: str = "kto_loss", variant: str | None = None) -> Callable:
    """kto_np's own functions wrapped as a candidate of `kind` (they pass every case)."""
    variant = _resolve_variant(kind, variant)
    if kind == "kto_loss":
        def kto_candidate(**kwargs):
            inputs = {k: v for k, v in kwargs.items() if v is not None}
            loss, grad, metrics = kto_loss_and_grad(**_kto_keywords(inputs, variant))
            grads = {"policy_logps": grad}
            if "kl_policy_logps" in inputs:  # z_ref is detached: no gradient reaches the KL pairs
                grads["kl_policy_logps"] = np.zeros_like(np.asarray(inputs["kl_policy_logps"]))
            return loss, grads, metrics
        return kto_candidate
    if kind == "dpo_loss":
        return dpo_loss_and_grad
    if kind in ("logprobs", "sequence_logprobs"):
        forward, backward = ((logprobs_forward, logprobs_backward) if kind == "logprobs"
                             else (sequence_logprobs_forward, sequence_logprobs_backward))

        def logprobs_candidate(logits, tokens, mask):
            logps, cache = forward(logits, tokens, mask)
            return logps, (lambda dlogps: backward(dlogps, cache))
        return logprobs_candidate

    def model_candidate(state_dict, config, **inputs):
        case = Case("candidate", "model_kto", "kto", "",
                    {**{f"state_dict/{k}": v for k, v in state_dict.items()}, **inputs}, {}, config)
        outputs = _model_kto_outputs(case)
        grads = {k[len("grad/"):]: v for k, v in outputs.items() if k.startswith("grad/")}
        metrics = {k[len("metrics/"):]: v for k, v in outputs.items() if k.startswith("metrics/")}
        return {"loss": outputs["loss"], "grads": grads, "logits": outputs["logits"],
                "policy_logps": outputs["policy_logps"], "kl_policy_logps": outputs["kl_policy_logps"],
                "kl_tokens": outputs["kl_tokens"], **metrics}
    return model_candidate


def load_callable(spec: str) -> Callable:
    """The function named by "package.module:function" (or "path/to/file.py:function"; attribute paths
    like "module:Class.method" work too). Errors name the spec and what is wrong."""
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string 'package.module:function', got {type(spec).__name__}")
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"spec must look like 'package.module:function', got {spec!r}")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ImportError(f"spec {spec!r}: no file {module_name!r}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise ImportError(f"spec {spec!r}: running {module_name!r} failed: {_short(exc)}") from exc
    else:
        added = os.getcwd() not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ImportError(f"spec {spec!r}: cannot import module {module_name!r}: {exc}") from exc
        finally:
            if added:
                sys.path.remove(os.getcwd())
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise AttributeError(f"spec {spec!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"spec {spec!r}: {attribute!r} is a {type(target).__name__}, not a callable")
    return target


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
