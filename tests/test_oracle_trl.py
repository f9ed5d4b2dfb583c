"""`kto-np oracle trl`: the installed TRL's own KTOTrainer checked at the loss and the model level; each release
group's code path driven through stand-ins in its shape (tests/trl_standins.py) where TRL is absent; whatever
keeps a TRL from being driven is exit status 2 with one line, never a FAILED."""

import types

import numpy as np
import pytest

from kto_np.oracle.integrations import trl as oracle_trl


@pytest.fixture(autouse=True)
def _fresh_caches():
    for cached in (oracle_trl.trl_api, oracle_trl._loss_trainer, oracle_trl._loss_batch_keys):
        cached.cache_clear()
    yield
    for cached in (oracle_trl.trl_api, oracle_trl._loss_trainer, oracle_trl._loss_batch_keys):
        cached.cache_clear()


def test_without_trl_one_line_and_exit_2(monkeypatch, capsys):
    def unavailable():
        raise oracle_trl.TRLUnavailable(f"trl not installed: {oracle_trl.INSTALL_HINT}")

    monkeypatch.setattr(oracle_trl, "trl_api", unavailable)
    assert oracle_trl.main_trl("all") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "oracle-trl" in captured.err


def test_bad_level_exit_2(capsys):
    assert oracle_trl.main_trl("everything") == 2
    assert "level must be one of" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# pieces that need no torch


def test_metrics_read_from_either_store_and_from_sums_and_counts():
    """TRL <= 1.3 keeps _stored_metrics, later _metrics; TRL <= 1.5 logs sums and counts; a metric not logged is
    left out (not None, which the oracle would call wrong)."""
    old = types.SimpleNamespace(_stored_metrics={"train": {"kl": [0.5], "count/chosen": [2.0],
                                                           "rewards/chosen_sum": [3.0], "logps/chosen_sum": [-8.0],
                                                           "count/rejected": [0.0]}})
    metrics = oracle_trl._train_metrics(old)
    assert metrics == {"kl": 0.5, "rewards/chosen": 1.5, "logps/chosen": -4.0}
    new = types.SimpleNamespace(_metrics={"train": {"kl": [0.0, 0.25], "rewards/chosen": [1.0],
                                                    "rewards/rejected": [-2.0]}})
    assert oracle_trl._train_metrics(new) == {"kl": 0.25, "rewards/chosen": 1.0, "rewards/rejected": -2.0,
                                              "rewards/margins": 3.0}
    assert oracle_trl._train_metrics(types.SimpleNamespace()) == {}


def test_a_release_that_appends_eos_is_not_driven_at_the_model_level():
    api = oracle_trl.TRLApi("1.0.0", "kto_loss", object, object)
    appended = types.SimpleNamespace(train_dataset=_Columns({"prompt": ["<1>"],
                                                             "completion_input_ids": [[1, 2, 11], [3, 11]]}))
    with pytest.raises(oracle_trl.TRLUnavailable, match="appends the tokenizer's EOS"):
        oracle_trl._check_token_ids(api, appended, vocab_size=11)
    within = types.SimpleNamespace(train_dataset=_Columns({"completion_input_ids": [[1, 2, 10]]}))
    oracle_trl._check_token_ids(api, within, vocab_size=11)  # ids inside the vocabulary: nothing to say


class _Columns(dict):
    @property
    def column_names(self):
        return list(self)


def test_fused_head_without_triton_is_named(monkeypatch):
    """TRL 1.15's fused head has no fallback when trl.kernels (Triton) is absent; 1.16's has (_use_triton)."""
    module = types.ModuleType("standin_kto_module")
    module.add_fused_lm_head = object()
    trainer_class = type("KTOTrainer", (), {"__module__": "standin_kto_module", "_compute_loss": lambda s: 0})
    monkeypatch.setitem(__import__("sys").modules, "standin_kto_module", module)
    utils = types.ModuleType("trl.trainer.utils")
    utils._ChunkedLogProbFunction = None
    monkeypatch.setitem(__import__("sys").modules, "trl.trainer.utils", utils)
    api = oracle_trl.api_for(trainer_class, object, "1.15.0")
    assert oracle_trl.fused_head(api) and oracle_trl._fused_head_kernel_missing(api)
    utils._use_triton = lambda device: False  # TRL 1.16: a torch fallback
    assert not oracle_trl._fused_head_kernel_missing(api)


# ---------------------------------------------------------------------------------------------------
# the release groups' code paths, through stand-ins (torch only)


def _standins():
    pytest.importorskip("torch", reason="torch not installed: the stand-in TRL paths skip")
    import trl_standins

    return trl_standins


def _drive(monkeypatch, trainer_class, version="standin"):
    api = oracle_trl.api_for(trainer_class, _standins().StandInConfig, version)
    monkeypatch.setattr(oracle_trl, "trl_api", lambda: api)
    monkeypatch.setattr(oracle_trl, "_loss_trainer", lambda loss_type: trainer_class(loss_type=loss_type))
    return api


def test_stand_in_model_answers_logits_with_the_log_prob_and_derivative_one():
    """log_softmax at TARGET of the logits the stand-in gives is the log-prob, d/dlogp = 1 (float64)."""
    standins = _standins()
    import torch

    logps = torch.tensor([-0.3, -9.0, -40.0], dtype=torch.float64, requires_grad=True)
    model = oracle_trl.LogpsModel(logps, None)
    ids = torch.tensor([[oracle_trl.MATCHED_MARKER, oracle_trl.TARGET]] * 3)
    logits = model(input_ids=ids).logits
    got = logits[:, 0].log_softmax(-1)[:, oracle_trl.TARGET]
    np.testing.assert_allclose(got.detach().numpy(), logps.detach().numpy(), rtol=1e-15, atol=1e-15)
    got.sum().backward()
    np.testing.assert_allclose(logps.grad.numpy(), np.ones(3), rtol=1e-12)
    fused = model(input_ids=ids, labels=ids.masked_fill(ids == oracle_trl.MATCHED_MARKER, -100), fused_lm_head=True)
    np.testing.assert_array_equal(fused.log_probs.detach().numpy()[:, 0], logps.detach().numpy())
    assert standins  # the module imported: torch is here
    with pytest.raises(oracle_trl.TRLUnavailable, match="log-probs < 0 only"):
        oracle_trl.LogpsModel(torch.tensor([0.5], dtype=torch.float64), None)(
            input_ids=torch.tensor([[oracle_trl.MATCHED_MARKER, oracle_trl.TARGET]]))


GROUP_NAMES = ["kto_loss (TRL 0.19-1.5)", "completion keys (TRL 1.6-1.7)", "logits (TRL 1.8-1.14)",
               "fused head (TRL >= 1.15)"]


@pytest.mark.parametrize("group", GROUP_NAMES)
def test_each_release_groups_path_passes_with_a_right_loss(group, monkeypatch, capsys):
    standins = _standins()
    api = _drive(monkeypatch, standins.GROUPS[group])
    assert api.api == ("kto_loss" if "kto_loss" in group else "compute_loss")
    assert oracle_trl.main_trl("loss") == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "TRL standin loss level, loss_type kto: PASSED" in out
    assert "TRL standin loss level, loss_type apo_zero_unpaired: PASSED" in out


@pytest.mark.parametrize("group", GROUP_NAMES)
def test_each_release_groups_path_fails_with_beta_applied_twice(group, monkeypatch, capsys):
    standins = _standins()
    from kto_np import oracle

    _drive(monkeypatch, standins.beta_twice(standins.GROUPS[group]))
    report = oracle.verify(oracle_trl.kto_loss, "kto_loss", "kto", isolate=False)
    assert not report.passed and not report.errors
    assert report.diagnosis.mistakes == ("beta_twice",), report.diagnosis.message
    assert oracle_trl.main_trl("loss") == 1
    captured = capsys.readouterr()
    assert "loss_type kto: FAILED" in captured.out and captured.err == ""


@pytest.mark.parametrize(("trainer", "cause"), [
    ("ExtraKeyTrainer", "carries 'token_type_ids', which the loss-level stand-in does not fill"),
    ("PrefixTokenTrainer", "without the [marker, target] rows"),
    ("WrongKeysTrainer", "before giving any number (KeyError: 'completion_input_ids'"),
    ("NoLossTrainer", "has neither kto_loss nor _compute_loss"),
])
def test_what_cannot_be_driven_is_exit_2_with_one_line_per_level(trainer, cause, monkeypatch, capsys):
    standins = _standins()
    trainer_class = getattr(standins, trainer)
    if trainer == "NoLossTrainer":
        def no_api():
            return oracle_trl.api_for(trainer_class, standins.StandInConfig, "standin")

        monkeypatch.setattr(oracle_trl, "trl_api", no_api)
    else:
        _drive(monkeypatch, trainer_class)
    assert oracle_trl.main_trl("loss") == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines and all(cause in line for line in lines), captured.err
    assert "FAILED" not in captured.out
    if trainer != "NoLossTrainer":
        assert len(lines) == 2 and captured.out.count("not driven") == 2  # one line for each loss_type


def test_a_trainer_that_cannot_be_built_is_one_line_for_every_level(monkeypatch, capsys):
    standins = _standins()
    api = _drive(monkeypatch, standins.LogitsTrainer)

    def unbuildable(loss_type):
        raise oracle_trl.TRLUnavailable("TRL standin's KTOTrainer cannot be built here (AttributeError: x)",
                                        every_level=True)

    monkeypatch.setattr(oracle_trl, "_loss_trainer", unbuildable)
    assert api.api == "compute_loss"
    assert oracle_trl.main_trl("all") == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "cannot be built here" in captured.err


# ---------------------------------------------------------------------------------------------------
# the installed TRL (CI installs trl 1.16.0)


def _installed_trl():
    pytest.importorskip("torch", reason="torch not installed: the TRL checks skip")
    pytest.importorskip("transformers", reason="transformers not installed (pip install 'kto_np[oracle-trl]')")
    pytest.importorskip("datasets", reason="datasets not installed (pip install 'kto_np[oracle-trl]')")
    pytest.importorskip("trl", reason="trl not installed (pip install 'kto_np[oracle-trl]'): the TRL checks skip")
    try:
        return oracle_trl.trl_api()
    except oracle_trl.TRLUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
def test_installed_trl_passes_or_says_in_one_line_why_not(capsys):
    api = _installed_trl()
    status = oracle_trl.main_trl("all")
    captured = capsys.readouterr()
    assert "FAILED" not in captured.out, captured.out
    if status == 2:  # a level this TRL cannot be driven at here: one stderr line each, naming why
        lines = captured.err.splitlines()
        assert lines and all(" not driven: " in line or "cannot be built" in line for line in lines), captured.err
        return
    assert status == 0, captured
    out = captured.out
    assert out.startswith(f"TRL {api.version}: ")
    for label in ("loss level, loss_type kto", "loss level, loss_type apo_zero_unpaired", "model level"):
        assert any(line.startswith(f"TRL {api.version} {label}") and line.endswith(": PASSED")
                   for line in out.splitlines()), label
    if oracle_trl.fused_head(api):  # TRL >= 1.15: the fused head is float32, said and checked at float32
        assert "Checked at float32 tolerance" in out and out.count("tolerance float32") == 1
    else:  # TRL <= 1.14 computes the model level in float64: checked at float64 throughout
        assert "tolerance float32" not in out


@pytest.mark.slow
def test_a_trl_with_beta_applied_twice_fails_with_the_mistake_named(monkeypatch):
    """A KTOTrainer whose loss reads beta squared (a subclass: the rest is TRL's code) is caught at the loss level."""
    from kto_np import oracle

    api = _installed_trl()

    class BetaTwice(api.trainer_class):
        @property
        def beta(self):
            return self._beta_given ** 2

        @beta.setter
        def beta(self, value):
            self._beta_given = value

    monkeypatch.setattr(oracle_trl, "trl_api", lambda: api._replace(trainer_class=BetaTwice))
    report = oracle.verify(oracle_trl.kto_loss, "kto_loss", "kto", isolate=False)
    assert not report.passed
    assert report.diagnosis.mistakes == ("beta_twice",), report.diagnosis.message
