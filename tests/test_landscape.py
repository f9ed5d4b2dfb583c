"""Loss landscapes: every number against an independent computation (the loss recomputed from the model's
logits, finite differences of the loss, a finite-difference Hessian, closed-form matrices), on tiny
models and a tiny run made here."""

import os
import shutil

import numpy as np
import pytest

from kto_np import checkpoint, cli, landscape, step, train
from kto_np.data import Tokenizer, collate
from kto_np.logprobs import sequence_logprobs
from kto_np.losses import KTOConfig, dpo_loss, kto_loss, kto_loss_and_grad
from kto_np.model import build

ALL_VARIANTS = landscape.LOSS_VARIANTS
TINY_RUN = dict(hidden_size=8, num_layers=1, num_heads=2, sft_steps=30, steps=8, batch_size=8, sft_examples=32,
                num_examples=32, eval_prompts=16, eval_every=4, checkpoint_every=4, warmup_steps=1, num_digits=2)
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


@pytest.mark.parametrize("variant, stop_z_grad", [("edifice", False), ("edifice", True), ("apo_zero_unpaired", False)])
def test_gradient_is_the_training_steps_gradient(variant, stop_z_grad):
    # ("kto" is left out on purpose: its landscape gradient includes the path through z_ref, which the
    # training step detaches; the slope test above checks it against finite differences.)
    model, reference, policy = tiny_model()
    batch = tiny_batch()
    name = "edifice_stop_z_grad" if stop_z_grad else variant
    problem = landscape.make_problem(model, reference, batch, name, center=policy)
    ref, kl_ref = step.reference_logps(model, reference, batch)
    loss, _, expected = step.kto_step(model, policy, batch, ref, kl_ref,
                                      KTOConfig(variant=variant, stop_z_grad=stop_z_grad))
    mine_loss, mine = landscape.loss_and_grad(problem, policy)
    assert mine_loss == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(flat(mine), flat(expected), rtol=1e-10, atol=1e-14)


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


def test_hessian_vector_product_matches_the_finite_difference_hessian():
    model, reference, policy = tiny_model(hidden_size=2, num_heads=1)  # ~270 parameters
    batch = tiny_batch()
    problem = landscape.make_problem(model, reference, batch, "kto")
    theta = flat(policy)
    P = theta.size

    def unflat(v):
        out, i = {}, 0
        for k, value in policy.items():
            out[k] = v[i:i + value.size].reshape(value.shape)
            i += value.size
        return out

    def loss(v):
        return landscape.loss_value(problem, unflat(v))

    def grad(v):
        return flat(landscape.loss_and_grad(problem, unflat(v))[1])

    h = 1e-5  # the full Hessian, column by column, from central differences of the gradient
    hessian = np.stack([(grad(theta + h * e) - grad(theta - h * e)) / (2 * h) for e in np.eye(P)], axis=1)
    scale = np.abs(hessian).max()
    np.testing.assert_allclose(hessian, hessian.T, atol=1e-6 * scale)  # only a true gradient gives this
    rng = np.random.default_rng(0)
    for _ in range(3):
        v = rng.standard_normal(P)
        hv = flat(landscape.hessian_vector_product(problem, policy, unflat(v)))
        np.testing.assert_allclose(hv, hessian @ v, atol=1e-6 * scale * np.linalg.norm(v))
        # and against the loss values alone: u'Hv by second differences (polarisation)
        u = rng.standard_normal(P)
        u, w = u / np.linalg.norm(u), v / np.linalg.norm(v)
        k = 1e-4
        second = (loss(theta + k * u + k * w) - loss(theta + k * u - k * w) - loss(theta - k * u + k * w)
                  + loss(theta - k * u - k * w)) / (4 * k * k)
        assert u @ hv / np.linalg.norm(v) == pytest.approx(second, rel=1e-4, abs=1e-7 * scale)
    # the power iteration on these products finds the largest-magnitude eigenvalues of that Hessian
    eigenvalues = np.linalg.eigvalsh((hessian + hessian.T) / 2)
    top = eigenvalues[np.argsort(-np.abs(eigenvalues))[:2]]
    _, _, found = landscape.hessian_directions(problem, policy, iterations=500, tol=1e-10)
    np.testing.assert_allclose(found, top, rtol=1e-3)


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


# ----------------------------------------------------------------------------------------------
# a tiny run, the trajectory and the command line


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("landscape") / "run"
    train.run(train.TrainConfig(**TINY_RUN), out, progress=False, log=lambda *a: None)
    return out


def test_the_run_keeps_a_thin_trajectory_that_a_resumed_run_rewrites_identically(tiny_run, tmp_path):
    names = sorted(os.listdir(tiny_run / "trajectory"))
    assert names == [f"kto_step_{s:06d}.npz" for s in range(1, TINY_RUN["steps"] + 1)]  # steps // 20 -> every step
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
    assert str(data["variant"]) == "kto" and data["trajectory"].shape == (TINY_RUN["steps"] + 1, 2)
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
