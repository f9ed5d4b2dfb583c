"""The projects' own KTO code checked as it sits in its file, with one flag and no glue (ecosystems.py).

The stand-ins below are ours, written in each project's shape (the class and method names, the signature,
the attributes its code reads on self, what it returns), each a right KTO and a wrong one: the right one
passes, the wrong one fails with its mistake named, and code that cannot run here exits 2 with one line.
"""

import textwrap

import pytest

from kto_np import oracle
from kto_np.oracle.integrations import ecosystems
from kto_np.oracle.run import conventions

# TRL <= 1.5: KTOTrainer.kto_loss reads calculate_KL, loss_type, beta, the weights and the accelerator.
TRL = '''
import torch
import torch.nn.functional as F


class KTOTrainer:
    def __init__(self, model, args):
        raise RuntimeError("needs a model: the oracle builds a stand-in self")

    def kto_loss(self, policy_chosen_logps, policy_rejected_logps, policy_KL_logps, reference_chosen_logps,
                 reference_rejected_logps, reference_KL_logps):
        if self.calculate_KL:
            kl = (policy_KL_logps - reference_KL_logps).mean().detach()
            kl = self.accelerator.gather_for_metrics(kl).mean().clamp(min=0)
        else:
            kl = torch.zeros(1).to(policy_chosen_logps.device)
        if policy_chosen_logps.shape[0] != 0:
            chosen = policy_chosen_logps - reference_chosen_logps
            if self.loss_type == "kto":
                chosen_losses = 1 - F.sigmoid(self.beta * (chosen - kl))
            else:
                chosen_losses = 1 - F.sigmoid(self.beta * chosen)
            chosen_rewards = self.beta * chosen.detach()
        else:
            chosen_losses = chosen_rewards = torch.Tensor([]).to(self.accelerator.device)
        if policy_rejected_logps.shape[0] != 0:
            rejected = policy_rejected_logps - reference_rejected_logps
            if self.loss_type == "kto":
                rejected_losses = 1 - F.sigmoid(self.beta * (kl - rejected))
            else:
                rejected_losses = F.sigmoid(self.beta * rejected)
            rejected_rewards = self.beta * rejected.detach()
        else:
            rejected_losses = rejected_rewards = torch.Tensor([]).to(self.accelerator.device)
        losses = torch.cat((WEIGHT_D * chosen_losses, WEIGHT_U * rejected_losses), 0)
        return losses, chosen_rewards, rejected_rewards, kl
'''
TRL_RIGHT = TRL.replace("WEIGHT_D", "self.desirable_weight").replace("WEIGHT_U", "self.undesirable_weight")
TRL_WRONG = TRL.replace("WEIGHT_D", "1.0").replace("WEIGHT_U", "1.0")  # weights_ignored

# LLaMA-Factory: CustomKTOTrainer inherits TRL's kto_loss (its base here: a TRL-shaped KTOTrainer).
LLAMAFACTORY = TRL_RIGHT + '''

class CustomKTOTrainer(KTOTrainer):
    def __init__(self, model, ref_model, finetuning_args, processor, **kwargs):
        self.beta = finetuning_args.pref_beta
        raise RuntimeError("needs a model")
'''
LLAMAFACTORY_WRONG = LLAMAFACTORY.replace(".mean().detach()", ".mean()")  # z not detached

# HALOs train/trainers.py: KTOTrainer.loss(batch, token-level log-probs [n, T], *args) reads config.loss.*,
# config.humanline, policy_dtype and accelerator.reduce; returns 6 values, rewards as r (not beta r).
HALOS = '''
import torch
import torch.nn.functional as F


class BasicTrainer:
    def __init__(self, tokenizer, config, train_iterator, eval_iterator, accelerator, optimizer, scheduler,
                 policy, reference_model=None, **kwargs):
        raise RuntimeError("needs models, data and an accelerator")

    def get_sequence_rewards(self, policy_logps, reference_logps, length_normalized=False):
        assert not self.config.humanline
        token_rewards = policy_logps - reference_logps
        unclamped = torch.Tensor([1]).to(self.policy_dtype).to(self.accelerator.device)
        return token_rewards.sum(-1), unclamped


class UnpairedPreferenceTrainer(BasicTrainer):
    pass


class KTOTrainer(UnpairedPreferenceTrainer):
    def loss(self, batch, policy_chosen_logps, policy_rejected_logps, policy_KL_logps, reference_chosen_logps,
             reference_rejected_logps, reference_KL_logps, *args):
        empty = torch.Tensor([]).to(self.policy_dtype).to(self.accelerator.device)
        one = torch.Tensor([1]).to(self.policy_dtype).to(self.accelerator.device)
        chosen_rewards, chosen_unclamped = (self.get_sequence_rewards(policy_chosen_logps, reference_chosen_logps)
                                            if policy_chosen_logps.shape[0] != 0 else (empty, one))
        rejected_rewards, rejected_unclamped = (
            self.get_sequence_rewards(policy_rejected_logps, reference_rejected_logps)
            if policy_rejected_logps.shape[0] != 0 else (empty, one))
        KL_rewards, _ = self.get_sequence_rewards(policy_KL_logps.detach(), reference_KL_logps.detach())
        stats = self.accelerator.reduce(torch.Tensor([
            KL_rewards.sum(), (KL_rewards.abs() != 0).float().sum().item()]).to(self.accelerator.device),
            reduction="sum")
        KL = CLAMPED
        beta = self.config.loss.beta
        chosen_losses = (self.config.loss.desirable_weight * (1 - F.sigmoid(beta * (chosen_rewards - KL)))
                         if policy_chosen_logps.shape[0] != 0 else empty)
        rejected_losses = (self.config.loss.undesirable_weight * (1 - F.sigmoid(beta * (KL - rejected_rewards)))
                           if policy_rejected_logps.shape[0] != 0 else empty)
        losses = torch.cat((chosen_losses, rejected_losses), 0)
        return (losses, chosen_rewards.detach(), rejected_rewards.detach(), KL.detach(), chosen_unclamped,
                rejected_unclamped)
'''
HALOS_RIGHT = HALOS.replace("CLAMPED", "(stats[0] / stats[1].clamp(min=1)).clamp(min=0)")
HALOS_WRONG = HALOS.replace("CLAMPED", "stats[0] / stats[1].clamp(min=1)")  # z_not_clamped

# OpenRLHF <= 0.9.5 openrlhf/models/loss.py: KTOLoss all-reduces the KL over torch.distributed and returns the
# loss already averaged; VanillaKTOLoss takes no KL pairs and no weights.
OPENRLHF = '''
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class VanillaKTOLoss(nn.Module):
    def __init__(self, beta):
        super().__init__()
        self.beta = beta

    def forward(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        chosen_KL = (policy_chosen_logps - reference_chosen_logps).mean().clamp(min=0)
        rejected_KL = (policy_rejected_logps - reference_rejected_logps).mean().clamp(min=0)
        chosen = policy_chosen_logps - reference_chosen_logps
        rejected = policy_rejected_logps - reference_rejected_logps
        losses = torch.cat((1 - F.sigmoid(self.beta * (chosen - rejected_KL)),
                            1 - F.sigmoid(self.beta * (chosen_KL - rejected))), 0).mean()
        return losses, self.beta * chosen.detach(), self.beta * rejected.detach()


class KTOLoss(nn.Module):
    def __init__(self, beta, desirable_weight, undesirable_weight, world_size, device):
        super().__init__()
        self.beta, self.world_size, self.device = beta, world_size, device
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight

    def forward(self, policy_chosen_logps, policy_rejected_logps, policy_KL_logps, reference_chosen_logps,
                reference_rejected_logps, reference_KL_logps):
        KL = (policy_KL_logps - reference_KL_logps).mean().detach()
        dist.all_reduce(KL, op=dist.ReduceOp.SUM)
        KL = (KL / self.world_size).clamp(min=0)
        empty = torch.Tensor([]).to(policy_chosen_logps.dtype).to(self.device)
        chosen = policy_chosen_logps - reference_chosen_logps
        rejected = policy_rejected_logps - reference_rejected_logps
        chosen_losses = 1 - F.sigmoid(self.beta * (chosen - KL)) if chosen.shape[0] else empty
        rejected_losses = 1 - F.sigmoid(self.beta * (KL - rejected)) if rejected.shape[0] else empty
        losses = torch.cat((self.desirable_weight * chosen_losses, self.undesirable_weight * rejected_losses),
                           0).REDUCE()
        return losses, self.beta * chosen.detach(), self.beta * rejected.detach(), KL
'''
OPENRLHF_RIGHT = OPENRLHF.replace("REDUCE", "mean")
OPENRLHF_WRONG = OPENRLHF.replace("REDUCE", "sum")  # loss_summed

# EasyDeL easydel/trainers/kto_trainer/_fn.py: kto_objective in JAX, keyword hyper-parameters and loss_type,
# rewards per example over the whole batch.
EASYDEL = '''
import jax
from jax import numpy as jnp
from jax.nn import sigmoid


def kto_objective(policy_logps, reference_logps, labels, *, beta, desirable_weight, undesirable_weight, loss_type,
                  policy_kl_logps=None, reference_kl_logps=None):
    dtype = policy_logps.dtype
    chosen_mask = labels.astype(bool).astype(dtype)
    rejected_mask = (~labels.astype(bool)).astype(dtype)
    logratios = policy_logps - reference_logps
    if policy_kl_logps is not None and reference_kl_logps is not None:
        kl = jnp.maximum(jnp.mean(policy_kl_logps - reference_kl_logps), 0.0)
    else:
        kl = jnp.zeros((), dtype=dtype)
    kl = STOP(kl)
    if loss_type == "kto":
        chosen_losses = chosen_mask * (1.0 - sigmoid(beta * (logratios - kl)))
        rejected_losses = rejected_mask * (1.0 - sigmoid(beta * (kl - logratios)))
    else:
        chosen_losses = chosen_mask * (1.0 - sigmoid(beta * logratios))
        rejected_losses = rejected_mask * sigmoid(beta * logratios)
    total = jnp.maximum(chosen_mask.sum() + rejected_mask.sum(), 1.0)
    loss = (desirable_weight * chosen_losses.sum() + undesirable_weight * rejected_losses.sum()) / total
    return loss, beta * logratios * chosen_mask, beta * logratios * rejected_mask, kl
'''
EASYDEL_RIGHT = EASYDEL.replace("STOP", "jax.lax.stop_gradient")
EASYDEL_WRONG = EASYDEL.replace("STOP", "")  # z_not_detached

# Liger-Kernel LigerFusedLinearKTOLoss: hidden states, head weight, targets; no class weights. The right
# stand-in takes weights (as a weighted KTO must); the wrong one is Liger's shape as it is (weights_ignored).
LIGER = '''
import torch
import torch.nn.functional as F


class LigerFusedLinearKTOLoss(torch.nn.Module):
    def __init__(self, ignore_index=-100, beta=0.1, compiled=True, use_ref_model=False, average_log_prob=False,
                 chunk_size=1WEIGHTS):
        super().__init__()
        self.beta, self.use_ref_model, self.weights = beta, use_ref_model, WEIGHT_VALUES

    def forward(self, _input, lin_weight, target, bias=None, preference_labels=None, ref_input=None,
                ref_weight=None, ref_bias=None, kl=None):
        def logps(hidden, weight):
            logits = hidden @ weight.t()
            # (Liger's own takes logits.float(): float32 log-probs, which `kto-np oracle liger` shows)
            return F.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(-1)

        logratios = logps(_input, lin_weight) - logps(ref_input, ref_weight)
        sign = torch.where(preference_labels, 1, -1)
        z = 0.0 if kl is None else kl
        weight = torch.where(preference_labels, self.weights[0], self.weights[1])
        losses = weight * (1 - torch.sigmoid(self.beta * (logratios - z) * sign))
        rewards = self.beta * logratios
        chosen_sum = (rewards * preference_labels).sum()
        rejected_sum = (rewards * ~preference_labels).sum()
        zero = torch.zeros(())
        return losses.sum() / target.shape[0], (zero, zero, zero, zero, chosen_sum, rejected_sum)
'''
LIGER_RIGHT = LIGER.replace("WEIGHTS", ", desirable_weight=1.0, undesirable_weight=1.0").replace(
    "WEIGHT_VALUES", "(desirable_weight, undesirable_weight)")
LIGER_WRONG = LIGER.replace("WEIGHTS", "").replace("WEIGHT_VALUES", "(1.0, 1.0)")


def _write(folder, name, text):
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def check(capsys, spec, variant="kto", **kwargs):
    status = oracle.main_check(spec, "kto_loss", variant, **kwargs)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture()
def torch_needed():
    pytest.importorskip("torch", reason="torch not installed (pip install 'kto_np[torch]')")


# ---------------------------------------------------------------------------------------------------
# detection and the stand-in self (no torch needed)


def _form(tmp_path, text, attribute, name="code.py"):
    from kto_np.oracle.run.loader import resolve_spec

    target, owner = resolve_spec(f"{_write(tmp_path, name, text)}:{attribute}")
    return conventions.candidate_form(target, owner)


def test_each_projects_code_is_recognised_by_its_shape(tmp_path):
    no_torch = {"import torch\n": "", "import torch.distributed as dist\n": "", "import torch.nn as nn\n": "",
                "import torch.nn.functional as F\n": "", "(nn.Module)": "", "(torch.nn.Module)": "",
                "import jax\n": "", "from jax import numpy as jnp\n": "", "from jax.nn import sigmoid\n": ""}

    def plain(text):
        for old, new in no_torch.items():
            text = text.replace(old, new)
        return text

    found = {}
    for label, text, attribute in (("trl", TRL_RIGHT, "KTOTrainer.kto_loss"),
                                   ("llamafactory", LLAMAFACTORY, "CustomKTOTrainer.kto_loss"),
                                   ("halos", HALOS_RIGHT, "KTOTrainer.loss"),
                                   ("openrlhf", OPENRLHF_RIGHT, "KTOLoss"),
                                   ("openrlhf_vanilla", OPENRLHF_RIGHT, "VanillaKTOLoss"),
                                   ("easydel", EASYDEL_RIGHT, "kto_objective"),
                                   ("liger", LIGER_WRONG, "LigerFusedLinearKTOLoss")):
        form = _form(tmp_path, plain(text), attribute, name=f"{label}_code.py")
        found[label] = conventions.detect(form, "kto_loss").name
    assert found == {"trl": "trl", "llamafactory": "llamafactory", "halos": "halos", "openrlhf": "openrlhf",
                     "openrlhf_vanilla": "openrlhf", "easydel": "easydel", "liger": "liger"}


@pytest.mark.parametrize("label, text, attribute", [
    ("trl", TRL_RIGHT, "KTOTrainer.kto_loss"), ("llamafactory", LLAMAFACTORY, "CustomKTOTrainer.kto_loss"),
    ("halos", HALOS_RIGHT, "KTOTrainer.loss"), ("openrlhf", OPENRLHF_RIGHT, "KTOLoss"),
    ("easydel", EASYDEL_RIGHT, "kto_objective"), ("liger", LIGER_WRONG, "LigerFusedLinearKTOLoss")])
def test_the_file_alone_names_the_ecosystem_the_child_would_detect(tmp_path, label, text, attribute):
    """The parent picks a detected ecosystem's tolerance (float32 for HALOs and Liger) from the file, read
    with ast: nothing is imported (these files import torch or JAX, which this check does not need)."""
    path = tmp_path / f"{label}_code.py"
    path.write_text(text)
    assert ecosystems.detect_from_file(f"{path}:{attribute}").name == label
    assert ecosystems.detect_from_file(f"{path}:NoSuchName") is None
    assert ecosystems.detect_from_file("kto_np.losses:kto_loss") is None  # a module spec: not read


def test_an_undeclared_halos_file_is_checked_at_its_float32_tolerance(tmp_path, capsys, torch_needed):
    from kto_np import cli  # noqa: PLC0415

    spec = _write(tmp_path, "trainers.py", HALOS_RIGHT) + ":KTOTrainer.loss"
    assert cli.main(["oracle", "check", spec, "--kind", "kto_loss", "--variant", "kto"]) == 0
    assert "tolerance float32" in capsys.readouterr().out


def test_a_function_whose_first_parameter_is_self_is_a_method(tmp_path):
    text = "def kto_loss(self, policy_chosen_logps, policy_rejected_logps, policy_KL_logps, " \
           "reference_chosen_logps, reference_rejected_logps, reference_KL_logps):\n    return self.beta\n"
    form = _form(tmp_path, text, "kto_loss")
    assert form.form == "method" and form.owner is None and form.parameters[0] == "policy_chosen_logps"
    bound = conventions.instance_for(form, {"beta": 0.25})
    assert bound(*range(6)) == 0.25


def test_the_one_process_accelerator_gathers_and_reduces_to_its_argument():
    accelerator = ecosystems.OneProcessAccelerator("cpu")
    assert accelerator.gather_for_metrics(3.0) == 3.0 and accelerator.reduce(2.0, reduction="sum") == 2.0
    assert accelerator.num_processes == 1 and accelerator.device == "cpu"


def test_code_that_imports_what_is_not_installed_exits_2_with_one_line(tmp_path, capsys):
    spec = _write(tmp_path, "needs_more.py", "import a_library_that_is_not_installed\n\n"
                  "def kto_objective(policy_logps, reference_logps, labels, *, beta, desirable_weight, "
                  "undesirable_weight, loss_type):\n    pass\n") + ":kto_objective"
    status, out, err = check(capsys, spec)
    assert status == 2 and out == "" and err.count("\n") == 1, (out, err)
    assert "a_library_that_is_not_installed" in err and "not installed" in err


def test_an_ecosystem_whose_library_is_absent_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ecosystems, "library_missing", lambda library: True)
    spec = _write(tmp_path, "halos_like.py", HALOS_RIGHT.replace("import torch\n", "").replace(
        "import torch.nn.functional as F\n", "")) + ":KTOTrainer.loss"
    from kto_np.oracle.check import verify
    from kto_np.oracle.run.loader import LoadError

    with pytest.raises(LoadError, match="needs torch, which is not installed"):
        verify(spec, "kto_loss", "kto", convention="halos", isolate=False)


# ---------------------------------------------------------------------------------------------------
# each ecosystem: the right stand-in passes, the wrong one fails with its mistake named (torch / JAX)


RIGHT_AND_WRONG = {
    "trl": (TRL_RIGHT, TRL_WRONG, "KTOTrainer.kto_loss", "weights_ignored"),
    "llamafactory": (LLAMAFACTORY, LLAMAFACTORY_WRONG, "CustomKTOTrainer.kto_loss", "z_not_detached"),
    "halos": (HALOS_RIGHT, HALOS_WRONG, "KTOTrainer.loss", "z_not_clamped"),
    "openrlhf": (OPENRLHF_RIGHT, OPENRLHF_WRONG, "KTOLoss", "loss_summed"),
    "liger": (LIGER_RIGHT, LIGER_WRONG, "LigerFusedLinearKTOLoss", "weights_ignored"),
}


@pytest.mark.parametrize("name", sorted(RIGHT_AND_WRONG))
@pytest.mark.parametrize("flag", [True, False], ids=["flag", "detected"])
def test_right_passes_and_wrong_is_named(tmp_path, capsys, torch_needed, name, flag):
    right, wrong, attribute, mistake = RIGHT_AND_WRONG[name]
    tolerance = ecosystems.ECOSYSTEMS[name].tolerance  # float32 for HALOs' KL statistics and Liger's log_softmax
    options = {"convention": name} if flag else {}
    status, out, err = check(capsys, _write(tmp_path, "right.py", right) + ":" + attribute, tolerance=tolerance,
                             **options)
    assert status == 0, out + err
    assert f"{name} ecosystem" in out
    status, out, err = check(capsys, _write(tmp_path, "wrong.py", wrong) + ":" + attribute, tolerance=tolerance,
                             **options)
    assert status == 1, out + err
    assert f"matches known mistake {mistake}" in out or f"matches known mistakes {mistake}" in out, out


def test_trl_right_passes_apo_zero_unpaired(tmp_path, capsys, torch_needed):
    status, out, _ = check(capsys, _write(tmp_path, "trl.py", TRL_RIGHT) + ":KTOTrainer.kto_loss",
                           variant="apo_zero_unpaired")
    assert status == 0, out


def test_halos_conventions_are_reported_not_failed(tmp_path, capsys, torch_needed):
    status, out, _ = check(capsys, _write(tmp_path, "trainers.py", HALOS_RIGHT) + ":KTOTrainer.loss",
                           tolerance="float32", show_all=True)
    assert status == 0, out
    assert "convention (halos): HALOs returns rewards as r" in out
    assert "metrics/rewards/chosen" in out and "metrics/kl" in out  # rewards compared, as beta r
    assert "not verified" not in out  # no log-prob metrics returned: nothing there to verify


def test_openrlhf_runs_in_a_one_rank_group_and_says_its_loss_is_averaged(tmp_path, capsys, torch_needed):
    status, out, _ = check(capsys, _write(tmp_path, "loss.py", OPENRLHF_RIGHT) + ":KTOLoss")
    assert status == 0, out
    assert "one-rank gloo process group" in out
    assert "already averaged" in out
    assert "one pair of log-ratio 0" in out  # no KL pairs, given to code that requires them


def test_openrlhf_vanilla_loss_fails_with_its_form_named(tmp_path, capsys, torch_needed):
    status, out, _ = check(capsys, _write(tmp_path, "loss.py", OPENRLHF_RIGHT) + ":VanillaKTOLoss")
    assert status == 1, out
    assert "openrlhf ecosystem" in out and "raised" not in out.split("FAILED")[1].split("\n")[0][-12:]
    assert "z_from_other_class" in out or "weights_ignored" in out, out


def test_easydel_right_passes_and_wrong_is_named(tmp_path, capsys):
    pytest.importorskip("jax", reason="JAX not installed (pip install jax)")
    status, out, _ = check(capsys, _write(tmp_path, "_fn.py", EASYDEL_RIGHT) + ":kto_objective")
    assert status == 0, out
    assert "easydel ecosystem" in out and "convention (easydel)" in out
    status, out, _ = check(capsys, _write(tmp_path, "_fn_wrong.py", EASYDEL_WRONG) + ":kto_objective")
    assert status == 1, out
    assert "z_not_detached" in out, out


def test_torch_code_without_torch_exits_2(tmp_path, capsys):
    pytest.importorskip("numpy")
    if not ecosystems.library_missing("torch"):
        pytest.skip("torch is installed: this checks the machine without it")
    status, out, err = check(capsys, _write(tmp_path, "trainers.py", HALOS_RIGHT) + ":KTOTrainer.loss")
    assert status == 2 and out == "" and err.count("\n") == 1, (out, err)
    assert "'torch'" in err and "not installed" in err
