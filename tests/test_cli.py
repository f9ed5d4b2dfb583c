"""The kto-np command line: exit codes, messages, and a tiny demo end to end."""

import json
import subprocess
import sys

import pytest

from kto_np import cli, train

TINY = dict(hidden_size=16, num_layers=1, num_heads=2, sft_examples=64, num_examples=64, eval_prompts=32,
            eval_every=10, checkpoint_every=10, warmup_steps=2, num_digits=3, batch_size=16)


@pytest.fixture
def tiny_demo(monkeypatch):
    monkeypatch.setattr(train, "DEMO_PRESET", TINY)


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_tiny_demo_end_to_end(tmp_path, capsys, tiny_demo):
    out = tmp_path / "demo"
    code, stdout, _ = run_cli(capsys, "demo", "--steps", "6", "--sft-steps", "5", "--out", str(out), "--quiet")
    assert code == 0
    assert "desirable rate" in stdout and "reference" in stdout and "policy" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert {"desirable_rate_before", "desirable_rate_after"} <= set(summary)
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 6 and config["hidden_size"] == 16

    # the same folder again: refused (exit 2, one line), then allowed with --force, or resumed
    code, _, err = run_cli(capsys, "demo", "--steps", "6", "--sft-steps", "5", "--out", str(out), "--quiet")
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    assert run_cli(capsys, "demo", "--steps", "6", "--sft-steps", "5", "--out", str(out), "--quiet",
                   "--force")[0] == 0
    assert run_cli(capsys, "demo", "--out", str(out), "--quiet", "--resume")[0] == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--beta", "-1"], "--beta"),
        (["demo", "--beta", "nan"], "--beta"),
        (["demo", "--steps", "0"], "--steps"),
        (["demo", "--steps", "ten"], "--steps"),
        (["demo", "--variant", "ipo"], "--variant"),
        (["demo", "--desirable-fraction", "1.5"], "--desirable-fraction"),
        (["demo", "--undesirable-weight", "-0.5"], "--undesirable-weight"),
        (["demo", "--dtype", "float16"], "--dtype"),
        (["demo", "--no-such-option"], "unrecognized"),
        (["no-such-command"], "invalid choice"),
        ([], "required"),
        (["oracle"], "required"),
    ],
)
def test_bad_options_exit_2_with_a_one_line_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.strip().splitlines()[-1].startswith("kto-np")


def test_force_and_resume_together_is_a_usage_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "demo", "--force", "--resume", "--out", str(tmp_path / "x"))
    assert code == 2 and "--force and --resume" in err


def test_unwritable_out_is_a_usage_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli(capsys, "demo", "--out", str(blocker / "run"), "--quiet")
    assert code == 2 and "not writable" in err


def test_both_weights_zero_is_a_usage_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "demo", "--desirable-weight", "0", "--undesirable-weight", "0",
                           "--out", str(tmp_path / "x"))
    assert code == 2 and "both be 0" in err


def test_gradcheck_passes_and_prints_every_parameter(capsys):
    code, out, _ = run_cli(capsys, "gradcheck")
    assert code == 0
    for name in ("compute_logprobs", "kto_loss[edifice]", "kto_loss[kto, KL pairs]", "dpo_loss",
                 "wte.weight", "h.1.mlp.c_proj.weight", "ln_f.bias"):
        assert name in out, name
    assert "FAIL" not in out


def test_figures_command(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "figures", "--out", str(tmp_path))
    assert code == 0
    assert (tmp_path / "kto_vs_dpo.png").is_file() and "training_curves.png needs a run" in out
    code, _, err = run_cli(capsys, "figures", "--out", str(tmp_path), "--run", str(tmp_path / "none"))
    assert code == 2 and "metrics.jsonl" in err


def test_oracle_check_exit_status(tmp_path, capsys):
    good = tmp_path / "good_kto.py"
    good.write_text(
        "import numpy as np\n"
        "from kto_np import kto_loss_and_grad\n"
        "def loss(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,\n"
        "         kl_policy_logps=None, kl_ref_logps=None):\n"
        "    value, grad, _ = kto_loss_and_grad(policy_logps, ref_logps, labels, beta, desirable_weight,\n"
        "        undesirable_weight, variant='kto', kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps,\n"
        "        warn_balance=False)\n"
        "    return value, grad\n"
        "def wrong(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,\n"
        "          kl_policy_logps=None, kl_ref_logps=None):\n"
        "    value, grad = loss(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,\n"
        "                       kl_policy_logps, kl_ref_logps)\n"
        "    return value * 1.01, grad\n"
    )
    assert run_cli(capsys, "oracle", "check", f"{good}:loss", "--kind", "kto_loss", "--variant", "kto")[0] == 0
    code, out, _ = run_cli(capsys, "oracle", "check", f"{good}:wrong", "--variant", "kto")
    assert code == 1 and "FAIL" in out
    assert run_cli(capsys, "oracle", "check", f"{good}:missing")[0] == 2
    assert run_cli(capsys, "oracle", "export", str(tmp_path / "cases"))[0] == 0
    assert (tmp_path / "cases" / "manifest.json").is_file()


def test_console_entry_point_and_version():
    result = subprocess.run([sys.executable, "-m", "kto_np", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("kto-np ")


def test_a_closed_pipe_ends_quietly():
    with subprocess.Popen([sys.executable, "-m", "kto_np", "gradcheck"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as reader:
        reader.stdout.readline()
        reader.stdout.close()  # like `kto-np gradcheck | head -1`
        stderr = reader.stderr.read()
        reader.wait(timeout=120)
    assert reader.returncode in (0, 141)
    assert b"Traceback" not in stderr
