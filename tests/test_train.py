"""Training: the end-to-end gradient, SFT, the run loop, determinism, exact resume, failure handling."""

import json
import os

import numpy as np
import pytest

from kto_np import checkpoint, step, train
from kto_np.architectures import build, model_from_config
from kto_np.data import Tokenizer, collate, make_examples, make_task
from kto_np.gradcheck import check_gradients
from kto_np.gradcheck_suite import model_checks
from kto_np.losses import VARIANTS
from kto_np.validation import NonFiniteError, check_finite

TINY = dict(hidden_size=16, num_layers=1, num_heads=2, sft_steps=40, steps=20, batch_size=16, sft_examples=64,
            num_examples=64, eval_prompts=32, eval_every=10, checkpoint_every=10, warmup_steps=2, num_digits=3)


def quiet_run(config, out, **kwargs):
    return train.run(config, out, progress=False, log=lambda *a: None, **kwargs)


def kto_records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("variant", VARIANTS)
def test_end_to_end_gradient_matches_finite_differences(variant):
    rows = model_checks(seed=3, variant=variant)
    bad = [(r.name, r.rel_error) for r in rows if not r.passed]
    assert not bad, f"{variant}: tensors over tolerance: {bad}"
    assert len(rows) == len(build(hidden_size=12, num_layers=2, num_heads=3, vocab_size=11,
                                  max_seq_len=8).init(0))


def test_sft_gradient_matches_finite_differences():
    task = make_task("sort", 3)
    batch = collate(make_examples(task, 4, seed=0), Tokenizer(), dtype="float64")
    model = build(hidden_size=8, num_layers=1, num_heads=2, vocab_size=Tokenizer().vocab_size, dropout=0.0,
                  max_seq_len=10, dtype="float64")
    params = model.init(1)
    _, _, grads = step.sft_step(model, params, batch)
    rows = check_gradients(lambda: step.sft_step(model, params, batch)[0], params, grads,
                           tolerance=1e-6)
    assert all(r.passed for r in rows), [(r.name, r.rel_error) for r in rows if not r.passed]


def test_sft_loss_is_mean_token_nll():
    task = make_task("sort", 3)
    batch = collate(make_examples(task, 5, seed=2), Tokenizer(), dtype="float64")
    model = build(hidden_size=8, num_layers=1, num_heads=2, vocab_size=13, dropout=0.0, max_seq_len=10,
                  dtype="float64")
    params = model.init(0)
    loss, _, _ = step.sft_step(model, params, batch)
    logits, _ = model.forward(params, batch.tokens)
    # independent: per-token log-softmax by hand, shifted, masked, averaged over completion tokens
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = [-logp[b, t - 1, batch.tokens[b, t]] for b in range(5) for t in range(1, batch.tokens.shape[1])
           if batch.completion_mask[b, t]]
    assert loss == pytest.approx(np.mean(nll), rel=1e-12)


def test_tiny_run_learns_and_writes_its_folder(tmp_path):
    out = tmp_path / "run"
    summary = quiet_run(train.TrainConfig(**TINY), out)
    for name in ("config.json", "metrics.jsonl", "summary.json", "training_curves.png",
                 "checkpoints/reference.npz", "checkpoints/kto.npz", "checkpoints/sft.npz"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "summary.json").read_text())
    assert saved["desirable_rate_before"] == summary["desirable_rate_before"]
    assert 0.0 <= saved["desirable_rate_after"] <= 1.0
    records = kto_records(out)
    losses = [r["loss"] for r in records if r["phase"] == "kto"]
    assert len(losses) == TINY["steps"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), "the KTO loss does not fall"
    evals = [r["desirable_rate"] for r in records if r["phase"] == "eval"]
    assert evals[-1] >= evals[0], "the desirable rate fell"
    for r in records:
        if r["phase"] == "kto":
            assert set(train.METRIC_NAMES) <= set(r), sorted(r)
    assert json.loads((out / "config.json").read_text()) == train.TrainConfig(**TINY).to_dict()


def test_same_seed_same_numbers(tmp_path):
    quiet_run(train.TrainConfig(**TINY), tmp_path / "a")
    quiet_run(train.TrainConfig(**TINY), tmp_path / "b")
    assert (tmp_path / "a/metrics.jsonl").read_bytes() == (tmp_path / "b/metrics.jsonl").read_bytes()
    assert (tmp_path / "a/checkpoints/kto.npz").read_bytes() == (tmp_path / "b/checkpoints/kto.npz").read_bytes()
    other = quiet_run(train.TrainConfig(**{**TINY, "seed": 1}), tmp_path / "c")
    assert other is not None
    assert (tmp_path / "a/metrics.jsonl").read_bytes() != (tmp_path / "c/metrics.jsonl").read_bytes()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, dropout):
    config = train.TrainConfig(**{**TINY, "dropout": dropout})
    quiet_run(config, tmp_path / "whole")
    assert quiet_run(config, tmp_path / "cut", stop_after=10) == {"stopped_after": 10}
    assert not (tmp_path / "cut/summary.json").exists()
    # records written after the checkpoint (none here) and the rest of the run come from the resume
    quiet_run(train.TrainConfig(), tmp_path / "cut", resume=True)  # the saved config wins
    whole = checkpoint.load(tmp_path / "whole/checkpoints/kto.npz")
    resumed = checkpoint.load(tmp_path / "cut/checkpoints/kto.npz")
    for name, value in whole.params.items():
        np.testing.assert_array_equal(resumed.params[name], value, err_msg=name)
    assert (tmp_path / "whole/metrics.jsonl").read_bytes() == (tmp_path / "cut/metrics.jsonl").read_bytes()


def test_resume_drops_records_written_after_the_checkpoint(tmp_path):
    config = train.TrainConfig(**{**TINY, "checkpoint_every": 10})
    quiet_run(config, tmp_path / "whole")
    quiet_run(config, tmp_path / "cut", stop_after=10)
    with open(tmp_path / "cut/metrics.jsonl", "a") as f:  # as if a crash hit after step 12
        f.write(json.dumps({"phase": "kto", "step": 12, "loss": 9.0}) + "\n")
    quiet_run(config, tmp_path / "cut", resume=True)
    assert (tmp_path / "whole/metrics.jsonl").read_bytes() == (tmp_path / "cut/metrics.jsonl").read_bytes()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    config = train.TrainConfig(**{**TINY, "checkpoint_every": 5})
    real = train.kto_step
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, metrics, grads = real(*args, **kwargs)
        calls["n"] += 1
        return (float("nan") if calls["n"] == 8 else loss), metrics, grads

    monkeypatch.setattr(train, "kto_step", poisoned)
    with pytest.raises(train.TrainingDiverged, match="kto step 8"):
        quiet_run(config, tmp_path / "run")
    saved = checkpoint.load(tmp_path / "run/checkpoints/kto.npz")
    assert saved.extra["step"] == 5


def test_train_step_is_kto_step_clip_schedule_adamw():
    # independent: the same update written out with the reading edition's optimiser (kto_np.optim)
    from kto_np import optim  # noqa: PLC0415
    from kto_np.losses import KTOConfig  # noqa: PLC0415

    model = build(hidden_size=8, num_layers=1, num_heads=2, vocab_size=Tokenizer().vocab_size, dropout=0.0,
                  max_seq_len=10, dtype="float64")
    batch = collate(make_examples(make_task("sort", 3), 6, seed=0), Tokenizer(), dtype="float64")
    ref_params = model.init(1)
    ref_logps, kl_ref_logps = step.reference_logps(model, ref_params, batch)
    config = KTOConfig("kto", 0.5, 1.0, 1.0, False)
    schedule = dict(base_lr=0.05, warmup_steps=2, total_steps=10, schedule="cosine", min_lr_ratio=0.1)
    params, expected = model.init(0), model.init(0)
    state, expected_state = optim.adamw_init(params), optim.adamw_init(expected)
    for k in range(3):
        loss, metrics, grad_norm, lr = train.train_step(
            model, params, state, batch, ref_logps, kl_ref_logps, config, step=k, lr_schedule=schedule,
            max_grad_norm=0.05, weight_decay=0.1)
        want_loss, _, grads = step.kto_step(model, expected, batch, ref_logps, kl_ref_logps, config)
        want_norm = optim.clip_grad_norm(grads, 0.05)
        want_lr = optim.learning_rate(k, **schedule)
        optim.adamw_step(expected, grads, expected_state, lr=want_lr, weight_decay=0.1)
        assert (loss, lr) == (want_loss, want_lr) and grad_norm == pytest.approx(want_norm, rel=1e-12)
        assert grad_norm > 0.05  # the clip acted
        for name, value in expected.items():
            # atol: the key bias's gradient is 0 in exact arithmetic, rounding noise here, which Adam
            # turns into updates of ~1e-15 whose last digits depend on the order of the operations
            np.testing.assert_allclose(params[name], value, rtol=1e-12, atol=1e-13, err_msg=f"step {k}: {name}")
    assert state["step"] == 3 and lr == 0.05  # warm-up 0, 0.025, then the cosine from its top


@pytest.mark.parametrize("poison, match", [
    ("raise", "kto step 8: the KL estimate must be finite"),
    ("grads", "kto step 8: the gradient norm must be finite"),
    ("params", r"kto step 8: params after the update with lr=[0-9.e+-]+ \(an overflow to infinity\) must be "
               r"finite, got NaN or infinite values in \['wte.weight'\]"),
])
def test_non_finite_steps_stop_with_the_step_and_the_quantity(tmp_path, monkeypatch, poison, match):
    config = train.TrainConfig(**{**TINY, "checkpoint_every": 5})
    real_step, real_adamw = train.kto_step, train.adamw_step
    calls = {"n": 0}

    def kto_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8 and poison == "raise":  # as the step reports it
            check_finite("the KL estimate", float("inf"))
        loss, metrics, grads = real_step(*args, **kwargs)
        if calls["n"] == 8 and poison == "grads":
            grads["wpe.weight"][0, 0] = np.nan
        return loss, metrics, grads

    def adamw_step(params, *args, **kwargs):
        real_adamw(params, *args, **kwargs)
        if calls["n"] == 8 and poison == "params":
            params["wte.weight"][1, 2] = np.inf

    monkeypatch.setattr(train, "kto_step", kto_step)
    monkeypatch.setattr(train, "adamw_step", adamw_step)
    with pytest.raises(train.TrainingDiverged, match=match) as caught:
        quiet_run(config, tmp_path / "run")
    assert isinstance(caught.value.__cause__, NonFiniteError)
    assert "the last good checkpoint is" in str(caught.value)
    assert checkpoint.load(tmp_path / "run/checkpoints/kto.npz").extra["step"] == 5


def test_a_value_error_that_is_not_a_non_finite_one_is_not_divergence(tmp_path, monkeypatch):
    def kto_step(*args, **kwargs):
        raise ValueError("tokens must be < vocab_size, and the message says must be finite")

    monkeypatch.setattr(train, "kto_step", kto_step)
    with pytest.raises(ValueError, match="tokens must be") as caught:
        quiet_run(train.TrainConfig(**TINY), tmp_path / "run")
    assert not isinstance(caught.value, train.TrainingDiverged)


def test_existing_run_is_not_overwritten_without_force(tmp_path):
    quiet_run(train.TrainConfig(**{**TINY, "steps": 2, "sft_steps": 2}), tmp_path / "run")
    before = (tmp_path / "run/metrics.jsonl").read_bytes()
    with pytest.raises(train.RunError, match="--force"):
        quiet_run(train.TrainConfig(**TINY), tmp_path / "run")
    assert (tmp_path / "run/metrics.jsonl").read_bytes() == before
    quiet_run(train.TrainConfig(**{**TINY, "steps": 3, "sft_steps": 2}), tmp_path / "run", force=True)
    assert (tmp_path / "run/metrics.jsonl").read_bytes() != before


def test_unwritable_or_missing_folders_fail_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(train.RunError, match="not a folder|not writable"):
        quiet_run(train.TrainConfig(**TINY), blocker)
    with pytest.raises(train.RunError, match="not writable"):
        quiet_run(train.TrainConfig(**TINY), blocker / "sub")
    with pytest.raises(train.RunError, match="cannot resume"):
        quiet_run(train.TrainConfig(**TINY), tmp_path / "nothing", resume=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=-1), "steps"),
        (dict(beta=0.0), "beta"),
        (dict(lr=float("nan")), "lr"),
        (dict(variant="dpo"), "variant"),
        (dict(desirable_weight=0.0, undesirable_weight=0.0), "both be 0"),
        (dict(desirable_fraction=1.5), "desirable_fraction"),
        (dict(hidden_size=10, num_heads=4), "divisible"),
        (dict(dtype="float16"), "dtype"),
        (dict(batch_size=100, num_examples=50), "num_examples"),
        (dict(stop_z_grad="yes"), "stop_z_grad"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        train.TrainConfig(**kwargs)


def test_config_round_trip_and_unknown_keys():
    config = train.TrainConfig(**TINY)
    assert train.TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown keys"):
        train.TrainConfig.from_dict({**config.to_dict(), "learning_rate": 1})


def test_token_gradients_of_a_run(tmp_path):
    out = tmp_path / "run"
    quiet_run(train.TrainConfig(**TINY), out)
    grads = train.run_token_gradients(out, num_examples=4)
    assert grads.norms.shape[0] == 4 and len(grads.tokens_text) == 4
    # policy = reference and no positive KL estimate: every example's dL/dlogp is -/+ beta * w / (4 n)
    saved = checkpoint.load(out / "checkpoints/reference.npz")
    model = build(**{k: v for k, v in saved.config.to_dict().items()
                     if k in ("hidden_size", "num_layers", "num_heads", "vocab_size", "max_seq_len", "dtype")},
                  dropout=0.0)
    examples = make_examples(make_task("sort", TINY["num_digits"]), 4, seed=2)
    batch = collate(examples, Tokenizer(), dtype="float32")
    logits, _ = model.forward(saved.params, batch.tokens)
    logits = logits.astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for b, (_, _, label) in enumerate(examples):
        dlogp = (-1 if label else 1) * 0.1 / (4 * 4)
        for t in range(1, batch.tokens.shape[1]):
            onehot = np.eye(probs.shape[-1])[batch.tokens[b, t]]
            expected = abs(dlogp) * batch.completion_mask[b, t] * np.linalg.norm(onehot - probs[b, t - 1])
            assert grads.norms[b, t] == pytest.approx(expected, rel=1e-4, abs=1e-9), (b, t)
    assert np.all(grads.norms[:, 0] == 0)


def test_resume_from_a_stop_between_checkpoints_is_bit_identical(tmp_path):
    config = train.TrainConfig(**{**TINY, "checkpoint_every": 10})
    quiet_run(config, tmp_path / "whole")
    quiet_run(config, tmp_path / "cut", stop_after=7)  # not a multiple of checkpoint_every
    assert checkpoint.load(tmp_path / "cut/checkpoints/kto.npz").extra["step"] == 7
    quiet_run(config, tmp_path / "cut", resume=True)
    assert (tmp_path / "whole/metrics.jsonl").read_bytes() == (tmp_path / "cut/metrics.jsonl").read_bytes()


def test_resume_before_the_first_kto_checkpoint_logs_no_record_twice(tmp_path):
    config = train.TrainConfig(**TINY)
    quiet_run(config, tmp_path / "whole")
    quiet_run(config, tmp_path / "cut", stop_after=10)
    (tmp_path / "cut/checkpoints/kto.npz").unlink()  # as if stopped before the first KTO checkpoint
    quiet_run(config, tmp_path / "cut", resume=True)
    assert (tmp_path / "whole/metrics.jsonl").read_bytes() == (tmp_path / "cut/metrics.jsonl").read_bytes()


# ----------------------------------------------------------------------------------------------
# run(reference=...): KTO from a saved reference, no SFT


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    quiet_run(train.TrainConfig(**TINY), out)
    return out


def test_a_run_from_a_reference_is_the_kto_phase_of_a_full_run(full_run, tmp_path):
    config = train.TrainConfig(**TINY)
    whole = checkpoint.load(full_run / "checkpoints/kto.npz")
    kto_and_eval = [r for r in kto_records(full_run) if r["phase"] != "sft"]
    for name, reference in (("from_folder", full_run), ("from_file", full_run / "checkpoints/reference.npz")):
        out = tmp_path / name
        quiet_run(config, out, reference=reference)
        assert not (out / "checkpoints/sft.npz").exists()
        assert kto_records(out) == kto_and_eval  # no SFT record; every KTO and evaluation record the same
        policy = checkpoint.load(out / "checkpoints/kto.npz")
        for key, value in whole.params.items():
            np.testing.assert_array_equal(policy.params[key], value, err_msg=f"{name}: {key}")
        copied = checkpoint.load(out / "checkpoints/reference.npz")
        assert copied.extra == {"source": os.path.abspath(full_run / "checkpoints/reference.npz")}
        assert json.loads((out / "config.json").read_text()) == config.to_dict()
    # stopped and resumed without naming the reference again: the same bits
    quiet_run(config, tmp_path / "cut", reference=full_run, stop_after=7)
    quiet_run(config, tmp_path / "cut", resume=True)
    assert (tmp_path / "cut/metrics.jsonl").read_bytes() == (tmp_path / "from_folder/metrics.jsonl").read_bytes()
    with pytest.raises(train.RunError, match="a resume continues from the run folder's own"):
        quiet_run(config, tmp_path / "cut", resume=True, reference=full_run)


def test_a_reference_of_another_model_or_a_missing_or_damaged_one_is_a_clear_error(full_run, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(train.RunError, match=r"different model .*hidden_size 16 \(config: 32\)"):
        quiet_run(train.TrainConfig(**{**TINY, "hidden_size": 32}), out, reference=full_run)
    with pytest.raises(train.RunError, match=r"different model .*dtype float32 \(config: float64\)"):
        quiet_run(train.TrainConfig(**{**TINY, "dtype": "float64"}), out, reference=full_run)
    with pytest.raises(train.RunError, match="nothing.npz' does not exist"):
        quiet_run(train.TrainConfig(**TINY), out, reference=tmp_path / "nothing.npz")
    with pytest.raises(train.RunError, match=r"reference\.npz' does not exist"):
        quiet_run(train.TrainConfig(**TINY), out, reference=tmp_path)  # a folder that holds no run
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes((full_run / "checkpoints/reference.npz").read_bytes()[:1000])
    with pytest.raises(train.RunError, match="truncated, corrupt"):
        quiet_run(train.TrainConfig(**TINY), out, reference=damaged)
    with pytest.raises(TypeError, match="reference must be"):
        quiet_run(train.TrainConfig(**TINY), out, reference=3)
    assert not out.exists()  # refused before the run folder was touched


def test_the_command_line_starts_from_a_reference(full_run, tmp_path, capsys):
    from kto_np import cli  # noqa: PLC0415

    model = model_from_config(train.TrainConfig().model_config())
    checkpoint.save(tmp_path / "ref.npz", model.init(5), model.config)  # the demo's model, untrained
    argv = ["demo", "--quiet", "--steps", "1", "--reference", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "b")]
    assert cli.main(argv) == 0
    assert not (tmp_path / "b/checkpoints/sft.npz").exists()
    copied = checkpoint.load(tmp_path / "b/checkpoints/reference.npz")
    for key, value in model.init(5).items():
        np.testing.assert_array_equal(copied.params[key], value, err_msg=key)
    capsys.readouterr()
    assert cli.main(["demo", "--quiet", "--reference", str(full_run), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert "holds a different model than the config describes: " in err and "hidden_size 16 (config: 64)" in err
