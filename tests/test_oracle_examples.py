"""The stand-ins in docs/examples get the verdicts docs/ORACLE.md shows: OpenRLHF's class (constructed with
world_size and device), LLaMA-Factory's method, a float32-internal HALOs-style function, and Liger's real loss
(no class weights) where liger-kernel is installed."""

import sys
from pathlib import Path

import pytest

from kto_np import oracle

torch = pytest.importorskip("torch", reason="torch not installed: the torch stand-ins skip")
EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def _verify(spec: str, **kwargs):
    return oracle.verify(f"{EXAMPLES / spec.split(':')[0]}:{spec.split(':')[1]}", "kto_loss", "kto", isolate=False,
                         **kwargs)


def test_openrlhf_style_class_passes():
    report = _verify("openrlhf_style.py:KTOLoss")
    assert report.passed, str(report)
    assert any("a class" in note for note in report.notes)


def test_llamafactory_style_method_passes():
    report = _verify("llamafactory_style.py:CustomKTOTrainer.kto_loss")
    assert report.passed, str(report)


def test_halos_style_float32_inside_is_said_and_passes_at_float32():
    report = _verify("halos_style.py:kto_loss")
    assert not report.passed and report.diagnosis.mistakes == ()
    assert "float32" in report.diagnosis.message
    assert _verify("halos_style.py:kto_loss", tolerance="float32").passed


def test_liger_real_kto_loss_has_no_class_weights():
    pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel not installed (pip install liger-kernel "
                        "--no-deps): the Liger check skips")
    report = _verify("liger_kto.py:kto_loss", tolerance="float32")
    assert report.diagnosis.mistakes == ("weights_ignored",), report.diagnosis.message
    unit = [c for c in report.checks if c.case == "kto_loss/kto/unit_weights"]
    assert unit and all(c.passed for c in unit)


def teardown_module():
    for name in ("openrlhf_style", "llamafactory_style", "halos_style", "liger_kto"):
        sys.modules.pop(name, None)
