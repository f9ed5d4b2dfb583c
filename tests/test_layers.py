"""Per-op checks of kto_np.layers: every backward against central finite differences (float64, random
upstream gradients, relative error <= 1e-7), plus dropout masks, causal masking and dtype behaviour."""

import math

import numpy as np
import pytest

from kto_np import layers
from kto_np.gradcheck import check_gradients, format_report

TOLERANCE = 1e-7


def assert_gradients(forward_output, tensors, analytic, dout, title):
    """FD-check analytic[name] = d sum(dout * forward_output()) / d tensors[name] for every name."""
    rows = check_gradients(lambda: float(np.sum(dout * forward_output())), tensors, analytic,
                           tolerance=TOLERANCE, max_full_size=400, num_directions=6)
    assert all(r.passed for r in rows), "\n" + format_report(rows, title)
    return rows


# ----------------------------------------------------------------------------------------------
# embedding, linear, layernorm, gelu


@pytest.mark.parametrize("seed", [0, 1])
def test_embedding_gradient_with_repeated_indices(seed):
    rng = np.random.default_rng(seed)
    V, C = 7, 5
    weight = rng.standard_normal((V, C))
    indices = rng.integers(0, V, size=(3, 6))
    indices[0, :3] = 2  # repeated ids must sum their gradients
    out, cache = layers.embedding_forward(weight, indices)
    np.testing.assert_array_equal(out, np.stack([[weight[i] for i in row] for row in indices]))
    dout = rng.standard_normal(out.shape)
    dweight = layers.embedding_backward(dout, cache)
    assert_gradients(lambda: layers.embedding_forward(weight, indices)[0], {"weight": weight},
                     {"weight": dweight}, dout, "embedding")
    unused = np.setdiff1d(np.arange(V), indices)
    assert np.all(dweight[unused] == 0.0)


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_gradients(with_bias):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 4))
    weight = rng.standard_normal((4, 5))
    bias = rng.standard_normal(5) if with_bias else None
    out, cache = layers.linear_forward(x, weight, bias)
    expected = np.einsum("bti,io->bto", x, weight) + (bias if with_bias else 0.0)
    np.testing.assert_allclose(out, expected, rtol=1e-13, atol=1e-13)
    dout = rng.standard_normal(out.shape)
    dx, dweight, dbias = layers.linear_backward(dout, cache)
    tensors = {"x": x, "weight": weight}
    analytic = {"x": dx, "weight": dweight}
    if with_bias:
        tensors["bias"], analytic["bias"] = bias, dbias
    else:
        assert dbias is None
    assert_gradients(lambda: layers.linear_forward(x, weight, bias)[0], tensors, analytic, dout, "linear")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layernorm_gradients_and_normalisation(seed):
    rng = np.random.default_rng(seed)
    C = int(rng.integers(2, 9))
    x = rng.standard_normal((2, 3, C)) * 3.0 + 1.5
    weight = rng.standard_normal(C)
    bias = rng.standard_normal(C)
    out, cache = layers.layernorm_forward(x, weight, bias)
    x_hat = (out - bias) / weight
    np.testing.assert_allclose(x_hat.mean(axis=-1), 0.0, atol=1e-12)
    var = x.var(axis=-1)
    np.testing.assert_allclose(x_hat.var(axis=-1), var / (var + 1e-5), rtol=1e-10)
    dout = rng.standard_normal(out.shape)
    dx, dweight, dbias = layers.layernorm_backward(dout, cache)
    assert_gradients(lambda: layers.layernorm_forward(x, weight, bias)[0],
                     {"x": x, "weight": weight, "bias": bias},
                     {"x": dx, "weight": dweight, "bias": dbias}, dout, "layernorm")


def test_gelu_gradient_and_values():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(40) * 3.0, [-30.0, -5.0, 0.0, 5.0, 30.0]])
    out, cache = layers.gelu_forward(x)
    # limits of x * Phi(x): ~0 far left, ~x far right, 0 at 0
    np.testing.assert_allclose(out[-5:], [0.0, 0.0, 0.0, 5.0, 30.0], atol=1e-5)
    # the tanh approximation is within 1e-3 of the exact x * Phi(x)
    exact = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])
    np.testing.assert_allclose(out, exact, atol=1e-3)
    dout = rng.standard_normal(out.shape)
    dx = layers.gelu_backward(dout, cache)
    assert_gradients(lambda: layers.gelu_forward(x)[0], {"x": x}, {"x": dx}, dout, "gelu")


def test_gelu_matches_torch_tanh_gelu():
    torch = pytest.importorskip("torch", reason="torch not installed (pip install 'kto_np[torch]')")
    x = np.random.default_rng(4).standard_normal(50) * 4.0
    ours, _ = layers.gelu_forward(x)
    theirs = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-14, atol=1e-15)


# ----------------------------------------------------------------------------------------------
# softmax


@pytest.mark.parametrize("masked", [False, True])
def test_softmax_gradient(masked):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 6)) * 2.0
    mask = layers.causal_mask(4, 6) if masked else None
    out, cache = layers.softmax_forward(x, mask=mask)
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, rtol=1e-14)
    if masked:
        assert np.all(out[:, ~mask] == 0.0)
    dout = rng.standard_normal(out.shape)
    dx = layers.softmax_backward(dout, cache)
    assert_gradients(lambda: layers.softmax_forward(x, mask=mask)[0], {"x": x}, {"x": dx}, dout, "softmax")
    if masked:
        assert np.all(dx[:, ~mask] == 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_large_logits_no_warnings_and_fully_masked_row(dtype):
    x = np.array([[1e4, -1e4, 0.0], [3e4, 3e4, -3e4], [1.0, 2.0, 3.0]], dtype=dtype)
    mask = np.array([[True, True, False], [True, True, True], [False, False, False]])
    out, cache = layers.softmax_forward(x, mask=mask)  # filterwarnings=error turns any warning into a failure
    assert out.dtype == dtype
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(out[1], [0.5, 0.5, 0.0])
    np.testing.assert_array_equal(out[2], [0.0, 0.0, 0.0])  # fully masked row: zeros, not NaN
    dx = layers.softmax_backward(np.ones_like(out), cache)
    assert np.all(np.isfinite(dx))
    out_unmasked, _ = layers.softmax_forward(x)
    np.testing.assert_allclose(out_unmasked[2], np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum(),
                               rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# dropout


def test_dropout_mask_reproducible_and_backward_uses_it():
    x = np.random.default_rng(6).standard_normal((4, 50))
    p = 0.3
    out_a, cache_a = layers.dropout_forward(x, p, train=True, rng=np.random.default_rng(42))
    out_b, cache_b = layers.dropout_forward(x, p, train=True, rng=np.random.default_rng(42))
    np.testing.assert_array_equal(out_a, out_b)
    np.testing.assert_array_equal(cache_a.keep, cache_b.keep)
    expected_keep = np.random.default_rng(42).random(x.shape) >= p  # mask drawn on the host, in this order
    np.testing.assert_array_equal(cache_a.keep, expected_keep)
    np.testing.assert_allclose(out_a, np.where(expected_keep, x / (1 - p), 0.0), rtol=1e-15)
    dout = np.random.default_rng(7).standard_normal(x.shape)
    dx = layers.dropout_backward(dout, cache_a)
    np.testing.assert_allclose(dx, np.where(expected_keep, dout / (1 - p), 0.0), rtol=1e-15)
    # the fraction kept is about 1 - p
    kept = np.random.default_rng(0).random((200, 200))
    _, cache = layers.dropout_forward(kept, p, train=True, rng=np.random.default_rng(1))
    assert abs(cache.keep.mean() - (1 - p)) < 0.01


def test_dropout_gradient_by_finite_differences():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 7))
    out, cache = layers.dropout_forward(x, 0.4, train=True, rng=np.random.default_rng(3))
    dout = rng.standard_normal(out.shape)
    dx = layers.dropout_backward(dout, cache)
    assert_gradients(lambda: layers.dropout_forward(x, 0.4, train=True, rng=np.random.default_rng(3))[0],
                     {"x": x}, {"x": dx}, dout, "dropout")


@pytest.mark.parametrize(("p", "train"), [(0.0, True), (0.5, False), (0.0, False)])
def test_dropout_identity(p, train):
    x = np.random.default_rng(9).standard_normal((3, 4)).astype(np.float32)
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    out, cache = layers.dropout_forward(x, p, train=train, rng=rng)
    assert out is x
    assert rng.bit_generator.state == state  # no draws
    dout = np.ones_like(x)
    assert layers.dropout_backward(dout, cache) is dout
    out, _ = layers.dropout_forward(x, p, train=train)  # no rng needed
    assert out is x


def test_dropout_keeps_float32():
    x = np.ones((5, 5), dtype=np.float32)
    out, cache = layers.dropout_forward(x, 0.5, train=True, rng=np.random.default_rng(0))
    assert out.dtype == np.float32
    assert layers.dropout_backward(x, cache).dtype == np.float32


# ----------------------------------------------------------------------------------------------
# attention


def attention_reference(x, c_attn_weight, c_attn_bias, c_proj_weight, c_proj_bias, num_heads):
    """Loop over batch, head and query position: a slow, independent statement of causal attention."""
    B, T, C = x.shape
    HS = C // num_heads
    qkv = x @ c_attn_weight + c_attn_bias
    y = np.zeros((B, T, C))
    for b in range(B):
        for h in range(num_heads):
            cols = slice(h * HS, (h + 1) * HS)
            q, k, v = qkv[b, :, :C][:, cols], qkv[b, :, C:2 * C][:, cols], qkv[b, :, 2 * C:][:, cols]
            for t in range(T):
                scores = np.array([q[t] @ k[s] / math.sqrt(HS) for s in range(t + 1)])
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                y[b, t, cols] = weights @ v[: t + 1]
    return y @ c_proj_weight + c_proj_bias


def attention_inputs(rng, B, T, C):
    return (rng.standard_normal((B, T, C)), rng.standard_normal((C, 3 * C)) * 0.5,
            rng.standard_normal(3 * C) * 0.1, rng.standard_normal((C, C)) * 0.5, rng.standard_normal(C) * 0.1)


@pytest.mark.parametrize(("B", "T", "C", "NH"), [(2, 5, 6, 2), (1, 1, 4, 1), (2, 4, 6, 1), (1, 3, 6, 3)])
def test_attention_matches_loop_reference(B, T, C, NH):
    rng = np.random.default_rng(10)
    inputs = attention_inputs(rng, B, T, C)
    out, cache = layers.attention_forward(*inputs, NH)
    np.testing.assert_allclose(out, attention_reference(*inputs, NH), rtol=1e-12, atol=1e-12)
    probs = cache.softmax_cache.probs
    assert probs.shape == (B, NH, T, T)
    assert np.all(probs[..., ~np.tri(T, dtype=bool)] == 0.0)


@pytest.mark.parametrize(("B", "T", "C", "NH", "dropout"),
                         [(2, 4, 6, 2, 0.0), (2, 4, 6, 3, 0.3), (1, 1, 4, 1, 0.0), (1, 3, 4, 1, 0.5)])
def test_attention_gradients(B, T, C, NH, dropout):
    rng = np.random.default_rng(11)
    x, c_attn_weight, c_attn_bias, c_proj_weight, c_proj_bias = attention_inputs(rng, B, T, C)

    def forward():
        return layers.attention_forward(x, c_attn_weight, c_attn_bias, c_proj_weight, c_proj_bias, NH,
                                        dropout=dropout, train=True, rng=np.random.default_rng(99))

    out, cache = forward()
    dout = rng.standard_normal(out.shape)
    grads = layers.attention_backward(dout, cache)
    assert_gradients(
        lambda: forward()[0],
        {"x": x, "c_attn_weight": c_attn_weight, "c_attn_bias": c_attn_bias,
         "c_proj_weight": c_proj_weight, "c_proj_bias": c_proj_bias},
        {"x": grads.dx, "c_attn_weight": grads.dc_attn_weight, "c_attn_bias": grads.dc_attn_bias,
         "c_proj_weight": grads.dc_proj_weight, "c_proj_bias": grads.dc_proj_bias},
        dout, f"attention B={B} T={T} C={C} NH={NH} dropout={dropout}",
    )


def test_attention_is_causal():
    rng = np.random.default_rng(12)
    x, *weights = attention_inputs(rng, 2, 6, 6)
    out, _ = layers.attention_forward(x, *weights, 2)
    for t in range(6):
        changed = x.copy()
        changed[:, t + 1:] = rng.standard_normal(changed[:, t + 1:].shape) * 10.0
        out_changed, _ = layers.attention_forward(changed, *weights, 2)
        np.testing.assert_allclose(out_changed[:, : t + 1], out[:, : t + 1], rtol=0, atol=1e-14,
                                   err_msg=f"output at positions <= {t} changed with later inputs")


def test_attention_large_inputs_no_warnings_float32():
    rng = np.random.default_rng(13)
    x, *weights = (a.astype(np.float32) for a in attention_inputs(rng, 2, 5, 8))
    x = x * 1e3  # scores of order 1e6 saturate the softmax
    out, cache = layers.attention_forward(x, *weights, 2, dropout=0.1, train=True, rng=np.random.default_rng(0))
    grads = layers.attention_backward(np.ones_like(out), cache)
    assert out.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads)
    assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in grads)


def test_causal_mask_with_cached_keys():
    mask = layers.causal_mask(2, 5)  # two new queries at positions 3 and 4 over five keys
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(layers.causal_mask(3, 3), np.tri(3, dtype=bool))


def test_ops_keep_float32():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    b = np.zeros(4, dtype=np.float32)
    g = np.ones(4, dtype=np.float32)
    for out, cache, backward in [
        (*layers.linear_forward(x, w, b), layers.linear_backward),
        (*layers.layernorm_forward(x, g, b), layers.layernorm_backward),
        (*layers.gelu_forward(x), layers.gelu_backward),
        (*layers.softmax_forward(x), layers.softmax_backward),
    ]:
        assert out.dtype == np.float32
        grads = backward(np.ones_like(out), cache)
        for grad in grads if isinstance(grads, tuple) else (grads,):
            assert grad is None or grad.dtype == np.float32
    emb, cache = layers.embedding_forward(w, np.array([[0, 3]]))
    assert emb.dtype == np.float32
    assert layers.embedding_backward(emb, cache).dtype == np.float32


@pytest.mark.parametrize("masked", [False, True])
def test_softmax_backward_equals_its_definition(masked):
    rng = np.random.default_rng(21)
    x = rng.standard_normal((2, 3, 5, 5)) * 3.0
    mask = layers.causal_mask(5, 5) if masked else None
    probs, cache = layers.softmax_forward(x, mask=mask)
    dprobs = rng.standard_normal(x.shape)
    by_definition = probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True))  # p (dp - sum(dp p))
    np.testing.assert_allclose(layers.softmax_backward(dprobs, cache), by_definition, rtol=1e-12, atol=1e-15)


def test_embedding_backward_adds_into_out():
    rng = np.random.default_rng(22)
    weight = rng.standard_normal((6, 4))
    indices = np.array([[0, 2, 2], [5, 0, 1]])
    _, cache = layers.embedding_forward(weight, indices)
    dout = rng.standard_normal((2, 3, 4))
    base = rng.standard_normal((6, 4))
    expected = base + layers.embedding_backward(dout, cache)
    out = base.copy()
    result = layers.embedding_backward(dout, cache, out=out)
    assert result is out
    np.testing.assert_allclose(out, expected, rtol=1e-15)


def test_gelu_and_layernorm_float32_match_float64_definitions():
    """The float32 formulas stay float32 and agree with the float64 formulas to float32 rounding."""
    rng = np.random.default_rng(23)
    x64 = rng.standard_normal((3, 4, 8)) * 3.0
    x32 = x64.astype(np.float32)
    out32, cache32 = layers.gelu_forward(x32)
    reference = 0.5 * x64 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64**3)))
    assert out32.dtype == np.float32 and cache32.tanh_out.dtype == np.float32
    np.testing.assert_allclose(out32, reference, rtol=2e-6, atol=2e-6)
    dout64 = rng.standard_normal(x64.shape)
    dx32 = layers.gelu_backward(dout64.astype(np.float32), cache32)
    dx64 = layers.gelu_backward(dout64, layers.gelu_forward(x64)[1])
    assert dx32.dtype == np.float32
    np.testing.assert_allclose(dx32, dx64, rtol=1e-5, atol=1e-5)
    weight, bias = rng.standard_normal(8), rng.standard_normal(8)
    ln64, ln_cache64 = layers.layernorm_forward(x64, weight, bias)
    ln32, ln_cache32 = layers.layernorm_forward(x32, weight.astype(np.float32), bias.astype(np.float32))
    np.testing.assert_allclose(ln32, ln64, rtol=1e-5, atol=1e-5)
    grads64 = layers.layernorm_backward(dout64, ln_cache64)
    grads32 = layers.layernorm_backward(dout64.astype(np.float32), ln_cache32)
    for name, mine, theirs in zip(("dx", "dweight", "dbias"), grads32, grads64):
        assert mine.dtype == np.float32, name
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4, err_msg=name)
