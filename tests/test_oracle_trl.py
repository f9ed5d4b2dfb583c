"""`kto-np oracle trl`: the installed TRL's own KTOTrainer checked at the loss and the model level; a TRL whose
loss is broken fails with the mistake named; without TRL the command says what to install (exit 2)."""

import pytest

from kto_np.oracle import trl as oracle_trl


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
def test_installed_trl_passes_at_both_levels(capsys):
    api = _installed_trl()
    if oracle_trl._major(api.version) < 1:  # TRL 0.x: the loss level only; the model level is not driven
        assert oracle_trl.main_trl("all") == 2
        assert "model level" in capsys.readouterr().err
        return
    assert oracle_trl.main_trl("all") == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert out.startswith(f"TRL {api.version}: ")
    for label in ("loss level, loss_type kto", "loss level, loss_type apo_zero_unpaired", "model level"):
        assert f"TRL {api.version} {label}" in out and "FAILED" not in out
    if oracle_trl.fused_head(api):  # TRL >= 1.6: the fused head is float32, said and checked at float32
        assert "Checked at float32 tolerance" in out and out.count("tolerance float32") == 1
    else:  # TRL <= 1.5 computes the model level in float64: checked at float64 throughout
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
    oracle_trl._loss_trainer.cache_clear()
    try:
        report = oracle.verify(oracle_trl.kto_loss, "kto_loss", "kto", isolate=False)
    finally:
        oracle_trl._loss_trainer.cache_clear()
    assert not report.passed
    assert report.diagnosis.mistakes == ("beta_twice",), report.diagnosis.message
