"""compute_logprobs, the shifted sequence helper and their backward, against independent computations."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kto_np.logprobs as lp
from kto_np.gradcheck import numerical_gradient, rel_error


def random_case(rng, B, T, V, masked=True, scale=3.0):
    logits = scale * rng.standard_normal((B, T, V))
    targets = rng.integers(0, V, size=(B, T))
    mask = (rng.random((B, T)) > 0.3).astype(np.float64) if masked else None
    return logits, targets, mask


def logprobs_by_loops(logits, targets, mask, shift=False):
    """The definition, one token at a time with math.exp: an independent reference."""
    B, T, V = logits.shape
    out = []
    for b in range(B):
        total = 0.0
        for t in range(1 if shift else 0, T):
            row = logits[b, t - 1] if shift else logits[b, t]
            m = max(row)
            lse = m + math.log(sum(math.exp(x - m) for x in row))
            w = 1.0 if mask is None else mask[b, t]
            total += w * (row[targets[b, t]] - lse)
        out.append(total)
    return np.array(out)


@pytest.mark.parametrize("B,T,V", [(1, 1, 2), (1, 4, 7), (3, 1, 5), (3, 5, 11), (2, 6, 3)])
def test_forward_matches_definition(rng, B, T, V):
    logits, targets, mask = random_case(rng, B, T, V)
    np.testing.assert_allclose(lp.compute_logprobs(logits, targets, mask),
                               logprobs_by_loops(logits, targets, mask), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lp.compute_logprobs(logits, targets),
                               logprobs_by_loops(logits, targets, None), rtol=1e-12, atol=1e-12)
    if T >= 2:
        np.testing.assert_allclose(lp.sequence_logprobs(logits, targets, mask),
                                   logprobs_by_loops(logits, targets, mask, shift=True),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("B,T,V", [(1, 1, 2), (1, 4, 7), (3, 1, 5), (3, 5, 11), (4, 3, 6)])
def test_backward_finite_differences(rng, B, T, V):
    logits, targets, mask = random_case(rng, B, T, V)
    upstream = rng.standard_normal(B)
    _, cache = lp.logprobs_forward(logits, targets, mask)
    analytic = lp.logprobs_backward(upstream, cache)
    numerical = numerical_gradient(lambda: float(upstream @ lp.compute_logprobs(logits, targets, mask)), logits)
    err = rel_error(analytic, numerical)
    assert err <= 1e-7, f"compute_logprobs dlogits: rel error {err:.2e}"


@pytest.mark.parametrize("B,T,V", [(1, 2, 2), (3, 5, 11), (2, 7, 4)])
def test_sequence_backward_finite_differences(rng, B, T, V):
    logits, tokens, mask = random_case(rng, B, T, V)
    upstream = rng.standard_normal(B)
    _, cache = lp.sequence_logprobs_forward(logits, tokens, mask)
    analytic = lp.sequence_logprobs_backward(upstream, cache)
    assert analytic.shape == logits.shape
    assert np.all(analytic[:, -1] == 0.0), "the last position scores no token"
    numerical = numerical_gradient(
        lambda: float(upstream @ lp.sequence_logprobs(logits, tokens, mask)), logits)
    err = rel_error(analytic, numerical)
    assert err <= 1e-7, f"sequence_logprobs dlogits: rel error {err:.2e}"


def test_shift_means_position_t_scores_token_t_plus_1(rng):
    logits, tokens, mask = random_case(rng, 2, 6, 5)
    shifted = lp.sequence_logprobs(logits, tokens, mask)
    unshifted = lp.compute_logprobs(logits[:, :-1], tokens[:, 1:], mask[:, 1:])
    np.testing.assert_array_equal(shifted, unshifted)
    # changing the first token (never scored) or the last logits (score nothing) changes nothing
    tokens2, logits2 = tokens.copy(), logits.copy()
    tokens2[:, 0] = (tokens[:, 0] + 1) % 5
    logits2[:, -1] += 10 * rng.standard_normal(logits2[:, -1].shape)
    np.testing.assert_array_equal(lp.sequence_logprobs(logits2, tokens2, mask), shifted)


def test_masked_positions_get_exactly_zero_gradient(rng):
    logits, targets, mask = random_case(rng, 3, 6, 5)
    mask[0] = 0.0  # a fully masked row
    out, cache = lp.logprobs_forward(logits, targets, mask)
    assert out[0] == 0.0
    dlogits = lp.logprobs_backward(rng.standard_normal(3), cache)
    assert np.all(dlogits[mask == 0] == 0.0)
    assert np.all(np.abs(dlogits[mask == 1]).sum(axis=-1) > 0)


@given(
    st.integers(1, 3), st.integers(1, 4), st.integers(2, 6),
    st.floats(-1e3, 1e3, allow_nan=False), st.integers(0, 2**32 - 1),
)
def test_log_softmax_shift_invariance(B, T, V, shift, seed):
    logits = np.random.default_rng(seed).standard_normal((B, T, V))
    np.testing.assert_allclose(lp.log_softmax(logits + shift), lp.log_softmax(logits), atol=1e-9)
    targets = np.random.default_rng(seed + 1).integers(0, V, (B, T))
    np.testing.assert_allclose(lp.compute_logprobs(logits + shift, targets),
                               lp.compute_logprobs(logits, targets), atol=1e-9)


@given(st.integers(0, 2**32 - 1))
def test_logprobs_are_nonpositive_and_normalised(seed):
    rng = np.random.default_rng(seed)
    logits = 5 * rng.standard_normal((2, 3, 4))
    probs = np.exp(lp.log_softmax(logits))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-12)
    assert np.all(lp.compute_logprobs(logits, rng.integers(0, 4, (2, 3))) <= 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_logits_are_stable(rng, dtype):
    logits = (1e4 * np.sign(rng.standard_normal((2, 4, 6)))).astype(dtype)
    targets = rng.integers(0, 6, (2, 4))
    out, cache = lp.logprobs_forward(logits, targets)
    dlogits = lp.logprobs_backward(np.ones(2, dtype=dtype), cache)
    assert out.dtype == dtype and dlogits.dtype == dtype
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(dlogits))
    np.testing.assert_allclose(out, logprobs_by_loops(logits.astype(np.float64), targets, None),
                               rtol=1e-6 if dtype == np.float32 else 1e-12)


def test_float32_stays_float32(rng):
    logits, targets, mask = random_case(rng, 2, 3, 5)
    out, cache = lp.sequence_logprobs_forward(logits.astype(np.float32), targets, mask.astype(np.float32))
    assert out.dtype == np.float32
    assert lp.sequence_logprobs_backward(np.ones(2, np.float32), cache).dtype == np.float32


def test_torch_parity(rng):
    torch = pytest.importorskip("torch", reason="torch not installed (pip install 'kto_np[torch]')")
    logits, tokens, mask = random_case(rng, 3, 6, 9)
    upstream = rng.standard_normal(3)
    for shifted in (False, True):
        tl = torch.tensor(logits, requires_grad=True)
        logp = torch.log_softmax(tl, dim=-1)
        if shifted:
            tok = torch.tensor(tokens[:, 1:])
            per_token = logp[:, :-1].gather(-1, tok[..., None])[..., 0] * torch.tensor(mask[:, 1:])
            ours, cache = lp.sequence_logprobs_forward(logits, tokens, mask)
            dours = lp.sequence_logprobs_backward(upstream, cache)
        else:
            tok = torch.tensor(tokens)
            per_token = logp.gather(-1, tok[..., None])[..., 0] * torch.tensor(mask)
            ours, cache = lp.logprobs_forward(logits, tokens, mask)
            dours = lp.logprobs_backward(upstream, cache)
        theirs = per_token.sum(1)
        (theirs * torch.tensor(upstream)).sum().backward()
        assert rel_error(ours, theirs.detach().numpy()) <= 1e-12
        assert rel_error(dours, tl.grad.numpy()) <= 1e-12, f"shifted={shifted}"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(logits=np.zeros((2, 3))), ValueError, "logits must be 3-D"),
        (dict(logits=np.zeros((2, 3, 4), dtype=np.complex128)), TypeError, "logits"),
        (dict(logits=np.full((2, 3, 4), np.nan)), ValueError, "logits must be finite"),
        (dict(logits=np.array([[[0.0, np.inf]] * 3] * 2)), ValueError, "logits must be finite"),
        (dict(logits=np.array([[[0.0, -np.inf]] * 3] * 2)), ValueError, "logits must be finite"),
        (dict(targets=np.zeros((2, 3))), TypeError, "targets must hold integers"),
        (dict(targets=np.full((2, 3), 4)), ValueError, r"targets must be in \[0, 4\)"),
        (dict(targets=np.full((2, 3), -1)), ValueError, "targets"),
        (dict(targets=np.zeros((3, 2), dtype=int)), ValueError, "targets must have shape"),
        (dict(mask=np.ones((2, 4))), ValueError, "mask must have the same shape"),
        (dict(mask=np.array([[1.0, np.nan, 1.0]] * 2)), ValueError, "mask must be finite"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(logits=np.zeros((2, 3, 4)), targets=np.zeros((2, 3), dtype=int), mask=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        lp.compute_logprobs(**args)


def test_bad_input_shifted():
    with pytest.raises(ValueError, match="completion_mask"):
        lp.sequence_logprobs(np.zeros((2, 3, 4)), np.zeros((2, 3), dtype=int), np.ones((2, 2)))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        lp.sequence_logprobs(np.zeros((2, 1, 4)), np.zeros((2, 1), dtype=int), np.ones((2, 1)))
    with pytest.raises(ValueError, match=r"completion_mask must be in \[0, 1\]"):
        lp.sequence_logprobs(np.zeros((2, 3, 4)), np.zeros((2, 3), dtype=int), np.full((2, 3), 2.0))


# ----------------------------------------------------------------------------------------------
# the doors


def test_non_finite_logits_found_anywhere(rng):
    for bad in (np.nan, np.inf, -np.inf):
        logits, targets, _ = random_case(rng, 2, 5, 13)
        logits[1, 3, 7] = bad
        with pytest.raises(ValueError, match="logits must be finite, got 1 NaN or infinite"):
            lp.sequence_logprobs(logits, targets, np.ones((2, 5)))
        with pytest.raises(ValueError, match="logits must be finite, got 1 NaN or infinite"):
            lp.compute_logprobs(logits, targets)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finite_but_too_large_logits_are_rejected_by_name(dtype):
    """Finite logits whose rows span more than the dtype holds, and log-probs whose sum overflows."""
    big = np.finfo(dtype).max
    logits = np.zeros((1, 3, 4), dtype=dtype)
    logits[0, 1, 0], logits[0, 1, 1] = big, -big  # max - min overflows
    targets = np.zeros((1, 3), dtype=int)
    for call in (lambda: lp.compute_logprobs(logits, targets),
                 lambda: lp.sequence_logprobs(logits, targets, np.ones((1, 3))),
                 lambda: lp.log_softmax(logits)):
        with pytest.raises(ValueError, match="logits are finite but too large: their log-sum-exp overflows"):
            call()
    logits = np.zeros((1, 3, 4), dtype=dtype)
    logits[0, :, 1] = big / 2  # each target (id 0) has log-prob -big/2: their sum over 3 tokens overflows
    with pytest.raises(ValueError, match="log-probabilities overflow"):
        lp.compute_logprobs(logits, targets)


def test_log_softmax_rejects_bad_input():
    with pytest.raises(ValueError, match="logits must be finite"):
        lp.log_softmax(np.array([0.0, np.inf]))
    with pytest.raises(TypeError, match="logits"):
        lp.log_softmax("abc")


def test_the_shifted_door_has_no_default_mask():
    # all ones would score the prompt tokens as if they were the completion
    logits, tokens = np.zeros((1, 3, 4)), np.zeros((1, 3), dtype=np.int64)
    with pytest.raises(TypeError, match="completion_mask must be an array of 0/1"):
        lp.sequence_logprobs(logits, tokens, None)


def test_the_ops_equal_the_doors(rng):
    """The unchecked ops give the doors' numbers on valid arguments (the doors add checks only)."""
    logits, targets, mask = random_case(rng, 3, 5, 7)
    np.testing.assert_array_equal(lp.logprobs_forward(logits, targets, mask)[0],
                                  lp.compute_logprobs(logits, targets, mask))
    np.testing.assert_array_equal(lp.sequence_logprobs_forward(logits, targets, mask)[0],
                                  lp.sequence_logprobs(logits, targets, mask))


def test_sequence_backward_leaves_the_logits_alone(rng):
    logits, tokens, mask = random_case(rng, 2, 4, 5)
    before = logits.copy()
    _, cache = lp.sequence_logprobs_forward(logits, tokens, mask)
    dlogits = lp.sequence_logprobs_backward(np.ones(2), cache)
    assert dlogits is not logits
    np.testing.assert_array_equal(logits, before)
