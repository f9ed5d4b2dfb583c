"""Edifice's backbone (kto_np.edifice): erf, the exact GELU, the +eps softmax, Axon names and init,
the finding (logits ignore the token ids), gradients against finite differences and a PyTorch twin,
generation, checkpoints, the oracle's model-level case and the bad-input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

import kto_np
from kto_np import checkpoint
from kto_np.edifice import (
    ATTENTION_MASK_VALUE,
    SOFTMAX_EPS,
    Edifice,
    EdificeConfig,
    edifice_positions,
    erf,
    fixed_token_embedding,
    gelu_exact_backward,
    gelu_exact_forward,
    glorot_uniform_limit,
    param_shapes,
    softmax_eps_backward,
    softmax_eps_forward,
)
from kto_np.generate import generate
from kto_np.gradcheck import check_gradients, rel_error
from kto_np.gradcheck_suite import model_checks
from kto_np.oracle.cases.edifice_case import edifice_model_case_arrays

SMALL = dict(vocab_size=11, hidden_size=12, num_heads=3, num_layers=2, max_seq_len=8, dropout=0.0,
             dtype="float64")


def small_model(**overrides) -> Edifice:
    return kto_np.build(architecture="edifice", **{**SMALL, **overrides})


def perturbed_params(model: Edifice, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed + 100)
    return {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in model.init(seed).items()}


# ---------------------------------------------------------------------------------------------------
# erf


def _relative(ours, reference):
    reference = np.asarray(reference)
    scale = np.where(reference == 0, 1.0, np.abs(reference))
    return np.abs(np.asarray(ours) - reference) / scale


def test_erf_matches_math_erf_on_a_dense_grid_to_1e15():
    x = np.concatenate([
        np.linspace(-7.0, 7.0, 140_001),  # step 1e-4, through every table interval and both signs
        np.geomspace(1e-300, 7.0, 4000), -np.geomspace(1e-300, 7.0, 4000),
        np.arange(0, 193) / 32.0 + 1.0 / 64.0,  # the edges between expansion centres
        np.arange(0, 193) / 32.0 - 1.0 / 64.0,
    ])
    reference = np.array([math.erf(v) for v in x])
    error = _relative(erf(x), reference)
    assert error.max() <= 1e-15, (x[error.argmax()], error.max())


def test_erf_against_mpmath_where_installed():
    mpmath = pytest.importorskip("mpmath", reason="mpmath not installed (pip install mpmath)")
    mpmath.mp.prec = 120
    x = np.concatenate([np.linspace(-6.5, 6.5, 3000), np.geomspace(1e-200, 6.5, 300)])  # (no 0)
    ours = erf(x)
    worst = max(abs(float((mpmath.mpf(float(o)) - mpmath.erf(mpmath.mpf(float(v)))) / mpmath.erf(mpmath.mpf(float(v)))))
                for v, o in zip(x, ours))
    assert worst <= 1e-15


def test_erf_extremes_subnormals_and_special_values():
    assert np.array_equal(erf(np.array([np.inf, -np.inf, 6.0, -6.0, 1e308, -1e308, 5.9])),
                          [1.0, -1.0, 1.0, -1.0, 1.0, -1.0, math.erf(5.9)])
    assert np.isnan(erf(np.array([np.nan]))).all()
    zero = erf(np.array([0.0, -0.0]))
    assert zero[0] == 0.0 and not np.signbit(zero[0]) and zero[1] == 0.0 and np.signbit(zero[1])
    tiny = np.array([5e-324, 1e-310, 2.2250738585072014e-308, -1e-315])
    ours, reference = erf(tiny), np.array([math.erf(v) for v in tiny])
    assert np.all(np.abs(ours - reference) <= 5e-324)  # within one unit of the subnormal spacing
    x = np.linspace(-5, 5, 1001)
    assert np.array_equal(erf(-x), -erf(x))  # odd, exactly
    assert erf(np.float64(0.5)).shape == () and float(erf(np.float64(0.5))) == pytest.approx(math.erf(0.5), rel=1e-15)


def test_erf_float32_is_rounded_from_an_accurate_value():
    x = np.random.default_rng(0).standard_normal(20000).astype(np.float32) * 2.5
    ours = erf(x)
    assert ours.dtype == np.float32
    reference = np.array([math.erf(float(v)) for v in x])
    # within one float32 rounding of the exact value
    assert np.all(np.abs(ours.astype(np.float64) - reference) <= np.spacing(np.abs(reference).astype(np.float32)))


def test_erf_rejects_integers():
    with pytest.raises(TypeError, match="floating"):
        erf(np.array([1, 2]))


# ---------------------------------------------------------------------------------------------------
# exact GELU and the +eps softmax


def test_gelu_exact_forward_and_backward():
    rng = np.random.default_rng(1)
    x = 2.0 * rng.standard_normal((3, 7))
    out, cache = gelu_exact_forward(x)
    expected = np.array([v * (1 + math.erf(v / math.sqrt(2))) / 2 for v in x.ravel()]).reshape(x.shape)
    assert np.max(np.abs(out - expected)) <= 1e-15 * np.max(np.abs(expected))
    upstream = rng.standard_normal(x.shape)
    rows = check_gradients(lambda: float(np.sum(upstream * gelu_exact_forward(x)[0])), {"x": x},
                           {"x": gelu_exact_backward(upstream, cache)}, tolerance=1e-9, max_full_size=x.size)
    assert rows[0].passed, rows


def test_softmax_eps_forward_and_backward_include_the_max_path():
    rng = np.random.default_rng(2)
    x = 3.0 * rng.standard_normal((2, 3, 5))
    eps = 0.3  # large, so that the path through max(x) matters far above finite-difference noise
    weights, cache = softmax_eps_forward(x, eps)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    assert np.allclose(weights, e / (e.sum(axis=-1, keepdims=True) + eps), rtol=1e-15, atol=0)
    upstream = rng.standard_normal(x.shape)
    rows = check_gradients(lambda: float(np.sum(upstream * softmax_eps_forward(x, eps)[0])), {"x": x},
                           {"x": softmax_eps_backward(upstream, cache)}, tolerance=1e-8, max_full_size=x.size)
    assert rows[0].passed, rows
    # without the max term the gradient is measurably wrong: the test can fail
    plain = weights * (upstream - np.sum(upstream * weights, axis=-1, keepdims=True))
    assert rel_error(plain, softmax_eps_backward(upstream, cache)) > 1e-3


# ---------------------------------------------------------------------------------------------------
# the configuration, Axon's names, the fixed tables and the init


def test_axon_parameter_names_and_shapes():
    shapes = param_shapes(EdificeConfig(**{k: v for k, v in SMALL.items()}))
    H, V = 12, 11
    expected = {}
    for i in (1, 2):
        expected[f"block_{i}_attn_norm.gamma"] = (H,)
        expected[f"block_{i}_attn_norm.beta"] = (H,)
        for part in ("q", "k", "v", "out"):
            expected[f"block_{i}_attn_{part}.kernel"] = (H, H)
            expected[f"block_{i}_attn_{part}.bias"] = (H,)
        expected[f"block_{i}_ffn_norm.gamma"] = (H,)
        expected[f"block_{i}_ffn_norm.beta"] = (H,)
        expected[f"block_{i}_ffn_up.kernel"] = (H, 4 * H)
        expected[f"block_{i}_ffn_up.bias"] = (4 * H,)
        expected[f"block_{i}_ffn_down.kernel"] = (4 * H, H)
        expected[f"block_{i}_ffn_down.bias"] = (H,)
    expected.update({"final_norm.gamma": (H,), "final_norm.beta": (H,), "lm_head.kernel": (H, V),
                     "lm_head.bias": (V,)})
    assert shapes == expected
    learned = param_shapes(EdificeConfig(**SMALL, token_embedding="learned"))
    assert learned == {"token_embed.kernel": (V, H), **expected}
    assert small_model().num_params() == sum(math.prod(s) for s in expected.values())


def test_init_follows_axons_defaults():
    model = kto_np.build(architecture="edifice", vocab_size=50, hidden_size=64, num_heads=4, num_layers=1,
                         max_seq_len=8, dtype="float64", token_embedding="learned")
    params = model.init(3)
    assert glorot_uniform_limit((64, 256)) == pytest.approx(math.sqrt(6 / (64 + 256)))
    assert glorot_uniform_limit((64,)) == pytest.approx(math.sqrt(3 / 64))  # Axon: fan_in = fan_out = n
    for name, value in params.items():
        kind = name.rsplit(".", 1)[1]
        if kind in ("bias", "beta"):
            assert not value.any(), name
        elif name == "token_embed.kernel":
            assert np.abs(value).max() <= 0.01 and np.abs(value).max() > 0.009
        else:  # glorot uniform: inside the bound and with the uniform's variance limit^2 / 3
            limit = glorot_uniform_limit(value.shape)
            assert np.abs(value).max() <= limit, name
            if value.size >= 1000:
                assert value.var() == pytest.approx(limit**2 / 3, rel=0.1), name
    again = model.init(3)
    assert all(np.array_equal(params[k], again[k]) for k in params)
    assert not np.array_equal(params["lm_head.kernel"], model.init(4)["lm_head.kernel"])
    float32 = kto_np.build(architecture="edifice", vocab_size=50, hidden_size=64, num_heads=4, num_layers=1,
                           max_seq_len=8, token_embedding="learned").init(3)
    assert all(float32[k].dtype == np.float32 and np.allclose(float32[k], params[k], rtol=1e-7) for k in params)


def test_positions_are_edifices_concatenated_sin_cos_table():
    H, T = 10, 7
    table = edifice_positions(T, H)
    half = H // 2
    for p in range(T):
        for i in range(half):
            frequency = math.exp(-math.log(10000.0) * i / (half - 1))
            assert table[p, i] == pytest.approx(math.sin(p * frequency), abs=1e-15)
            assert table[p, half + i] == pytest.approx(math.cos(p * frequency), abs=1e-15)
    # H = 2: half - 1 = 0, and Edifice's max(half - 1, 1) makes the one frequency 1
    assert np.allclose(edifice_positions(5, 2), np.stack([np.sin(np.arange(5)), np.cos(np.arange(5))], axis=1))
    model = kto_np.build(architecture="edifice", vocab_size=5, hidden_size=2, num_heads=1, num_layers=1,
                         max_seq_len=4, dtype="float64")
    assert model.forward(model.init(0), np.array([[1, 2, 3]]))[0].shape == (1, 3, 5)


def test_fixed_embedding_is_the_one_hot_product_with_iota_over_sqrt_v():
    V, H = 7, 6
    tokens = np.array([[0, 3, 6], [5, 5, 1]])
    table = np.arange(V * H, dtype=np.float64).reshape(V, H) / math.sqrt(V)  # Nx.iota({V, H}) / sqrt(V)
    one_hot = (tokens[..., None] == np.arange(V)).astype(np.float64)
    assert np.allclose(fixed_token_embedding(tokens, V, H, np.float64), one_hot @ table, rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------------
# the finding: with the fixed embedding the logits do not depend on the token ids


def test_fixed_embedding_logits_ignore_the_token_ids():
    model = small_model()
    params = perturbed_params(model)
    rng = np.random.default_rng(5)
    tokens_a = rng.integers(0, 11, (4, 8))
    tokens_b = rng.integers(0, 11, (4, 8))
    assert (tokens_a != tokens_b).mean() > 0.5
    logits_a = model.forward(params, tokens_a)[0]
    logits_b = model.forward(params, tokens_b)[0]
    # equal to rounding: the per-token constant t H / sqrt(V) is at most (V - 1) H / sqrt(V) ~ 36 here
    assert np.max(np.abs(logits_a - logits_b)) <= 1e-12 * np.max(np.abs(logits_a))
    # ... and the same across the batch: only the position matters
    assert np.max(np.abs(logits_a - logits_a[:1])) <= 1e-12 * np.max(np.abs(logits_a))
    # the gradient of anything but a position-dependent loss reaches no token: nothing flows into E
    assert "token_embed.kernel" not in model.backward(np.ones_like(logits_a), model.forward(params, tokens_a)[1])


def test_learned_embedding_repairs_it():
    model = small_model(token_embedding="learned")
    params = perturbed_params(model)
    tokens_a = np.array([[1, 2, 3, 4]])
    tokens_b = np.array([[5, 2, 3, 4]])
    logits_a, logits_b = model.forward(params, tokens_a)[0], model.forward(params, tokens_b)[0]
    assert np.max(np.abs(logits_a - logits_b)) > 1e-2  # the first token changes every position's logits


# ---------------------------------------------------------------------------------------------------
# gradients: finite differences and a PyTorch float64 twin


@pytest.mark.parametrize(("variant", "token_embedding"), [("kto", "fixed"), ("edifice", "learned")])
def test_model_gradients_against_finite_differences(variant, token_embedding):
    rows = model_checks(seed=1, variant=variant, architecture="edifice", token_embedding=token_embedding)
    names = {r.name for r in rows}
    assert names == set(param_shapes(EdificeConfig(vocab_size=11, hidden_size=12, num_heads=3, num_layers=2,
                                                   max_seq_len=8, token_embedding=token_embedding)))
    failed = [r for r in rows if not r.passed]
    assert not failed, failed
    assert {r.name for r in rows if r.mode == "floor"} >= {"block_1_attn_k.bias", "block_2_attn_k.bias"}


@pytest.mark.slow
@pytest.mark.parametrize("variant", kto_np.VARIANTS)
@pytest.mark.parametrize("token_embedding", ["fixed", "learned"])
def test_model_gradients_every_variant(variant, token_embedding):
    rows = model_checks(seed=2, variant=variant, architecture="edifice", token_embedding=token_embedding)
    assert all(r.passed for r in rows), [r for r in rows if not r.passed]


def test_dropout_placement_gradients():
    """train=True with dropout: the same masks for the same rng seed, so finite differences apply."""
    model = small_model(dropout=0.3)
    params = perturbed_params(model)
    tokens = np.random.default_rng(0).integers(0, 11, (2, 5))
    upstream = np.random.default_rng(1).standard_normal((2, 5, 11))

    def loss():
        return float(np.sum(upstream * model.forward(params, tokens, train=True, rng=np.random.default_rng(9))[0]))

    logits, cache = model.forward(params, tokens, train=True, rng=np.random.default_rng(9))
    assert not np.allclose(logits, model.forward(params, tokens)[0])  # dropout is active
    grads = model.backward(upstream, cache)
    picked = {k: params[k] for k in ("block_1_attn_out.bias", "block_2_ffn_down.bias", "block_1_ffn_up.kernel")}
    rows = check_gradients(loss, picked, grads, tolerance=1e-7, seed=0)
    assert all(r.passed for r in rows), rows


def _torch_twin_logits(torch, weights: dict, tokens, config: EdificeConfig):
    """Edifice's build/1 written again with torch ops (float64), from its description."""
    F = torch.nn.functional
    V, H, NH = config.vocab_size, config.hidden_size, config.num_heads
    HS = H // NH
    B, T = tokens.shape
    one_hot = F.one_hot(tokens, V).double()  # [B, T, V]
    if config.token_embedding == "fixed":
        table = torch.arange(V * H, dtype=torch.float64).reshape(V, H) / math.sqrt(V)
    else:
        table = weights["token_embed.kernel"]
    x = one_hot @ table
    half = H // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / max(half - 1, 1))
    angles = torch.arange(T, dtype=torch.float64)[:, None] * frequencies[None, :]
    x = x + torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)[None]
    rows, cols = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = torch.where(cols > rows, torch.tensor(-1e9, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    for i in range(1, config.num_layers + 1):
        p = f"block_{i}_"

        def dense(inp, layer, p=p):
            return inp @ weights[p + layer + ".kernel"] + weights[p + layer + ".bias"]

        h = F.layer_norm(x, (H,), weights[p + "attn_norm.gamma"], weights[p + "attn_norm.beta"], eps=1e-5)
        q, k, v = (dense(h, f"attn_{part}").reshape(B, T, NH, HS).transpose(1, 2) for part in "qkv")
        scores = q @ k.transpose(-1, -2) / math.sqrt(HS) + mask
        e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        w = e / (e.sum(dim=-1, keepdim=True) + 1e-8)
        attended = (w @ v).transpose(1, 2).reshape(B, T, H)
        x = x + dense(attended, "attn_out")
        h = F.layer_norm(x, (H,), weights[p + "ffn_norm.gamma"], weights[p + "ffn_norm.beta"], eps=1e-5)
        x = x + dense(F.gelu(dense(h, "ffn_up")), "ffn_down")  # F.gelu: the exact (erf) GELU
    x = F.layer_norm(x, (H,), weights["final_norm.gamma"], weights["final_norm.beta"], eps=1e-5)
    return x @ weights["lm_head.kernel"] + weights["lm_head.bias"]


@pytest.mark.parametrize("token_embedding", ["fixed", "learned"])
def test_torch_twin_same_logits_and_every_gradient(token_embedding):
    torch = pytest.importorskip("torch", reason="torch not installed: the PyTorch twin is skipped")
    model = small_model(token_embedding=token_embedding, num_layers=3)
    params = perturbed_params(model, seed=7)
    rng = np.random.default_rng(8)
    tokens = rng.integers(0, 11, (3, 8))
    upstream = rng.standard_normal((3, 8, 11))
    logits, cache = model.forward(params, tokens)
    grads = model.backward(upstream, cache)

    weights = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    twin = _torch_twin_logits(torch, weights, torch.tensor(tokens), model.config)
    (twin * torch.tensor(upstream)).sum().backward()
    assert rel_error(logits, twin.detach().numpy()) <= 1e-10
    errors = {k: rel_error(grads[k], weights[k].grad.numpy()) for k in params if not k.endswith("attn_k.bias")}
    assert max(errors.values()) <= 1e-10, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    # the key biases' gradients are 0 up to rounding in both (a key bias shifts a whole row of scores)
    largest = max(float(np.max(np.abs(g))) for g in grads.values())
    for name in (k for k in params if k.endswith("attn_k.bias")):
        assert np.max(np.abs(grads[name] - weights[name].grad.numpy())) <= 1e-14 * largest, name


# ---------------------------------------------------------------------------------------------------
# generation, checkpoints, training config, the oracle case


def test_generate_without_a_kv_cache_is_greedy_step_by_step():
    model = small_model(token_embedding="learned")
    params = perturbed_params(model)
    prompt = np.array([[1, 2], [3, 4]])
    out = generate(model, params, prompt, 4)
    tokens = prompt
    for _ in range(4):
        next_tokens = model.forward(params, tokens)[0][:, -1].argmax(axis=-1)
        tokens = np.concatenate([tokens, next_tokens[:, None]], axis=1)
    assert np.array_equal(out, tokens)
    stopped = generate(model, params, prompt, 4, temperature=1.0, rng=np.random.default_rng(0), stop_token=0)
    assert stopped.shape[0] == 2 and stopped.shape[1] <= 6


def test_checkpoint_round_trip(tmp_path):
    model = small_model(token_embedding="learned", dtype="float32")
    params = model.init(0)
    checkpoint.save(tmp_path / "edifice.npz", params, model.config, extra={"step": 3})
    loaded = checkpoint.load(tmp_path / "edifice.npz")
    assert loaded.config == model.config and isinstance(loaded.config, EdificeConfig)
    assert all(np.array_equal(loaded.params[k], params[k]) for k in params) and loaded.extra == {"step": 3}
    with pytest.raises(ValueError, match="do not match"):
        checkpoint.save(tmp_path / "bad.npz", {k: v for k, v in params.items() if k != "lm_head.bias"}, model.config)


def test_train_config_builds_edifice_and_rejects_what_does_not_apply():
    from kto_np.train import TrainConfig  # noqa: PLC0415

    config = TrainConfig(architecture="edifice", token_embedding="learned")
    assert isinstance(config.model_config(), EdificeConfig) and config.model_config().token_embedding == "learned"
    assert TrainConfig(architecture="edifice").model_config().token_embedding == "fixed"
    with pytest.raises(ValueError, match="positional"):
        TrainConfig(architecture="edifice", positional="sinusoidal")
    with pytest.raises(ValueError, match="token_embedding"):
        TrainConfig(token_embedding="learned")  # gpt2
    with pytest.raises(ValueError, match="architecture"):
        TrainConfig(architecture="llama")


def test_a_tiny_edifice_run(tmp_path):
    from kto_np.train import TrainConfig, run  # noqa: PLC0415

    config = TrainConfig(architecture="edifice", token_embedding="learned", hidden_size=16, num_heads=2,
                         num_layers=1, sft_steps=3, steps=2, batch_size=8, num_examples=16, sft_examples=16,
                         eval_prompts=4, eval_every=2, checkpoint_every=2)
    summary = run(config, tmp_path / "run", progress=False, log=lambda *a, **k: None)
    assert 0.0 <= summary["desirable_rate_after"] <= 1.0
    assert isinstance(checkpoint.load(tmp_path / "run" / "checkpoints" / "kto.npz").config, EdificeConfig)


def test_oracle_case_is_deterministic_and_matches_finite_differences():
    case = edifice_model_case_arrays(seed=3)
    again = edifice_model_case_arrays(seed=3)
    assert case["expected"]["loss"] == again["expected"]["loss"]
    assert all(np.array_equal(case["weights"][k], again["weights"][k]) for k in case["weights"])
    assert set(case["weights"]) == set(param_shapes(EdificeConfig.from_dict(case["config"])))
    config = EdificeConfig.from_dict(case["config"])
    model = Edifice(config)
    weights = {k: v.copy() for k, v in case["weights"].items()}
    options = case["loss_options"]

    def loss() -> float:  # the seed's contract, computed again from its definitions
        logits = model.forward(weights, case["tokens"])[0]
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        picked = np.take_along_axis(log_probs, case["targets"][..., None], axis=-1)[..., 0]
        logps = (picked * case["mask"]).sum(axis=1)
        kl = options["beta"] * (logps - case["ref_logps"])
        reward = kl - kl.mean()
        sigmoid = 1 / (1 + np.exp(-reward))
        utility = np.where(case["labels"] == 1, options["desirable_weight"] * sigmoid,
                           options["undesirable_weight"] * (1 - sigmoid))
        return -float(utility.mean())

    assert loss() == pytest.approx(case["expected"]["loss"], rel=1e-13)
    rows = check_gradients(loss, weights, case["expected"]["grads"], tolerance=1e-6, seed=0)
    # relative to the tensor, or to 1e-3 of the largest gradient entry for tiny ones (gradcheck's "floor")
    floor = 1e-3 * max(float(np.max(np.abs(g))) for g in case["expected"]["grads"].values())
    failed = [r for r in rows if r.max_abs_error > 1e-6 * max(floor, r.max_abs_error / max(r.rel_error, 1e-300))]
    assert not failed, failed
    for name in ("block_1_attn_k.bias", "block_2_attn_k.bias"):  # exactly 0: a key bias shifts a whole row
        assert np.max(np.abs(case["expected"]["grads"][name])) <= 1e-14
    learned = edifice_model_case_arrays(seed=3, token_embedding="learned")
    assert "token_embed.kernel" in learned["weights"]


# ---------------------------------------------------------------------------------------------------
# bad input


def test_bad_architecture_and_options_that_do_not_apply():
    with pytest.raises(ValueError, match="architecture"):
        kto_np.build(architecture="llama")
    with pytest.raises(ValueError, match="tie_embeddings"):
        kto_np.build(architecture="edifice", tie_embeddings=False)
    with pytest.raises(ValueError, match="positional"):
        kto_np.build(architecture="edifice", positional="learned")
    with pytest.raises(ValueError, match="token_embedding"):
        kto_np.build(token_embedding="learned")
    with pytest.raises(ValueError, match="token_embedding"):
        kto_np.build(architecture="edifice", token_embedding="random")
    assert isinstance(kto_np.build(), kto_np.GPT)  # the default stays GPT-2


def test_bad_sizes():
    with pytest.raises(ValueError, match="hidden_size must be even"):
        kto_np.build(architecture="edifice", hidden_size=15, num_heads=3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        kto_np.build(architecture="edifice", hidden_size=12, num_heads=5)
    with pytest.raises(ValueError, match="dropout"):
        kto_np.build(architecture="edifice", dropout=1.0)


def test_token_ids_out_of_range_are_rejected_saying_what_edifice_does():
    model = small_model()
    params = model.init(0)
    for bad in (np.array([[1, 11]]), np.array([[-1, 2]])):
        with pytest.raises(ValueError, match="zero vectors"):
            model.forward(params, bad)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.forward(params, np.zeros((1, 9), dtype=int))
    with pytest.raises(TypeError, match="integers"):
        model.forward(params, np.array([[1.0, 2.0]]))


def test_bad_params_and_dlogits():
    model = small_model()
    params = model.init(0)
    with pytest.raises(ValueError, match="missing keys"):
        model.forward({k: v for k, v in params.items() if k != "final_norm.beta"}, np.array([[1, 2]]))
    with pytest.raises(TypeError, match="dtype"):
        model.forward({**params, "lm_head.bias": params["lm_head.bias"].astype(np.float32)}, np.array([[1, 2]]))
    logits, cache = model.forward(params, np.array([[1, 2]]))
    with pytest.raises(ValueError, match="shape"):
        model.backward(np.zeros((1, 3, 11)), cache)
    with pytest.raises(ValueError, match="finite"):
        model.backward(np.full_like(logits, np.nan), cache)
    with pytest.raises(TypeError, match="EdificeCache"):
        model.backward(logits, None)


def test_constants_are_edifices():
    assert ATTENTION_MASK_VALUE == -1e9 and SOFTMAX_EPS == 1e-8


def test_demo_command_line_options():
    from kto_np.cli import build_parser  # noqa: PLC0415

    args = build_parser().parse_args(["demo", "--architecture", "edifice", "--token-embedding", "learned"])
    assert args.architecture == "edifice" and args.token_embedding == "learned"
    args = build_parser().parse_args(["demo"])
    assert args.architecture == "gpt2" and args.token_embedding is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--architecture", "llama"])
