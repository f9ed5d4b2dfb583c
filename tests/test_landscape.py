"""Loss landscapes: every number against an independent computation (the loss recomputed from the model's
logits, finite differences of the loss, a finite-difference Hessian, closed-form matrices), on tiny
models and a tiny run made here."""

import os
import shutil

import numpy as np
import pytest

from kto_np import checkpoint, cli, landscape, step, train
from kto_np.architectures import build
from kto_np.data import Tokenizer, collate
from kto_np.dpo import dpo_loss
from kto_np.logprobs import sequence_logprobs
from kto_np.losses import KTOConfig, kto_loss, kto_loss_and_grad

ALL_VARIANTS = landscape.LOSS_VARIANTS
TINY_RUN = dict(hidden_size=8, num_layers=1, num_heads=2, sft_steps=30, steps=23, batch_size=8, sft_examples=32,
                num_examples=32, eval_prompts=16, eval_every=8, checkpoint_every=4, warmup_steps=1, num_digits=2)
TRAJECTORY_STEPS = [*range(2, 23, 2), 23]  # 23 steps: every ceil(23 / 20) = 2 steps, and the last one
# prompts repeat with both labels, so DPO has pairs; both classes, several completion lengths
EXAMPLES = [("21=", "12.", 1), ("21=", "21.", 0), ("43=", "34.", 1), ("43=", "3.", 0), ("70=", "07.", 1),
            ("58=", "585.", 0)]


def tiny_model(hidden_size=8, num_heads=2, seed=0):
    model = build(hidden_size=hidden_size, num_layers=1, num_heads=num_heads, vocab_size=Tokenizer().vocab_size,
                  dropout=0.0, max_seq_len=8, dtype="float64")
    reference = model.init(seed)
    rng = np.random.default_rng(seed + 1)
    policy = {k: v + 0.3 * rng.standard_normal(v.shape) * (np.abs(v).mean() + 0.02) for k, v in reference.items()}
    return model, reference, policy


def tiny_batch():
    return collate(EXAMPLES, Tokenizer(), dtype="float64")


def logps_of(model, params, tokens, mask):  # independent of landscape's path: the model's logits, then logprobs
    logits, _ = model.forward(params, tokens)
    return sequence_logprobs(logits, tokens, mask)


def independent_loss(variant, model, reference, params, batch, center, beta=0.1):
    pol = logps_of(model, params, batch.tokens, batch.completion_mask)
    ref = logps_of(model, reference, batch.tokens, batch.completion_mask)
    labels = batch.labels
    if variant in ("edifice", "apo_zero_unpaired"):
        return kto_loss(pol, ref, labels, beta, variant=variant, warn_balance=False)
    if variant == "kto":
        kl_pol = logps_of(model, params, batch.kl_tokens, batch.kl_completion_mask)
        kl_ref = logps_of(model, reference, batch.kl_tokens, batch.kl_completion_mask)
        return kto_loss(pol, ref, labels, beta, variant="kto", kl_policy_logps=kl_pol, kl_ref_logps=kl_ref,
                        warn_balance=False)
    if variant == "edifice_stop_z_grad":  # edifice with z = mean β r at the centre
        center_logps = logps_of(model, center, batch.tokens, batch.completion_mask)
        z0 = np.mean(beta * (center_logps - ref))
        reward = beta * (pol - ref) - z0
        return float(np.mean(np.where(labels == 1, -1 / (1 + np.exp(-reward)), -1 / (1 + np.exp(reward)))))
    if variant == "dpo":  # rows (0, 1) and (2, 3) are the pairs
        return dpo_loss(pol[[0, 2]], pol[[1, 3]], ref[[0, 2]], ref[[1, 3]], beta)
    # sft: the mean token NLL of the desirable completions, by train's own SFT loss on those rows only
    desirable = collate([e for e in EXAMPLES if e[2] == 1], Tokenizer(), dtype="float64")
    return step.sft_step(model, params, desirable)[0]


def flat(d):
    return np.concatenate([np.ravel(d[k]) for k in d])


def random_like(params, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape) for k, v in params.items()}


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_grid_centre_is_the_policy_loss_and_slope_is_grad_dot_direction(variant):
    model, reference, policy = tiny_model()
    batch = tiny_batch()
    problem = landscape.make_problem(model, reference, batch, variant, center=policy)
    d1 = landscape.random_direction(policy, np.random.default_rng(0))
    d2 = landscape.random_direction(policy, np.random.default_rng(1))
    h = 1e-5
    grid = landscape.landscape_grid(problem, policy, d1, d2, [-h, 0.0, h], [-h, 0.0, h])
    expected = independent_loss(variant, model, reference, policy, batch, policy)
    assert grid[1, 1] == pytest.approx(expected, rel=1e-12, abs=1e-14)
    loss, grads = landscape.loss_and_grad(problem, policy)
    assert loss == pytest.approx(expected, rel=1e-12, abs=1e-14)
    for direction, slope in ((d1, (grid[2, 1] - grid[0, 1]) / (2 * h)), (d2, (grid[1, 2] - grid[1, 0]) / (2 * h))):
        analytic = float(flat(grads) @ flat(direction))
        assert slope == pytest.approx(analytic, rel=1e-6, abs=1e-9)


def torch_loss(variant, model, reference, params, batch):
    """The landscape's loss of `variant` at params (= the centre for edifice_stop_z_grad), by the PyTorch
    twin (kto_np.torch_reference) and autograd: (loss, {name: gradient})."""
    torch = pytest.importorskip("torch", reason="the PyTorch twin kto_np.torch_reference needs torch")
    from kto_np import torch_reference

    def logps(p, tokens, mask):
        tokens = torch.tensor(tokens)
        logits = torch_reference.gpt2_logits(p, tokens, num_heads=model.config.num_heads)
        return torch_reference.sequence_logps(logits, tokens, torch.tensor(mask))

    weights = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    frozen = {k: torch.tensor(v) for k, v in reference.items()}
    pol = logps(weights, batch.tokens, batch.completion_mask)
    ref = logps(frozen, batch.tokens, batch.completion_mask)
    labels = torch.tensor(batch.labels == 1)
    if variant in ("edifice", "apo_zero_unpaired"):
        loss = torch_reference.kto_loss(pol, ref, labels, 0.1, variant=variant)
    elif variant == "edifice_stop_z_grad":
        loss = torch_reference.kto_loss(pol, ref, labels, 0.1, variant="edifice", stop_z_grad=True)
    elif variant == "kto":  # z_ref NOT detached (the landscape draws the loss value): r - z_ref via the reference
        z_ref = (logps(weights, batch.kl_tokens, batch.kl_completion_mask)
                 - logps(frozen, batch.kl_tokens, batch.kl_completion_mask)).mean().clamp(min=0)
        assert float(z_ref.detach()) > 0  # else the path through z_ref would not be exercised
        loss = torch_reference.kto_loss(pol, ref + z_ref, labels, 0.1, variant="kto")
    elif variant == "dpo":  # rows (0, 1) and (2, 3) are the pairs
        loss = torch_reference.dpo_loss(pol[[0, 2]], pol[[1, 3]], ref[[0, 2]], ref[[1, 3]], 0.1)
    else:  # sft: mean NLL per completion token of the desirable rows
        loss = -pol[labels].sum() / torch.tensor(batch.completion_mask)[labels].sum()
    loss.backward()
    return float(loss.detach()), {k: w.grad.numpy() for k, w in weights.items()}


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_gradient_matches_pytorch_autograd(variant):
    model, reference, policy = tiny_model()  # its KL rows have z_ref > 0 (torch_loss checks)
    batch = tiny_batch()
    problem = landscape.make_problem(model, reference, batch, variant, center=policy)
    expected_loss, expected = torch_loss(variant, model, reference, policy, batch)
    loss, grads = landscape.loss_and_grad(problem, policy)
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    for name in policy:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-9, atol=1e-13, err_msg=name)


def test_frozen_z_edifice_is_apo_zero_against_the_shifted_reference():
    # the identity make_problem uses: -w σ(s(βr - z0)) = apo_zero_unpaired's loss at r - z0/β, minus w
    rng = np.random.default_rng(4)
    logps, ref = rng.normal(-8.0, 2.0, 7), rng.normal(-8.0, 2.0, 7)
    labels = np.array([1, 0, 1, 1, 0, 0, 1])
    config = KTOConfig("apo_zero_unpaired", beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)
    w = np.where(labels == 1, 1.5, 0.7)
    s = np.where(labels == 1, 1.0, -1.0)
    for z0 in (-0.8, 0.0, 0.45):
        direct = np.mean(-w / (1 + np.exp(-s * (0.3 * (logps - ref) - z0))))
        via_apo = config.loss_and_grad(logps, ref + z0 / 0.3, labels)[0] - w.mean()
        assert via_apo == pytest.approx(direct, rel=1e-13)
    # through make_problem, away from the centre (the loss there is not the edifice loss: z stays z0),
    # the value and its slope against the independent formula and its finite differences
    model, reference, policy = tiny_model()
    batch = collate(EXAMPLES[:-1], Tokenizer(), dtype="float64")  # 3 desirable, 2 undesirable: L moves with z
    problem = landscape.make_problem(model, reference, batch, "edifice_stop_z_grad", center=policy)
    assert landscape.loss_value(problem, policy) == pytest.approx(
        independent_loss("edifice", model, reference, policy, batch, None), rel=1e-12)
    elsewhere = landscape._combine(policy, (0.5, landscape.random_direction(policy, np.random.default_rng(6))))
    expected = independent_loss("edifice_stop_z_grad", model, reference, elsewhere, batch, policy)
    assert abs(expected - independent_loss("edifice", model, reference, elsewhere, batch, None)) > 1e-5
    loss, grads = landscape.loss_and_grad(problem, elsewhere)
    assert landscape.loss_value(problem, elsewhere) == pytest.approx(expected, rel=1e-12)
    assert loss == pytest.approx(expected, rel=1e-12)
    d = landscape.random_direction(policy, np.random.default_rng(5))
    h = 1e-5
    slope = (independent_loss("edifice_stop_z_grad", model, reference, landscape._combine(elsewhere, (h, d)), batch,
                              policy)
             - independent_loss("edifice_stop_z_grad", model, reference, landscape._combine(elsewhere, (-h, d)),
                                batch, policy)) / (2 * h)
    assert float(flat(grads) @ flat(d)) == pytest.approx(slope, rel=1e-6, abs=1e-10)


def test_filter_normalisation_gives_each_filter_the_parameters_filter_norm():
    model, _, policy = tiny_model()
    direction = landscape.random_direction(policy, np.random.default_rng(3))
    for name, theta in policy.items():
        d = direction[name]
        if theta.ndim == 1:  # biases and LayerNorm: not moved
            assert not d.any(), name
            continue
        rows = name.split(".")[0] in ("wte", "wpe", "lm_head")  # filters: rows (embeddings) or columns
        filters = range(theta.shape[0] if rows else theta.shape[1])
        for f in filters:
            theta_f, d_f = (theta[f], d[f]) if rows else (theta[:, f], d[:, f])
            assert np.sqrt(np.sum(d_f ** 2)) == pytest.approx(np.sqrt(np.sum(theta_f ** 2)), rel=1e-12), (name, f)
    # a filter of zeros stays zero, and the direction is not just the parameters
    zero = {k: np.zeros_like(v) for k, v in policy.items()}
    assert not flat(landscape.filter_normalize(direction, zero)).any()
    assert abs(np.corrcoef(flat(direction), flat(policy))[0, 1]) < 0.2


def test_interpolation_ends_are_the_reference_and_policy_losses():
    model, reference, policy = tiny_model()
    batch = tiny_batch()
    for variant in ("kto", "edifice", "sft"):
        problem = landscape.make_problem(model, reference, batch, variant)
        ends = landscape.interpolation_losses(problem, reference, policy, [0.0, 1.0])
        assert ends[0] == pytest.approx(independent_loss(variant, model, reference, reference, batch, None), rel=1e-12)
        assert ends[1] == pytest.approx(independent_loss(variant, model, reference, policy, batch, None), rel=1e-12)
    ts = landscape.interpolation_ts(21)
    assert 0.0 in ts and 1.0 in ts and ts[0] == -0.5 and ts[-1] == 1.5


def test_hessian_vector_product_matches_second_differences_of_the_loss_values():
    model, reference, policy = tiny_model(hidden_size=2, num_heads=1, seed=2)  # 120 parameters
    # 3 desirable, 2 undesirable: sum_i dL/dlogps_i != 0, so z_ref's path carries a fifth of H v here
    batch = collate(EXAMPLES[:-1], Tokenizer(), dtype="float64")
    kl_mean = np.mean(logps_of(model, policy, batch.kl_tokens, batch.kl_completion_mask)
                      - logps_of(model, reference, batch.kl_tokens, batch.kl_completion_mask))
    assert kl_mean > 0.01  # z_ref > 0 (and stays so within the steps below): its path is part of the Hessian
    problem = landscape.make_problem(model, reference, batch, "kto")
    theta = flat(policy)
    P = theta.size

    def unflat(v):
        out, i = {}, 0
        for k, value in policy.items():
            out[k] = v[i:i + value.size].reshape(value.shape)
            i += value.size
        return out

    def loss(v):  # loss VALUES only (forward passes): the reference shares nothing with the gradient code
        return landscape.loss_value(problem, unflat(v))

    def hessian_times(v, h=2e-5):  # (H v)_i = mixed second difference of L along e_i and v / |v|, times |v|
        w = v / np.linalg.norm(v)
        out = np.empty(P)
        for i in range(P):
            e = np.zeros(P)
            e[i] = h
            out[i] = (loss(theta + e + h * w) - loss(theta + e - h * w) - loss(theta - e + h * w)
                      + loss(theta - e - h * w)) / (4 * h * h)
        return out * np.linalg.norm(v)

    rng = np.random.default_rng(0)
    for _ in range(2):
        v = rng.standard_normal(P)
        hv = flat(landscape.hessian_vector_product(problem, policy, unflat(v)))
        expected = hessian_times(v)
        np.testing.assert_allclose(hv, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    # the power iteration on these products finds the largest-magnitude eigenvalues of the Hessian they
    # make (symmetric: only a true gradient's differences give that), and the curvature of the loss
    # VALUES along the top eigenvector is its eigenvalue
    hessian = np.stack([flat(landscape.hessian_vector_product(problem, policy, unflat(e))) for e in np.eye(P)], axis=1)
    scale = np.abs(hessian).max()
    np.testing.assert_allclose(hessian, hessian.T, atol=1e-6 * scale)
    eigenvalues = np.linalg.eigvalsh((hessian + hessian.T) / 2)
    top = eigenvalues[np.argsort(-np.abs(eigenvalues))[:2]]
    d1, _, found = landscape.hessian_directions(problem, policy, iterations=500, tol=1e-10)
    np.testing.assert_allclose(found, top, rtol=1e-3)
    u, k = flat(d1), 2e-5
    assert np.linalg.norm(u) == pytest.approx(1.0)
    curvature = (loss(theta + k * u) - 2 * loss(theta) + loss(theta - k * u)) / (k * k)
    assert curvature == pytest.approx(found[0], rel=1e-3)


def test_power_iteration_finds_the_eigenpairs_of_a_known_matrix():
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    eigenvalues = np.array([5.0, -3.0, 2.0, 1.0, 0.5, 0.1])
    matrix = q @ np.diag(eigenvalues) @ q.T
    values, vectors = landscape.power_iteration(lambda v: matrix @ v, 6, num_vectors=2, iterations=2000,
                                                tol=1e-14, seed=0)
    np.testing.assert_allclose(values, [5.0, -3.0], rtol=1e-9)
    for k in range(2):
        assert abs(vectors[k] @ q[:, k]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="num_vectors"):
        landscape.power_iteration(lambda v: v, 2, num_vectors=3)


def test_edifice_is_flat_along_the_shift_of_every_log_prob_and_the_anchored_variants_are_not():
    model, reference, policy = tiny_model()
    batch = collate(EXAMPLES[:-1], Tokenizer(), dtype="float64")  # 3 desirable, 2 undesirable
    problems = {v: landscape.make_problem(model, reference, batch, v, center=policy)
                for v in landscape.COMPARISON_VARIANTS}
    shifts = np.linspace(-20.0, 20.0, 9)
    losses = landscape.shift_losses(problems, reference, policy, [0.0, 0.5, 1.0], shifts)
    assert np.ptp(losses["edifice"], axis=1).max() < 1e-12
    for name in ("edifice_stop_z_grad", "kto", "apo_zero_unpaired"):  # (at the reference, t = 0, every
        assert np.ptp(losses[name][1:], axis=1).min() > 1e-4, name  # r is 0: a balanced batch is flat there)
    # c = 0 is the loss itself
    centre = int(np.argmin(np.abs(shifts)))
    for name, problem in problems.items():
        assert losses[name][2, centre] == pytest.approx(landscape.loss_value(problem, policy), rel=1e-12)

    # the same through the parameters: the direction d with J d = 1 shifts every log-prob by the same
    # amount (finite differences of the model's own log-probs), and the edifice slope along it is zero
    for name in ("edifice", "kto", "apo_zero_unpaired"):
        problem = problems[name]
        d = landscape.logprob_shift_direction(problem, policy)
        h = 1e-5
        plus = {k: policy[k] + h * d[k] for k in policy}
        minus = {k: policy[k] - h * d[k] for k in policy}
        for tokens, mask in [(batch.tokens, batch.completion_mask)] + (
                [(batch.kl_tokens, batch.kl_completion_mask)] if name == "kto" else []):
            rate = (logps_of(model, plus, tokens, mask) - logps_of(model, minus, tokens, mask)) / (2 * h)
            np.testing.assert_allclose(rate, 1.0, rtol=1e-6)
        slope = (landscape.loss_value(problem, plus) - landscape.loss_value(problem, minus)) / (2 * h)
        # J d = 1, so the slope is the sum of dL/dlogps: 0 for edifice (and kto while z_ref > 0, below)
        pol = logps_of(model, policy, batch.tokens, batch.completion_mask)
        _, dlogps, _ = kto_loss_and_grad(pol, problem.ref_logps, batch.labels, 0.1, variant="apo_zero_unpaired",
                                         warn_balance=False)
        if name == "apo_zero_unpaired":  # anchored at r = 0: -(β/n) sum_i w_i s_i σ(βr_i) σ(-βr_i) != 0
            assert abs(dlogps.sum()) > 1e-6
            assert slope == pytest.approx(dlogps.sum(), rel=1e-5)
        else:
            assert abs(slope) < 1e-10, name

    # kto is anchored only by its clamp z_ref = max(0, mean KL-row log-ratio + c): flat along c while
    # that mean stays above 0, sloped once it is clamped
    kl_mean = np.mean(logps_of(model, policy, batch.kl_tokens, batch.kl_completion_mask)
                      - logps_of(model, reference, batch.kl_tokens, batch.kl_completion_mask))
    assert 0 < kl_mean < 5  # this tiny policy: z_ref > 0, so c >= 0 keeps it unclamped and c <= -5 clamps it
    at_policy = losses["kto"][2]
    assert np.ptp(at_policy[shifts >= 0]) < 1e-12
    assert np.all(np.diff(at_policy[shifts <= -5]) < -1e-6)  # clamped: lowering every log-prob costs


def test_pca_of_a_trajectory_in_a_known_plane():
    rng = np.random.default_rng(0)
    shapes = {"a.weight": (3, 4), "b.bias": (5,)}
    center = {k: rng.standard_normal(s) for k, s in shapes.items()}
    u, v = np.linalg.qr(rng.standard_normal((17, 2)))[0].T
    coefficients = [(-3.0, 1.0), (-2.0, 1.5), (-1.0, 0.5), (0.0, 0.0)]  # the last point is the centre
    points = []
    for a, b in coefficients:
        offset = a * u + 3.0 * b * v
        points.append({"a.weight": center["a.weight"] + offset[:12].reshape(3, 4),
                       "b.bias": center["b.bias"] + offset[12:]})
    d1, d2, coords, explained = landscape.pca_directions(points)
    assert explained.sum() == pytest.approx(1.0)
    assert explained[0] >= explained[1]
    basis = np.stack([flat(d1), flat(d2)])
    np.testing.assert_allclose(basis @ basis.T, np.eye(2), atol=1e-12)
    for point, c in zip(points, coords):  # the plane holds every point: centre + coords . d gives it back
        np.testing.assert_allclose(flat(center) + c @ basis, flat(point), atol=1e-12)
    assert coords[0, 0] < 0 and coords[0, 1] < 0  # fixed signs: the first point at negative coordinates
    with pytest.raises(landscape.LandscapeError, match="at least 3"):
        landscape.pca_directions(points[:2])


def test_data_that_cannot_serve_the_variant():
    model, reference, _ = tiny_model()
    unpaired = collate([("21=", "12.", 1), ("43=", "3.", 0)], Tokenizer(), dtype="float64")
    with pytest.raises(landscape.LandscapeError, match="'dpo' needs pairs"):
        landscape.make_problem(model, reference, unpaired, "dpo")
    undesirable_only = collate([("21=", "2.", 0), ("43=", "3.", 0)], Tokenizer(), dtype="float64")
    with pytest.raises(landscape.LandscapeError, match="'sft' needs desirable"):
        landscape.make_problem(model, reference, undesirable_only, "sft")
    with pytest.raises(ValueError, match="center"):
        landscape.make_problem(model, reference, unpaired, "edifice_stop_z_grad")
    with pytest.raises(ValueError, match="variant"):
        landscape.make_problem(model, reference, unpaired, "ipo")
    with pytest.raises(TypeError, match="config must be a losses.KTOConfig"):
        landscape.make_problem(model, reference, unpaired, "kto", config={"beta": 0.1})


# ----------------------------------------------------------------------------------------------
# a tiny run, the trajectory and the command line


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("landscape") / "run"
    train.run(train.TrainConfig(**TINY_RUN), out, progress=False, log=lambda *a: None)
    return out


def test_the_run_keeps_a_thin_trajectory_that_a_resumed_run_rewrites_identically(tiny_run, tmp_path):
    names = sorted(os.listdir(tiny_run / "trajectory"))
    assert names == [f"kto_step_{s:06d}.npz" for s in TRAJECTORY_STEPS]
    last = checkpoint.load(tiny_run / "trajectory" / names[-1])
    final = checkpoint.load(tiny_run / "checkpoints/kto.npz")
    assert last.extra["step"] == TINY_RUN["steps"]
    for k, v in final.params.items():
        np.testing.assert_array_equal(last.params[k], v)
    config = train.TrainConfig(**TINY_RUN)
    train.run(config, tmp_path / "cut", progress=False, log=lambda *a: None, stop_after=5)
    train.run(config, tmp_path / "cut", progress=False, log=lambda *a: None, resume=True)
    for name in names:
        assert (tmp_path / "cut/trajectory" / name).read_bytes() == (tiny_run / "trajectory" / name).read_bytes()


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_the_figures_and_the_data_deterministically(tiny_run, tmp_path, capsys):
    out = tmp_path / "land"
    code, stdout, _ = run_cli(capsys, "landscape", "--run", str(tiny_run), "--points", "5", "--out", str(out),
                              "--eval-prompts", "4", "--directions", "pca")
    assert code == 0, stdout
    for name in ("landscape_pca.png", "landscape_interpolation.png", "landscape_variants.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert name in stdout
    data = np.load(out / "landscape.npz", allow_pickle=False)
    assert data["loss"].shape == (5, 5) and data["alpha"].shape == (5,) and data["beta"].shape == (5,)
    assert data["alpha"][2] == 0.0 and data["beta"][2] == 0.0
    assert str(data["variant"]) == "kto" and data["trajectory"].shape == (len(TRAJECTORY_STEPS) + 1, 2)
    # the centre is the policy's loss on the run's batch, recomputed independently
    states = landscape.load_run(tiny_run)
    batch = landscape.run_batch(states.config, landscape.DEFAULT_EXAMPLES)
    expected = independent_loss("kto", states.model, states.reference, states.policy, batch, None)
    assert data["loss"][2, 2] == pytest.approx(expected, rel=1e-12)
    assert data["interpolation_loss"][np.flatnonzero(data["interpolation_t"] == 1.0)[0]] == pytest.approx(expected)
    # same seed, same bytes; another seed, other random directions
    again = tmp_path / "again"
    assert run_cli(capsys, "landscape", "--run", str(tiny_run), "--points", "5", "--out", str(again),
                   "--eval-prompts", "4", "--directions", "pca", "--quiet")[0] == 0
    for name in os.listdir(out):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    problem = landscape.make_problem(states.model, states.reference, batch, "kto")
    grids = [landscape.compute_landscape(states, problem, "random", points=3, seed=seed).loss for seed in (0, 0, 1)]
    assert np.array_equal(grids[0], grids[1]) and grids[0][1, 1] == grids[2][1, 1]
    assert not np.array_equal(grids[0], grids[2])
    even = landscape.compute_landscape(states, problem, "random", points=4)  # an even grid still holds the policy
    assert list(even.alpha) == [-1.0, -0.5, 0.0, 0.5] and even.loss[2, 2] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("argv, message", [
    (["--points", "2"], "[3, 101]"),
    (["--points", "100000"], "[3, 101]"),
    (["--span", "0"], "--span must be a positive"),
    (["--span", "-1"], "--span must be a positive"),
    (["--span", "inf"], "--span must be a positive"),
    (["--variant", "dpo", "--examples", "4"], "'dpo' needs pairs"),  # 4 different prompts
    (["--examples", "1000"], "--examples must be <="),
])
def test_cli_bad_options_exit_2_with_one_line(tiny_run, tmp_path, capsys, argv, message):
    code, _, err = run_cli(capsys, "landscape", "--run", str(tiny_run), "--out", str(tmp_path / "x"),
                           "--quiet", *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("missing", ["checkpoints/kto.npz", "checkpoints/reference.npz", "config.json", "trajectory"])
def test_cli_run_without_the_files_it_needs(tiny_run, tmp_path, capsys, missing):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    target = run / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    code, _, err = run_cli(capsys, "landscape", "--run", str(run), "--directions", "pca", "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert (missing if missing != "trajectory" else "kto_step_") in err
    code, _, err = run_cli(capsys, "landscape", "--run", str(tmp_path / "nowhere"), "--quiet")
    assert code == 2 and "not a folder" in err


def test_figures_command_adds_the_landscape_figures(tiny_run, tmp_path, capsys, monkeypatch):
    full = landscape.run_landscape
    monkeypatch.setattr(landscape, "run_landscape", lambda *a, **k: full(*a, **k, points=3, eval_prompts=4))
    code, out, _ = run_cli(capsys, "figures", "--out", str(tmp_path), "--run", str(tiny_run))
    assert code == 0
    for name in ("landscape_random.png", "landscape_pca.png", "landscape_interpolation.png",
                 "landscape_variants.png", "training_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and name in out
    assert not (tmp_path / "landscape.npz").exists()


def test_figures_command_still_writes_the_other_figures_when_the_landscape_fails(tiny_run, tmp_path, capsys,
                                                                                 monkeypatch):
    from kto_np import plots

    def fail(*args, **kwargs):
        raise landscape.LandscapeError("run folder 'x' has no checkpoints/kto.npz")

    def other_figures(out_dir, **kwargs):  # (the real ones take ~20 s; here only the order of events counts)
        path = os.path.join(out_dir, "training_curves.png")
        with open(path, "wb") as f:
            f.write(b"png")
        return [path]

    monkeypatch.setattr(landscape, "run_landscape", fail)
    monkeypatch.setattr(plots, "make_all_figures", other_figures)
    code, out, err = run_cli(capsys, "figures", "--out", str(tmp_path), "--run", str(tiny_run))
    assert code == 0
    assert out.splitlines()[0] == str(tmp_path / "training_curves.png")
    assert len(err.strip().splitlines()) == 1 and "warning" in err and "checkpoints/kto.npz" in err, err
