"""The fast room against the reading edition: every op of kto_np.fast.layers and kto_np.fast.logprobs
against its twin in kto_np.layers / kto_np.logprobs, forward and backward, on the same inputs.

Float64 agrees to 1e-12 and float32 to 1e-5 (normwise relative error: max|fast - reading| / max|reading|).
The log-prob shapes exercise the blocking of the fast room: one row per block, a few rows (less than one
sequence), whole sequences (one or several per block), the whole array, the non-contiguous shifted view.
"""

import inspect

import numpy as np
import pytest

import kto_np.fast.layers as fast_layers
import kto_np.fast.logprobs as fast_lp
import kto_np.fast.threads as fast_threads
import kto_np.layers as layers
import kto_np.logprobs as lp

TOLERANCE = {np.float64: 1e-12, np.float32: 1e-5}
DTYPES = [np.float64, np.float32]


def assert_twins(fast, reading, dtype, what=""):
    """fast and reading agree in shape, dtype and numbers (normwise relative error <= TOLERANCE[dtype])."""
    if reading is None:
        assert fast is None, what
        return
    fast, reading = np.asarray(fast), np.asarray(reading)
    assert fast.shape == reading.shape, f"{what}: shape {fast.shape} vs {reading.shape}"
    assert fast.dtype == reading.dtype == dtype, f"{what}: dtype {fast.dtype} vs {reading.dtype}"
    scale = float(np.max(np.abs(reading.astype(np.float64)))) if reading.size else 0.0
    error = float(np.max(np.abs(fast.astype(np.float64) - reading.astype(np.float64)))) if reading.size else 0.0
    assert error <= TOLERANCE[dtype] * max(scale, 1e-300), f"{what}: relative error {error / max(scale, 1e-300):.2e}"


def assert_all_twins(fast, reading, dtype, what=""):
    if isinstance(reading, tuple):
        assert isinstance(fast, tuple) and len(fast) == len(reading), what
        for i, (f, r) in enumerate(zip(fast, reading)):
            assert_twins(f, r, dtype, f"{what}[{i}]")
    else:
        assert_twins(fast, reading, dtype, what)


def normal(rng, shape, dtype, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


@pytest.mark.parametrize("module_pair", [(fast_layers, layers), (fast_lp, lp)], ids=["layers", "logprobs"])
def test_the_fast_room_has_the_reading_editions_names_and_signatures(module_pair):
    fast, reading = module_pair
    assert fast.__all__ == reading.__all__
    for name in reading.__all__:
        mine, theirs = getattr(fast, name), getattr(reading, name)
        if inspect.isfunction(theirs):
            assert inspect.signature(mine) == inspect.signature(theirs), name
        else:  # the caches: the reading edition's own classes
            assert mine is theirs, name


def test_the_reading_edition_is_not_the_fast_one():
    """The twins are two implementations (a test of one against itself could not fail)."""
    for name in ("linear_forward", "layernorm_forward", "layernorm_backward", "gelu_forward", "gelu_backward",
                 "softmax_forward", "softmax_backward", "attention_forward", "attention_backward"):
        assert getattr(fast_layers, name) is not getattr(layers, name), name
    for name in lp.__all__:
        if name[0].islower():
            assert getattr(fast_lp, name) is not getattr(lp, name), name


# ----------------------------------------------------------------------------------------------
# layers


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 6), (7, 6), (2, 3, 4, 6)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear(rng, dtype, shape, with_bias):
    x, weight = normal(rng, shape, dtype), normal(rng, (6, 9), dtype)
    bias = normal(rng, 9, dtype) if with_bias else None
    out_f, cache_f = fast_layers.linear_forward(x, weight, bias)
    out_r, cache_r = layers.linear_forward(x, weight, bias)
    assert_twins(out_f, out_r, dtype, "out")
    dout = normal(rng, out_r.shape, dtype)
    assert_all_twins(fast_layers.linear_backward(dout, cache_f), layers.linear_backward(dout, cache_r), dtype, "grads")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 8), (3, 1), (4, 16)])
def test_layernorm(rng, dtype, shape):
    C = shape[-1]
    x = normal(rng, shape, dtype, 3.0) + dtype(1.5)
    weight, bias = normal(rng, C, dtype), normal(rng, C, dtype)
    x_before = x.copy()
    out_f, cache_f = fast_layers.layernorm_forward(x, weight, bias)
    out_r, cache_r = layers.layernorm_forward(x, weight, bias)
    assert_twins(out_f, out_r, dtype, "out")
    dout = normal(rng, shape, dtype)
    dout_before = dout.copy()
    assert_all_twins(fast_layers.layernorm_backward(dout, cache_f), layers.layernorm_backward(dout, cache_r), dtype,
                     "grads")
    np.testing.assert_array_equal(x, x_before)  # the in-place buffers are the op's own
    np.testing.assert_array_equal(dout, dout_before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu(rng, dtype):
    x = np.concatenate([normal(rng, 200, dtype, 3.0), np.array([-30.0, -5.0, 0.0, 5.0, 30.0], dtype)]).reshape(5, 41)
    out_f, cache_f = fast_layers.gelu_forward(x)
    out_r, cache_r = layers.gelu_forward(x)
    assert_twins(out_f, out_r, dtype, "out")
    assert_twins(cache_f.tanh_out, cache_r.tanh_out, dtype, "tanh_out")
    dout = normal(rng, x.shape, dtype)
    assert_twins(fast_layers.gelu_backward(dout, cache_f), layers.gelu_backward(dout, cache_r), dtype, "dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_softmax(rng, dtype, masked):
    x = normal(rng, (2, 3, 5, 7), dtype, 3.0)
    mask = layers.causal_mask(5, 7) if masked else None
    x_before = x.copy()
    probs_f, cache_f = fast_layers.softmax_forward(x, mask=mask)
    probs_r, cache_r = layers.softmax_forward(x, mask=mask)
    assert_twins(probs_f, probs_r, dtype, "probs")
    dprobs = normal(rng, x.shape, dtype)
    dprobs_before = dprobs.copy()
    assert_twins(fast_layers.softmax_backward(dprobs, cache_f), layers.softmax_backward(dprobs, cache_r), dtype, "dx")
    # the public fast pair leaves its arguments alone (only attention's internal helpers work in place)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(dprobs, dprobs_before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_fully_masked_row(dtype):
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype)
    mask = np.array([[True, False, True], [False, False, False]])
    probs_f, cache_f = fast_layers.softmax_forward(x, mask=mask)
    probs_r, cache_r = layers.softmax_forward(x, mask=mask)
    assert_twins(probs_f, probs_r, dtype, "probs")
    np.testing.assert_array_equal(probs_f[1], 0.0)
    dprobs = np.ones_like(x)
    assert_twins(fast_layers.softmax_backward(dprobs, cache_f), layers.softmax_backward(dprobs, cache_r), dtype, "dx")


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding(rng, dtype):
    weight = normal(rng, (9, 4), dtype)
    indices = rng.integers(0, 9, size=(3, 5))
    indices[0, :3] = 2
    out_f, cache_f = fast_layers.embedding_forward(weight, indices)
    out_r, cache_r = layers.embedding_forward(weight, indices)
    assert_twins(out_f, out_r, dtype, "out")
    dout = normal(rng, out_r.shape, dtype)
    assert_twins(fast_layers.embedding_backward(dout, cache_f), layers.embedding_backward(dout, cache_r), dtype,
                 "dweight")
    base = normal(rng, weight.shape, dtype)
    out_f, out_r = base.copy(), base.copy()
    assert fast_layers.embedding_backward(dout, cache_f, out=out_f) is out_f
    layers.embedding_backward(dout, cache_r, out=out_r)
    assert_twins(out_f, out_r, dtype, "dweight added into out")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p, train", [(0.3, True), (0.3, False), (0.0, True)])
def test_dropout(rng, dtype, p, train):
    x = normal(rng, (4, 6, 5), dtype)
    out_f, cache_f = fast_layers.dropout_forward(x, p, train=train, rng=np.random.default_rng(7))
    out_r, cache_r = layers.dropout_forward(x, p, train=train, rng=np.random.default_rng(7))
    assert_twins(out_f, out_r, dtype, "out")
    dout = normal(rng, x.shape, dtype)
    assert_twins(fast_layers.dropout_backward(dout, cache_f), layers.dropout_backward(dout, cache_r), dtype, "dx")


def attention_inputs(rng, B, T, C, dtype):
    return (normal(rng, (B, T, C), dtype), normal(rng, (C, 3 * C), dtype, 0.5), normal(rng, 3 * C, dtype, 0.1),
            normal(rng, (C, C), dtype, 0.5), normal(rng, C, dtype, 0.1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("B", "T", "C", "NH", "dropout"),
                         [(2, 5, 8, 2, 0.0), (2, 6, 12, 3, 0.2), (1, 1, 4, 1, 0.0), (3, 4, 6, 6, 0.5)])
def test_attention(rng, dtype, B, T, C, NH, dropout):
    inputs = attention_inputs(rng, B, T, C, dtype)
    kwargs = dict(dropout=dropout, train=True)
    out_f, cache_f = fast_layers.attention_forward(*inputs, NH, rng=np.random.default_rng(3), **kwargs)
    out_r, cache_r = layers.attention_forward(*inputs, NH, rng=np.random.default_rng(3), **kwargs)
    assert_twins(out_f, out_r, dtype, "out")
    assert_twins(cache_f.softmax_cache.probs, cache_r.softmax_cache.probs, dtype, "probs")
    dout = normal(rng, out_r.shape, dtype)
    grads_f = fast_layers.attention_backward(dout, cache_f)
    grads_r = layers.attention_backward(dout, cache_r)
    for name, mine, theirs in zip(grads_r._fields, grads_f, grads_r):
        assert_twins(mine, theirs, dtype, name)


# ----------------------------------------------------------------------------------------------
# log-probabilities


def logprob_case(rng, B, T, V, dtype, masked=True):
    logits = normal(rng, (B, T, V), dtype, 3.0)
    targets = rng.integers(0, V, size=(B, T))
    mask = (rng.random((B, T)) > 0.3).astype(dtype) if masked else None
    return logits, targets, mask


# (B, T, V, chunk elements): one row per block; a few rows, less than one sequence; one sequence;
# several sequences; the whole array in one block
BLOCKINGS = [(3, 7, 13, 1), (3, 7, 13, 13 * 3), (3, 7, 13, 13 * 7), (5, 7, 13, 13 * 7 * 2), (3, 7, 13, 1 << 22)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("B, T, V, chunk", BLOCKINGS)
def test_logprobs(rng, monkeypatch, dtype, masked, B, T, V, chunk):
    monkeypatch.setattr(fast_lp, "_CHUNK_ELEMENTS", chunk)
    logits, targets, mask = logprob_case(rng, B, T, V, dtype, masked)
    logits_before = logits.copy()
    logps_f, cache_f = fast_lp.logprobs_forward(logits, targets, mask)
    logps_r, cache_r = lp.logprobs_forward(logits, targets, mask)
    assert_twins(logps_f, logps_r, dtype, "logps")
    assert_twins(cache_f.logsumexp, cache_r.logsumexp, dtype, "logsumexp")
    assert_twins(fast_lp.compute_logprobs(logits, targets, mask), lp.compute_logprobs(logits, targets, mask), dtype,
                 "compute_logprobs")
    dlogps = normal(rng, B, dtype)
    assert_twins(fast_lp.logprobs_backward(dlogps, cache_f), lp.logprobs_backward(dlogps, cache_r), dtype, "dlogits")
    np.testing.assert_array_equal(logits, logits_before)  # only the sequence backward overwrites


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, V, chunk", BLOCKINGS)
def test_sequence_logprobs_overwrites_the_logits(rng, monkeypatch, dtype, B, T, V, chunk):
    """The shifted view logits[:, :-1] is not contiguous: the fast room blocks it without a copy and
    writes dlogits into the logits the forward was given."""
    monkeypatch.setattr(fast_lp, "_CHUNK_ELEMENTS", chunk)
    logits, tokens, mask = logprob_case(rng, B, T, V, dtype)
    owned = logits.copy()
    logps_f, cache_f = fast_lp.sequence_logprobs_forward(owned, tokens, mask)
    logps_r, cache_r = lp.sequence_logprobs_forward(logits, tokens, mask)
    assert_twins(logps_f, logps_r, dtype, "logps")
    assert_twins(fast_lp.sequence_logprobs(logits, tokens, mask), lp.sequence_logprobs(logits, tokens, mask), dtype,
                 "sequence_logprobs")
    dlogps = normal(rng, B, dtype)
    dlogits_r = lp.sequence_logprobs_backward(dlogps, cache_r)
    dlogits_f = fast_lp.sequence_logprobs_backward(dlogps, cache_f)
    assert dlogits_f is owned, "the fast backward returns the logits array it was given, overwritten"
    assert_twins(dlogits_f, dlogits_r, dtype, "dlogits")
    assert not np.array_equal(owned, logits)
    np.testing.assert_array_equal(dlogits_f[:, -1], 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, V", [(2, 4, 70_000), (3, 9, 50)])
def test_logprobs_at_the_real_block_size(rng, dtype, B, T, V):
    """Without monkeypatching: a block of 3 rows when V = 70,000 (less than one sequence), and of many
    whole sequences when V = 50."""
    logits, tokens, mask = logprob_case(rng, B, T, V, dtype)
    logps_f, cache_f = fast_lp.sequence_logprobs_forward(logits.copy(), tokens, mask)
    logps_r, cache_r = lp.sequence_logprobs_forward(logits, tokens, mask)
    assert_twins(logps_f, logps_r, dtype, "logps")
    dlogps = normal(rng, B, dtype)
    assert_twins(fast_lp.sequence_logprobs_backward(dlogps, cache_f), lp.sequence_logprobs_backward(dlogps, cache_r),
                 dtype, "dlogits")


@pytest.mark.parametrize("dtype", DTYPES)
def test_logprobs_of_other_non_contiguous_views(rng, monkeypatch, dtype):
    monkeypatch.setattr(fast_lp, "_CHUNK_ELEMENTS", 20)
    base = normal(rng, (4, 9, 11), dtype, 3.0)
    for logits in (base[::2, 1::2], base.transpose(1, 0, 2)[:, :3], base[:, :, ::-1]):
        B, T, V = logits.shape
        targets = rng.integers(0, V, size=(B, T))
        mask = (rng.random((B, T)) > 0.3).astype(dtype)
        logps_f, cache_f = fast_lp.logprobs_forward(logits, targets, mask)
        logps_r, cache_r = lp.logprobs_forward(logits, targets, mask)
        assert_twins(logps_f, logps_r, dtype, "logps")
        dlogps = normal(rng, B, dtype)
        assert_twins(fast_lp.logprobs_backward(dlogps, cache_f), lp.logprobs_backward(dlogps, cache_r), dtype,
                     "dlogits")


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_softmax(rng, dtype):
    logits = normal(rng, (3, 4, 9), dtype, 5.0)
    for axis in (-1, 0, 1):
        assert_twins(fast_lp.log_softmax(logits, axis=axis), lp.log_softmax(logits, axis=axis), dtype, f"axis {axis}")


def head_case(rng, B, T, C, V, dtype):
    """x_final, a head, tokens and a mask with every kind of row: the mask on position 0 (scored by
    nothing), a row with no completion token, fractional weights, a row scored to its end."""
    x_final, head_weight = normal(rng, (B, T, C), dtype), normal(rng, (V, C), dtype, 0.5)
    tokens = rng.integers(0, V, size=(B, T))
    mask = (rng.random((B, T)) > 0.4).astype(dtype)
    mask[0, 0], mask[1] = 1, 0  # position 0 has no logits scoring it; row 1 scores nothing
    mask[2, 3:] = rng.random(T - 3)  # fractional weights, to the end of the row
    return x_final, head_weight, tokens, mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, C, V, chunk", [(4, 9, 6, 13, 13 * 2), (3, 7, 5, 70, 1 << 22), (3, 5, 4, 70_000, None)])
def test_the_head_at_the_scored_positions_is_the_full_heads_twin(rng, monkeypatch, dtype, B, T, C, V, chunk):
    """fast.head (logits only where a completion token is scored) against the reading edition's full
    logits x_final @ head_weight.T and kto_np.logprobs: log-probs, dx_final, dhead_weight."""
    import kto_np.fast.head as fast_head

    if chunk is not None:
        monkeypatch.setattr(fast_lp, "_CHUNK_ELEMENTS", chunk)
    x_final, head_weight, tokens, mask = head_case(rng, B, T, C, V, dtype)
    logits = x_final @ head_weight.T  # [B, T, V]
    logps_r, cache_r = lp.sequence_logprobs_forward(logits, tokens, mask)
    logps_f, cache_f = fast_head.head_logprobs_forward(x_final, head_weight, tokens, mask)
    assert_twins(logps_f, logps_r, dtype, "logps")
    assert logps_f[1] == 0.0  # nothing scored
    assert cache_f.logits.logits.shape == (1, int((mask[:, 1:] != 0).sum()), V)  # only the scored rows
    dlogps = normal(rng, B, dtype)
    dlogits = lp.sequence_logprobs_backward(dlogps, cache_r)
    dx_final_r = dlogits @ head_weight
    dhead_weight_r = dlogits.reshape(-1, V).T @ x_final.reshape(-1, C)
    dx_final_f, dhead_weight_f = fast_head.head_logprobs_backward(dlogps, cache_f)
    assert_twins(dx_final_f, dx_final_r, dtype, "dx_final")
    assert_twins(dhead_weight_f, dhead_weight_r, dtype, "dhead_weight")
    np.testing.assert_array_equal(dx_final_f[1], 0.0)
    np.testing.assert_array_equal(dx_final_f[:, -1], 0.0)


def test_the_head_with_nothing_scored(rng):
    import kto_np.fast.head as fast_head

    x_final, head_weight, tokens, _ = head_case(rng, 3, 6, 4, 11, np.float64)
    logps, cache = fast_head.head_logprobs_forward(x_final, head_weight, tokens, np.zeros((3, 6)))
    np.testing.assert_array_equal(logps, 0.0)
    dx_final, dhead_weight = fast_head.head_logprobs_backward(np.ones(3), cache)
    np.testing.assert_array_equal(dx_final, 0.0)
    np.testing.assert_array_equal(dhead_weight, 0.0)
    assert dx_final.shape == x_final.shape and dhead_weight.shape == head_weight.shape


# ----------------------------------------------------------------------------------------------
# the threads: the numbers do not depend on how many there are


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 entries, so that small arrays are cut into many blocks and every thread gets some."""
    monkeypatch.setattr(fast_threads, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(fast_threads, "MIN_PARALLEL_ELEMENTS", 0)  # every op with two blocks or more in threads
    yield
    fast_threads.set_threads(None)


def outputs_of_every_op(rng, dtype):
    """Every threaded op of the fast room, forward and backward, on one set of inputs: a flat list."""
    results = []
    x = normal(rng, (3, 7, 10), dtype, 2.0) + dtype(0.5)
    weight, bias = normal(rng, 10, dtype), normal(rng, 10, dtype)
    dout = normal(rng, x.shape, dtype)
    out, cache = fast_layers.layernorm_forward(x, weight, bias)
    results += [out, cache.mean, cache.rstd, *fast_layers.layernorm_backward(dout, cache)]
    out, cache = fast_layers.gelu_forward(x)
    results += [out, cache.tanh_out, fast_layers.gelu_backward(dout, cache)]
    scores = normal(rng, (2, 3, 6, 6), dtype, 3.0)
    for mask in (None, layers.causal_mask(6, 6)):
        probs, cache = fast_layers.softmax_forward(scores, mask=mask)
        results += [probs, fast_layers.softmax_backward(normal(rng, scores.shape, dtype), cache)]
    inputs = attention_inputs(rng, 2, 6, 8, dtype)
    out, cache = fast_layers.attention_forward(*inputs, 2)
    results += [out, *fast_layers.attention_backward(normal(rng, out.shape, dtype), cache)]
    logits, tokens, mask = logprob_case(rng, 3, 7, 13, dtype)
    logps, cache = fast_lp.sequence_logprobs_forward(logits, tokens, mask)
    results += [logps, cache.shifted.logsumexp, fast_lp.sequence_logprobs_backward(normal(rng, 3, dtype), cache)]
    return results


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_numbers_do_not_depend_on_the_thread_count(small_blocks, dtype):
    runs = {}
    for count in (1, 2, 3):
        fast_threads.set_threads(count)
        runs[count] = outputs_of_every_op(np.random.default_rng(11), dtype)
    for count in (2, 3):
        assert len(runs[count]) == len(runs[1])
        for i, (mine, single) in enumerate(zip(runs[count], runs[1])):
            assert mine.tobytes() == single.tobytes(), f"output {i}: {count} threads differ from 1"


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_blocked_threaded_ops_are_twins_of_the_reading_edition(small_blocks, dtype):
    fast_threads.set_threads(3)
    test_layernorm(np.random.default_rng(1), dtype, (4, 9, 16))
    test_gelu(np.random.default_rng(2), dtype)
    test_softmax(np.random.default_rng(3), dtype, True)
    test_softmax(np.random.default_rng(4), dtype, False)
    test_attention(np.random.default_rng(5), dtype, 2, 6, 12, 3, 0.2)
    test_attention(np.random.default_rng(6), dtype, 3, 11, 8, 2, 0.0)
    test_attention(np.random.default_rng(7), dtype, 2, 9, 8, 4, 0.3)


def test_a_whole_step_does_not_depend_on_the_thread_count(small_blocks):
    from kto_np import bench
    from kto_np.fast import optim as fast_optim

    results = {}
    for count in (1, 3):
        fast_threads.set_threads(count)
        step = bench.NumpyKTOStep(bench.CONFIGS["tiny"], seed=2)
        losses = [step() for _ in range(2)]
        norm = fast_optim.clip_grad_norm(step.loss_and_grads()[1], 1e-3)
        results[count] = losses, norm, {k: v.tobytes() for k, v in step.params.items()}
    assert results[1] == results[3]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [1, 2])
def test_packed_attention_is_the_reading_editions_attention_on_each_row(small_blocks, monkeypatch, rng, dtype,
                                                                       count):
    """kto_np.fast.packed's attention on rows of lengths 5, 0 (dropped), 7 and 1, packed end to end,
    against kto_np.layers' attention on the padded batch, read at the kept positions; the gradients with
    dout 0 beyond each row's end. With 2 threads and threadpoolctl (CI's second pass) the rows run on the
    pool, in parallel (checked); without threadpoolctl, one after the other."""
    from kto_np.fast import packed

    pooled = []
    monkeypatch.setattr(fast_threads, "run", lambda function, tasks, work=None, run=fast_threads.run:
                        pooled.append(len(tasks)) or run(function, tasks, work))
    fast_threads.set_threads(count)
    try:
        B, T, C, NH = 4, 7, 8, 2
        lengths = [5, 0, 7, 1]
        x = normal(rng, (B, T, C), dtype)
        weights = [normal(rng, shape, dtype, 0.5) for shape in ((C, 3 * C), (3 * C,), (C, C), (C,))]
        dout = normal(rng, (B, T, C), dtype)
        for b, length in enumerate(lengths):
            dout[b, length:] = 0
        out_r, cache_r = layers.attention_forward(x, *weights, NH)
        grads_r = layers.attention_backward(dout, cache_r)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        spans = [(int(s), int(s + n)) for s, n in zip(starts, lengths) if n]
        keep = [(b, t) for b, n in enumerate(lengths) for t in range(n)]
        x_packed = np.stack([x[b, t] for b, t in keep])
        out_p, cache_p = packed.attention_forward(x_packed, *weights, NH, spans)
        assert_twins(out_p, np.stack([out_r[b, t] for b, t in keep]), dtype, "out")
        grads_p = packed.attention_backward(np.stack([dout[b, t] for b, t in keep]), cache_p)
        assert_twins(grads_p.dx, np.stack([grads_r.dx[b, t] for b, t in keep]), dtype, "dx")
        for name in ("dc_attn_weight", "dc_attn_bias", "dc_proj_weight", "dc_proj_bias"):
            assert_twins(getattr(grads_p, name), getattr(grads_r, name), dtype, name)
        rows_on_the_pool = count > 1 and bool(fast_threads._blas_controller())
        assert (3 in pooled) == rows_on_the_pool, pooled  # the 3 kept rows as one job, forward and backward
    finally:
        fast_threads.set_threads(None)


def test_the_pool_keeps_the_callers_error_state_and_raises_the_workers_errors(small_blocks):
    fast_threads.set_threads(3)
    huge = np.full(1000, 1e38, dtype=np.float32)
    with np.errstate(over="ignore"):  # workers get the caller's error state: x * x overflows, silently
        out, _ = fast_layers.gelu_forward(huge)
    np.testing.assert_array_equal(out, huge)  # gelu(x) = x for large x
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):  # ... and raise where it says so
        fast_layers.gelu_forward(huge)

    def fail(start, stop):
        if start > 0:
            raise KeyError(f"block at {start}")

    with pytest.raises(KeyError, match="block at"):
        fast_threads.run(fail, fast_threads.blocks(1000, 1))


def test_the_thread_count_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(fast_threads.ENV_VAR, "3")
    assert fast_threads.default_threads() == 3
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv(fast_threads.ENV_VAR, bad)
        with pytest.raises(ValueError, match=fast_threads.ENV_VAR):
            fast_threads.default_threads()
    monkeypatch.delenv(fast_threads.ENV_VAR)
    assert fast_threads.default_threads() >= 1
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="count"):
            fast_threads.set_threads(bad)


def test_the_pool_runs_tasks_on_several_threads_and_small_work_in_the_caller(small_blocks, monkeypatch):
    import threading
    import time

    def record(seen):
        def task(i):
            time.sleep(0.01)  # releases the GIL, as NumPy's ufuncs do
            seen.append(threading.get_ident())
        return task

    fast_threads.set_threads(3)
    seen = []
    fast_threads.run(record(seen), [(i,) for i in range(12)])
    assert len(seen) == 12 and len(set(seen)) >= 2, "the tasks ran on one thread"
    monkeypatch.setattr(fast_threads, "MIN_PARALLEL_ELEMENTS", 1000)
    seen = []
    fast_threads.run(record(seen), [(i,) for i in range(4)], work=999)
    assert set(seen) == {threading.get_ident()}  # too little work: all in the calling thread
    fast_threads.set_threads(1)
    seen = []
    fast_threads.run(record(seen), [(i,) for i in range(4)])
    assert set(seen) == {threading.get_ident()}


def test_blocks_depend_on_the_shape_only():
    assert fast_threads.blocks(10, 3, block_elements=7) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert fast_threads.blocks(3, 100, block_elements=7) == [(0, 1), (1, 2), (2, 3)]  # a row at least
    assert fast_threads.blocks(0, 5) == []


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_matmul_is_the_product_whatever_the_threads(small_blocks, dtype):
    """kto_np.fast.threads.batched_matmul (the attention's products): a @ b on any thread count, for
    contiguous stacks and for transposed views (with threadpoolctl installed, the stack goes over the pool)."""
    rng = np.random.default_rng(6)
    a, b = normal(rng, (2, 3, 5, 4), dtype), normal(rng, (2, 3, 4, 6), dtype)
    c = normal(rng, (2, 3, 6, 5), dtype)
    expected = [np.matmul(a, b), np.matmul(c.transpose(0, 1, 3, 2), normal(np.random.default_rng(7), (2, 3, 6, 2),
                                                                               dtype))]
    for count in (1, 2, 3):
        fast_threads.set_threads(count)
        got = [fast_threads.batched_matmul(a, b),
               fast_threads.batched_matmul(c.transpose(0, 1, 3, 2), normal(np.random.default_rng(7), (2, 3, 6, 2),
                                                                           dtype))]
        for mine, theirs in zip(got, expected):
            assert mine.shape == theirs.shape and mine.dtype == theirs.dtype
            np.testing.assert_allclose(mine, theirs, rtol=10 * TOLERANCE[dtype], atol=0)
