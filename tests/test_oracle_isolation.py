"""A verdict no candidate can forge: candidates run in a child process with a time limit per case, and
every abnormal end (sys.exit, os._exit, a signal, a hang, an exit while imported, patching the oracle)
is a failed check naming what happened, never a pass and never the checker's own exit status."""

import os
import sys
import time

import numpy as np
import pytest

from kto_np import oracle
from kto_np.oracle.run import runner

STAND_INS = '''
import os, signal, sys, time, warnings
from kto_np import oracle

good = oracle.builtin_candidate("kto_loss", "kto")

def exits_zero(*args, **kwargs):
    sys.exit(0)

def exits_three(*args, **kwargs):
    sys.exit(3)

def hard_exit(*args, **kwargs):
    os._exit(0)

def segfault(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGSEGV)

def sleeps_on_batch_of_1(**kwargs):
    if len(kwargs["policy_logps"]) == 1:
        time.sleep(600)
    return good(**kwargs)

def patches_report(**kwargs):
    from kto_np.oracle.compare import report
    report.Report.passed = property(lambda self: True)
    kwargs["beta"] = kwargs["beta"] ** 2
    return good(**kwargs)

good_dpo = oracle.builtin_candidate("dpo_loss")

def floods(*args):
    for i in range(1000):
        print(f"line {i}")
        warnings.warn(f"warning number {i}")
    return good_dpo(*args)
'''


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    path = tmp_path_factory.mktemp("stand_ins") / "stand_ins.py"
    path.write_text(STAND_INS)
    return path


def check(capsys, spec, *args, **kwargs):
    status = oracle.main_check(spec, *args, **kwargs)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_correct_candidate_passes_in_a_child(stand_ins, capsys):
    status, out, _ = check(capsys, f"{stand_ins}:good", "kto_loss", "kto")
    assert status == 0, out
    assert "PASSED" in out and "not isolated" not in out


@pytest.mark.parametrize("name,what", [
    ("exits_zero", "called sys.exit(0)"),
    ("exits_three", "called sys.exit(3)"),
    ("hard_exit", "exit status 0 (os._exit"),
    ("segfault", "killed by SIGSEGV (a crash)"),
])
def test_an_exiting_or_crashing_candidate_fails_with_what_happened(stand_ins, capsys, name, what):
    status, out, _ = check(capsys, f"{stand_ins}:{name}", "dpo_loss")
    assert status == 1, out
    assert "FAILED" in out
    assert out.count(what) == 3, out  # every dpo case, each in a fresh child after an abnormal end


def test_a_module_exiting_on_import_fails(tmp_path, capsys):
    source = tmp_path / "exits_on_import.py"
    source.write_text("import sys\nsys.exit(0)\ndef f(**kwargs):\n    return 0.0\n")
    status, out, _ = check(capsys, f"{source}:f", "dpo_loss")
    assert status == 1
    assert "called sys.exit(0) while being imported" in out and "FAILED" in out


def test_a_module_raising_on_import_is_one_line_and_exit_2(tmp_path, capsys):
    source = tmp_path / "raises_on_import.py"
    source.write_text("def helper():\n    raise RuntimeError('no GPU here')\nhelper()\n")
    status, out, err = check(capsys, f"{source}:f", "dpo_loss")
    assert status == 2 and out == ""
    assert err.count("\n") == 1
    assert "RuntimeError: no GPU here (at raises_on_import.py:2)" in err


def test_patching_the_report_in_the_child_changes_nothing(stand_ins, capsys):
    status, out, _ = check(capsys, f"{stand_ins}:patches_report", "kto_loss", "kto")
    assert status == 1 and "beta_twice" in out


def test_a_hanging_case_times_out_and_the_others_still_run(stand_ins, capsys):
    start = time.monotonic()
    status, out, _ = check(capsys, f"{stand_ins}:sleeps_on_batch_of_1", "kto_loss", "kto", timeout=2, show_all=True)
    assert time.monotonic() - start < 30
    assert status == 1
    assert "kto_loss/kto/batch_of_1: ERROR, the candidate timed out: still running after 2 s" in out
    rows = [line.split() for line in out.splitlines()]
    assert ["kto_loss/kto/undesirable_only", "loss"] in [row[:2] for row in rows]  # ran in a fresh child
    assert "did not run to the end" in out


def test_output_and_warnings_are_summarised(stand_ins, capsys):
    status, out, _ = check(capsys, f"{stand_ins}:floods", "dpo_loss")
    assert status == 0, out
    assert "wrote 3000 lines to stdout (first 5 shown): line 0 | line 1" in out
    assert "more notes" in out
    assert len(out.splitlines()) < 60


def module_level_exit(*args, **kwargs):
    sys.exit(0)


def test_verify_isolates_module_level_functions_and_specs(stand_ins):
    assert runner.candidate_spec(module_level_exit) == f"{__name__}:module_level_exit"
    report = oracle.verify(module_level_exit, "dpo_loss")
    assert not report.passed
    assert all("called sys.exit(0)" in message for message in report.errors.values())
    report = oracle.verify(f"{stand_ins}:hard_exit", "dpo_loss")
    assert not report.passed and len(report.errors) == 3


def test_verify_in_process_catches_exits_timeouts_and_patching():
    good = oracle.builtin_candidate("dpo_loss")

    def exits(*args):
        sys.exit(0)

    report = oracle.verify(exits, "dpo_loss")
    assert not report.passed and "called sys.exit(0)" in str(report)
    assert any("not isolated" in note for note in report.notes)

    def sleeps(*args):
        time.sleep(30)

    start = time.monotonic()
    report = oracle.verify(sleeps, "dpo_loss", timeout=0.5)
    assert time.monotonic() - start < 10
    assert not report.passed and "timed out" in str(report)

    original = oracle.Report.passed

    def patches(*args):
        oracle.Report.passed = property(lambda self: True)
        return good(*args)

    report = oracle.verify(patches, "dpo_loss")
    assert oracle.Report.passed is original
    assert not report.passed and "Report.passed" in str(report)
    with pytest.raises(TypeError, match="isolate=True"):
        oracle.verify(exits, "dpo_loss", isolate=True)


def test_verify_rejects_bad_isolation_arguments():
    good = oracle.builtin_candidate("dpo_loss")
    with pytest.raises(ValueError, match="timeout"):
        oracle.verify(good, "dpo_loss", timeout=0)
    with pytest.raises(TypeError, match="isolate"):
        oracle.verify(good, "dpo_loss", isolate="yes")


def test_wire_format_round_trips_exactly_and_refuses_garbage():
    values = np.array([[1.0, -0.0, np.nan], [np.inf, 1e-310, 0.1]])
    decoded = runner.decode_array(runner.encode_array(values))
    assert decoded.tobytes() == values.tobytes()
    with pytest.raises(ValueError, match="does not fit"):
        runner.decode_array({"shape": [2, 2], "data": [1.0]})
    case = oracle.generate_cases()[0]
    with pytest.raises(ValueError, match="unknown quantity"):
        runner.decode_values(case, {"no_such": {"value": None, "source": "returned"}})
    with pytest.raises(ValueError, match="not checked"):
        runner.decode_values(case, {"grad/policy_logps": {"value": None, "source": "not checked"}})


def test_cli_timeout_option(stand_ins, capsys):
    from kto_np.cli import main

    assert main(["oracle", "check", f"{stand_ins}:good_dpo", "--kind", "dpo_loss", "--timeout", "5"]) == 0
    assert "PASSED" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["oracle", "check", f"{stand_ins}:good", "--timeout", "0"])
    assert "--timeout: expected a number in (0.0, inf)" in capsys.readouterr().err


def test_child_environment_finds_this_kto_np():
    assert os.path.isdir(os.path.join(runner._package_root(), "kto_np", "oracle"))
