"""End-to-end checks of the GPT model: every parameter's gradient by finite differences and against an
independent PyTorch float64 implementation, causality, batch independence, init, dtypes, bad input."""

import math
import tracemalloc

import numpy as np
import pytest

from kto_np import torch_reference
from kto_np.architectures import build
from kto_np.gradcheck import check_gradients, format_report, rel_error
from kto_np.model import GPT, GPTConfig, param_shapes

V, C, NH, L, T, B = 11, 12, 3, 2, 5, 3
MAX_SEQ_LEN = 8
MODEL_TOLERANCE = 1e-6
VARIANTS = [("learned", True), ("learned", False), ("sinusoidal", True), ("sinusoidal", False)]


def small_model(positional="learned", tie_embeddings=True, *, dropout=0.0, dtype="float64", **overrides):
    sizes = dict(hidden_size=C, num_layers=L, num_heads=NH, vocab_size=V, max_seq_len=MAX_SEQ_LEN)
    sizes.update(overrides)
    return build(**sizes, dropout=dropout, dtype=dtype, positional=positional, tie_embeddings=tie_embeddings)


def random_tokens(seed, batch=B, seq=T, vocab=V):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq))


def check_model_gradients(model, params, tokens, *, train=False, rng_seed=None, title=""):
    """FD-check every parameter of sum(dlogits * logits) with a random dlogits; return the rows."""

    def forward():
        rng = None if rng_seed is None else np.random.default_rng(rng_seed)  # same masks every evaluation
        return model.forward(params, tokens, train=train, rng=rng)

    logits, cache = forward()
    dlogits = np.random.default_rng(123).standard_normal(logits.shape)
    grads = model.backward(dlogits, cache)
    assert list(grads) == list(params)
    for name in params:
        assert grads[name].shape == params[name].shape, name
    rows = check_gradients(lambda: float(np.sum(dlogits * forward()[0])), params, grads,
                           tolerance=MODEL_TOLERANCE, max_full_size=150, num_directions=6)
    assert all(r.passed for r in rows), "\n" + format_report(rows, title)
    return rows


# ----------------------------------------------------------------------------------------------
# gradients by finite differences


@pytest.mark.parametrize(("positional", "tie_embeddings"), VARIANTS)
def test_every_parameter_gradient_by_finite_differences(positional, tie_embeddings):
    model = small_model(positional, tie_embeddings)
    params = model.init(0)
    names = set(params)
    assert ("wpe.weight" in names) == (positional == "learned")
    assert ("lm_head.weight" in names) == (not tie_embeddings)
    check_model_gradients(model, params, random_tokens(1), title=f"{positional}, tied={tie_embeddings}")


def test_gradient_with_dropout_in_train_mode():
    model = small_model("learned", False, dropout=0.3)
    params = model.init(1)
    check_model_gradients(model, params, random_tokens(2), train=True, rng_seed=7, title="dropout 0.3")


@pytest.mark.parametrize(("batch", "seq", "heads"), [(1, 5, 3), (3, 1, 3), (2, 4, 1), (1, 1, 1)])
def test_gradient_edge_cases(batch, seq, heads):
    model = small_model(num_heads=heads, num_layers=1)
    params = model.init(2)
    check_model_gradients(model, params, random_tokens(3, batch, seq), title=f"B={batch} T={seq} NH={heads}")


def test_tied_embedding_gradient_is_the_sum_of_both_uses():
    model = small_model("learned", True)
    untied = small_model("learned", False)
    params = model.init(3)
    untied_params = {**params, "lm_head.weight": params["wte.weight"].copy()}
    tokens = random_tokens(4)
    logits, cache = model.forward(params, tokens)
    untied_logits, untied_cache = untied.forward(untied_params, tokens)
    np.testing.assert_allclose(untied_logits, logits, rtol=1e-14, atol=1e-14)
    dlogits = np.random.default_rng(5).standard_normal(logits.shape)
    grads = model.backward(dlogits, cache)
    untied_grads = untied.backward(dlogits, untied_cache)
    np.testing.assert_allclose(grads["wte.weight"], untied_grads["wte.weight"] + untied_grads["lm_head.weight"],
                               rtol=1e-13, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# structure: causality, batch independence, positions


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_causality(positional):
    model = small_model(positional)
    params = model.init(4)
    tokens = random_tokens(6, seq=6)
    logits, _ = model.forward(params, tokens)
    rng = np.random.default_rng(7)
    for t in range(tokens.shape[1] - 1):
        changed = tokens.copy()
        changed[:, t + 1:] = (changed[:, t + 1:] + rng.integers(1, V, size=changed[:, t + 1:].shape)) % V
        changed_logits, _ = model.forward(params, changed)
        np.testing.assert_allclose(changed_logits[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-13,
                                   err_msg=f"logits at positions <= {t} depend on later tokens")
        assert not np.allclose(changed_logits[:, t + 1:], logits[:, t + 1:])


def test_batch_independence():
    model = small_model("sinusoidal", False)
    params = model.init(5)
    tokens = random_tokens(8, batch=4)
    logits, _ = model.forward(params, tokens)
    for b in range(tokens.shape[0]):
        alone, _ = model.forward(params, tokens[b:b + 1])
        np.testing.assert_allclose(alone[0], logits[b], rtol=1e-12, atol=1e-13, err_msg=f"row {b}")


def test_positions_matter_and_sinusoidal_table():
    model = small_model("sinusoidal")
    params = model.init(6)
    table = model.position_embeddings(params, 4, start=2)
    for pos in range(2, 6):
        for i in range(C // 2):
            angle = pos / 10000 ** (2 * i / C)
            assert table[pos - 2, 2 * i] == pytest.approx(math.sin(angle), abs=1e-15)
            assert table[pos - 2, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-15)
    logits, _ = model.forward(params, np.array([[3, 3, 3]]))
    assert not np.allclose(logits[0, 0], logits[0, 2])  # same token, different positions


# ----------------------------------------------------------------------------------------------
# init, dtypes, counts


def test_init_is_deterministic_and_gpt2_like():
    model = small_model("learned", False, hidden_size=64, num_heads=4, num_layers=4, vocab_size=50,
                        max_seq_len=64)
    params = model.init(7)
    again = model.init(7)
    other = model.init(8)
    for name in params:
        np.testing.assert_array_equal(params[name], again[name], err_msg=name)
    assert not np.array_equal(params["wte.weight"], other["wte.weight"])
    residual_std = 0.02 / math.sqrt(2 * 4)
    for name, value in params.items():
        assert value.dtype == np.float64
        if ".ln_" in f".{name}" and name.endswith("weight"):
            assert np.all(value == 1.0), name
        elif name.endswith("bias"):
            assert np.all(value == 0.0), name
        else:
            expected = residual_std if name.endswith("c_proj.weight") else 0.02
            assert abs(value.mean()) < 4 * expected / math.sqrt(value.size), name
            assert value.std() == pytest.approx(expected, rel=0.1), name


def test_float32_model_runs_in_float32_and_agrees_with_float64():
    model32 = small_model("learned", True, dtype="float32")
    model64 = small_model("learned", True, dtype="float64")
    params32, params64 = model32.init(9), model64.init(9)
    for name in params32:
        assert params32[name].dtype == np.float32
        np.testing.assert_array_equal(params32[name], params64[name].astype(np.float32), err_msg=name)
    tokens = random_tokens(10)
    logits32, cache32 = model32.forward(params32, tokens, train=True, rng=np.random.default_rng(0))
    logits64, _ = model64.forward(params64, tokens)
    assert logits32.dtype == np.float32
    dlogits = np.random.default_rng(11).standard_normal(logits32.shape).astype(np.float32)
    grads32 = model32.backward(dlogits, cache32)
    assert all(g.dtype == np.float32 for g in grads32.values())
    logits32_eval, _ = model32.forward(params32, tokens)
    np.testing.assert_allclose(logits32_eval, logits64, rtol=1e-4, atol=1e-5)


def test_build_defaults_and_parameter_count():
    model = build()
    config = model.config
    assert isinstance(model, GPT)
    assert (config.hidden_size, config.num_layers, config.num_heads, config.vocab_size, config.dropout,
            config.max_seq_len, config.dtype, config.positional, config.tie_embeddings) == (
        512, 6, 8, 32000, 0.1, 2048, "float32", "learned", True)
    hidden, vocab, positions, layers = 512, 32000, 2048, 6
    per_layer = 12 * hidden * hidden + 13 * hidden
    assert model.num_params() == vocab * hidden + positions * hidden + layers * per_layer + 2 * hidden
    small = small_model("sinusoidal", False)
    assert small.num_params(small.init(0)) == small.num_params() == sum(
        math.prod(s) for s in param_shapes(small.config).values())


@pytest.mark.slow
def test_default_model_forward_backward_memory():
    """build() defaults (~36 M parameters, float32) on 2 x 256 tokens: peak traced memory < 2 GiB."""
    tracemalloc.start()
    try:
        model = build()
        params = model.init(0)
        tokens = random_tokens(0, batch=2, seq=256, vocab=32000)
        logits, cache = model.forward(params, tokens, train=True, rng=np.random.default_rng(0))
        assert logits.shape == (2, 256, 32000) and logits.dtype == np.float32
        dlogits = np.random.default_rng(1).standard_normal(logits.shape, dtype=np.float32) * 1e-3
        grads = model.backward(dlogits, cache)
        assert all(np.all(np.isfinite(g)) for g in grads.values())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**30, f"peak traced memory {peak / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.fixture
def model_and_params():
    model = small_model("learned", True)
    return model, model.init(0)


@pytest.mark.parametrize(("tokens", "error"), [
    (np.zeros((2, 3)), TypeError),  # float ids
    (np.zeros(3, dtype=np.int64), ValueError),  # 1-D
    (np.zeros((1, 2, 3), dtype=np.int64), ValueError),  # 3-D
    (np.full((2, 3), V, dtype=np.int64), ValueError),  # id == vocab_size
    (np.full((2, 3), -1, dtype=np.int64), ValueError),  # negative id
    (np.zeros((2, MAX_SEQ_LEN + 1), dtype=np.int64), ValueError),  # longer than max_seq_len
    (np.zeros((2, 0), dtype=np.int64), ValueError),  # empty
    ("abc", TypeError),
])
def test_bad_tokens(model_and_params, tokens, error):
    model, params = model_and_params
    with pytest.raises(error, match="tokens"):
        model.forward(params, tokens)


def test_bad_params(model_and_params):
    model, params = model_and_params
    tokens = random_tokens(0)
    missing = {k: v for k, v in params.items() if k != "h.1.ln_2.bias"}
    with pytest.raises(ValueError, match=r"params.*missing keys.*h\.1\.ln_2\.bias"):
        model.forward(missing, tokens)
    with pytest.raises(ValueError, match=r"params.*unexpected keys.*lm_head\.weight"):
        model.forward({**params, "lm_head.weight": params["wte.weight"]}, tokens)
    with pytest.raises(ValueError, match=r"params.*wrong shapes.*ln_f\.weight"):
        model.forward({**params, "ln_f.weight": np.ones(C + 1)}, tokens)
    with pytest.raises(TypeError, match=r"params.*float64.*ln_f\.weight: float32"):
        model.forward({**params, "ln_f.weight": params["ln_f.weight"].astype(np.float32)}, tokens)
    with pytest.raises(TypeError, match="params"):
        model.forward([params], tokens)


def test_bad_dlogits_and_cache(model_and_params):
    model, params = model_and_params
    logits, cache = model.forward(params, random_tokens(0))
    with pytest.raises(ValueError, match="dlogits"):
        model.backward(np.zeros((B, T, V + 1)), cache)
    with pytest.raises(ValueError, match="dlogits"):
        model.backward(np.zeros((B, T)), cache)
    with pytest.raises(ValueError, match="dlogits"):
        model.backward(np.full(logits.shape, np.nan), cache)
    with pytest.raises(TypeError, match="dlogits"):
        model.backward(np.zeros(logits.shape, dtype=np.float32), cache)
    with pytest.raises(TypeError, match="cache"):
        model.backward(np.zeros(logits.shape), {"not": "a cache"})


def test_train_mode_needs_rng():
    model = small_model(dropout=0.1)
    params = model.init(0)
    with pytest.raises(ValueError, match="rng"):
        model.forward(params, random_tokens(0), train=True)
    with pytest.raises(TypeError, match="rng"):
        model.forward(params, random_tokens(0), train=True, rng=0)
    model.forward(params, random_tokens(0), train=False)  # eval needs no rng
    no_dropout = small_model(dropout=0.0)
    no_dropout.forward(no_dropout.init(0), random_tokens(0), train=True)  # nothing to draw


@pytest.mark.parametrize(("kwargs", "name", "error"), [
    ({"hidden_size": 10, "num_heads": 3}, "hidden_size", ValueError),
    ({"num_layers": 0}, "num_layers", ValueError),
    ({"vocab_size": 2.5}, "vocab_size", TypeError),
    ({"dropout": 1.0}, "dropout", ValueError),
    ({"dropout": -0.1}, r"dropout must be in \[0, 1\)", ValueError),
    ({"dropout": "0.1"}, "dropout must be a real number", TypeError),
    ({"dtype": "float16"}, "dtype", ValueError),
    ({"positional": "rotary"}, "positional", ValueError),
    ({"tie_embeddings": 1}, "tie_embeddings", TypeError),
])
def test_bad_build_arguments(kwargs, name, error):
    with pytest.raises(error, match=name):
        build(**kwargs)


def test_bad_seed_and_config():
    with pytest.raises(TypeError, match="seed"):
        small_model().init(1.5)
    with pytest.raises(TypeError, match="config"):
        GPT({"hidden_size": 12})
    assert GPT(GPTConfig(hidden_size=C, num_heads=NH)).config.hidden_size == C


# ----------------------------------------------------------------------------------------------
# parity with the independent PyTorch twin (kto_np.torch_reference), float64


@pytest.mark.parametrize(("positional", "tie_embeddings"), VARIANTS)
def test_torch_parity_logits_and_every_gradient(positional, tie_embeddings):
    torch = pytest.importorskip("torch", reason="torch not installed (pip install 'kto_np[torch]')")
    model = small_model(positional, tie_embeddings, num_layers=3, hidden_size=16, num_heads=4)
    params = model.init(12)
    tokens = random_tokens(13, batch=3, seq=7)
    logits, cache = model.forward(params, tokens)
    dlogits = np.random.default_rng(14).standard_normal(logits.shape)
    grads = model.backward(dlogits, cache)

    torch_params = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    config = model.config
    their_logits = torch_reference.gpt2_logits(torch_params, torch.from_numpy(tokens), num_heads=config.num_heads,
                                               positional=config.positional, tie_embeddings=config.tie_embeddings)
    (their_logits * torch.from_numpy(dlogits)).sum().backward()

    their_logits = their_logits.detach().numpy()
    err = rel_error(logits, their_logits)
    assert err <= 1e-10, f"logits: rel error {err:.2e}\nours  {logits.ravel()[:4]}\ntorch {their_logits.ravel()[:4]}"
    failures = []
    for name in params:
        theirs = torch_params[name].grad.numpy()
        err = rel_error(grads[name], theirs)
        if not err <= 1e-10:
            failures.append(f"{name}: rel error {err:.2e}; ours {grads[name].ravel()[:3]} torch {theirs.ravel()[:3]}")
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------------------------
# forward-only passes and the backward's checks


@pytest.mark.parametrize(("positional", "tie_embeddings"), VARIANTS)
def test_forward_without_cache_gives_the_same_logits(positional, tie_embeddings):
    model = small_model(positional, tie_embeddings)
    params = model.init(3)
    tokens = random_tokens(4)
    logits, cache = model.forward(params, tokens)
    forward_only, no_cache = model.forward(params, tokens, keep_cache=False)
    assert no_cache is None and cache is not None
    np.testing.assert_array_equal(forward_only, logits)
    with pytest.raises(TypeError, match="keep_cache"):
        model.forward(params, tokens, keep_cache="no")


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_backward_rejects_any_non_finite_dlogit(model_and_params, bad):
    model, params = model_and_params
    logits, cache = model.forward(params, random_tokens(0))
    dlogits = np.random.default_rng(2).standard_normal(logits.shape)
    dlogits[1, 2, 3] = bad
    with pytest.raises(ValueError, match="dlogits must be finite, got 1 NaN or infinite"):
        model.backward(dlogits, cache)


def test_backward_reports_overflowing_dlogits_float32():
    model = small_model(dtype="float32")
    params = model.init(0)
    params["wte.weight"][:] = 1.0  # the head: dx_final = sum over V of dlogits
    logits, cache = model.forward(params, random_tokens(0))
    huge = np.full(logits.shape, 3e38, dtype=np.float32)  # finite, but V * 3e38 overflows float32
    with pytest.raises(ValueError, match="dlogits are too large"):
        model.backward(huge, cache)


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_the_fast_room_gives_the_reading_editions_logits_and_gradients(dtype, rtol, tie_embeddings):
    """build(..., fast=True) runs kto_np.fast.layers: the same logits and every gradient as the reading
    edition, with dropout (the same masks from the same seed)."""
    kwargs = dict(hidden_size=16, num_layers=2, num_heads=4, vocab_size=37, dropout=0.1, max_seq_len=16,
                  dtype=dtype, tie_embeddings=tie_embeddings)
    reading, fast = build(**kwargs), build(**kwargs, fast=True)
    assert not reading.fast and fast.fast and fast.ops is not reading.ops
    params = reading.init(3)
    tokens = np.random.default_rng(4).integers(0, 37, size=(3, 11))
    dlogits = np.random.default_rng(5).normal(size=(3, 11, 37)).astype(dtype)
    outputs = []
    for model in (reading, fast):
        logits, cache = model.forward(params, tokens, train=True, rng=np.random.default_rng(6))
        outputs.append((logits.copy(), model.backward(dlogits.copy(), cache)))
    (logits_a, grads_a), (logits_b, grads_b) = outputs
    scale = float(np.abs(logits_a).max())
    np.testing.assert_allclose(logits_b, logits_a, rtol=rtol, atol=rtol * scale)
    for name in grads_a:
        scale = float(np.abs(grads_a[name]).max())
        np.testing.assert_allclose(grads_b[name], grads_a[name], rtol=rtol, atol=rtol * scale, err_msg=name)
