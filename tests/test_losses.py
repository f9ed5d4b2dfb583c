"""KTO loss variants and DPO: values against closed forms written in plain Python, gradients against
central finite differences (float64) and PyTorch autograd, Hypothesis properties, numerical stability
and input validation."""

from __future__ import annotations

import math
import os
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kto_np import validation
from kto_np.dpo import dpo_backward, dpo_forward, dpo_loss, dpo_loss_and_grad
from kto_np.gradcheck import check_gradients, format_report, rel_error
from kto_np.losses import (
    VARIANTS,
    KTOConfig,
    check_balance,
    default_beta,
    kto_backward,
    kto_forward,
    kto_loss,
    kto_loss_and_grad,
    log_sigmoid,
    sigmoid,
)

# (variant, options) covering every variant and option
KTO_CASES = [
    ("edifice", {"stop_z_grad": False}),
    ("edifice", {"stop_z_grad": True}),
    ("kto", {}),
    ("kto", {"kl_pairs": True}),
    ("apo_zero_unpaired", {}),
]
CASE_IDS = ["edifice", "edifice-stop_z", "kto-no_kl", "kto-kl_pairs", "apo_zero_unpaired"]
LAYOUTS = ["batch1", "only_desirable", "only_undesirable", "mixed", "mixed_large"]


def make_batch(rng, layout: str, beta: float):
    """policy_logps, ref_logps [n] with β r ~ N(0, 1.5²), and labels for the layout."""
    n = {"batch1": 1, "only_desirable": int(rng.integers(3, 7)), "only_undesirable": int(rng.integers(3, 7)),
         "mixed": int(rng.integers(2, 9)), "mixed_large": 24}[layout]
    ref = rng.uniform(-40.0, -5.0, size=n)
    policy = ref + rng.normal(0.0, 1.5, size=n) / beta
    if layout == "only_desirable":
        labels = np.ones(n, dtype=np.int64)
    elif layout == "only_undesirable":
        labels = np.zeros(n, dtype=np.int64)
    elif layout == "batch1":
        labels = rng.integers(0, 2, size=1)
    else:
        labels = np.concatenate([[0, 1], rng.integers(0, 2, size=n - 2)])
        rng.shuffle(labels)
    return policy, ref, labels


def make_kl_pairs(rng, n: int, beta: float, positive_mean: bool):
    kl_ref = rng.uniform(-40.0, -5.0, size=n)
    shift = 0.8 if positive_mean else -0.8
    kl_policy = kl_ref + (shift + rng.normal(0.0, 0.3, size=n)) / beta
    return kl_policy, kl_ref


def kto_kwargs(variant, options, rng, n, beta):
    kwargs = {"variant": variant, "stop_z_grad": options.get("stop_z_grad", False), "warn_balance": False}
    if options.get("kl_pairs"):
        kwargs["kl_policy_logps"], kwargs["kl_ref_logps"] = make_kl_pairs(rng, n, beta, positive_mean=True)
    return kwargs


def forward(policy, ref, labels, beta, wd=1.0, wu=1.0, *, variant, stop_z_grad=False, kl_policy_logps=None,
            kl_ref_logps=None, warn_balance=False):
    """kto_forward (which takes a KTOConfig and checks nothing) called with kto_loss's arguments."""
    config = KTOConfig(variant, beta, wd, wu, stop_z_grad)
    return kto_forward(config, np.asarray(policy), np.asarray(ref), np.asarray(labels), kl_policy_logps, kl_ref_logps)


def assert_close(name, mine, theirs, rtol, atol=0.0):
    mine_np, theirs_np = np.asarray(mine, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    ok = np.allclose(mine_np, theirs_np, rtol=rtol, atol=atol)
    assert ok, (
        f"{name}: mine vs reference differ (max abs {np.max(np.abs(mine_np - theirs_np)):.3e}, "
        f"rel {rel_error(mine_np, theirs_np):.3e})\n mine:      {mine_np.ravel()[:6]}\n reference: "
        f"{theirs_np.ravel()[:6]}"
    )


# ---------------------------------------------------------------------------------------------------
# closed forms in plain Python (loops and math.exp), independent of the NumPy code


def py_sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def closed_form_kto(policy, ref, labels, beta, wd, wu, variant, kl_policy=None, kl_ref=None,
                    frozen_z=None) -> float:
    """frozen_z (edifice only): use this z instead of mean(β r), the function whose gradient
    stop_z_grad=True computes."""
    n = len(policy)
    r = [float(p) - float(q) for p, q in zip(policy, ref)]
    total = 0.0
    if variant == "edifice":
        kl = [beta * x for x in r]
        z = sum(kl) / n if frozen_z is None else frozen_z
        for k, label in zip(kl, labels):
            total += -wd * py_sigmoid(k - z) if label == 1 else -wu * py_sigmoid(-(k - z))
    elif variant == "kto":
        z = 0.0
        if kl_policy is not None:
            z = max(0.0, sum(float(p) - float(q) for p, q in zip(kl_policy, kl_ref)) / len(kl_policy))
        for x, label in zip(r, labels):
            total += wd * (1 - py_sigmoid(beta * (x - z))) if label == 1 else wu * (1 - py_sigmoid(beta * (z - x)))
    else:
        for x, label in zip(r, labels):
            total += wd * (1 - py_sigmoid(beta * x)) if label == 1 else wu * py_sigmoid(beta * x)
    return total / n


def closed_form_dpo(pc, pr, rc, rr, beta) -> float:
    total = 0.0
    for a, b, c, d in zip(pc, pr, rc, rr):
        h = beta * ((a - c) - (b - d))
        total += -math.log(py_sigmoid(h))
    return total / len(pc)


# ---------------------------------------------------------------------------------------------------
# finite differences


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("variant", "options"), KTO_CASES, ids=CASE_IDS)
def test_kto_gradient_matches_finite_differences(variant, options, layout):
    rng = np.random.default_rng(1000 + 17 * KTO_CASES.index((variant, options)) + LAYOUTS.index(layout))
    beta = float(rng.uniform(0.05, 1.0))
    wd, wu = float(rng.uniform(0.3, 2.0)), float(rng.uniform(0.3, 2.0))
    policy, ref, labels = make_batch(rng, layout, beta)
    kwargs = kto_kwargs(variant, options, rng, len(policy), beta)
    dloss = float(rng.uniform(0.5, 2.0) * rng.choice([-1.0, 1.0]))

    _, cache = forward(policy, ref, labels, beta, wd, wu, **kwargs)
    dpolicy = kto_backward(dloss, cache)
    if kwargs["stop_z_grad"]:
        # the stopped gradient is that of the loss with z held at its value: differentiate that
        frozen_z = cache.z

        def objective():
            return dloss * closed_form_kto(policy, ref, labels, beta, wd, wu, variant, frozen_z=frozen_z)
    else:

        def objective():
            return dloss * kto_loss(policy, ref, labels, beta, wd, wu, **kwargs)

    rows = check_gradients(
        objective,
        {"policy_logps": policy, "ref_logps": ref},
        {"policy_logps": dpolicy, "ref_logps": -dpolicy},
        tolerance=1e-7,
    )
    assert all(r.passed for r in rows), format_report(rows, f"{variant} {options} {layout}")


def test_kto_no_gradient_reaches_kl_pairs_but_value_depends_on_them(rng):
    """z_ref is detached: kl_policy_logps changes the loss, but kto_backward returns dL/dpolicy_logps
    only, holding z_ref fixed (the finite difference over policy_logps alone agrees above)."""
    beta = 0.3
    policy, ref, labels = make_batch(rng, "mixed", beta)
    kl_policy, kl_ref = make_kl_pairs(rng, len(policy), beta, positive_mean=True)
    with_kl = kto_loss(policy, ref, labels, beta, variant="kto", kl_policy_logps=kl_policy,
                       kl_ref_logps=kl_ref, warn_balance=False)
    without_kl = kto_loss(policy, ref, labels, beta, variant="kto", warn_balance=False)
    assert with_kl != without_kl


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_dpo_gradient_matches_finite_differences(n):
    rng = np.random.default_rng(50 + n)
    beta = float(rng.uniform(0.05, 1.0))
    ref_chosen, ref_rejected = rng.uniform(-40, -5, size=n), rng.uniform(-40, -5, size=n)
    chosen = ref_chosen + rng.normal(0, 1.5, size=n) / beta
    rejected = ref_rejected + rng.normal(0, 1.5, size=n) / beta
    dloss = -1.3
    _, cache = dpo_forward(chosen, rejected, ref_chosen, ref_rejected, beta)
    dchosen, drejected = dpo_backward(dloss, cache)
    rows = check_gradients(
        lambda: dloss * dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta),
        {"policy_chosen_logps": chosen, "policy_rejected_logps": rejected,
         "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected},
        {"policy_chosen_logps": dchosen, "policy_rejected_logps": drejected,
         "ref_chosen_logps": -dchosen, "ref_rejected_logps": -drejected},
        tolerance=1e-7,
    )
    assert all(r.passed for r in rows), format_report(rows, f"dpo n={n}")


def test_edifice_two_examples_of_one_class_is_constant():
    """n = 2, one class: σ(a) + σ(-a) = 1, so the edifice loss is -λ/2 whatever the log-probs."""
    for labels, weight_kw, weight in (([1, 1], "desirable_weight", 1.7), ([0, 0], "undesirable_weight", 0.6)):
        loss, grad, _ = kto_loss_and_grad([-3.0, -9.0], [-4.0, -4.5], labels, 0.7, **{weight_kw: weight})
        assert loss == pytest.approx(-weight / 2, rel=1e-14)
        assert np.max(np.abs(grad)) < 1e-15


# ---------------------------------------------------------------------------------------------------
# closed forms


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("variant", "options"), KTO_CASES, ids=CASE_IDS)
def test_kto_value_matches_closed_form(variant, options, layout):
    rng = np.random.default_rng(2000 + KTO_CASES.index((variant, options)) * 10 + LAYOUTS.index(layout))
    beta = float(rng.uniform(0.05, 1.0))
    wd, wu = float(rng.uniform(0.0, 2.0)), float(rng.uniform(0.3, 2.0))
    policy, ref, labels = make_batch(rng, layout, beta)
    kwargs = kto_kwargs(variant, options, rng, len(policy), beta)
    mine = kto_loss(policy, ref, labels, beta, wd, wu, **kwargs)
    theirs = closed_form_kto(policy.tolist(), ref.tolist(), labels.tolist(), beta, wd, wu, variant,
                             kwargs.get("kl_policy_logps"), kwargs.get("kl_ref_logps"))
    assert isinstance(mine, float)
    assert_close(f"{variant} loss", mine, theirs, rtol=1e-12, atol=1e-15)


def test_kto_negative_kl_estimate_is_clamped_to_zero(rng):
    beta = 0.2
    policy, ref, labels = make_batch(rng, "mixed", beta)
    kl_policy, kl_ref = make_kl_pairs(rng, 7, beta, positive_mean=False)
    loss, _, metrics = kto_loss_and_grad(policy, ref, labels, beta, variant="kto", kl_policy_logps=kl_policy,
                                         kl_ref_logps=kl_ref, warn_balance=False)
    assert metrics["kl"] == 0.0
    assert loss == kto_loss(policy, ref, labels, beta, variant="kto", warn_balance=False)
    kl_policy, kl_ref = make_kl_pairs(rng, 7, beta, positive_mean=True)
    _, _, metrics = kto_loss_and_grad(policy, ref, labels, beta, variant="kto", kl_policy_logps=kl_policy,
                                      kl_ref_logps=kl_ref, warn_balance=False)
    assert_close("kl", metrics["kl"], sum(kl_policy - kl_ref) / 7, rtol=1e-12)


def test_apo_zero_unpaired_equals_kto_without_kl_pairs(rng):
    policy, ref, labels = make_batch(rng, "mixed_large", 0.5)
    apo = kto_loss_and_grad(policy, ref, labels, 0.5, 1.2, 0.8, variant="apo_zero_unpaired")
    kto = kto_loss_and_grad(policy, ref, labels, 0.5, 1.2, 0.8, variant="kto", warn_balance=False)
    assert_close("loss", apo[0], kto[0], rtol=1e-15)
    assert_close("grad", apo[1], kto[1], rtol=1e-15)


@pytest.mark.parametrize("n", [1, 3, 11])
def test_dpo_value_matches_closed_form(n):
    rng = np.random.default_rng(70 + n)
    pc, pr, rc, rr = (rng.uniform(-30, -5, size=n) for _ in range(4))
    mine = dpo_loss(pc, pr, rc, rr, 0.4)
    assert isinstance(mine, float)
    assert_close("dpo loss", mine, closed_form_dpo(pc, pr, rc, rr, 0.4), rtol=1e-12)


@pytest.mark.parametrize(("variant", "options"), KTO_CASES, ids=CASE_IDS)
def test_metrics_match_closed_form(variant, options):
    rng = np.random.default_rng(3)
    beta = 0.25
    policy, ref, labels = make_batch(rng, "mixed_large", beta)
    kwargs = kto_kwargs(variant, options, rng, len(policy), beta)
    _, _, metrics = kto_loss_and_grad(policy, ref, labels, beta, **kwargs)
    chosen = [beta * (p - q) for p, q, y in zip(policy, ref, labels) if y == 1]
    rejected = [beta * (p - q) for p, q, y in zip(policy, ref, labels) if y == 0]
    if variant == "edifice":
        kl = sum(beta * (p - q) for p, q in zip(policy, ref)) / len(policy)
    elif options.get("kl_pairs"):
        kl = max(0.0, float(np.mean(kwargs["kl_policy_logps"] - kwargs["kl_ref_logps"])))
    else:
        kl = 0.0
    expected = {
        "kl": kl,
        "rewards/chosen": sum(chosen) / len(chosen),
        "rewards/rejected": sum(rejected) / len(rejected),
        "rewards/margins": sum(chosen) / len(chosen) - sum(rejected) / len(rejected),
        "logps/chosen": sum(p for p, y in zip(policy, labels) if y == 1) / len(chosen),
        "logps/rejected": sum(p for p, y in zip(policy, labels) if y == 0) / len(rejected),
    }
    for name, value in expected.items():
        assert type(metrics[name]) is float, name
        assert_close(f"metrics[{name!r}]", metrics[name], value, rtol=1e-12, atol=1e-15)
    assert (metrics["count/chosen"], metrics["count/rejected"]) == (len(chosen), len(rejected))
    assert type(metrics["count/chosen"]) is int


def test_dpo_metrics_match_closed_form(rng):
    pc, pr, rc, rr = (rng.uniform(-30, -5, size=9) for _ in range(4))
    _, _, metrics = dpo_loss_and_grad(pc, pr, rc, rr, 0.3)
    chosen, rejected = 0.3 * (pc - rc), 0.3 * (pr - rr)
    assert_close("rewards/chosen", metrics["rewards/chosen"], sum(chosen) / 9, rtol=1e-12)
    assert_close("rewards/rejected", metrics["rewards/rejected"], sum(rejected) / 9, rtol=1e-12)
    assert_close("rewards/margins", metrics["rewards/margins"], sum(chosen - rejected) / 9, rtol=1e-12)
    assert metrics["rewards/accuracies"] == sum(chosen > rejected) / 9
    assert_close("logps/chosen", metrics["logps/chosen"], sum(pc) / 9, rtol=1e-12)
    assert_close("logps/rejected", metrics["logps/rejected"], sum(pr) / 9, rtol=1e-12)


def test_sigmoid_and_log_sigmoid_match_math():
    xs = np.array([-700.0, -40.0, -3.5, -1e-3, 0.0, 2e-4, 1.0, 36.0, 700.0])
    assert_close("sigmoid", sigmoid(xs), [py_sigmoid(x) if x > -700 else math.exp(x) for x in xs], rtol=1e-15)
    expected = [-math.log1p(math.exp(-x)) if x > -30 else x - math.log1p(math.exp(x)) for x in xs]
    assert_close("log_sigmoid", log_sigmoid(xs), expected, rtol=1e-15)
    assert default_beta() == 0.1


# ---------------------------------------------------------------------------------------------------
# Hypothesis properties

finite_logps = st.floats(-60.0, 0.0, allow_nan=False, allow_infinity=False)


@st.composite
def kto_batches(draw, min_size=1, max_size=8, labels_strategy=None):
    n = draw(st.integers(min_size, max_size))
    policy = np.array(draw(st.lists(finite_logps, min_size=n, max_size=n)))
    ref = np.array(draw(st.lists(finite_logps, min_size=n, max_size=n)))
    labels = np.array(draw(labels_strategy or st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    beta = draw(st.floats(0.01, 2.0))
    wd = draw(st.floats(0.0, 3.0))
    wu = draw(st.floats(0.1, 3.0))
    return policy, ref, labels, beta, wd, wu


@st.composite
def kl_pair_batches(draw):
    m = draw(st.integers(1, 6))
    return (np.array(draw(st.lists(finite_logps, min_size=m, max_size=m))),
            np.array(draw(st.lists(finite_logps, min_size=m, max_size=m))))


@given(kto_batches(), st.floats(-100.0, 100.0))
def test_edifice_invariant_to_shifting_policy_logps(batch, shift):
    policy, ref, labels, beta, wd, wu = batch
    loss, grad, _ = kto_loss_and_grad(policy, ref, labels, beta, wd, wu, warn_balance=False)
    shifted = kto_loss(policy + shift, ref, labels, beta, wd, wu, warn_balance=False)
    assert shifted == pytest.approx(loss, abs=1e-12 * (1 + beta * abs(shift)))
    assert abs(grad.sum()) <= 1e-15 * len(policy) * (1 + np.abs(grad).max())


@pytest.mark.parametrize("with_kl", [False, True])
@given(batch=kto_batches(), kl_pairs=kl_pair_batches(), shift=st.floats(-100.0, 100.0))
def test_kto_invariant_to_shifting_policy_and_ref(with_kl, batch, kl_pairs, shift):
    policy, ref, labels, beta, wd, wu = batch
    kl = {"kl_policy_logps": kl_pairs[0], "kl_ref_logps": kl_pairs[1]} if with_kl else {}
    loss, grad, _ = kto_loss_and_grad(policy, ref, labels, beta, wd, wu, variant="kto", warn_balance=False,
                                      **kl)
    kl_shifted = {name: value + shift for name, value in kl.items()}
    loss_s, grad_s, _ = kto_loss_and_grad(policy + shift, ref + shift, labels, beta, wd, wu, variant="kto",
                                          warn_balance=False, **kl_shifted)
    # r = policy - ref is recomputed after the shift: rounding of |shift| ~ 1e-14 is all that may differ
    tol = 1e-13 * beta * (1 + abs(shift)) * max(wd, wu)
    assert loss_s == pytest.approx(loss, abs=tol)
    np.testing.assert_allclose(grad_s, grad, atol=beta * tol)


@pytest.mark.parametrize(("variant", "options"), KTO_CASES, ids=CASE_IDS)
@given(batch=kto_batches(), kl_pairs=kl_pair_batches(), data=st.data())
def test_permuting_the_batch_permutes_the_gradient(variant, options, batch, kl_pairs, data):
    policy, ref, labels, beta, wd, wu = batch
    kwargs = {"variant": variant, "stop_z_grad": options.get("stop_z_grad", False), "warn_balance": False}
    if options.get("kl_pairs"):
        kwargs.update(kl_policy_logps=kl_pairs[0], kl_ref_logps=kl_pairs[1])
    order = np.array(data.draw(st.permutations(range(len(policy)))))
    loss, grad, metrics = kto_loss_and_grad(policy, ref, labels, beta, wd, wu, **kwargs)
    loss_p, grad_p, metrics_p = kto_loss_and_grad(policy[order], ref[order], labels[order], beta, wd, wu,
                                                  **kwargs)
    assert loss_p == pytest.approx(loss, rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(grad_p, grad[order], rtol=1e-9, atol=1e-15 * (1 + np.abs(grad).max()))
    assert (metrics_p["count/chosen"], metrics_p["count/rejected"]) == (metrics["count/chosen"],
                                                                        metrics["count/rejected"])


@pytest.mark.parametrize(("variant", "options"), KTO_CASES, ids=CASE_IDS)
@given(batch=kto_batches(), kl_pairs=kl_pair_batches())
def test_loss_bounds(variant, options, batch, kl_pairs):
    policy, ref, labels, beta, wd, wu = batch
    kwargs = {"variant": variant, "stop_z_grad": options.get("stop_z_grad", False), "warn_balance": False}
    if options.get("kl_pairs"):
        kwargs.update(kl_policy_logps=kl_pairs[0], kl_ref_logps=kl_pairs[1])
    loss = kto_loss(policy, ref, labels, beta, wd, wu, **kwargs)
    top = max(wd, wu) * (1 + 1e-12)
    if variant == "edifice":
        assert -top <= loss <= 0.0
    else:
        assert 0.0 <= loss <= top


@pytest.mark.parametrize(("variant", "options"), KTO_CASES, ids=CASE_IDS)
@given(batch=kto_batches(), kl_pairs=kl_pair_batches(), data=st.data())
def test_raising_desirable_logp_never_raises_loss(variant, options, batch, kl_pairs, data):
    """kto, apo: the value is monotone in each example (z does not depend on policy_logps), so both the
    gradient sign and a finite step are checked; edifice with stop_z_grad: the (stopped) gradient of
    a desirable example is <= 0. Edifice with the z gradient: only when every other example is
    undesirable (see test_edifice_with_z_gradient_is_not_monotone for why)."""
    policy, ref, labels, beta, wd, wu = batch
    j = data.draw(st.integers(0, len(policy) - 1))
    labels = labels.copy()
    labels[j] = 1
    if variant == "edifice" and not options["stop_z_grad"]:
        labels[:] = 0
        labels[j] = 1
    kwargs = {"variant": variant, "stop_z_grad": options.get("stop_z_grad", False), "warn_balance": False}
    if options.get("kl_pairs"):
        kwargs.update(kl_policy_logps=kl_pairs[0], kl_ref_logps=kl_pairs[1])
    loss, grad, _ = kto_loss_and_grad(policy, ref, labels, beta, wd, wu, **kwargs)
    assert grad[j] <= 0.0
    if variant != "edifice" or not options["stop_z_grad"]:
        raised = policy.copy()
        raised[j] += data.draw(st.floats(1e-3, 20.0))
        assert kto_loss(raised, ref, labels, beta, wd, wu, **kwargs) <= loss + 1e-13 * max(wd, wu)
    undesirable = np.flatnonzero(labels == 0)
    if variant != "edifice" or options["stop_z_grad"]:
        assert np.all(grad[undesirable] >= 0.0)


def test_edifice_with_z_gradient_is_not_monotone():
    """z = mean(β r) carries gradient: raising one desirable example's log-prob raises z and so lowers
    every other example's reward. With a saturated example and two unsaturated desirable ones, the
    loss goes UP: dL/dr_0 = β (g_0 - mean g) > 0 because g_0 ≈ 0 and mean g < 0."""
    policy, ref, labels = np.array([10.0, 0.0, 0.0]), np.zeros(3), np.ones(3, dtype=int)
    loss, grad, _ = kto_loss_and_grad(policy, ref, labels, beta=1.0)
    assert grad[0] > 1e-3
    raised = policy.copy()
    raised[0] += 0.5
    assert kto_loss(raised, ref, labels, beta=1.0) > loss
    _, grad_stopped, _ = kto_loss_and_grad(policy, ref, labels, beta=1.0, stop_z_grad=True)
    assert grad_stopped[0] < 0.0


@pytest.mark.parametrize("variant", VARIANTS)
@given(batch=kto_batches(), doubled=st.sampled_from(["desirable_weight", "undesirable_weight"]))
def test_doubling_a_weight_doubles_that_class_contribution(variant, batch, doubled):
    """L is linear in (λ_D, λ_U) and z does not depend on them, so the desirable contribution is
    L(λ_D, λ_U) - L(0, λ_U); doubling λ_D doubles it and leaves the undesirable part alone."""
    policy, ref, labels, beta, wd, wu = batch
    weights = {"desirable_weight": wd + 0.1, "undesirable_weight": wu}
    other = "undesirable_weight" if doubled == "desirable_weight" else "desirable_weight"

    def loss(**override):
        return kto_loss(policy, ref, labels, beta, variant=variant, warn_balance=False, **{**weights, **override})

    without_class = loss(**{doubled: 0.0})
    contribution = loss() - without_class
    doubled_contribution = loss(**{doubled: 2 * weights[doubled]}) - without_class
    assert doubled_contribution == pytest.approx(2 * contribution, abs=1e-14 * max(wd, wu, 1.0))
    assert loss(**{doubled: 2 * weights[doubled], other: 0.0}) == pytest.approx(
        2 * loss(**{other: 0.0}), rel=1e-14, abs=1e-300)


@pytest.mark.parametrize(("variant", "options"), KTO_CASES, ids=CASE_IDS)
@given(batch=kto_batches(), kl_pairs=kl_pair_batches(), label=st.integers(0, 1))
def test_metrics_are_nan_free_with_one_class(variant, options, batch, kl_pairs, label):
    policy, ref, _, beta, wd, wu = batch
    labels = np.full(len(policy), label)
    kwargs = {"variant": variant, "stop_z_grad": options.get("stop_z_grad", False)}
    if options.get("kl_pairs"):
        kwargs.update(kl_policy_logps=kl_pairs[0], kl_ref_logps=kl_pairs[1])
    loss, grad, metrics = kto_loss_and_grad(policy, ref, labels, beta, wd + 0.1, wu, **kwargs)
    assert math.isfinite(loss) and np.all(np.isfinite(grad))
    present, absent = ("chosen", "rejected") if label == 1 else ("rejected", "chosen")
    assert metrics[f"rewards/{absent}"] is None and metrics[f"logps/{absent}"] is None
    assert metrics["rewards/margins"] is None
    assert metrics[f"count/{absent}"] == 0 and metrics[f"count/{present}"] == len(policy)
    for name in ("kl", f"rewards/{present}", f"logps/{present}"):
        assert math.isfinite(metrics[name]), name


# ---------------------------------------------------------------------------------------------------
# numerical stability


@pytest.mark.parametrize(("variant", "options"), KTO_CASES, ids=CASE_IDS)
def test_extreme_rewards_are_finite_without_warnings(variant, options):
    beta = 0.1
    policy = np.array([1e5, -1e5, 1e5, -1e5, 3.0, -2e4])  # β r up to ±1e4
    ref = np.zeros(6)
    labels = np.array([1, 1, 0, 0, 1, 0])
    kwargs = {"variant": variant, "stop_z_grad": options.get("stop_z_grad", False)}
    if options.get("kl_pairs"):
        kwargs.update(kl_policy_logps=np.array([1e5, -2e4]), kl_ref_logps=np.zeros(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, grad, metrics = kto_loss_and_grad(policy, ref, labels, beta, **kwargs)
        loss32, grad32, _ = kto_loss_and_grad(policy.astype(np.float32), ref.astype(np.float32), labels,
                                              beta, **kwargs)
    assert math.isfinite(loss) and math.isfinite(loss32)
    assert np.all(np.isfinite(grad)) and np.all(np.isfinite(grad32))
    assert all(v is None or math.isfinite(v) for v in metrics.values())
    if variant == "apo_zero_unpaired" or (variant == "kto" and not options.get("kl_pairs")):
        # saturated: desirable r = +1e5 and undesirable r = -1e5 cost 0; the wrong signs cost λ = 1
        expected = (0 + 1 + 1 + 0 + (1 - py_sigmoid(0.3)) + 0) / 6
        assert loss == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("variant", VARIANTS)
def test_saturated_tails_keep_relative_precision(variant):
    """β r = ±30: σ(-30) ≈ 9.4e-14 must come out to full relative precision, not as 1 - σ(30)."""
    beta, wd, wu = 0.5, 1.3, 0.9
    policy, ref, labels = np.array([60.0, -60.0]), np.zeros(2), np.array([1, 0])
    loss, grad, _ = kto_loss_and_grad(policy, ref, labels, beta, wd, wu, variant=variant, warn_balance=False)
    tail = math.exp(-30.0) / (1.0 + math.exp(-30.0))  # σ(-30)
    slope = tail * (1.0 - tail)  # σ(30) σ(-30)
    if variant == "edifice":  # z = 0, rewards ±30: both examples sit at -λ σ(30)
        expected_loss = -(wd + wu) * (1.0 - tail) / 2
        g = [-wd * slope / 2, -wu * slope / 2]  # ∂loss_i/∂reward_i / n; undesirable: -λ σ(-reward)
        g[1] = -g[1]
        expected_grad = [beta * (g[0] - (g[0] + g[1]) / 2), beta * (g[1] - (g[0] + g[1]) / 2)]
    else:
        expected_loss = (wd + wu) * tail / 2
        expected_grad = [-beta * wd * slope / 2, beta * wu * slope / 2]  # undesirable: λ_U σ(β r)
    assert_close(f"{variant} loss", loss, expected_loss, rtol=1e-13)
    assert_close(f"{variant} dL/dpolicy_logps", grad, expected_grad, rtol=1e-13)


def test_dpo_extreme_margins_are_finite_without_warnings():
    chosen = np.array([1e5, -1e5, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, (dchosen, drejected), _ = dpo_loss_and_grad(chosen, np.zeros(3), np.zeros(3), np.zeros(3), 0.1)
        values = (sigmoid(np.array([1e4, -1e4, 1e300])), log_sigmoid(np.array([1e4, -1e4, -1e300])))
    assert loss == pytest.approx((0.0 + 1e4 + math.log(2)) / 3, rel=1e-14)
    assert np.all(np.isfinite(dchosen)) and np.all(np.isfinite(drejected))
    assert np.all(np.isfinite(values[0])) and values[1][2] == -1e300


# ---------------------------------------------------------------------------------------------------
# PyTorch parity


def torch_kto_loss(torch, policy, ref, labels, beta, wd, wu, variant, stop_z_grad, kl_policy, kl_ref):
    """The formulas from the design document, written directly in torch; autograd does the rest."""
    r = policy - ref
    desirable = torch.as_tensor(labels == 1)
    if variant == "edifice":
        kl = beta * r
        z = kl.mean().detach() if stop_z_grad else kl.mean()
        reward = kl - z
        losses = torch.where(desirable, -wd * torch.sigmoid(reward), -wu * torch.sigmoid(-reward))
    elif variant == "kto":
        z = torch.zeros((), dtype=torch.float64)
        if kl_policy is not None:
            z = (kl_policy - kl_ref).mean().clamp(min=0).detach()
        losses = torch.where(desirable, wd * (1 - torch.sigmoid(beta * (r - z))),
                             wu * (1 - torch.sigmoid(beta * (z - r))))
    else:
        losses = torch.where(desirable, wd * (1 - torch.sigmoid(beta * r)), wu * torch.sigmoid(beta * r))
    return losses.mean()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("variant", "options"), KTO_CASES, ids=CASE_IDS)
def test_kto_matches_torch_autograd(variant, options, layout):
    torch = pytest.importorskip("torch", reason="torch not installed (pip install 'kto_np[torch]')")
    rng = np.random.default_rng(4000 + KTO_CASES.index((variant, options)) * 10 + LAYOUTS.index(layout))
    beta = float(rng.uniform(0.05, 1.0))
    wd, wu = float(rng.uniform(0.3, 2.0)), float(rng.uniform(0.3, 2.0))
    policy, ref, labels = make_batch(rng, layout, beta)
    kwargs = kto_kwargs(variant, options, rng, len(policy), beta)
    loss, grad, _ = kto_loss_and_grad(policy, ref, labels, beta, wd, wu, **kwargs)

    policy_t = torch.tensor(policy, dtype=torch.float64, requires_grad=True)
    kl = [torch.tensor(kwargs[k]) if k in kwargs else None for k in ("kl_policy_logps", "kl_ref_logps")]
    loss_t = torch_kto_loss(torch, policy_t, torch.tensor(ref), labels, beta, wd, wu, variant,
                            kwargs["stop_z_grad"], *kl)
    loss_t.backward()
    assert_close(f"{variant} loss vs torch", loss, loss_t.item(), rtol=1e-12)
    err = rel_error(grad, policy_t.grad.numpy())
    assert err <= 1e-12, (f"{variant} dL/dpolicy_logps vs torch: rel error {err:.3e}\n mine:  {grad[:6]}\n"
                          f" torch: {policy_t.grad.numpy()[:6]}")


@pytest.mark.parametrize("n", [1, 6])
def test_dpo_matches_torch_autograd(n):
    torch = pytest.importorskip("torch", reason="torch not installed (pip install 'kto_np[torch]')")
    rng = np.random.default_rng(90 + n)
    pc, pr, rc, rr = (rng.uniform(-30, -5, size=n) for _ in range(4))
    loss, (dchosen, drejected), _ = dpo_loss_and_grad(pc, pr, rc, rr, 0.35)
    pc_t = torch.tensor(pc, requires_grad=True)
    pr_t = torch.tensor(pr, requires_grad=True)
    loss_t = -torch.nn.functional.logsigmoid(0.35 * ((pc_t - torch.tensor(rc)) - (pr_t - torch.tensor(rr))))
    loss_t.mean().backward()
    assert_close("dpo loss vs torch", loss, loss_t.mean().item(), rtol=1e-12)
    assert rel_error(dchosen, pc_t.grad.numpy()) <= 1e-12, (dchosen, pc_t.grad)
    assert rel_error(drejected, pr_t.grad.numpy()) <= 1e-12, (drejected, pr_t.grad)


# ---------------------------------------------------------------------------------------------------
# dtypes, containers, backward seed


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_in_float32_grad_out(variant, rng):
    policy, ref, labels = make_batch(rng, "mixed", 0.5)
    loss64, grad64, _ = kto_loss_and_grad(policy, ref, labels, 0.5, variant=variant, warn_balance=False)
    loss32, grad32, _ = kto_loss_and_grad(policy.astype(np.float32), ref.astype(np.float32), labels, 0.5,
                                          variant=variant, warn_balance=False)
    assert grad32.dtype == np.float32 and grad64.dtype == np.float64
    assert isinstance(loss32, float)
    assert_close("float32 loss", loss32, loss64, rtol=1e-4, atol=1e-5)
    assert_close("float32 grad", grad32, grad64, rtol=1e-3, atol=1e-5)
    _, (dchosen, drejected), _ = dpo_loss_and_grad(policy.astype(np.float32), ref.astype(np.float32),
                                                   ref.astype(np.float32), policy.astype(np.float32))
    assert dchosen.dtype == np.float32 and drejected.dtype == np.float32


def test_grad_keeps_policy_dtype_when_ref_is_float64(rng):
    """A float64 reference with a float32 policy computes r in float64 and returns a float32 gradient."""
    policy, ref, labels = make_batch(rng, "mixed", 0.5)
    for variant in VARIANTS:
        _, grad, _ = kto_loss_and_grad(policy.astype(np.float32), ref, labels, 0.5, variant=variant,
                                       warn_balance=False)
        assert grad.dtype == np.float32, variant
    _, (dchosen, drejected), _ = dpo_loss_and_grad(policy.astype(np.float32), ref, ref, policy)
    assert dchosen.dtype == np.float32 and drejected.dtype == np.float64


def test_lists_and_bool_labels_are_accepted():
    loss, grad, _ = kto_loss_and_grad([-1.0, -2.0, -3.0], [-1.5, -1.5, -1.5], [True, False, True],
                                      warn_balance=False)
    assert isinstance(grad, np.ndarray) and grad.dtype == np.float64
    assert loss == kto_loss(np.array([-1.0, -2.0, -3.0]), np.array([-1.5, -1.5, -1.5]), np.array([1, 0, 1]),
                            warn_balance=False)


@pytest.mark.parametrize(("variant", "options"), KTO_CASES, ids=CASE_IDS)
def test_backward_is_linear_in_the_upstream_gradient(variant, options, rng):
    policy, ref, labels = make_batch(rng, "mixed", 0.3)
    _, cache = forward(policy, ref, labels, 0.3, **kto_kwargs(variant, options, rng, len(policy), 0.3))
    assert_close("dL/dpolicy_logps", kto_backward(-2.5, cache), -2.5 * kto_backward(1.0, cache), rtol=1e-15)


# ---------------------------------------------------------------------------------------------------
# desirable/undesirable balance


@pytest.mark.parametrize(("labels", "wd", "wu", "ratio"), [
    ([1, 1, 1, 0, 0, 0], 1.0, 1.0, 1.0),
    ([1, 1, 1, 1, 0, 0, 0], 1.0, 1.0, 4 / 3),
    ([1, 0, 0, 0, 0], 3.0, 0.75, 1.0),
    ([1, 1], 1.0, 1.0, None),
    ([0, 0, 0], 1.0, 1.0, None),
])
def test_check_balance_inside_range_is_silent(labels, wd, wu, ratio):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = check_balance(labels, wd, wu)
    assert result == (None if ratio is None else pytest.approx(ratio, rel=1e-15))


@pytest.mark.parametrize(("labels", "wd", "wu", "ratio"), [
    ([1, 1, 1, 1, 0, 0], 1.0, 1.0, 2.0),
    ([1, 0, 0, 0], 1.0, 1.0, 1 / 3),
    ([1, 0], 1.0, 0.0, math.inf),
    ([1, 0], 0.0, 1.0, 0.0),
])
def test_check_balance_outside_range_warns(labels, wd, wu, ratio):
    with pytest.warns(UserWarning, match="outside"):
        assert check_balance(labels, wd, wu) == ratio


def test_unbalanced_batch_warns_for_edifice_and_kto_only():
    policy, ref, labels = [-1.0, -2.0, -3.0, -4.0], [-2.0] * 4, [1, 1, 1, 0]
    for variant in ("edifice", "kto"):
        with pytest.warns(UserWarning, match="desirable_weight"):
            kto_loss(policy, ref, labels, variant=variant)
        with pytest.warns(UserWarning, match="Eq. 8"):
            kto_loss_and_grad(policy, ref, labels, variant=variant)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            kto_loss(policy, ref, labels, variant=variant, warn_balance=False)
            kto_loss(policy, ref, labels, 0.1, 1.0, 2.5, variant=variant)  # 3 / 2.5 = 1.2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kto_loss(policy, ref, labels, variant="apo_zero_unpaired")


# ---------------------------------------------------------------------------------------------------
# bad input

GOOD = {"policy_logps": [-1.0, -2.0], "ref_logps": [-1.5, -1.5], "labels": [1, 0]}
BAD_KTO = [
    ({"policy_logps": [[-1.0, -2.0]]}, ValueError, "policy_logps"),
    ({"policy_logps": [], "ref_logps": [], "labels": []}, ValueError, "policy_logps"),
    ({"policy_logps": [-1.0, float("nan")]}, ValueError, "policy_logps"),
    ({"policy_logps": [-1.0, float("inf")]}, ValueError, "policy_logps"),
    ({"policy_logps": "abc"}, TypeError, "policy_logps"),
    ({"ref_logps": [-1.0, -2.0, -3.0]}, ValueError, "ref_logps"),
    ({"ref_logps": [-1.0, -float("inf")]}, ValueError, "ref_logps"),
    ({"labels": [1, 2]}, ValueError, "labels"),
    ({"labels": [1, -1]}, ValueError, "labels"),
    ({"labels": [0.5, 1]}, ValueError, "labels"),
    ({"labels": [float("nan"), 1]}, ValueError, "labels"),
    ({"labels": [1, 0, 1]}, ValueError, "labels"),
    ({"labels": ["yes", "no"]}, TypeError, "labels"),
    ({"beta": 0.0}, ValueError, "beta"),
    ({"beta": -0.1}, ValueError, "beta"),
    ({"beta": float("nan")}, ValueError, "beta"),
    ({"beta": float("inf")}, ValueError, "beta"),
    ({"beta": "0.1"}, TypeError, "beta"),
    ({"desirable_weight": -1.0}, ValueError, "desirable_weight"),
    ({"desirable_weight": float("nan")}, ValueError, "desirable_weight"),
    ({"undesirable_weight": float("inf")}, ValueError, "undesirable_weight"),
    ({"desirable_weight": 0.0, "undesirable_weight": 0.0}, ValueError, "undesirable_weight"),
    ({"variant": "dpo"}, ValueError, "variant"),
    ({"stop_z_grad": 1}, TypeError, "stop_z_grad"),
    ({"stop_z_grad": "yes"}, TypeError, "stop_z_grad"),
    ({"warn_balance": None}, TypeError, "warn_balance"),
    ({"variant": "edifice", "kl_policy_logps": [-1.0], "kl_ref_logps": [-1.0]}, ValueError, "kl_policy_logps"),
    ({"variant": "edifice", "kl_ref_logps": [-1.0]}, ValueError, "kl_ref_logps"),
    ({"variant": "apo_zero_unpaired", "kl_policy_logps": [-1.0], "kl_ref_logps": [-1.0]}, ValueError,
     "kl_policy_logps"),
    ({"variant": "kto", "kl_policy_logps": [-1.0]}, ValueError, "kl_ref_logps"),
    ({"variant": "kto", "kl_ref_logps": [-1.0]}, ValueError, "kl_policy_logps"),
    ({"variant": "kto", "kl_policy_logps": [-1.0, -2.0], "kl_ref_logps": [-1.0]}, ValueError, "kl_ref_logps"),
    ({"variant": "kto", "kl_policy_logps": [float("nan")], "kl_ref_logps": [-1.0]}, ValueError,
     "kl_policy_logps"),
    ({"variant": "kto", "kl_policy_logps": [-1.0], "kl_ref_logps": [float("inf")]}, ValueError, "kl_ref_logps"),
    ({"variant": "kto", "kl_policy_logps": [], "kl_ref_logps": []}, ValueError, "kl_policy_logps"),
    ({"variant": "kto", "kl_policy_logps": [[-1.0]], "kl_ref_logps": [[-1.0]]}, ValueError, "kl_policy_logps"),
]


@pytest.mark.parametrize("function", [kto_loss, kto_loss_and_grad])
@pytest.mark.parametrize(("override", "error", "name"), BAD_KTO)
def test_kto_bad_input_names_the_argument(function, override, error, name):
    with pytest.raises(error, match=name):
        function(**{**GOOD, **override})


GOOD_DPO = {"policy_chosen_logps": [-1.0, -2.0], "policy_rejected_logps": [-3.0, -2.5],
            "ref_chosen_logps": [-1.5, -1.5], "ref_rejected_logps": [-2.0, -2.0]}


@pytest.mark.parametrize("name", list(GOOD_DPO))
@pytest.mark.parametrize("bad", [[-1.0], [[-1.0, -2.0]], [-1.0, float("nan")], []])
def test_dpo_bad_input_names_the_argument(name, bad):
    with pytest.raises(ValueError, match=name):
        dpo_loss(**{**GOOD_DPO, name: bad})


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan")])
def test_dpo_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        dpo_loss_and_grad(**GOOD_DPO, beta=beta)


def test_dpo_backward_and_check_balance_bad_input():
    _, dpo_cache = dpo_forward(**GOOD_DPO)
    with pytest.raises(TypeError, match="dloss"):
        dpo_backward("1", dpo_cache)
    with pytest.raises(ValueError, match="labels"):
        check_balance([1, 3])
    with pytest.raises(ValueError, match="labels"):
        check_balance([[1, 0]])
    with pytest.raises(ValueError, match="desirable_weight"):
        check_balance([1, 0], -1.0)
    with pytest.raises(ValueError, match="undesirable_weight"):
        check_balance([1, 0], 0.0, 0.0)


def test_dpo_backward_with_a_foreign_cache_is_a_type_error():
    with pytest.raises(TypeError, match="DPOCache"):
        dpo_backward(1.0, (1, 2))


@pytest.mark.parametrize("shift", [-1.5, 0.0, 0.7])
def test_kl_raw_is_the_estimate_before_the_clamp(shift):
    rng = np.random.default_rng(11)
    policy, ref = rng.normal(-10.0, 2.0, 6), rng.normal(-10.0, 2.0, 6)
    kl_ref = rng.normal(-20.0, 2.0, 6)
    kl_policy = kl_ref + shift + rng.normal(0.0, 0.1, 6)
    labels = [1, 0, 1, 0, 1, 0]
    _, _, metrics = kto_loss_and_grad(policy, ref, labels, 0.1, variant="kto", kl_policy_logps=kl_policy,
                                      kl_ref_logps=kl_ref)
    estimate = float(np.mean(kl_policy - kl_ref))
    assert metrics["kl_raw"] == pytest.approx(estimate, rel=1e-12)
    assert metrics["kl"] == pytest.approx(max(0.0, estimate), rel=1e-12, abs=0.0)
    for variant in ("kto", "edifice", "apo_zero_unpaired"):  # no KL pairs: nothing estimated
        assert kto_loss_and_grad(policy, ref, labels, 0.1, variant=variant)[2]["kl_raw"] is None


# ---------------------------------------------------------------------------------------------------
# checked once, at the door


def calls_into_validation(function):
    """(result of function(), the names of the kto_np.validation functions it called, in order)."""
    target = os.path.abspath(validation.__file__)
    calls = []

    def profile(frame, event, arg):
        if event == "call" and os.path.abspath(frame.f_code.co_filename) == target:
            calls.append(frame.f_code.co_name)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        result = function()
    finally:
        sys.setprofile(previous)
    return result, calls


@pytest.mark.parametrize(("variant", "options"), KTO_CASES, ids=CASE_IDS)
def test_config_loss_and_grad_checks_nothing_and_equals_the_door(variant, options, rng):
    """KTOConfig.loss_and_grad is what the training step calls with arrays it made and checked: it makes
    no call into kto_np.validation, and gives bit for bit what the checking door kto_loss_and_grad gives."""
    beta, wd, wu = 0.3, 1.2, 0.9
    policy, ref, labels = make_batch(rng, "mixed_large", beta)
    kwargs = kto_kwargs(variant, options, rng, len(policy), beta)
    config = KTOConfig(variant, beta, wd, wu, kwargs["stop_z_grad"])
    kl = (kwargs.get("kl_policy_logps"), kwargs.get("kl_ref_logps"))
    (loss, grad, metrics), calls = calls_into_validation(lambda: config.loss_and_grad(policy, ref, labels, *kl))
    assert calls == []
    (door_loss, door_grad, door_metrics), door_calls = calls_into_validation(
        lambda: kto_loss_and_grad(policy, ref, labels, beta, wd, wu, **kwargs))
    assert "as_float_array" in door_calls and "as_labels" in door_calls  # the counter sees the door's checks
    assert loss == door_loss and metrics == door_metrics
    assert grad.dtype == door_grad.dtype and np.array_equal(grad, door_grad)


def through_config(policy, ref, labels, beta, variant, kl_policy_logps=None, kl_ref_logps=None, **_):
    """KTOConfig.loss_and_grad (the training step's call) with kto_loss's arguments."""
    as_array = np.asarray
    kl = (None, None) if kl_policy_logps is None else (as_array(kl_policy_logps), as_array(kl_ref_logps))
    return KTOConfig(variant, beta).loss_and_grad(as_array(policy), as_array(ref), as_array(labels), *kl)


@pytest.mark.parametrize("function", [kto_loss, kto_loss_and_grad, through_config])
def test_overflow_is_rejected_by_name(function):
    """Finite inputs whose β r (or its sum) is past the float range: a ValueError naming the inputs,
    not inf, NaN or a RuntimeWarning (warnings are errors here), at the doors and in the training
    step's call (where it names the cause of a divergence)."""
    with pytest.raises(ValueError, match=r"overflows float64 .*beta=1e\+308.*the rewards beta \* r"):
        function([-1.0, 2.0], [-4.0, -4.0], [1, 0], 1e308, variant="kto", warn_balance=False)
    big = np.array([3e38, -3e38], dtype=np.float32)
    with pytest.raises(ValueError, match=r"overflows float32 .*beta=10.*the rewards beta \* r"):
        function(big, np.zeros(2, dtype=np.float32), [1, 0], 10.0, variant="apo_zero_unpaired")
    with pytest.raises(ValueError, match="KL estimate mean.kl_policy_logps - kl_ref_logps"):
        function([-1.0, -2.0], [-1.5, -1.5], [1, 0], 0.1, variant="kto", kl_policy_logps=[1e308, 1e308],
                 kl_ref_logps=[-1e308, -1e308], warn_balance=False)
    with pytest.raises(ValueError, match="policy_logps - ref_logps must be finite"):
        function([1e308, -1.0], [-1e308, -1.0], [1, 0], 0.1, variant="kto", warn_balance=False)
