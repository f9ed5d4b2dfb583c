"""Lesson 10's exercises (tutorials/10_kto_vs_dpo.py): DPO: its loss and gradient, and the implied reward margins.

Each exercise lists its inputs (`calls`), its reference and the typical mistakes its grader names; the
machinery (Exercise, Call, the judges, grade()) is in kit.py and registry.py.
"""

from __future__ import annotations

import numpy as np

from .kit import Call, Exercise, Mistake, closed_form, oracle_calls, oracle_cases, oracle_judge, sigmoid


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
                             lambda c: (lambda ref, h, n: (ref[0], -call_beta(c) * sigmoid(h) / n,
                                                           call_beta(c) * sigmoid(h) / n))(
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


EXERCISES = [DPO_LOSS, REWARD_MARGIN]
