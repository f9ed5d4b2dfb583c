"""The known mistakes: a catalogue (id, title, fix) and one mutated formula per mistake or form of it.

These are the only deliberate second KTO formulas in kto_np: `_kto_family` is the KTO loss family with a
switch per mistake, `_token_logps` the sequence log-probs with the wrong shift, reduction or mask. The
diagnosis (report.diagnose) names a mistake when its mutant reproduces a failing candidate's numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from ...dpo import dpo_loss_and_grad
from ...edifice import Edifice, EdificeConfig
from ...logprobs import logprobs_backward, logprobs_forward, sequence_logprobs_backward, sequence_logprobs_forward
from ...losses import sigmoid
from .reference import (
    KINDS,
    PIPELINE_KINDS,
    Case,
    edifice_params_from_inputs,
    hf_name,
    model_case_batch,
    model_from_case,
    pipeline_part,
)


@dataclass(frozen=True)
class Mistake:
    """A known implementation mistake the diagnosis can name."""

    id: str
    title: str
    fix: str
    seen_in: str = ""  # where it was found in real code (../shared/KTO_MISTAKES.md), "" when not known


# the catalogue of implementation mistakes (data.MISTAKES is another thing: the toy task's wrong answers)
KNOWN_MISTAKES = {m.id: m for m in (
    Mistake("z_not_detached", "z (the KL estimate / reference point) is not detached: gradient flows through it",
            "detach z (TRL: kl = kl.detach()); with z_ref from KL pairs, kl_policy_logps get no gradient"),
    Mistake("z_detached", "z is detached, but the variant's formula passes gradient through z (Edifice: "
            "z = mean(beta r); kto_pair: the other class's clamped mean log-ratio)",
            "keep z in the graph (Edifice: dL/dr_j = beta (g_j - mean_i g_i)), or use stop_z_grad (Edifice) or "
            "variant kto (detached z from KL pairs) on purpose"),
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
    Mistake("kl_pairs_rotated_wrong_way", "KL completions rotated the other way than the cases declare "
            "(completion_{i+1} for kl_rotation -1, completion_{i-1} for +1)",
            "rotate as kl_ref_logps were computed: kl_completion_i = completion_{(i + kl_rotation) mod B} "
            "(TRL, kl_rotation -1: torch.roll(c, 1, 0)); or check with --kl-rotation matching your code"),
    Mistake("weights_ignored", "class weights ignored: desirable_weight and undesirable_weight taken as 1",
            "multiply each example's loss by its class weight (lambda_D or lambda_U); an implementation "
            "without class weights passes only the unit_weights cases"),
)}


class _Mutant(NamedTuple):
    mistake: str
    label: str
    compute: Callable[[Case], dict]
    metrics: bool = False  # the mutant is about the metrics: report.diagnose compares them too
    match: Callable | None = None  # (candidate_values, cases by name) -> bool, for mistakes with no fixed numbers


_VARIANT_KNOBS = {
    "edifice": dict(form="edifice", z_source="batch", clamp=False, z_grad=True),
    "edifice_stop_z_grad": dict(form="edifice", z_source="batch", clamp=False, z_grad=False),
    "kto": dict(form="kto", z_source="kl_pairs", clamp=True, z_grad=False),
    "apo_zero_unpaired": dict(form="kto", z_source=None, clamp=False, z_grad=False),
}


def _kto_family(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, *, form, z_source,
                clamp, z_grad, kl_policy_logps=None, kl_ref_logps=None, beta_power=1, undesirable_z_sign=1.0,
                normalise_by_weights=False, ignore_weights=False, undesirable_loss_sign=1.0):
    """The KTO family with switches for the known mistakes: (loss, dL/dpolicy_logps [n], dL/dkl_policy_logps).

    In log-ratio units: u_i = b (r_i - o_i), b = beta ** beta_power, o_i = zr (desirable) or
    undesirable_z_sign * zr (undesirable); zr = mean(r) (z_source "batch", Edifice: z = b zr),
    mean(kl_policy - kl_ref) ("kl_pairs"; 0 without them) or 0, clamped at 0 when clamp.
    loss_i = -w_i sigma(s_i u_i) (form "edifice") or w_i sigma(-s_i u_i) ("kto"; APO-zero is "kto" with
    zr = 0); an undesirable loss_i times undesirable_loss_sign (-1: subtracted, not added); L = sum_i loss_i / D
    with D = n, or sum_i w_i when normalise_by_weights.
    """
    labels = np.asarray(labels, dtype=bool)
    r = np.asarray(policy_logps, dtype=np.float64) - np.asarray(ref_logps, dtype=np.float64)  # [n]
    n = r.shape[0]
    b = beta ** beta_power
    signs = np.where(labels, 1.0, -1.0)  # [n] s
    weights = np.ones(n) if ignore_weights else np.where(labels, desirable_weight, undesirable_weight)  # [n] w
    weights = weights * np.where(labels, 1.0, undesirable_loss_sign)  # a subtracted undesirable term: w_U < 0
    has_kl = kl_policy_logps is not None
    if z_source == "batch":
        raw = float(np.mean(r))
    elif z_source == "kl_pairs" and has_kl:
        raw = float(np.mean(np.asarray(kl_policy_logps) - np.asarray(kl_ref_logps)))
    else:
        raw = 0.0
    z = max(0.0, raw) if clamp else raw
    dz_draw = 1.0 if (not clamp or raw >= 0) else 0.0  # at raw = 0 the gradient passes, as torch's clamp does
    offset_sign = np.where(labels, 1.0, undesirable_z_sign)  # [n]
    u = b * (r - offset_sign * z)  # [n]
    per_example = -weights * sigmoid(signs * u) if form == "edifice" else weights * sigmoid(-signs * u)
    denominator = float(np.abs(weights).sum()) if normalise_by_weights else float(n)
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


def _token_logps(logits, tokens, mask, *, shift: int = 1, reduction: str = "sum", mask_ignored: bool = False,
                 prompt_in_mask: bool = False):
    """Per-sequence log-probs where logits at t score tokens[t + shift], and a backward dlogps -> dlogits.

    shift=1, reduction="sum", mask_ignored=False is sequence_logprobs itself; the other settings are the
    known mistakes (shift 0 or 2, "masked_mean" or "mean_over_time", the mask ignored, the prompt tokens
    (those before the first completion token) inside the mask).
    """
    if prompt_in_mask:
        mask = np.where(np.cumsum(mask, axis=1) == 0, 1.0, np.asarray(mask, dtype=np.float64))
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


def _references(reference: str | None, ref_logps, kl_ref_logps, policy_logps, kl_policy_logps):
    """(ref_logps, kl_ref_logps) as a code with a missing reference sees them: None (as given), "missing"
    (r = log pi: the reference log-probs taken as 0; the KL pairs' kept), "missing_kl" (both taken as 0) or
    "policy" (the policy is the reference: r = 0 and every KL log-ratio 0)."""
    if reference in ("missing", "missing_kl"):
        ref_logps = np.zeros(np.shape(ref_logps))
        if reference == "missing_kl" and kl_ref_logps is not None:
            kl_ref_logps = np.zeros(np.shape(kl_ref_logps))
    elif reference == "policy":
        ref_logps = np.array(policy_logps, dtype=np.float64)
        kl_ref_logps = None if kl_ref_logps is None else np.array(kl_policy_logps, dtype=np.float64)
    return ref_logps, kl_ref_logps


def _model_mutant_outputs(case: Case, *, pairs: str = "declared", logps_options: Mapping | None = None,
                          loss_mistakes: Mapping | None = None, reference: str | None = None
                          ) -> dict[str, np.ndarray]:
    """Loss, intermediates and every parameter's gradient of a model case computed with a known mistake:
    KL rows built otherwise (pairs "matched", or "reversed": the other rotation than the case declares),
    logps_options (for _token_logps), loss_mistakes (for _kto_family) or a missing reference (_references)."""
    inputs = case.inputs
    model, params = model_from_case(case)
    rotation = {"declared": case.kl_rotation, "matched": 0, "reversed": -case.kl_rotation}[pairs]
    batch = model_case_batch(case, rotation)
    logits, cache = model.forward(params, batch.tokens)  # [B, T, V]
    kl_logits, kl_cache = model.forward(params, batch.kl_tokens)
    options = dict(logps_options or {})
    policy_logps, policy_backward = _token_logps(logits, batch.tokens, batch.completion_mask, **options)
    kl_policy_logps, kl_backward = _token_logps(kl_logits, batch.kl_tokens, batch.kl_completion_mask, **options)
    ref_logps, kl_ref_logps = _references(reference, np.asarray(inputs["ref_logps"]),
                                          np.asarray(inputs["kl_ref_logps"]), policy_logps, kl_policy_logps)
    loss, dpolicy, dkl = _kto_family(
        policy_logps, ref_logps, batch.labels, float(inputs["beta"]),
        float(inputs["desirable_weight"]), float(inputs["undesirable_weight"]),
        kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps,
        **{**_VARIANT_KNOBS["kto"], **(loss_mistakes or {})})
    grads = model.backward(policy_backward(dpolicy), cache)
    if np.any(dkl != 0):
        kl_grads = model.backward(kl_backward(dkl), kl_cache)
        grads = {name: grads[name] + kl_grads[name] for name in grads}
    out = {
        "loss": np.float64(loss), "tokens": batch.tokens, "sequence_mask": batch.completion_mask,
        "kl_tokens": batch.kl_tokens, "kl_sequence_mask": batch.kl_completion_mask, "logits": logits,
        "policy_logps": policy_logps, "kl_policy_logps": kl_policy_logps,
    }
    out.update({f"grad/{hf_name(name)}": g for name, g in grads.items()})
    return out


def _edifice_mutant_outputs(case: Case, *, logps_options: Mapping | None = None,
                            loss_mistakes: Mapping | None = None, reference: str | None = None
                            ) -> dict[str, np.ndarray]:
    """Loss, logits, logps and every parameter's gradient of a model_edifice case computed with a known
    mistake: in the log-probs (logps_options for _token_logps; shift 0 is the seed's contract) or in the
    'edifice' loss (loss_mistakes for _kto_family)."""
    inputs = case.inputs
    model = Edifice(EdificeConfig.from_dict(case.config))
    params = {k: np.asarray(v) for k, v in edifice_params_from_inputs(inputs).items()}
    logits, cache = model.forward(params, np.asarray(inputs["tokens"]))  # [B, T, V]
    options = {"shift": 0, **(logps_options or {})}
    logps, logps_backward = _token_logps(logits, np.asarray(inputs["targets"]), np.asarray(inputs["mask"]),
                                         **options)
    ref_logps, _ = _references(reference, np.asarray(inputs["ref_logps"]), None, logps, None)
    loss, dlogps, _ = _kto_family(
        logps, ref_logps, inputs["labels"], float(inputs["beta"]),
        float(inputs["desirable_weight"]), float(inputs["undesirable_weight"]),
        **{**_VARIANT_KNOBS["edifice"], **(loss_mistakes or {})})
    grads = model.backward(logps_backward(dlogps), cache)
    out = {"loss": np.float64(loss), "logits": logits, "logps": logps}
    out.update({f"grad/{name}": g for name, g in grads.items()})
    return out


def _edifice_mutant(mistake: str, label: str, **settings) -> _Mutant:
    return _Mutant(mistake, label, lambda case: _edifice_mutant_outputs(case, **settings))


def _kto_loss_mutant(mistake: str, knobs: dict, *, label: str | None = None, reference: str | None = None
                     ) -> _Mutant:
    def compute(case: Case) -> dict:
        inputs = case.inputs
        has_kl = "kl_policy_logps" in inputs
        ref_logps, kl_ref_logps = _references(reference, inputs["ref_logps"], inputs.get("kl_ref_logps"),
                                              inputs["policy_logps"], inputs.get("kl_policy_logps"))
        loss, dpolicy, dkl = _kto_family(
            inputs["policy_logps"], ref_logps, inputs["labels"], float(inputs["beta"]),
            float(inputs["desirable_weight"]), float(inputs["undesirable_weight"]),
            kl_policy_logps=inputs.get("kl_policy_logps"), kl_ref_logps=kl_ref_logps,
            **{**_VARIANT_KNOBS[case.variant], **knobs})
        out = {"loss": np.float64(loss), "grad/policy_logps": dpolicy}
        if has_kl:
            settings = {**_VARIANT_KNOBS[case.variant], **knobs}
            corner = (settings["z_grad"] and settings["clamp"] and settings["z_source"] == "kl_pairs"
                      and float(np.mean(inputs["kl_policy_logps"] - inputs["kl_ref_logps"])) == 0.0)
            # at max(0, x)'s corner the gradient is any subgradient (torch's clamp passes 1, JAX's maximum 1/2)
            out["grad/kl_policy_logps"] = None if corner else dkl
        return out

    return _Mutant(mistake, label or mistake, compute)


_LOSS_MISTAKE_KNOBS = {
    "z_not_detached": dict(z_grad=True),
    "z_detached": dict(z_grad=False),
    "z_not_clamped": dict(clamp=False),
    "z_clamped": dict(clamp=True),
    "undesirable_sign": dict(undesirable_z_sign=-1.0),
    "beta_twice": dict(beta_power=2),
    "beta_missing": dict(beta_power=0),
    "weights_normalise_mean": dict(normalise_by_weights=True),
    "weights_ignored": dict(ignore_weights=True),
}
_KTO_VARIANT_MISTAKES = {
    "edifice": ("z_detached", "z_clamped", "undesirable_sign", "beta_twice", "beta_missing",
                "weights_normalise_mean", "weights_ignored"),
    "edifice_stop_z_grad": ("z_not_detached", "z_clamped", "undesirable_sign", "beta_twice", "beta_missing",
                            "weights_normalise_mean", "weights_ignored"),
    "kto": ("z_not_detached", "z_not_clamped", "undesirable_sign", "beta_twice", "beta_missing",
            "weights_normalise_mean", "weights_ignored"),
    "apo_zero_unpaired": ("beta_twice", "beta_missing", "weights_normalise_mean", "weights_ignored"),
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
    return _Mutant(mistake, label, lambda case: _model_mutant_outputs(case, **settings))


def mutants(kind: str, variant: str | None) -> list[_Mutant]:
    """The built-in mutated formulas for a kind and variant, one per known mistake (or form of it)."""
    return _builtin_mutants(kind, variant) + real_code_mutants(kind, variant)


def _builtin_mutants(kind: str, variant: str | None) -> list[_Mutant]:
    if kind in PIPELINE_KINDS:
        return []
    if kind == "kto_loss" and variant == "kto_pair":
        return [_other_class_mutant(m, m, **knobs) for m, knobs in _KTO_PAIR_KNOBS.items()]
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
            _model_mutant("kl_pairs_not_mismatched", "kl_pairs_not_mismatched", pairs="matched"),
            _model_mutant("kl_pairs_rotated_wrong_way", "kl_pairs_rotated_wrong_way", pairs="reversed"),
            _model_mutant("logits_not_shifted", "logits_not_shifted", logps_options=dict(shift=0)),
            _model_mutant("logits_shifted_twice", "logits_shifted_twice", logps_options=dict(shift=2)),
        ]
        mutants += [_model_mutant(m, label, logps_options=dict(shift=1, **o)) for m, label, o in mean_forms]
        mutants += [_model_mutant(m, m, loss_mistakes=_LOSS_MISTAKE_KNOBS[m])
                    for m in _KTO_VARIANT_MISTAKES["kto"]]
        return mutants
    if kind == "model_edifice":  # the seed's contract has no shift: shifting (again) is the mistake here
        mutants = [_edifice_mutant("logits_shifted", "logits_shifted", logps_options=dict(shift=1))]
        mutants += [_edifice_mutant(m, label, logps_options=o) for m, label, o in mean_forms]
        mutants += [_edifice_mutant(m, m, loss_mistakes=_LOSS_MISTAKE_KNOBS[m])
                    for m in _KTO_VARIANT_MISTAKES["edifice"]]
        return mutants
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")



# ---------------------------------------------------------------------------------------------------
# The mistakes found in real KTO code (../shared/KTO_MISTAKES.md, issue 13): the formula-level ones here,
# the KL-pair, data-parallel and accumulation ones in kl_pairs.py and distributed.py. Each says where it
# was seen; the numbers in parentheses are the rows of KTO_MISTAKES.md.

REAL_CODE_MISTAKES = (
    Mistake("class_means_added", "per-class means added (mean_D + lambda mean_U) instead of one mean over the batch",
            "L = (1/n) sum_i w_i loss_i over the whole batch (TRL concatenates both classes, then takes the mean)",
            "S3nna13/Aurelius src/alignment/kto_trainer.py (28)"),
    Mistake("loss_summed", "batch loss summed instead of averaged (loss and gradient x the batch size)",
            "L = mean_i w_i loss_i, not sum_i",
            "HALOs losses.sum(), Sep 2024 - May 2025, fixed by 'fix issue with sum vs. mean for grad acc' (15)"),
    Mistake("z_from_matched_pairs", "z from the matched pairs (the batch's own rewards) instead of mismatched ones",
            "z_ref = max(0, mean_j(kl_policy_logps_j - kl_ref_logps_j)) over mismatched pairs (prompt_i, "
            "completion_j, j != i), detached",
            "Edifice lib/edifice/meta/kto.ex (27); S3nna13/Aurelius (28); HALOs UnpairedPreferenceDataLoader "
            "with one example per process (6)"),
    Mistake("z_from_other_class", "z of one class used for the other (the old SimpleKTO / kto_pair form): "
            "desirable losses use max(0, mean r_U), undesirable ones max(0, mean r_D), not detached",
            "one z_ref for every example, from the KL pairs, detached (if TRL's paired kto_pair loss is meant, it "
            "is that variant's z: check with --variant kto_pair)",
            "HALOs early SimpleKTOTrainer; TRL DPOTrainer loss_type='kto_pair' (#1075, removed #1734); "
            "OpenRLHF VanillaKTOLoss (7)"),
    Mistake("single_class_nan", "NaN loss (or a crash) for a batch with only one class",
            "the mean over the examples present; an absent class contributes nothing (TRL: nanmean of the "
            "concatenated losses)",
            "TRL #1386 (issue #1447, fixed #1472/#1499) (9); TRL #1181, a micro-batch without KL rows "
            "(fixed #1380) (1)"),
    Mistake("logps_metrics_swapped", "the metrics logps/chosen and logps/rejected swapped",
            "logps/chosen is the mean policy log-prob of the desirable examples", "TRL #1386 (fixed #1402) (10)"),
    Mistake("reward_metrics_zero_for_absent", "reward metrics of an absent class reported as 0 (then averaged "
            "with the others) instead of absent",
            "leave the metric of an absent class out (None / NaN) and average only over batches that have it",
            "OpenRLHF KTOTrainer fit() metrics (26)"),
    Mistake("prompt_in_mask", "prompt tokens inside the completion mask: r and z include the prompt's log-ratio",
            "score only the completion tokens: the sequence mask is 0 on the prompt (and the padding)",
            "OpenRLHF _get_batch_logps, mask attention_mask[:, 1:] (fixed 2024-07 'fix kto loss mask') (20)"),
    Mistake("reference_missing", "no reference model: r = log pi (the policy's log-prob), not log pi - log pi_ref; "
            "rewards of the size of beta log pi, and r != 0 at theta = theta_ref",
            "pass the reference log-probs (a frozen copy of the initial policy, or the adapter-disabled base under "
            "PEFT): r = log pi_theta - log pi_ref",
            "TRL fused (Liger) path under PEFT, use_ref_model=(ref_model is not None) (#7063, fixed PR #7075) (34); "
            "Liger-Kernel's KTO with use_ref_model=False, its default; TRL + Liger + PEFT (18)"),
    Mistake("reference_is_policy", "the policy used as its own reference: r = 0 and z = 0 for every example "
            "(rewards and KL 0), whatever the policy learned",
            "compute the reference log-probs with the reference model (precompute them before training, or disable "
            "the adapter), never with the policy being trained or evaluated",
            "TRL precompute_ref_log_probs=True without a reference model: eval reference log-probs from the trained "
            "policy (PR #6443) (19); TRL pretrained LoRA with target_parameters (PR #6591) (33)"),
    Mistake("undesirable_subtracted", "the undesirable term subtracted instead of added: L = w_D (1 - sigma(...)) "
            "- w_U (1 - sigma(...)); minimising it raises the undesirable completions' log-probs",
            "add both classes' terms: loss_i = w_U (1 - sigma(beta (z - r_i))) for an undesirable example; its "
            "gradient dL/dr_i is positive (an undesirable log-prob is pushed down)",
            "PKU-Alignment align-anything align_anything/trainers/text_to_text/kto.py loss() (31)"),
    # kind kl_pairs (kl_pairs.py)
    Mistake("kl_pairs_reversed", "KL completions reversed (completion[::-1]): for an odd block the middle example "
            "is paired with itself", "rotate by one within the block: prompt i with completion (i - 1) mod b",
            "TRL [::-1] (#1402; issue #1911; fixed #1970 with a cyclic shift) (3); ColossalAI ColossalChat "
            "DataCollatorForKTODataset; LLaMA-Factory until #7509 (4)"),
    Mistake("kl_pairs_random_permutation", "KL completions a random permutation: its fixed points pair some "
            "examples with themselves", "a permutation without fixed points (a cyclic shift by one)",
            "TRL get_KL_dataset with random.sample (#1380; fixed #1402) (2)"),
    Mistake("kl_pairs_single_block_matched", "a block of one example left unchanged: its KL pair is matched",
            "refuse a block of one example (TRL requires a per-device batch > 1)",
            "TRL, a last block of size 1 left by the rotation (guard #1402, tightened #2153) (5); HALOs "
            "UnpairedPreferenceDataLoader with one example per process (6); LLaMA-Factory, no per-device batch "
            "> 1 check (29)"),
    Mistake("kl_pairs_across_blocks", "KL pairs span the blocks: a micro-batch's KL completions are not its own",
            "pair within each per-device block (micro-batch)",
            "TRL #1402-#2153 (blocks of world x per-device x accumulation) and ms-swift kto.py (12); LLaMA-Factory "
            "with a random sampler (13)"),
    # kind data_parallel (distributed.py)
    Mistake("dp_z_not_all_reduced", "z not all-reduced: each rank uses the KL estimate of its own shard",
            "all-reduce (or gather) the per-rank KL means, then clamp: z = max(0, mean_r m_r)",
            "per-device z in OpenRLHF VanillaKTOLoss and HALOs' early SimpleKTOTrainer (7)"),
    Mistake("dp_z_clamped_per_rank", "z clamped per rank, then averaged: mean_r max(0, m_r) >= max(0, mean_r m_r)",
            "average the per-rank KL means first, clamp once", "NeMo-Aligner megatron_gpt_kto_model.py (8)"),
    Mistake("dp_losses_summed", "losses summed over ranks instead of averaged (loss and gradient x world size)",
            "return the rank's mean loss; data-parallel training averages the gradients over ranks",
            "the metric form: LLaMA-Factory's KTO log() sums over ranks (24)"),
    Mistake("global_mean_convention", "the global-mean convention (z and the loss over all examples of all "
            "ranks): a convention, not a mistake; the default reference is TRL's mean of rank means",
            "check with variant 'global_mean' (kto-np oracle check --kind data_parallel --variant global_mean)", ""),
    Mistake("rank_means_convention", "TRL's mean-of-rank-means convention: a convention, not a mistake; this "
            "reference is the global mean", "check with variant 'rank_means' (the default)", ""),
    # kind accumulation (distributed.py)
    Mistake("accumulation_not_divided", "micro-batch loss not divided by the accumulation steps (gradient and "
            "logged loss x A)", "return loss / accumulation_steps for each micro-batch",
            "TRL #2617, #2626 (fixed #2648) (14); HALOs before its sum/mean fix (15); ColossalAI "
            "coati/trainer/kto.py (16)"),
    Mistake("accumulation_kl_pairs_window", "the reference's KL pairs rotated over the whole accumulation window, "
            "the policy's within each micro-batch: the first prompt of a micro-batch gets different completions "
            "in the two, so z_k = mean(log pi(y'|x) - log pi_ref(y''|x)) is not a KL estimate",
            "build the KL pairs once (prompt i with completion i - 1 within the micro-batch) and score the same "
            "pairs with the policy and the reference",
            "EasyDeL easydel/trainers/kto_trainer/_fn.py training_step with gradient accumulation > 1 (35)"),
)
KNOWN_MISTAKES.update({m.id: m for m in REAL_CODE_MISTAKES})
REAL_CODE_MISTAKE_IDS = frozenset(m.id for m in REAL_CODE_MISTAKES)

# where the catalogue's older mistakes were seen in real code
_SEEN_IN = {
    "z_not_detached": "HALOs early SimpleKTOTrainer; TRL loss_type='kto_pair' (#1075); OpenRLHF VanillaKTOLoss (7); "
                      "Edifice (27); S3nna13/Aurelius (28)",
    "z_not_clamped": "Edifice lib/edifice/meta/kto.ex (27)",
    "undesirable_sign": "Edifice: its docs say sigma(-KL - z), its code sigma(z - KL) (27)",
    "logps_mean_not_sum": "Liger-Kernel 0.5.3-0.5.4, log-probs always averaged per token (22); "
                          "S3nna13/Aurelius, per-token mean log-ratio (28)",
    "logits_not_shifted": "Edifice compute_logprobs, no shift (27)",
    "mask_ignored": "OpenRLHF _get_batch_logps before 2024-07 (20, the prompt form is prompt_in_mask)",
    "kl_pairs_not_mismatched": "Edifice (27); HALOs UnpairedPreferenceDataLoader with one example per process (6); "
                               "ms-swift, identical adjacent completions (issue #4535) (30)",
}
for _id, _where in _SEEN_IN.items():
    if _id in KNOWN_MISTAKES and _where and not KNOWN_MISTAKES[_id].seen_in:
        KNOWN_MISTAKES[_id] = replace(KNOWN_MISTAKES[_id], seen_in=_where)

# kinds that check a piece of the training pipeline rather than a formula: their mutants live in their modules


def _class_mean_weights(labels, desirable_weight, undesirable_weight) -> tuple[float, float]:
    """Weights that turn mean_i(w_i loss_i) into sum_D w_D loss / n_D + sum_U w_U loss / n_U."""
    labels = np.asarray(labels, dtype=bool)
    n, n_desirable = labels.shape[0], int(labels.sum())
    n_undesirable = n - n_desirable
    return (desirable_weight * n / max(n_desirable, 1), undesirable_weight * n / max(n_undesirable, 1))


def _reduction_mutant(mistake: str) -> _Mutant:
    """loss_summed (the mean times n) and class_means_added (class weights rescaled by n / n_class)."""
    def compute(case: Case) -> dict:
        inputs = case.inputs
        labels = inputs["labels"]
        weights = (float(inputs["desirable_weight"]), float(inputs["undesirable_weight"]))
        scale = 1.0
        if mistake == "class_means_added":
            weights = _class_mean_weights(labels, *weights)
        else:
            scale = float(np.asarray(labels).shape[0])
        loss, dpolicy, dkl = _kto_family(
            inputs["policy_logps"], inputs["ref_logps"], labels, float(inputs["beta"]), *weights,
            kl_policy_logps=inputs.get("kl_policy_logps"), kl_ref_logps=inputs.get("kl_ref_logps"),
            **_VARIANT_KNOBS[case.variant])
        out = {"loss": np.float64(scale * loss), "grad/policy_logps": scale * dpolicy}
        if "kl_policy_logps" in inputs:
            out["grad/kl_policy_logps"] = scale * dkl
        return out

    return _Mutant(mistake, mistake, compute)


def _other_class_z(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, *,
                   beta_power: int = 1, ignore_weights: bool = False, z_grad: bool = True):
    """kto_pair / SimpleKTO: (loss, dL/dpolicy_logps). Desirable i: w_D (1 - sigma(b (r_i - z_U))),
    undesirable k: w_U (1 - sigma(b (z_D - r_k))), z_c = max(0, mean_{c} r), not detached (z_grad); mean over n;
    b = beta ** beta_power; w = 1 with ignore_weights. NaN (loss and gradient) when a class is absent, as mean()
    of an empty tensor is."""
    labels = np.asarray(labels, dtype=bool)
    r = np.asarray(policy_logps, dtype=np.float64) - np.asarray(ref_logps, dtype=np.float64)  # [n]
    n = r.shape[0]
    if labels.all() or not labels.any():
        return math.nan, np.full(n, math.nan)
    beta = beta ** beta_power
    if ignore_weights:
        desirable_weight = undesirable_weight = 1.0
    mean_d, mean_u = float(r[labels].mean()), float(r[~labels].mean())
    z_d, z_u = max(0.0, mean_d), max(0.0, mean_u)
    a = beta * (r - z_u)  # [n] desirable arguments
    b = beta * (z_d - r)  # [n] undesirable arguments
    losses = np.where(labels, desirable_weight * (1 - sigmoid(a)), undesirable_weight * (1 - sigmoid(b)))
    slope_d = desirable_weight * beta * sigmoid(a) * sigmoid(-a) / n  # [n] |dloss_i/da_i| beta / n
    slope_u = undesirable_weight * beta * sigmoid(b) * sigmoid(-b) / n
    grad = np.where(labels, -slope_d, slope_u)  # direct terms
    if z_grad:
        through_z_d = -float(slope_u[~labels].sum()) * (mean_d > 0) / int(labels.sum())  # dL/dz_D dz_D/dr_i
        through_z_u = float(slope_d[labels].sum()) * (mean_u > 0) / int((~labels).sum())
        grad = grad + np.where(labels, through_z_d, through_z_u)
    return float(losses.mean()), grad


def _other_class_mutant(label: str = "z_from_other_class", mistake: str = "z_from_other_class", **knobs) -> _Mutant:
    def compute(case: Case) -> dict:
        inputs = case.inputs
        loss, grad = _other_class_z(inputs["policy_logps"], inputs["ref_logps"], inputs["labels"],
                                    float(inputs["beta"]), float(inputs["desirable_weight"]),
                                    float(inputs["undesirable_weight"]), **knobs)
        out = {"loss": np.float64(loss), "grad/policy_logps": grad}
        if "kl_policy_logps" in inputs:
            out["grad/kl_policy_logps"] = np.zeros_like(inputs["kl_policy_logps"])
        return out

    return _Mutant(mistake, label, compute)


# the kto_pair variant's own mistakes (its reference is _other_class_z with the defaults)
_KTO_PAIR_KNOBS = {"z_detached": dict(z_grad=False), "beta_twice": dict(beta_power=2),
                   "beta_missing": dict(beta_power=0), "weights_ignored": dict(ignore_weights=True)}


def _single_class_nan_mutant(placeholder: bool) -> _Mutant:
    """The loss NaN for a batch with one class. The gradient: NaN (finite differences of a NaN loss), or, when
    autograd differentiates the mean over the n examples and one constant NaN placeholder, n / (n + 1) times
    the reference (the placeholder has no gradient)."""
    def compute(case: Case) -> dict:
        labels = np.asarray(case.inputs["labels"], dtype=bool)
        out = {k: v for k, v in case.expected.items() if k == "loss" or k.startswith("grad/")}
        if labels.all() or not labels.any():
            n = labels.shape[0]
            out["loss"] = np.float64(math.nan)
            out["grad/policy_logps"] = (np.asarray(out["grad/policy_logps"]) * n / (n + 1) if placeholder
                                        else np.full(labels.shape, math.nan))
        return out

    label = "single_class_nan (a NaN placeholder, autograd)" if placeholder else "single_class_nan"
    return _Mutant("single_class_nan", label, compute)


def _metric_mutant(mistake: str) -> _Mutant:
    def compute(case: Case) -> dict:
        metrics = {k: v for k, v in case.expected.items() if k.startswith("metrics/")}
        if mistake == "logps_metrics_swapped":
            metrics["metrics/logps/chosen"], metrics["metrics/logps/rejected"] = (
                metrics.get("metrics/logps/rejected"), metrics.get("metrics/logps/chosen"))
        else:
            chosen = metrics.get("metrics/rewards/chosen")
            rejected = metrics.get("metrics/rewards/rejected")
            chosen = np.float64(0.0) if chosen is None else chosen
            rejected = np.float64(0.0) if rejected is None else rejected
            metrics.update({"metrics/rewards/chosen": chosen, "metrics/rewards/rejected": rejected,
                            "metrics/rewards/margins": np.float64(chosen - rejected)})
        return metrics

    return _Mutant(mistake, mistake, compute, metrics=True)


_MATCHED_PAIR_FORMS = (("z_from_matched_pairs", dict(z_source="batch")),
                       ("z_from_matched_pairs (not detached, not clamped)",
                        dict(z_source="batch", clamp=False, z_grad=True)),
                       ("z_from_matched_pairs (not detached)", dict(z_source="batch", z_grad=True)))


_REFERENCE_FORMS = (("reference_missing", "reference_missing", "missing"),
                    ("reference_missing", "reference_missing (the KL pairs' reference too)", "missing_kl"),
                    ("reference_is_policy", "reference_is_policy", "policy"))


def _undesirable_gradient_sign_rule(candidate_values: Mapping, cases_by_name: Mapping) -> bool:
    """undesirable_subtracted at any scale (a mean over pairs, per-class means): on every case with both classes
    the undesirable examples' gradients have the opposite sign of the reference's, the desirable ones the same."""
    seen = False
    for case_name, quantities in candidate_values.items():
        case = cases_by_name[case_name]
        value = quantities.get("grad/policy_logps", (None,))[0]
        reference = case.expected.get("grad/policy_logps")
        labels = np.asarray(case.inputs.get("labels", ()), dtype=bool)
        if value is None or reference is None or labels.all() or not labels.any():
            continue
        value, reference = np.asarray(value, dtype=np.float64), np.asarray(reference, dtype=np.float64)
        if value.shape != reference.shape or not np.all(np.isfinite(value)):
            return False
        decided = np.abs(reference) > 1e-12 * max(1.0, float(np.max(np.abs(reference))))
        desirable, undesirable = decided & labels, decided & ~labels
        if not undesirable.any():
            continue
        if (np.any(np.sign(value[desirable]) != np.sign(reference[desirable]))
                or np.any(np.sign(value[undesirable]) != -np.sign(reference[undesirable]))):
            return False
        seen = True
    return seen


def real_code_mutants(kind: str, variant: str | None) -> list[_Mutant]:
    """The mutants of the mistakes found in real code, for a kind and variant."""
    if kind in PIPELINE_KINDS:
        return pipeline_part(kind, "mutants")(kind, variant)
    out: list[_Mutant] = []
    if kind == "kto_loss" and variant != "kto_pair":
        out += [_reduction_mutant("class_means_added"), _reduction_mutant("loss_summed")]
        out += [_kto_loss_mutant(mistake, {}, label=label, reference=form) for mistake, label, form in _REFERENCE_FORMS
                if variant == "kto" or form != "missing_kl"]
        out += [_kto_loss_mutant("undesirable_subtracted", dict(undesirable_loss_sign=-1.0)),
                _Mutant("undesirable_subtracted", "undesirable_subtracted (gradient signs)", lambda case: {},
                        match=_undesirable_gradient_sign_rule)]
        if variant == "kto":
            out += [_Mutant("z_from_matched_pairs", label, _kto_loss_mutant(label, knobs).compute)
                    for label, knobs in _MATCHED_PAIR_FORMS]
            out.append(_other_class_mutant())
            out.append(_other_class_mutant("z_from_other_class+weights_ignored (kto_pair / VanillaKTOLoss: no "
                                           "class weights)", "z_from_other_class+weights_ignored",
                                           ignore_weights=True))
        if variant in ("kto", "apo_zero_unpaired"):
            out += [_single_class_nan_mutant(False), _single_class_nan_mutant(True)]
    if kind == "kto_loss":  # (kto_pair's cases hold both classes: no class is ever absent there)
        out.append(_metric_mutant("logps_metrics_swapped"))
        if variant != "kto_pair":
            out.append(_metric_mutant("reward_metrics_zero_for_absent"))
    elif kind == "model_kto":
        out.append(_model_mutant("prompt_in_mask", "prompt_in_mask", logps_options=dict(prompt_in_mask=True)))
        out += [_model_mutant(mistake, label, reference=form) for mistake, label, form in _REFERENCE_FORMS]
        out.append(_model_mutant("undesirable_subtracted", "undesirable_subtracted",
                                 loss_mistakes=dict(undesirable_loss_sign=-1.0)))
    elif kind == "model_edifice":
        out.append(_edifice_mutant("prompt_in_mask", "prompt_in_mask", logps_options=dict(prompt_in_mask=True)))
        out += [_edifice_mutant(mistake, label, reference=form) for mistake, label, form in _REFERENCE_FORMS
                if form != "missing_kl"]
    return out


def mistake_ids(mutant: _Mutant) -> tuple[str, ...]:
    """The catalogue ids a mutant stands for: one, or several joined by '+' (two mistakes together)."""
    return tuple(mutant.mistake.split("+"))


def has_single_class_batch(case: Case) -> bool:
    """Whether a case (or one of its shards or micro-batches) holds examples of one class only."""
    labels = case.inputs.get("labels")
    if labels is None:
        return False
    labels = np.asarray(labels, dtype=bool)
    sizes = next((case.inputs[k] for k in ("shard_sizes", "micro_batch_sizes") if k in case.inputs), None)
    bounds = np.cumsum([0] + [int(s) for s in sizes]) if sizes is not None else np.array([0, labels.shape[0]])
    parts = [labels[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return any(bool(part.all()) or not bool(part.any()) for part in parts)


def _non_finite(value) -> bool:
    return value is not None and not bool(np.all(np.isfinite(np.asarray(value, dtype=np.float64))))


def failed_only_on_single_class(cases_by_name: Mapping[str, Case], errors: Mapping[str, str], failing_cases,
                                candidate_values: Mapping) -> bool:
    """single_class_nan in any form: every case that failed or raised holds a batch (or shard) of one class;
    either it raised on every case with one class and only there, or it gave a NaN or inf (loss, gradient or
    intermediate) on some of them, and raised or gave a NaN or inf on each of the others that failed."""
    single = {name for name, case in cases_by_name.items() if has_single_class_batch(case)}
    failing = set(failing_cases) | set(errors)
    if not failing or not failing <= single:
        return False
    non_finite = {name for name in set(failing_cases)
                  if any(_non_finite(value) for value, _, _ in candidate_values.get(name, {}).values())}
    if not non_finite:  # the crash form: it raised on every case with one class
        return set(errors) == single
    return failing <= non_finite | set(errors)
