"""The exercises about the losses and their numbers: lessons 01, 02, 06, 08, 09, 10, 11 and A1.

Each reference below is a closed form written here, or the oracle's float64 cases (kto_np.oracle), whose
diagnosis names the mistake; the typical mistakes are the formulas a learner is likely to write instead.
"""

from __future__ import annotations

import numpy as np

from .core import Call, Exercise, Mistake, closed_form, oracle_calls, oracle_cases, oracle_judge


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def _not_written(*args, **kwargs):
    raise NotImplementedError("write this function")


# ---------------------------------------------------------------------------------------------------
# 01: the KTO loss


def _z_ref_calls():
    rng = np.random.default_rng(1)
    kl_policy = rng.normal(-30.0, 2.0, 6)
    return [
        Call("6 KL pairs whose mean log-ratio is positive", (kl_policy, kl_policy - rng.uniform(0.5, 2.5, 6)), {}),
        Call("6 KL pairs whose mean log-ratio is negative", (kl_policy, kl_policy + rng.uniform(0.5, 2.5, 6)), {}),
        Call("1 KL pair, log-ratio +0.7", (np.array([-12.3]), np.array([-13.0])), {}),
    ]


def _z_ref_reference(call):
    p, r = call.args
    return (max(0.0, float(np.mean(p - r))),)


def z_ref_stub(kl_policy_logps, kl_ref_logps):
    raise NotImplementedError("write z_ref")


Z_REF = Exercise(
    "01.z_ref", "z_ref", "z_ref(kl_policy_logps, kl_ref_logps) -> float",
    "KTO's reference point from the log-probs of the mismatched (KL) pairs: their mean log-ratio, clamped at 0",
    _z_ref_calls,
    closed_form(("z_ref",), _z_ref_reference, [
        Mistake("z_not_clamped", "the mean log-ratio without the clamp at 0 (a KL divergence is never negative)",
                lambda c: (float(np.mean(c.args[0] - c.args[1])),)),
        Mistake("ratio_reversed", "the log-ratio taken the wrong way round, log π_ref − log π",
                lambda c: (max(0.0, float(np.mean(c.args[1] - c.args[0]))),)),
        Mistake("sum_not_mean", "a sum over the pairs instead of their mean",
                lambda c: (max(0.0, float(np.sum(c.args[0] - c.args[1]))),)),
    ]),
    z_ref_stub,
)


def _kto_cases():
    return oracle_cases("kto_loss", "kto", keep=lambda c: "kl_policy_logps" in c.inputs)


def _kto_arguments(case):
    i = case.inputs
    return (), {"policy_logps": i["policy_logps"], "ref_logps": i["ref_logps"], "labels": i["labels"],
                "kl_policy_logps": i["kl_policy_logps"], "kl_ref_logps": i["kl_ref_logps"], "beta": float(i["beta"]),
                "desirable_weight": float(i["desirable_weight"]),
                "undesirable_weight": float(i["undesirable_weight"])}


def _kto_reference(call):
    from ..losses import kto_loss_and_grad  # noqa: PLC0415

    kw = dict(call.kwargs)
    loss, grad, _ = kto_loss_and_grad(kw.pop("policy_logps"), kw.pop("ref_logps"), kw.pop("labels"), variant="kto",
                                      warn_balance=False, **kw)
    return loss, grad


def kto_loss_stub(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                  undesirable_weight):
    raise NotImplementedError("write kto_loss_and_grad")


KTO_LOSS = Exercise(
    "01.kto_loss", "kto_loss_and_grad",
    "kto_loss_and_grad(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight, "
    "undesirable_weight) -> (loss, dloss_dpolicy_logps)",
    "the paper's KTO loss (z_ref from the KL pairs, clamped at 0, detached) and its gradient, NumPy in and out",
    oracle_calls(_kto_cases, _kto_arguments),
    oracle_judge("kto_loss", "kto", ("loss", "dloss_dpolicy_logps"), ("loss", "grad/policy_logps"), _kto_cases,
                 lambda case: ((), np.shape(case.inputs["policy_logps"])), extra=[
                     Mistake("gradient_sign_flipped", "the gradient with its sign flipped (dL/dπ is negative for a "
                             "desirable example: descent raises it)",
                             lambda c: (_kto_reference(c)[0], -_kto_reference(c)[1])),
                     Mistake("gradient_not_divided_by_n", "the gradient of the summed loss (the 1/n of the mean "
                             "is missing)",
                             lambda c: (_kto_reference(c)[0], _kto_reference(c)[1] * len(c.kwargs["labels"]))),
                 ]),
    kto_loss_stub, how="oracle",
)


# ---------------------------------------------------------------------------------------------------
# 02: loss surfaces


def _gradient_calls():
    rng = np.random.default_rng(2)
    labels = np.array([1, 0, 1, 0, 1, 1, 0])
    r = rng.normal(0.0, 6.0, 7)
    return [
        Call("7 examples, β = 0.1, z_ref = 0.5, λ_D = 1, λ_U = 1", (r, labels, 0.5, 0.1, 1.0, 1.0), {}),
        Call("7 examples, β = 0.5, z_ref = 0, λ_D = 2, λ_U = 1.5", (r, labels, 0.0, 0.5, 2.0, 1.5), {}),
        Call("7 examples, β = 2, z_ref = 1.3, λ_D = 0.5, λ_U = 3", (r / 4.0, labels, 1.3, 2.0, 0.5, 3.0), {}),
    ]


def _gradient(r, labels, z, beta, dw, uw, *, outer_beta=True, sign=1.0, weights=True, derivative=True):
    s = np.where(labels == 1, 1.0, -1.0)
    w = np.where(labels == 1, dw, uw) if weights else np.ones(len(labels))
    u = beta * (r - z)
    shape = _sigmoid(u) * _sigmoid(-u) if derivative else _sigmoid(s * u)
    return -sign * w * s * (beta if outer_beta else 1.0) * shape


def gradient_stub(log_ratios, labels, z_ref, beta, desirable_weight, undesirable_weight):
    return np.zeros_like(log_ratios)  # a placeholder: the right shape, the wrong numbers


KTO_GRADIENT = Exercise(
    "02.kto_gradient", "kto_gradient",
    "kto_gradient(log_ratios, labels, z_ref, beta, desirable_weight, undesirable_weight) -> dloss_dr",
    "d loss_i / d r_i for each example, loss_i = λ_i (1 − σ(s_i β (r_i − z_ref))) (not divided by n): the curve "
    "whose peak is βλ/4",
    _gradient_calls,
    closed_form(("dloss_dr",), lambda c: (_gradient(*c.args),), [
        Mistake("beta_missing", "the chain rule without its factor β (d u / d r = β)",
                lambda c: (_gradient(*c.args, outer_beta=False),)),
        Mistake("sign_flipped", "the gradient with its sign flipped (a desirable example's loss falls as r rises)",
                lambda c: (_gradient(*c.args, sign=-1.0),)),
        Mistake("weights_ignored", "the gradient without the class weights λ_D, λ_U",
                lambda c: (_gradient(*c.args, weights=False),)),
        Mistake("sigmoid_not_derivative", "σ(s u) in place of its derivative σ(u) σ(−u)",
                lambda c: (_gradient(*c.args, derivative=False),)),
    ]),
    gradient_stub,
)


def _share_calls():
    return [
        Call("5 thumbs-up, 5 thumbs-down, λ_D = λ_U = 1", (np.array([1, 0] * 5), 1.0, 1.0), {}),
        Call("1 thumbs-up in 10, λ_D = 10, λ_U = 1", (np.array([1] + [0] * 9), 10.0, 1.0), {}),
        Call("6 thumbs-up, 2 thumbs-down, λ_D = 1, λ_U = 1.5", (np.array([1, 1, 0, 1, 1, 0, 1, 1]), 1.0, 1.5), {}),
        Call("3 thumbs-up only, λ_D = 2, λ_U = 1", (np.array([1, 1, 1]), 2.0, 1.0), {}),
    ]


def _counts(labels):
    labels = np.asarray(labels)
    return float(np.sum(labels == 1)), float(np.sum(labels != 1))


def _share(labels, dw, uw):
    nd, nu = _counts(labels)
    return dw * nd / (dw * nd + uw * nu)


def share_stub(labels, desirable_weight, undesirable_weight):
    raise NotImplementedError("write desirable_gradient_share")


DESIRABLE_SHARE = Exercise(
    "02.desirable_share", "desirable_gradient_share",
    "desirable_gradient_share(labels, desirable_weight, undesirable_weight) -> float",
    "the desirable class's share of the summed |gradient| at the first step (policy = reference, every u = 0)",
    _share_calls,
    closed_form(("share",), lambda c: (_share(*c.args),), [
        Mistake("ratio_not_share", "the ratio ρ = λ_D n_D / (λ_U n_U) instead of the share ρ / (1 + ρ)",
                lambda c: (c.args[1] * _counts(c.args[0])[0] / (c.args[2] * _counts(c.args[0])[1])
                           if _counts(c.args[0])[1] else np.inf,)),
        Mistake("weights_ignored", "the fraction of thumbs-up examples n_D / n, without the weights",
                lambda c: (_counts(c.args[0])[0] / len(c.args[0]),)),
        Mistake("undesirable_share", "the undesirable class's share",
                lambda c: (1.0 - _share(*c.args),)),
    ], hint="At u = 0 every example's |gradient| is λ_i β/(4n): add them up per class."),
    share_stub,
)


# ---------------------------------------------------------------------------------------------------
# 06: imbalanced feedback


def _balance_calls():
    return [
        Call("1 thumbs-up in 10, λ_D = λ_U = 1", (np.array([1] + [0] * 9), 1.0, 1.0), {}),
        Call("1 thumbs-up in 10, λ_D = 10, λ_U = 1", (np.array([1] + [0] * 9), 10.0, 1.0), {}),
        Call("6 thumbs-up, 2 thumbs-down, λ_D = 1, λ_U = 1.5", (np.array([1, 1, 0, 1, 1, 0, 1, 1]), 1.0, 1.5), {}),
    ]


def _rho(labels, dw, uw):
    nd, nu = _counts(labels)
    return dw * nd / (uw * nu)


def balance_stub(labels, desirable_weight, undesirable_weight):
    return 1.0  # a placeholder: right for balanced data with equal weights only


BALANCE_RATIO = Exercise(
    "06.balance_ratio", "balance_ratio",
    "balance_ratio(labels, desirable_weight, undesirable_weight) -> float",
    "the paper's ρ = λ_D n_D / (λ_U n_U), which its Eq. 8 asks to keep in [1, 4/3]",
    _balance_calls,
    closed_form(("rho",), lambda c: (_rho(*c.args),), [
        Mistake("inverted", "the inverse, λ_U n_U / (λ_D n_D)", lambda c: (1.0 / _rho(*c.args),)),
        Mistake("weights_ignored", "the count ratio n_D / n_U without the weights",
                lambda c: (_rho(c.args[0], 1.0, 1.0),)),
        Mistake("fraction", "the weighted fraction λ_D n_D / (λ_D n_D + λ_U n_U) (the gradient share, not ρ)",
                lambda c: (_share(*c.args),)),
    ]),
    balance_stub,
)


def _band_calls():
    return [
        Call("1 thumbs-up in 10, λ_U = 1", (np.array([1] + [0] * 9), 1.0), {}),
        Call("3 thumbs-up, 5 thumbs-down, λ_U = 2", (np.array([1, 0, 0, 1, 0, 1, 0, 0]), 2.0), {}),
        Call("4 thumbs-up, 1 thumbs-down, λ_U = 1", (np.array([1, 1, 1, 0, 1]), 1.0), {}),
    ]


def _band(labels, uw, low=1.0, high=4.0 / 3.0):
    nd, nu = _counts(labels)
    return low * uw * nu / nd, high * uw * nu / nd


def band_stub(labels, undesirable_weight):
    raise NotImplementedError("write band_desirable_weights")


BAND_WEIGHTS = Exercise(
    "06.band_weights", "band_desirable_weights",
    "band_desirable_weights(labels, undesirable_weight) -> (low, high)",
    "the range of λ_D that puts ρ = λ_D n_D / (λ_U n_U) in the paper's band [1, 4/3]",
    _band_calls,
    closed_form(("low", "high"), lambda c: _band(*c.args), [
        Mistake("inverted", "solving ρ with the counts inverted (λ_U n_D / n_U)",
                lambda c: tuple(b * (_counts(c.args[0])[0] / _counts(c.args[0])[1]) ** 2 for b in _band(*c.args))),
        Mistake("undesirable_weight_ignored", "the band for λ_U = 1 whatever λ_U is",
                lambda c: _band(c.args[0], 1.0)),
        Mistake("band_inverted", "the band [3/4, 1] (ρ's bounds inverted)",
                lambda c: _band(*c.args, low=0.75, high=1.0)),
    ]),
    band_stub,
)


# ---------------------------------------------------------------------------------------------------
# 08: the seed's formula


def _seed_cases(variant):
    return lambda: oracle_cases("kto_loss", variant)


def _seed_arguments(case):
    i = case.inputs
    return (), {"policy_logps": i["policy_logps"], "ref_logps": i["ref_logps"], "labels": i["labels"],
                "beta": float(i["beta"]), "desirable_weight": float(i["desirable_weight"]),
                "undesirable_weight": float(i["undesirable_weight"])}


def seed_loss_stub(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight):
    raise NotImplementedError("write seed_loss_and_grad")


def _seed_exercise(exercise_id, function, variant, words):
    return Exercise(
        exercise_id, function,
        f"{function}(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight) -> "
        "(loss, dloss_dpolicy_logps)",
        words,
        oracle_calls(_seed_cases(variant), _seed_arguments),
        oracle_judge("kto_loss", variant, ("loss", "dloss_dpolicy_logps"), ("loss", "grad/policy_logps"),
                     _seed_cases(variant), lambda case: ((), np.shape(case.inputs["policy_logps"]))),
        seed_loss_stub, how="oracle")


SEED_LOSS = _seed_exercise(
    "08.seed_loss", "seed_loss_and_grad", "edifice",
    "the seed's formula (z = mean β r of the batch itself, not clamped, not detached: gradient flows through z) "
    "and its gradient")
SEED_LOSS_STOP_Z = _seed_exercise(
    "08.seed_loss_stop_z", "seed_loss_stop_z_and_grad", "edifice_stop_z_grad",
    "the seed's formula with a stop-gradient on z (stop_z_grad=True: z is a constant in the gradient)")


# ---------------------------------------------------------------------------------------------------
# 09: the KL estimate


def _rotation_calls():
    rng = np.random.default_rng(9)
    return [
        Call("4 completions of 5 tokens", (rng.integers(0, 12, (4, 5)),), {}),
        Call("3 completions of 2 tokens", (np.array([[1, 2], [3, 4], [5, 6]]),), {}),
        Call("5 completions of 1 token", (np.arange(5)[:, None] + 10,), {}),
    ]


def rotation_stub(completions):
    return completions  # a placeholder: the matched pairs, which is the mistake to avoid


KL_COMPLETIONS = Exercise(
    "09.kl_completions", "kl_completions",
    "kl_completions(completions) -> kl_completions",
    "the completion each prompt is paired with for the KL estimate: prompt i with completion i − 1 "
    "(TRL's rotation by one; completions is [B, T], one row per example)",
    _rotation_calls,
    closed_form(("kl_completions",), lambda c: (np.roll(c.args[0], 1, axis=0),), [
        Mistake("kl_pairs_not_mismatched", "matched pairs, prompt i with its own completion i (the KL estimate "
                "then measures the rewards being scored)", lambda c: (c.args[0],)),
        Mistake("kl_pairs_rotated_wrong_way", "the rotation the other way, completion i + 1",
                lambda c: (np.roll(c.args[0], -1, axis=0),)),
        Mistake("kl_pairs_reversed", "reversing the batch: the middle example of an odd batch keeps its own "
                "completion", lambda c: (c.args[0][::-1],)),
        Mistake("rotated_tokens", "rotating the tokens inside each completion (axis 1) instead of the rows",
                lambda c: (np.roll(c.args[0], 1, axis=1),)),
    ], rtol=0.0, atol=0.0),
    rotation_stub,
)


def _sampled_calls():
    rng = np.random.default_rng(19)
    p = rng.normal(-8.0, 2.0, 64)
    return [
        Call("64 samples", (p, p - rng.gamma(2.0, 0.4, 64)), {}),
        Call("5 samples", (p[:5], p[:5] + rng.normal(0.0, 1.0, 5)), {}),
    ]


def _sampled(p, r, ddof=1, se=True, sign=1.0):
    d = sign * (np.asarray(p) - np.asarray(r))
    std = float(np.std(d, ddof=ddof))
    return float(d.mean()), std / np.sqrt(len(d)) if se else std


def sampled_stub(policy_logps, ref_logps):
    raise NotImplementedError("write sampled_kl")


SAMPLED_KL = Exercise(
    "09.sampled_kl", "sampled_kl",
    "sampled_kl(policy_logps, ref_logps) -> (estimate, standard_error)",
    "KL(π ‖ π_ref) from completions sampled from π: the mean of log π − log π_ref over the samples, and its "
    "standard error (sample standard deviation, ddof=1, over √n)",
    _sampled_calls,
    closed_form(("estimate", "standard_error"), lambda c: _sampled(*c.args), [
        Mistake("std_not_standard_error", "the standard deviation of the samples, not of their mean (÷ √n missing)",
                lambda c: _sampled(*c.args, se=False)),
        Mistake("ddof_0", "the standard deviation with ddof=0 (the biased one: use ddof=1)",
                lambda c: _sampled(*c.args, ddof=0)),
        Mistake("ratio_reversed", "the log-ratio the wrong way round, log π_ref − log π",
                lambda c: _sampled(*c.args, sign=-1.0)),
    ]),
    sampled_stub,
)


# ---------------------------------------------------------------------------------------------------
# 10: DPO


def _dpo_cases():
    return oracle_cases("dpo_loss", None)


def _dpo_arguments(case):
    i = case.inputs
    return (i["policy_chosen_logps"], i["policy_rejected_logps"], i["ref_chosen_logps"], i["ref_rejected_logps"],
            float(i["beta"])), {}


def _dpo_reference(call):
    from ..dpo import dpo_loss_and_grad  # noqa: PLC0415

    loss, (dc, dr), _ = dpo_loss_and_grad(*call.args)
    return loss, dc, dr


def dpo_stub(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    raise NotImplementedError("write dpo_loss_and_grad")


DPO_LOSS = Exercise(
    "10.dpo_loss", "dpo_loss_and_grad",
    "dpo_loss_and_grad(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta) "
    "-> (loss, dloss_dpolicy_chosen_logps, dloss_dpolicy_rejected_logps)",
    "DPO's loss mean_i −log σ(h_i), h_i = β((πc − refc) − (πr − refr)), and its gradient for both sides",
    oracle_calls(_dpo_cases, _dpo_arguments),
    oracle_judge("dpo_loss", None, ("loss", "dloss_dpolicy_chosen_logps", "dloss_dpolicy_rejected_logps"),
                 ("loss", "grad/policy_chosen_logps", "grad/policy_rejected_logps"), _dpo_cases,
                 lambda case: ((), np.shape(case.inputs["policy_chosen_logps"]),
                               np.shape(case.inputs["policy_chosen_logps"])), extra=[
                     Mistake("rejected_same_sign", "the rejected side's gradient with the chosen side's sign "
                             "(h falls as πr rises: its gradient is the negative of the chosen one's)",
                             lambda c: (lambda ref: (ref[0], ref[1], ref[1]))(_dpo_reference(c))),
                     Mistake("gradient_not_divided_by_n", "the gradient of the summed loss (the 1/n of the mean "
                             "is missing)", lambda c: (lambda ref, n: (ref[0], ref[1] * n, ref[2] * n))(
                                 _dpo_reference(c), len(c.args[0]))),
                     Mistake("sigma_not_complement", "σ(h) in place of σ(−h) (d/dh −log σ(h) = −σ(−h))",
                             lambda c: (lambda ref, h, n: (ref[0], -call_beta(c) * _sigmoid(h) / n,
                                                           call_beta(c) * _sigmoid(h) / n))(
                                 _dpo_reference(c), _margins(*c.args), len(c.args[0]))),
                 ]),
    dpo_stub, how="oracle",
)


def call_beta(call):
    return call.args[4]


def _margins(pc, pr, rc, rr, beta, *, use_beta=True, sign=1.0, reference=True):
    pc, pr, rc, rr = (np.asarray(a, dtype=np.float64) for a in (pc, pr, rc, rr))
    if not reference:
        rc, rr = np.zeros_like(rc), np.zeros_like(rr)
    return sign * (beta if use_beta else 1.0) * ((pc - rc) - (pr - rr))


def _margin_calls():
    rng = np.random.default_rng(10)
    pc, pr = rng.normal(-9, 2, 6), rng.normal(-9, 2, 6)
    rc, rr = pc + rng.normal(0, 1.5, 6), pr + rng.normal(0, 1.5, 6)
    return [Call("6 pairs, β = 0.1", (pc, pr, rc, rr, 0.1), {}), Call("6 pairs, β = 0.5", (pc, pr, rc, rr, 0.5), {})]


def margin_stub(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    raise NotImplementedError("write reward_margins")


REWARD_MARGIN = Exercise(
    "10.reward_margins", "reward_margins",
    "reward_margins(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta) "
    "-> margins",
    "the implied reward margin of each pair, β[(log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)]",
    _margin_calls,
    closed_form(("margins",), lambda c: (_margins(*c.args),), [
        Mistake("beta_missing", "the margin without β", lambda c: (_margins(*c.args, use_beta=False),)),
        Mistake("sign_flipped", "rejected minus chosen", lambda c: (_margins(*c.args, sign=-1.0),)),
        Mistake("reference_ignored", "the policy's log-probs alone, without the reference's",
                lambda c: (_margins(*c.args, reference=False),)),
    ]),
    margin_stub,
)


# ---------------------------------------------------------------------------------------------------
# 11: β under AdamW


def _adam_calls():
    g = np.array([0.3, -2.0e-3, 5.0, -1.0e-7, 1.0e-9, 0.0])
    return [Call("6 gradients from 5 down to 0, lr = 1e-3, eps = 1e-8", (g, 1e-3, 1e-8), {}),
            Call("the same gradients × 100, lr = 3e-3, eps = 1e-8", (g * 100.0, 3e-3, 1e-8), {})]


def _adam(g, lr, eps, *, corrected=True, sign=1.0, eps_inside=False):
    g = np.asarray(g, dtype=np.float64)
    m, v = 0.1 * g, 0.001 * g * g  # one step of the moments from 0, β1 = 0.9, β2 = 0.999
    if corrected:
        m, v = m / 0.1, v / 0.001
    denominator = np.sqrt(v + eps) if eps_inside else np.sqrt(v) + eps
    return -sign * lr * m / denominator


def adam_stub(grad, lr, eps):
    raise NotImplementedError("write adamw_first_step")


ADAM_FIRST_STEP = Exercise(
    "11.adamw_first_step", "adamw_first_step",
    "adamw_first_step(grad, lr, eps) -> update",
    "the change of the parameters in AdamW's first step from zero moments (β1 = 0.9, β2 = 0.999, bias-corrected, "
    "no weight decay): what stays of the gradient once Adam has divided it by its own size",
    _adam_calls,
    closed_form(("update",), lambda c: (_adam(*c.args),), [
        Mistake("no_bias_correction", "the moments without the bias correction m / (1 − β1^t), v / (1 − β2^t)",
                lambda c: (_adam(*c.args, corrected=False),)),
        Mistake("sign_flipped", "the update with its sign flipped (a step goes against the gradient)",
                lambda c: (_adam(*c.args, sign=-1.0),)),
        Mistake("eps_inside_sqrt", "ε inside the square root, √(v + ε) (AdamW adds it after: √v + ε)",
                lambda c: (_adam(*c.args, eps_inside=True),)),
    ], rtol=1e-9),
    adam_stub,
)


def _saturation_calls():
    return [Call("β = 0.1, a half of the peak", (0.1, 0.5), {}), Call("β = 1, a tenth of the peak", (1.0, 0.1), {}),
            Call("β = 0.01, 90 % of the peak", (0.01, 0.9), {})]


def _saturation(beta, fraction, power=1):
    return 2.0 * np.arccosh(1.0 / np.sqrt(fraction)) / beta ** power


def saturation_stub(beta, fraction):
    raise NotImplementedError("write saturation_log_ratio")


SATURATION = Exercise(
    "11.saturation_log_ratio", "saturation_log_ratio",
    "saturation_log_ratio(beta, fraction) -> r",
    "the log-ratio r > 0 (with z_ref = 0) at which a desirable example's gradient β λ σ(βr) σ(−βr) has fallen to "
    "`fraction` of its peak β λ / 4: how far β lets the policy go",
    _saturation_calls,
    closed_form(("r",), lambda c: (_saturation(*c.args),), [
        Mistake("beta_forgotten", "the argument u = βr of the sigmoid, not the log-ratio r = u / β",
                lambda c: (_saturation(*c.args, power=0),)),
        Mistake("beta_twice", "u / β² (β divided out twice)", lambda c: (_saturation(*c.args, power=2),)),
        Mistake("half_width", "half of the answer (σ(u) σ(−u) = 1 / (4 cosh²(u/2)): mind the u/2)",
                lambda c: (_saturation(*c.args) / 2.0,)),
    ], hint="σ(u) σ(−u) = 1 / (4 cosh²(u/2)); solve for u, then r = u / β."),
    saturation_stub,
)


# ---------------------------------------------------------------------------------------------------
# A1: the oracle


def _apo_cases():
    return oracle_cases("kto_loss", "apo_zero_unpaired")


def _apo_stub(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight):
    raise NotImplementedError("write apo_zero_loss")


APO_ZERO = Exercise(
    "A1.apo_zero_loss", "apo_zero_loss",
    "apo_zero_loss(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight) -> loss",
    "a candidate for the oracle: TRL's unpaired APO-zero loss (desirable λ_D(1 − σ(βr)), undesirable λ_U σ(βr), "
    "mean over the batch), the loss only",
    oracle_calls(_apo_cases, _seed_arguments),
    oracle_judge("kto_loss", "apo_zero_unpaired", ("loss",), ("loss",), _apo_cases, lambda case: ((),)),
    _apo_stub, how="oracle",
)


def _mismatch_calls():
    reference = np.array([[1.0, -200.0, 3.0], [0.5, 1e-3, -2.0]])
    close = reference + np.array([[1e-12, -3e-10, 0.0], [0.0, 1e-10, 2e-11]])  # within 1e-9 of max|r| = 200
    far = reference.copy()
    far[1, 1] += 1e-4
    far[1, 2] += 1.0
    return [Call("a candidate within tolerance of the reference", (close, reference, 1e-9, 1e-12), {}),
            Call("a candidate off in two entries", (far, reference, 1e-9, 1e-12), {}),
            Call("a candidate off in two entries, looser tolerance", (far, reference, 1e-6, 1e-12), {}),
            Call("a NaN in the candidate", (np.array([0.0, np.nan]), np.array([0.0, 1.0]), 1e-9, 1e-12), {})]


def _mismatch(c, r, rtol, atol, per_element=False):
    c, r = np.asarray(c, dtype=np.float64), np.asarray(r, dtype=np.float64)
    limit = atol + rtol * (np.abs(r) if per_element else np.max(np.abs(r)))
    bad = ~(np.abs(c - r) <= limit)
    return int(np.flatnonzero(bad)[0]) if bad.any() else -1


def mismatch_stub(candidate, reference, rtol, atol):
    return -1  # a placeholder: "they agree", whatever they are


FIRST_MISMATCH = Exercise(
    "A1.first_mismatch", "first_mismatch",
    "first_mismatch(candidate, reference, rtol, atol) -> int",
    "the oracle's rule: the flat index of the first entry with |c − r| > atol + rtol · max|r| (NaN never "
    "agrees), or −1 when every entry agrees",
    _mismatch_calls,
    closed_form(("index",), lambda c: (_mismatch(*c.args),), [
        Mistake("per_element_tolerance", "a tolerance per entry, atol + rtol · |r_i| (the oracle scales by max|r|, "
                "so a tiny entry next to a large one is not held to a tiny tolerance)",
                lambda c: (_mismatch(*c.args, per_element=True),)),
    ], rtol=0.0, atol=0.0),
    mismatch_stub,
)


EXERCISES = [Z_REF, KTO_LOSS, KTO_GRADIENT, DESIRABLE_SHARE, BALANCE_RATIO, BAND_WEIGHTS, SEED_LOSS,
             SEED_LOSS_STOP_Z, KL_COMPLETIONS, SAMPLED_KL, DPO_LOSS, REWARD_MARGIN, ADAM_FIRST_STEP, SATURATION,
             APO_ZERO, FIRST_MISMATCH]
