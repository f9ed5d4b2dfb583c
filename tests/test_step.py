"""The step module: the batch and its KL rows (checked row by row, by hand), its door checks, and the
KTO step against the losses and finite differences."""

import numpy as np
import pytest

from kto_np import step
from kto_np.architectures import build
from kto_np.gradcheck import check_gradients
from kto_np.losses import KTOConfig, kto_loss

PROMPTS = [[5, 6], [7], [8, 9, 10]]
COMPLETIONS = [[1, 2, 3], [4], [2, 2]]


def _row(tokens, mask, b):
    """(prompt + completion ids of row b without padding, the completion ids under the mask)."""
    length = int(np.flatnonzero(np.asarray(tokens[b]) != 0)[-1]) + 1
    return list(tokens[b][:length]), [int(t) for t, m in zip(tokens[b], mask[b]) if m == 1]


@pytest.mark.parametrize("rotation, partners", [(-1, [2, 0, 1]), (1, [1, 2, 0]), (2, [2, 0, 1])])
def test_kl_row_i_is_prompt_i_with_the_partners_completion(rotation, partners):
    batch = step.make_batch(PROMPTS, COMPLETIONS, [1, 0, 1], rotation=rotation, dtype="float64")
    assert step.kl_partner_indices(3, rotation).tolist() == partners
    for i, j in enumerate(partners):
        row, completion = _row(batch.kl_tokens, batch.kl_completion_mask, i)
        assert row == PROMPTS[i] + COMPLETIONS[j]
        assert completion == COMPLETIONS[j]
        row, completion = _row(batch.tokens, batch.completion_mask, i)
        assert row == PROMPTS[i] + COMPLETIONS[i] and completion == COMPLETIONS[i]


def test_trl_rotation_is_the_default_and_every_pair_is_mismatched():
    for size in range(2, 40):
        partners = step.kl_partner_indices(size)
        assert (partners != np.arange(size)).all()
        assert sorted(partners.tolist()) == list(range(size))  # each completion used once
        assert partners[0] == size - 1  # TRL: completions [c_{B-1}, c_0, ..., c_{B-2}]
    with pytest.raises(ValueError, match="no mismatched pair"):
        step.kl_partner_indices(1)


def test_padding_and_max_len():
    batch = step.make_batch(PROMPTS, COMPLETIONS, [1, 0, 1], max_len=9, pad_id=0)
    assert batch.tokens.shape == (3, 9) and batch.kl_tokens.shape == (3, 9)
    assert batch.completion_mask.dtype == np.float32 and batch.tokens.dtype == np.int64
    with pytest.raises(ValueError, match="max_len must be >= the longest prompt \\+ completion"):
        step.make_batch(PROMPTS, COMPLETIONS, [1, 0, 1], max_len=3)


@pytest.mark.parametrize("prompts, completions, labels, rotation, error, match", [
    ([], [], [], -1, ValueError, "prompt_ids must not be empty"),
    (PROMPTS, COMPLETIONS[:2], [1, 0, 1], -1, ValueError, "one entry per example"),
    (PROMPTS, COMPLETIONS, [1, 0], -1, ValueError, "one entry per example"),
    (PROMPTS, COMPLETIONS, [1, 7, 0], -1, ValueError, "labels must be 0"),
    (PROMPTS, COMPLETIONS, [1.0, 0.5, 0.0], -1, ValueError, "labels must be 0"),
    (PROMPTS, COMPLETIONS, [1, 0, 1], 1.5, TypeError, "rotation must be an integer"),
    (PROMPTS, COMPLETIONS, [1, 0, 1], 3, ValueError, "multiple of the batch size"),
    ("abc", COMPLETIONS, [1, 0, 1], -1, TypeError, "prompt_ids must be a list"),
])
def test_make_batch_rejects_bad_input_by_name(prompts, completions, labels, rotation, error, match):
    with pytest.raises(error, match=match):
        step.make_batch(prompts, completions, labels, rotation=rotation)


def _tiny():
    rng = np.random.default_rng(3)
    model = build(hidden_size=8, num_layers=1, num_heads=2, vocab_size=11, dropout=0.0, max_seq_len=8,
                  dtype="float64")
    params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in model.init(1).items()}
    batch = step.make_batch(PROMPTS, COMPLETIONS, [1, 0, 1], dtype="float64")
    return model, params, batch, rng


@pytest.mark.parametrize("variant", ["edifice", "kto", "apo_zero_unpaired"])
def test_kto_step_is_the_loss_of_the_logps_and_its_gradient(variant):
    model, params, batch, rng = _tiny()
    ref = step.forward_logps(model, params, batch.tokens, batch.completion_mask) + 0.2 * rng.standard_normal(3)
    kl_ref = step.forward_logps(model, params, batch.kl_tokens, batch.kl_completion_mask) - 0.4  # z > 0
    config = KTOConfig(variant, beta=0.7, desirable_weight=1.3, undesirable_weight=1.0)
    loss, metrics, grads = step.kto_step(model, params, batch, ref, kl_ref, config)
    kl_policy = step.forward_logps(model, params, batch.kl_tokens, batch.kl_completion_mask)  # held fixed
    kl = dict(kl_policy_logps=kl_policy, kl_ref_logps=kl_ref) if variant == "kto" else {}

    def objective():
        logps = step.forward_logps(model, params, batch.tokens, batch.completion_mask)
        return kto_loss(logps, ref, batch.labels, 0.7, 1.3, 1.0, variant=variant, warn_balance=False, **kl)

    assert loss == pytest.approx(objective(), rel=1e-14)
    if variant == "kto":
        assert metrics["kl"] > 0
    rows = check_gradients(objective, params, grads, tolerance=1e-6, seed=0)
    assert all(row.passed for row in rows), [row for row in rows if not row.passed]


def test_sft_step_gradient_matches_finite_differences():
    model, params, batch, _ = _tiny()
    loss, _, grads = step.sft_step(model, params, batch)
    tokens = float(np.asarray(batch.completion_mask).sum())

    def objective():
        return -float(step.forward_logps(model, params, batch.tokens, batch.completion_mask).sum()) / tokens

    assert loss == pytest.approx(objective(), rel=1e-14)
    assert all(row.passed for row in check_gradients(objective, params, grads, tolerance=1e-6, seed=0))


def test_a_batch_of_one_has_no_kl_pair():
    model, params, _, _ = _tiny()
    batch = step.make_batch(PROMPTS[:1], COMPLETIONS[:1], [1], dtype="float64")
    ref, kl_ref = step.reference_logps(model, params, batch)
    with pytest.raises(ValueError, match="at least 2 examples"):
        step.kto_step(model, params, batch, ref, kl_ref, KTOConfig("kto"))
    step.kto_step(model, params, batch, ref, None, KTOConfig("apo_zero_unpaired"))  # no KL rows needed


def _calls_into(module_file: str, function, *args, **kwargs) -> int:
    """How many Python function calls land in `module_file` while function(*args, **kwargs) runs."""
    import sys

    calls = []

    def profile(frame, event, arg):
        # comprehensions are frames of their own before Python 3.12 (PEP 709 inlines them): not calls
        if event == "call" and frame.f_code.co_filename == module_file and not frame.f_code.co_name.startswith("<"):
            calls.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        function(*args, **kwargs)
    finally:
        sys.setprofile(None)
    return len(calls)


@pytest.mark.parametrize("fast", [False, True])
def test_a_kto_step_checks_its_arguments_once_at_the_door(fast):
    """The step checks at its door; the model, the log-probs and the loss inside run unchecked (a step on
    main before the reading edition made 71 calls into validation)."""
    from kto_np import validation

    model = build(hidden_size=16, num_layers=2, num_heads=2, vocab_size=13, dropout=0.1, max_seq_len=12,
                  dtype="float64", fast=fast)
    params = model.init(0)
    batch = step.make_batch(PROMPTS, COMPLETIONS, [1, 0, 1], dtype="float64")
    ref, kl_ref = step.reference_logps(model, params, batch)
    config = KTOConfig(variant="kto")
    rng = np.random.default_rng(0)
    calls = _calls_into(validation.__file__, step.kto_step, model, params, batch, ref, kl_ref, config,
                        train=True, rng=rng)
    assert 0 < calls <= 15, calls
    # and the same check of the counter: the public forward alone checks (it is a door)
    assert _calls_into(validation.__file__, model.forward, params, batch.tokens) > 0


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("tie_embeddings, positional", [(True, "learned"), (False, "learned"), (True, "sinusoidal")])
@pytest.mark.parametrize("dropout, train", [(0.1, True), (0.1, False), (0.0, True)], ids=["dropout", "eval", "p0"])
def test_a_fast_step_is_the_reading_editions_step(monkeypatch, dtype, rtol, tie_embeddings, positional, dropout,
                                                  train):
    """A fast GPT's step computes its head only where a completion token is scored (kto_np.fast.head)
    and, where no dropout applies, its body only on the positions the loss reads, rows packed end to
    end (kto_np.fast.packed): the same loss, metrics and every gradient as the reading edition's full
    rows and logits, for KTO, SFT and the forward-only log-probs; with dropout, the same masks from the
    same seed. Row 1 has an empty completion: nothing of it is scored. Row 2's completion ends early
    (max_len pads every row)."""
    from kto_np.fast import packed

    kwargs = dict(hidden_size=16, num_layers=2, num_heads=4, vocab_size=37, dropout=dropout, max_seq_len=16,
                  dtype=dtype, tie_embeddings=tie_embeddings, positional=positional)
    reading, fast = build(**kwargs), build(**kwargs, fast=True)
    assert step._scored_logits_only(fast) and not step._scored_logits_only(reading)
    packed_bodies = []
    monkeypatch.setattr(packed, "body_forward", lambda *a, body=packed.body_forward, **k: packed_bodies.append(1)
                        or body(*a, **k))
    params, ref_params = reading.init(3), reading.init(4)
    batch = step.make_batch([[5, 6], [7], [8, 9, 10], [11]], [[1, 2, 3], [], [2, 2], [30, 31, 32, 33]],
                            [1, 0, 1, 0], dtype=dtype, max_len=12)
    config = KTOConfig(variant="kto")
    results = []
    for model in (reading, fast):
        ref, kl_ref = step.reference_logps(model, ref_params, batch)
        loss, metrics, grads = step.kto_step(model, params, batch, ref, kl_ref, config, train=train,
                                             rng=np.random.default_rng(6))
        sft_loss, _, sft_grads = step.sft_step(model, params, batch, train=train, rng=np.random.default_rng(7))
        logps = step.forward_logps(model, params, batch.tokens, batch.completion_mask)
        results.append((ref, kl_ref, loss, metrics, grads, sft_loss, sft_grads, logps))
    reading_results, fast_results = results
    for what, a, b in zip(["ref", "kl_ref"], reading_results[:2], fast_results[:2]):
        np.testing.assert_allclose(b, a, rtol=rtol, err_msg=what)
    np.testing.assert_allclose(fast_results[2], reading_results[2], rtol=rtol)
    for key, value in reading_results[3].items():
        np.testing.assert_allclose(fast_results[3][key], value, rtol=rtol, atol=rtol, err_msg=key)
    np.testing.assert_allclose(fast_results[5], reading_results[5], rtol=rtol)
    for grads_a, grads_b in ((reading_results[4], fast_results[4]), (reading_results[6], fast_results[6])):
        assert grads_a.keys() == grads_b.keys()
        for name in grads_a:
            scale = float(np.abs(grads_a[name]).max())
            np.testing.assert_allclose(grads_b[name], grads_a[name], rtol=rtol, atol=rtol * scale, err_msg=name)
    np.testing.assert_allclose(fast_results[7], reading_results[7], rtol=rtol)
    assert reading_results[7][1] == 0.0 == fast_results[7][1]
    # packed: the two reference passes, the policy's KL rows and the forward-only pass always; the KTO
    # and SFT steps' matched rows too unless dropout applies
    assert len(packed_bodies) == (4 if train and dropout > 0 else 6)


@pytest.mark.parametrize("prompts, completions", [([[5], [6]], [[], []]), ([[5, 6], [7]], [[], [3]])],
                         ids=["T=1", "one-row-empty"])
def test_a_fast_step_with_nothing_or_little_scored_is_the_reading_editions_step(prompts, completions):
    """Rows of one token (T = 1: nothing can be scored) and an empty completion beside a one-token one."""
    kwargs = dict(hidden_size=8, num_layers=1, num_heads=2, vocab_size=11, dropout=0.0, max_seq_len=8,
                  dtype="float64")
    reading, fast = build(**kwargs), build(**kwargs, fast=True)
    params, ref_params = reading.init(0), reading.init(1)
    batch = step.make_batch(prompts, completions, [1, 0], dtype="float64")
    outputs = []
    for model in (reading, fast):
        ref, kl_ref = step.reference_logps(model, ref_params, batch)
        loss, _, grads = step.kto_step(model, params, batch, ref, kl_ref, KTOConfig(variant="kto"))
        logps = step.forward_logps(model, params, batch.tokens, batch.completion_mask)
        outputs.append((ref, kl_ref, loss, grads, logps))
    for a, b in zip(*outputs):
        if isinstance(a, dict):
            for name in a:
                np.testing.assert_allclose(b[name], a[name], rtol=1e-12, atol=1e-15, err_msg=name)
        else:
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dropout, train", [(0.1, True), (0.0, False)])
def test_kto_dlogits_of_a_fast_model_are_the_dense_dlogits(dropout, train):
    """kto_dlogits (train.token_gradient_norms reads it) keeps every logit for a fast model too."""
    kwargs = dict(hidden_size=16, num_layers=2, num_heads=4, vocab_size=37, dropout=dropout, max_seq_len=16,
                  dtype="float64")
    reading, fast = build(**kwargs), build(**kwargs, fast=True)
    params, ref_params = reading.init(3), reading.init(4)
    batch = step.make_batch(PROMPTS, COMPLETIONS, [1, 0, 1], dtype="float64", max_len=9)
    results = []
    for model in (reading, fast):
        ref, kl_ref = step.reference_logps(model, ref_params, batch)
        loss, _, dlogits, _ = step.kto_dlogits(model, params, batch, ref, kl_ref, KTOConfig(variant="kto"),
                                               train=train, rng=np.random.default_rng(5))
        results.append((loss, dlogits))
    (loss_r, dlogits_r), (loss_f, dlogits_f) = results
    assert dlogits_f.shape == dlogits_r.shape == (3, 9, 37)
    np.testing.assert_allclose(loss_f, loss_r, rtol=1e-12)
    np.testing.assert_allclose(dlogits_f, dlogits_r, rtol=1e-12, atol=1e-15)


def test_forward_logps_checks_the_mask_at_its_door():
    model = build(hidden_size=8, num_layers=1, num_heads=2, vocab_size=11, max_seq_len=8, fast=True)
    params = model.init(0)
    tokens = np.ones((2, 3), dtype=np.int64)
    with pytest.raises(ValueError, match="completion_mask must have the shape of tokens"):
        step.forward_logps(model, params, tokens, np.ones((2, 2)))
    with pytest.raises(ValueError, match="completion_mask"):
        step.forward_logps(model, params, tokens, np.ones(3))


def test_row_spans_keep_each_row_to_its_last_scored_position():
    from kto_np.fast.packed import row_spans

    mask = np.array([[0, 0, 1, 1, 0, 0],   # scored t = 1, 2: keeps 0..2
                     [0, 0, 0, 0, 0, 0],   # nothing scored: keeps nothing
                     [1, 0, 0, 0, 0, 1],   # position 0 scores nothing; t = 4 scored: keeps 0..4
                     [0, 1, 0, 0, 0, 0]])  # t = 0 scored: keeps 0
    spans, row_starts = row_spans(mask)
    assert spans == [(0, 0, 3), (2, 3, 8), (3, 8, 9)]
    assert row_starts.tolist() == [0, 3, 3, 8]
    spans, row_starts = row_spans(np.ones((3, 1)))  # T = 1: nothing can be scored
    assert spans == [] and row_starts.tolist() == [0, 0, 0]
