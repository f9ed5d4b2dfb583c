"""Signatures detected, not demanded: the kto_np and split conventions as functions, classes and methods;
return forms; honest verdicts (mistakes not verified, float32 intermediates); the loader."""

import numpy as np
import pytest

from kto_np import oracle

STAND_INS = '''
import numpy as np
from helper_of_stand_ins import sigmoid   # a neighbour module: the file's folder is on sys.path


def _kto_losses(policy_chosen_logps, policy_rejected_logps, policy_KL_logps, reference_chosen_logps,
                reference_rejected_logps, reference_KL_logps, beta, desirable_weight, undesirable_weight):
    kl = max(0.0, float(np.mean(policy_KL_logps - reference_KL_logps)))
    chosen = policy_chosen_logps - reference_chosen_logps
    rejected = policy_rejected_logps - reference_rejected_logps
    losses = np.concatenate([desirable_weight * (1 - sigmoid(beta * (chosen - kl))),
                             undesirable_weight * (1 - sigmoid(beta * (kl - rejected)))])
    return losses, beta * chosen, beta * rejected, kl


def split_function(policy_chosen_logps, policy_rejected_logps, policy_KL_logps, reference_chosen_logps,
                   reference_rejected_logps, reference_KL_logps, beta, desirable_weight, undesirable_weight):
    return _kto_losses(policy_chosen_logps, policy_rejected_logps, policy_KL_logps, reference_chosen_logps,
                       reference_rejected_logps, reference_KL_logps, beta, desirable_weight, undesirable_weight)


class SplitLoss:
    def __init__(self, beta, desirable_weight=1.0, undesirable_weight=1.0, world_size=None):
        assert world_size == 1
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight

    def __call__(self, policy_chosen_logps, policy_rejected_logps, policy_KL_logps, reference_chosen_logps,
                 reference_rejected_logps, reference_KL_logps):
        return _kto_losses(policy_chosen_logps, policy_rejected_logps, policy_KL_logps, reference_chosen_logps,
                           reference_rejected_logps, reference_KL_logps, self.beta, self.desirable_weight,
                           self.undesirable_weight)


class Trainer:
    def __init__(self):
        raise RuntimeError("a trainer needs a model, a dataset, ...: the oracle uses a bare instance")

    def kto_loss(self, policy_chosen_logps, policy_rejected_logps, policy_KL_logps, reference_chosen_logps,
                 reference_rejected_logps, reference_KL_logps):
        import torch
        kl = (policy_KL_logps - reference_KL_logps).mean().clamp(min=0)   # not detached
        chosen = policy_chosen_logps - reference_chosen_logps
        rejected = policy_rejected_logps - reference_rejected_logps
        losses = torch.cat([self.desirable_weight * (1 - torch.sigmoid(self.beta * (chosen - kl))),
                            self.undesirable_weight * (1 - torch.sigmoid(self.beta * (kl - rejected)))])
        return losses, self.beta * chosen.detach(), self.beta * rejected.detach(), kl.detach()


class KtoNpLoss:
    def __init__(self, beta, desirable_weight, undesirable_weight):
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight

    def __call__(self, policy_logps, ref_logps, labels, kl_policy_logps=None, kl_ref_logps=None):
        return per_example(policy_logps, ref_logps, labels, self.beta, self.desirable_weight,
                           self.undesirable_weight, kl_policy_logps, kl_ref_logps).mean()


def per_example(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                kl_policy_logps=None, kl_ref_logps=None):
    z = 0.0 if kl_policy_logps is None else max(0.0, float(np.mean(kl_policy_logps - kl_ref_logps)))
    r = policy_logps - ref_logps
    return np.where(labels, desirable_weight * (1 - sigmoid(beta * (r - z))),
                    undesirable_weight * (1 - sigmoid(beta * (z - r))))


def kwargs_split(**kwargs):
    return split_function(**kwargs)


def unknown_signature(a, b, c):
    return 0.0


def raises_inside(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                  kl_policy_logps=None, kl_ref_logps=None):
    return _helper()


def _helper():
    raise ZeroDivisionError("boom")
'''


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    folder = tmp_path_factory.mktemp("conventions")
    (folder / "helper_of_stand_ins.py").write_text(
        "import numpy as np\n\ndef sigmoid(x):\n    return np.exp(-np.logaddexp(0.0, -x))\n")
    (folder / "stand_ins_conventions.py").write_text(STAND_INS)
    return lambda name: f"{folder / 'stand_ins_conventions.py'}:{name}"


def check(capsys, *args, **kwargs):
    status = oracle.main_check(*args, **kwargs)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("name,how", [
    ("split_function", "split convention, a function"),
    ("SplitLoss", "split convention, a class"),
    ("KtoNpLoss", "kto_np convention, a class"),
    ("per_example", None),
])
def test_each_convention_and_form_passes(spec, capsys, name, how):
    status, out, _ = check(capsys, spec(name), "kto_loss", "kto", show_all=True)
    assert status == 0, out
    if how:
        assert how in out
    if name == "per_example":
        assert "per-example loss vector [n]: its mean was taken as the loss" in out
    if name.startswith("Split") or name.startswith("split"):
        assert "metrics/rewards/chosen" in out and "metrics/kl" in out  # the 4-tuple's rewards and kl compared


def test_a_method_on_a_bare_instance_is_called_and_its_mistake_named(spec, capsys):
    pytest.importorskip("torch", reason="torch not installed (pip install 'kto_np[torch]')")
    status, out, _ = check(capsys, spec("Trainer.kto_loss"), "kto_loss", "kto", show_all=True)
    assert status == 1, out
    assert "split convention, a method" in out
    assert "matches known mistake z_not_detached" in out


def test_a_signature_that_fits_nothing_is_one_line_and_exit_2(spec, capsys):
    status, out, err = check(capsys, spec("unknown_signature"), "kto_loss", "kto")
    assert status == 2 and out == "" and err.count("\n") == 1
    assert "has the parameters (a, b, c)" in err
    assert "kto_np (policy_logps, ref_logps, labels)" in err and "split (policy_chosen_logps" in err


def test_convention_can_be_forced(spec, capsys):
    status, out, _ = check(capsys, spec("kwargs_split"), "kto_loss", "kto")
    assert status == 1  # **kwargs: called as kto_np, and it is not
    status, out, _ = check(capsys, spec("kwargs_split"), "kto_loss", "kto", convention="split")
    assert status == 0, out
    with pytest.raises(oracle.LoadError, match="convention must be one of"):
        oracle.verify(spec("kwargs_split"), "kto_loss", "kto", convention="nonsense", isolate=False)
    with pytest.raises(oracle.LoadError, match="applies to kinds"):
        oracle.verify(spec("kwargs_split"), "dpo_loss", convention="split", isolate=False)


def test_error_locations_point_into_the_candidate(spec):
    report = oracle.verify(spec("raises_inside"), "kto_loss", "kto")
    message = next(iter(report.errors.values()))
    assert "ZeroDivisionError: boom (at stand_ins_conventions.py:" in message


def np_sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -x))


def loss_only(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, kl_policy_logps=None,
              kl_ref_logps=None, dtype=np.float64):
    """A loss-only NumPy KTO: z is not detached (NumPy has no graph), which no loss value can show."""
    policy_logps, ref_logps = policy_logps.astype(dtype), ref_logps.astype(dtype)
    z = 0.0 if kl_policy_logps is None else max(0.0, float(np.mean(kl_policy_logps - kl_ref_logps)))
    r = policy_logps - ref_logps
    losses = np.where(labels, desirable_weight * (1 - np_sigmoid(beta * (r - z))),
                      undesirable_weight * (1 - np_sigmoid(beta * (z - r))))
    return losses.astype(dtype).mean()


def test_checks_that_could_not_run_are_named_not_verified():
    report = oracle.verify(loss_only, "kto_loss", "kto")
    assert report.passed
    assert report.not_verified == ("z_not_detached",)
    text = str(report)
    assert "all checks passed" not in text
    assert "not verified: z_not_detached" in text


def test_float32_intermediates_are_named_with_the_flag_to_rerun_with():
    def float32_inside(**kwargs):
        return loss_only(**kwargs, dtype=np.float32)

    report = oracle.verify(float32_inside, "kto_loss", "kto")
    assert not report.passed
    assert "within float32 tolerance" in report.diagnosis.message
    assert "--tolerance float32" in report.diagnosis.message
    relaxed = oracle.verify(float32_inside, "kto_loss", "kto", tolerance="float32")
    assert relaxed.passed, relaxed
    assert {c.source for c in relaxed.checks if c.quantity == "grad/policy_logps"} == {"finite differences"}


def test_float32_torch_intermediate_is_diagnosed():
    torch = pytest.importorskip("torch", reason="torch not installed (pip install 'kto_np[torch]')")

    def float32_head(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                     kl_policy_logps=None, kl_ref_logps=None):
        r = (policy_logps.float() - ref_logps.float()).double()  # a float32 intermediate in float64 code
        z = torch.zeros((), dtype=r.dtype)
        if kl_policy_logps is not None:
            z = (kl_policy_logps - kl_ref_logps).mean().clamp(min=0).detach()
        losses = torch.where(labels, desirable_weight * (1 - torch.sigmoid(beta * (r - z))),
                             undesirable_weight * (1 - torch.sigmoid(beta * (z - r))))
        return losses.mean()

    report = oracle.verify(float32_head, "kto_loss", "kto")
    assert not report.passed and "intermediate is computed in float32" in report.diagnosis.message
