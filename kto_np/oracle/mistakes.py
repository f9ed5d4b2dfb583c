"""The known mistakes: a catalogue (id, title, fix) and one mutated formula per mistake or form of it.

These are the only deliberate second KTO formulas in kto_np: `_kto_family` is the KTO loss family with a
switch per mistake, `_token_logps` the sequence log-probs with the wrong shift, reduction or mask. The
diagnosis (report.diagnose) names a mistake when its mutant reproduces a failing candidate's numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..logprobs import logprobs_backward, logprobs_forward, sequence_logprobs_backward, sequence_logprobs_forward
from ..losses import dpo_loss_and_grad, sigmoid
from .cases import KINDS, Case, hf_name, model_case_batch, model_from_case


@dataclass(frozen=True)
class Mistake:
    """A known implementation mistake the diagnosis can name."""

    id: str
    title: str
    fix: str


# the catalogue of implementation mistakes (data.MISTAKES is another thing: the toy task's wrong answers)
KNOWN_MISTAKES = {m.id: m for m in (
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


_VARIANT_KNOBS = {
    "edifice": dict(form="edifice", z_source="batch", clamp=False, z_grad=True),
    "edifice_stop_z_grad": dict(form="edifice", z_source="batch", clamp=False, z_grad=False),
    "kto": dict(form="kto", z_source="kl_pairs", clamp=True, z_grad=False),
    "apo_zero_unpaired": dict(form="kto", z_source=None, clamp=False, z_grad=False),
}


def _kto_family(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, *, form, z_source,
                clamp, z_grad, kl_policy_logps=None, kl_ref_logps=None, beta_power=1, undesirable_z_sign=1.0,
                normalise_by_weights=False, ignore_weights=False):
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
    weights = np.ones(n) if ignore_weights else np.where(labels, desirable_weight, undesirable_weight)  # [n] w
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


def _model_mutant_outputs(case: Case, *, pairs: str = "declared", logps_options: Mapping | None = None,
                          loss_mistakes: Mapping | None = None) -> dict[str, np.ndarray]:
    """Loss, intermediates and every parameter's gradient of a model case computed with a known mistake:
    KL rows built otherwise (pairs "matched", or "reversed": the other rotation than the case declares),
    logps_options (for _token_logps) or loss_mistakes (for _kto_family)."""
    inputs = case.inputs
    model, params = model_from_case(case)
    rotation = {"declared": case.kl_rotation, "matched": 0, "reversed": -case.kl_rotation}[pairs]
    batch = model_case_batch(case, rotation)
    logits, cache = model.forward(params, batch.tokens)  # [B, T, V]
    kl_logits, kl_cache = model.forward(params, batch.kl_tokens)
    options = dict(logps_options or {})
    policy_logps, policy_backward = _token_logps(logits, batch.tokens, batch.completion_mask, **options)
    kl_policy_logps, kl_backward = _token_logps(kl_logits, batch.kl_tokens, batch.kl_completion_mask, **options)
    loss, dpolicy, dkl = _kto_family(
        policy_logps, np.asarray(inputs["ref_logps"]), batch.labels, float(inputs["beta"]),
        float(inputs["desirable_weight"]), float(inputs["undesirable_weight"]),
        kl_policy_logps=kl_policy_logps, kl_ref_logps=np.asarray(inputs["kl_ref_logps"]),
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
            settings = {**_VARIANT_KNOBS[case.variant], **knobs}
            corner = (settings["z_grad"] and settings["clamp"] and settings["z_source"] == "kl_pairs"
                      and float(np.mean(inputs["kl_policy_logps"] - inputs["kl_ref_logps"])) == 0.0)
            # at max(0, x)'s corner the gradient is any subgradient (torch's clamp passes 1, JAX's maximum 1/2)
            out["grad/kl_policy_logps"] = None if corner else dkl
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
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

