"""Generation with a key/value cache: cached logits equal the full forward pass, greedy decoding equals
argmax over repeated full forwards, top-k sampling stays in the top k, seeds reproduce, limits hold."""

import numpy as np
import pytest

from kto_np.architectures import build
from kto_np.generate import KVCache, forward_with_cache, generate

V, C, NH, L = 13, 12, 3, 2
MAX_SEQ_LEN = 12


def small_model(positional="learned", tie_embeddings=True, dtype="float64", fast=False):
    return build(hidden_size=C, num_layers=L, num_heads=NH, vocab_size=V, dropout=0.1,
                 max_seq_len=MAX_SEQ_LEN, dtype=dtype, positional=positional, tie_embeddings=tie_embeddings,
                 fast=fast)


def prompt(seed, batch=3, seq=4):
    return np.random.default_rng(seed).integers(0, V, size=(batch, seq))


def scaled_params(model, seed):
    """init(seed) with larger weights, so that logits are spread out and argmax ties do not occur."""
    params = model.init(seed)
    for name in params:
        if not name.endswith("bias") and ".ln_" not in f".{name}":
            params[name] *= 20.0
    return params


@pytest.mark.parametrize(("positional", "tie_embeddings", "fast"),
                         [("learned", True, False), ("learned", False, False), ("sinusoidal", True, False),
                          ("sinusoidal", False, False), ("learned", True, True)])
@pytest.mark.parametrize("chunks", [[12], [5, 1, 1, 3, 2], [1] * 12])
def test_cached_logits_equal_full_forward(positional, tie_embeddings, fast, chunks):
    """Generation's own forward path (generate.forward_with_cache) against the training forward, on the
    reading edition's ops and on the fast room's."""
    model = small_model(positional, tie_embeddings, fast=fast)
    params = model.init(0)
    tokens = prompt(1, batch=2, seq=sum(chunks))
    full, _ = model.forward(params, tokens)
    kv_cache = KVCache.empty(model, batch_size=2)
    pieces, start = [], 0
    for size in chunks:
        logits, kv_cache = forward_with_cache(model, params, tokens[:, start:start + size], kv_cache)
        pieces.append(logits)
        start += size
        assert kv_cache.length == start
    cached = np.concatenate(pieces, axis=1)
    err = np.max(np.abs(cached - full)) / np.max(np.abs(full))
    assert err <= 1e-12, (f"cached vs full logits: rel error {err:.2e}\n"
                          f"cached {cached[0, -1, :4]}\nfull   {full[0, -1, :4]}")


def test_forward_with_cache_makes_a_cache_and_enforces_capacity():
    model = small_model()
    params = model.init(1)
    logits, kv_cache = forward_with_cache(model, params, prompt(2, seq=MAX_SEQ_LEN - 1))
    assert kv_cache.capacity == MAX_SEQ_LEN and kv_cache.length == MAX_SEQ_LEN - 1
    forward_with_cache(model, params, prompt(3, seq=1), kv_cache)  # fills the last position
    with pytest.raises(ValueError, match="tokens"):
        forward_with_cache(model, params, prompt(3, seq=1), kv_cache)
    with pytest.raises(ValueError, match="tokens"):
        forward_with_cache(model, params, prompt(4, batch=2, seq=1), KVCache.empty(model, 3))
    with pytest.raises(ValueError, match="capacity"):
        KVCache.empty(model, 1, capacity=MAX_SEQ_LEN + 1)
    with pytest.raises(TypeError, match="kv_cache must be a KVCache"):
        forward_with_cache(model, params, prompt(5, seq=1), {"keys": []})
    with pytest.raises(TypeError, match="kv_cache"):  # the training forward has no cache: it is generation's
        model.forward(params, prompt(5, seq=1), kv_cache=KVCache.empty(model, 3))


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_greedy_equals_argmax_of_repeated_full_forwards(positional):
    model = small_model(positional)
    params = scaled_params(model, 2)
    start = prompt(5)
    generated = generate(model, params, start, 7)
    assert generated.shape == (3, 11)
    np.testing.assert_array_equal(generated[:, :4], start)
    expected = start.copy()
    for _ in range(7):
        logits, _ = model.forward(params, expected)
        expected = np.concatenate([expected, logits[:, -1].argmax(axis=-1)[:, None]], axis=1)
    np.testing.assert_array_equal(generated, expected)


def test_top_k_sampling_picks_only_from_the_top_k():
    model = small_model()
    params = model.init(3)  # small weights: nearly uniform, so a sampler ignoring top_k would stray
    top_k = 3
    generated = generate(model, params, prompt(6, batch=4, seq=2), 10, temperature=2.0, top_k=top_k,
                         rng=np.random.default_rng(0))
    logits, _ = model.forward(params, generated[:, :-1])
    for t in range(2, generated.shape[1]):  # sampled positions (after the 2 prompt tokens)
        ranks = (logits[:, t - 1] > logits[np.arange(4), t - 1, generated[:, t]][:, None]).sum(axis=-1)
        assert np.all(ranks < top_k), f"position {t}: ranks {ranks} of the sampled tokens"
    assert len(np.unique(generated[:, 2:])) > 1  # it samples, it is not greedy


def test_top_k_one_is_greedy_and_seed_reproduces():
    model = small_model("sinusoidal", False)
    params = scaled_params(model, 4)
    start = prompt(7)
    greedy = generate(model, params, start, 6)
    np.testing.assert_array_equal(
        generate(model, params, start, 6, temperature=0.7, top_k=1, rng=np.random.default_rng(9)), greedy)
    params = model.init(4)
    first = generate(model, params, start, 8, temperature=1.0, rng=np.random.default_rng(10))
    second = generate(model, params, start, 8, temperature=1.0, rng=np.random.default_rng(10))
    other = generate(model, params, start, 8, temperature=1.0, rng=np.random.default_rng(11))
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_max_seq_len_is_enforced():
    model = small_model()
    params = model.init(5)
    start = prompt(8, seq=4)
    assert generate(model, params, start, MAX_SEQ_LEN - 4).shape == (3, MAX_SEQ_LEN)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, params, start, MAX_SEQ_LEN - 3)
    np.testing.assert_array_equal(generate(model, params, start, 0), start)


def test_stop_token_pads_and_ends_early():
    model = small_model()
    params = scaled_params(model, 6)
    start = prompt(9)
    free = generate(model, params, start, 6)
    stop = int(free[0, 4])  # row 0 produces it first
    stopped = generate(model, params, start, 6, stop_token=stop)
    for row, free_row in zip(stopped, free):
        hits = np.flatnonzero(free_row[4:] == stop)
        if hits.size:
            first = 4 + hits[0]
            np.testing.assert_array_equal(row[: first + 1], free_row[: first + 1])
            assert np.all(row[first:] == stop)
        else:
            np.testing.assert_array_equal(row, free_row[: len(row)])
    every_row_stops = all((free[:, 4:] == stop).any(axis=1))
    assert stopped.shape[1] <= free.shape[1]
    if not every_row_stops:
        assert stopped.shape[1] == free.shape[1]
    single = generate(model, params, start[:1], 6, stop_token=stop)
    assert single.shape == (1, 5)  # ends as soon as its only row stops


def test_float32_generation():
    model = small_model(dtype="float32")
    params = model.init(7)
    logits, _ = forward_with_cache(model, params, prompt(10))
    assert logits.dtype == np.float32
    assert generate(model, params, prompt(10), 3).shape == (3, 7)


@pytest.mark.parametrize(("kwargs", "name", "error"), [
    ({"temperature": 1.0}, "rng", ValueError),
    ({"temperature": 1.0, "rng": 3}, "rng", TypeError),
    ({"temperature": -0.5}, "temperature", ValueError),
    ({"temperature": float("nan")}, "temperature", ValueError),
    ({"top_k": 0}, "top_k", ValueError),
    ({"top_k": V + 1}, "top_k", ValueError),
    ({"stop_token": V}, "stop_token", ValueError),
    ({"stop_token": -1}, "stop_token", ValueError),
    ({"max_new_tokens": -1}, "max_new_tokens", ValueError),
    ({"max_new_tokens": 2.0}, "max_new_tokens", TypeError),
    ({"prompt_tokens": np.zeros((2, 3))}, "prompt_tokens", TypeError),
    ({"prompt_tokens": np.zeros(3, dtype=np.int64)}, "prompt_tokens", ValueError),
    ({"prompt_tokens": np.full((2, 3), V)}, "prompt_tokens", ValueError),
])
def test_bad_arguments(kwargs, name, error):
    model = small_model()
    params = model.init(0)
    call = {"prompt_tokens": prompt(0), "max_new_tokens": 2, **kwargs}
    with pytest.raises(error, match=name):
        generate(model, params, call.pop("prompt_tokens"), call.pop("max_new_tokens"), **call)
