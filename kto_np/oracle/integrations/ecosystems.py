"""The projects' own KTO code, as it sits in their source files, checked with one flag and no glue.

`kto-np oracle check path/file.py:Class.method --ecosystem NAME` (or NAME detected from the code's shape):
the oracle builds what the project's code reads around its loss -- a stand-in `self` (beta, the weights,
loss_type, calculate_KL, config.loss.*, policy_dtype, an accelerator of one process with gather_for_metrics /
reduce / device), the class constructed with the arguments it asks for, a one-rank torch.distributed group
where the code's module calls torch.distributed, the log-probs split by class (and token-level where the
project's loss takes tokens) -- calls it on every case and reads what it returns back into the kto_np
quantities. Each ecosystem's documented conventions (rewards as r, an already-averaged loss, metrics it does
not return) are converted where they are conversions and reported as notes, never as mistakes.

  trl           TRL <= 1.5 KTOTrainer.kto_loss (self: calculate_KL, loss_type, beta, weights, accelerator)
  llamafactory  LLaMA-Factory's CustomKTOTrainer.kto_loss (TRL's method on its trainer): as trl
  halos         HALOs' train/trainers.py KTOTrainer.loss(batch, token-level log-probs): config.loss.*,
                policy_dtype, accelerator.reduce; rewards returned as r = log pi/pi_ref (not beta r)
  openrlhf      OpenRLHF <= 0.9.5 openrlhf/models/loss.py KTOLoss (torch.distributed all_reduce of the KL)
                and VanillaKTOLoss (no KL pairs, no weights); the loss returned already averaged
  easydel       EasyDeL's kto_objective (JAX; loss_type, policy_kl_logps; rewards per example over the batch)
  liger         a class with Liger-Kernel's LigerFusedLinearKTOLoss forward (hidden states, head weight,
                targets, preference labels, reference hidden states, kl): see liger.py (`kto-np oracle liger`)

Every ecosystem is registered as a calling convention (conventions.CONVENTIONS) of kind kto_loss, so
verify(spec, convention="halos") and `--ecosystem halos` are the same thing. Where the code cannot be run
here (torch or JAX not installed) loading fails with one line (exit status 2), never a failed check.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import inspect
import sys
import types
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from ..run.conventions import (
    CONVENTIONS,
    SPLIT_PARAMETERS,
    CandidateForm,
    Convention,
    ConventionError,
    instance_for,
)

SPLIT_NO_KL = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")
EASYDEL_PARAMETERS = ("policy_logps", "reference_logps", "labels", "loss_type")
LIGER_PARAMETERS = ("_input", "lin_weight", "target", "preference_labels", "ref_input", "ref_weight", "kl")
HALOS_TOKENS = 3  # the token-level log-probs HALOs' loss takes: [x/2, x/2, 0] per sequence (a padded token)


class Ecosystem(NamedTuple):
    name: str
    takes: str  # what code it is for
    library: str  # "torch" or "jax": the array library the code needs
    conventions: tuple[str, ...]  # documented conventions, reported as notes
    tolerance: str  # "float32" where the project's code computes in float32 whatever its inputs
    detect: Callable  # (form: CandidateForm, source: str) -> bool
    adapt: Callable  # (form, ecosystem) -> a kto_np-convention callable


# ---------------------------------------------------------------------------------------------------
# what the projects' code reads around its loss


class OneProcessAccelerator:
    """What a trainer reads of accelerate's Accelerator, for one process (rank 0 of 1): gathers and reduces
    return their argument."""

    num_processes = 1
    process_index = 0
    local_process_index = 0
    is_main_process = True
    is_local_main_process = True

    def __init__(self, device):
        self.device = device

    def gather_for_metrics(self, value, *args, **kwargs):
        return value

    def gather(self, value):
        return value

    def reduce(self, value, reduction: str = "sum", scale: float = 1.0):
        return value * scale if scale != 1.0 else value

    def autocast(self, *args, **kwargs):
        return contextlib.nullcontext()

    def unwrap_model(self, model, *args, **kwargs):
        return model


def stand_in_attributes(beta: float, desirable_weight: float, undesirable_weight: float, variant: str,
                        has_kl: bool) -> dict:
    """The attributes the projects' loss methods read on `self`, for one case (torch imported)."""
    import torch  # noqa: PLC0415

    device = torch.device("cpu")
    hyper = {"beta": beta, "desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight}
    loss = types.SimpleNamespace(name="kto", **hyper)
    return {
        **hyper,
        "loss_type": variant,  # TRL: "kto" or "apo_zero_unpaired"
        "calculate_KL": has_kl,  # TRL: False declares the KL pairs absent (z = 0)
        "world_size": 1,
        "device": device,
        "accelerator": OneProcessAccelerator(device),
        "policy_dtype": torch.float64,  # HALOs casts empty tensors to it
        "config": types.SimpleNamespace(loss=loss, humanline=False, model=types.SimpleNamespace(
            policy_dtype="float64")),  # HALOs: config.loss.*, config.humanline
        "args": types.SimpleNamespace(loss_type=variant, **hyper),  # TRL's KTOConfig
        "finetuning_args": types.SimpleNamespace(pref_beta=beta, kto_chosen_weight=desirable_weight,
                                                 kto_rejected_weight=undesirable_weight, pref_ftx=0.0,
                                                 pref_loss=variant),  # LLaMA-Factory
        "reference_free": False,
        "ftx_gamma": 0.0,
    }


def one_rank_group(notes: list) -> None:
    """A torch.distributed process group of one rank (gloo, in this process) unless one is up already."""
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_available() or dist.is_initialized():
        return
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    notes.append("the code calls torch.distributed: it ran in a one-rank gloo process group")


def _module_source(form: CandidateForm) -> str:
    target = form.owner or form.target
    module = sys.modules.get(getattr(target, "__module__", "") or "")
    try:
        return inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        return ""


def _class_name(form: CandidateForm) -> str:
    if form.form == "class":
        return form.target.__name__
    return getattr(form.owner, "__name__", "")


def library_missing(library: str) -> bool:
    return importlib.util.find_spec(library) is None


# ---------------------------------------------------------------------------------------------------
# reading what the code returns


def _mean(value):
    """The mean of a per-example tensor or array; None when empty (a class absent)."""
    if value is None:
        return None
    if hasattr(value, "numel"):
        return None if value.numel() == 0 else value.double().mean()
    arr = np.asarray(value, dtype=np.float64)
    return None if arr.size == 0 else arr.mean()


def _scalar(value):
    if value is None:
        return None
    if hasattr(value, "numel") and value.numel() == 1:
        return value.reshape(())
    return value


def _read_split(out, beta: float, ecosystem: Ecosystem, notes: list, rewards_are_r: bool = False) -> dict:
    """(losses, chosen_rewards, rejected_rewards[, kl, ...]) -> the kto_np quantities."""
    if not isinstance(out, (tuple, list)):
        out = (out,)
    losses = out[0]
    if getattr(losses, "ndim", 1) == 0:
        _note(notes, f"{ecosystem.name}: the loss is returned already averaged over the batch (a convention: "
                     "compared as the loss)")
        loss = losses
    else:
        loss = losses.mean() if hasattr(losses, "mean") else _mean(losses)
    result = {"loss": loss}
    if len(out) >= 3:
        chosen, rejected = _mean(out[1]), _mean(out[2])
        if rewards_are_r:
            chosen = None if chosen is None else beta * chosen
            rejected = None if rejected is None else beta * rejected
        result.update({"rewards/chosen": chosen, "rewards/rejected": rejected})
    if len(out) >= 4 and out[3] is not None:
        result["kl"] = _scalar(out[3])
    return result


def _note(notes: list, text: str) -> None:
    if text not in notes:
        notes.append(text)


# ---------------------------------------------------------------------------------------------------
# the adapters: each returns a callable in the kto_np kto_loss convention that also takes `variant`


def _oracle_callable(call: Callable, library: str, notes: list) -> Callable:
    call.takes_variant = True  # candidates.evaluate passes the case's variant
    call.array_library = library  # ... and calls it with this library's arrays only
    call.oracle_notes = notes  # ... and drains these notes into the report after each call
    return call


def _split_adapter(form: CandidateForm, ecosystem: Ecosystem, *, no_kl: str, token_level: bool = False,
                   rewards_are_r: bool = False, with_batch: bool = False) -> Callable:
    """The split call (policy_chosen_logps, ..., reference_KL_logps) on a stand-in self or a constructed class.

    no_kl: how the cases without KL pairs are given to code whose KL arguments have no default:
    "declared" (calculate_KL = False and None, as TRL's trainer does), "zero_length" (tensors of zero
    examples, as HALOs' loss handles) or "zero_pair" (one pair of log-ratio 0: z_ref = max(0, 0) = 0)."""
    notes: list = []
    uses_distributed = "torch.distributed" in _module_source(form) or "dist." in _module_source(form)
    names = set(form.parameters)
    takes_kl = {"policy_KL_logps", "reference_KL_logps"} <= names

    def call(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, kl_policy_logps=None,
             kl_ref_logps=None, *, variant="kto"):
        import torch  # noqa: PLC0415

        if uses_distributed:
            one_rank_group(notes)
        labels = torch.as_tensor(np.asarray(labels, dtype=bool))
        has_kl = kl_policy_logps is not None and variant == "kto"
        if not has_kl and variant == "kto" and takes_kl:
            if no_kl == "zero_pair":
                kl_policy_logps, kl_ref_logps = policy_logps.new_zeros(1), ref_logps.new_zeros(1)
                _note(notes, f"{ecosystem.name}: the code takes KL log-probs without a default: the cases without "
                             "KL pairs give it one pair of log-ratio 0 (z_ref = max(0, 0) = 0, as without pairs)")
            elif no_kl == "zero_length":
                kl_policy_logps, kl_ref_logps = policy_logps.new_zeros(0), ref_logps.new_zeros(0)
        attributes = stand_in_attributes(beta, desirable_weight, undesirable_weight, variant, has_kl)
        function = instance_for(form, attributes)

        def shaped(x):
            if x is None or not token_level:
                return x
            half = x / 2
            return torch.stack([half, half, torch.zeros_like(x)], dim=-1)  # sums to x exactly

        values = [policy_logps[labels], policy_logps[~labels], kl_policy_logps, ref_logps[labels],
                  ref_logps[~labels], kl_ref_logps]
        arguments = dict(zip(SPLIT_PARAMETERS, (shaped(v) for v in values)))
        if not takes_kl:
            arguments = {k: v for k, v in arguments.items() if k in SPLIT_NO_KL}
        args = [{}] if with_batch else []  # HALOs' first argument: the batch, which its loss does not read
        out = function(*args, **arguments)
        return _read_split(out, beta, ecosystem, notes, rewards_are_r=rewards_are_r)

    return _oracle_callable(call, "torch", notes)


def _adapt_trl(form, ecosystem):
    return _split_adapter(form, ecosystem, no_kl="declared")


def _adapt_halos(form, ecosystem):
    return _split_adapter(form, ecosystem, no_kl="zero_length", token_level=True, rewards_are_r=True,
                          with_batch=True)


def _adapt_openrlhf(form, ecosystem):
    return _split_adapter(form, ecosystem, no_kl="zero_pair")


def _adapt_easydel(form, ecosystem):
    import jax  # noqa: PLC0415

    notes: list = []
    if not jax.config.read("jax_enable_x64"):
        jax.config.update("jax_enable_x64", True)
        notes.append("easydel: JAX 64-bit mode turned on for the check (the code is checked at float64)")

    def call(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, kl_policy_logps=None,
             kl_ref_logps=None, *, variant="kto"):
        import jax.numpy as jnp  # noqa: PLC0415

        labels = np.asarray(labels, dtype=bool)
        kwargs = {"beta": beta, "desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight,
                  "loss_type": variant}
        if kl_policy_logps is not None:
            kwargs.update(policy_kl_logps=jnp.asarray(kl_policy_logps), reference_kl_logps=jnp.asarray(kl_ref_logps))
        out = form.target(jnp.asarray(policy_logps), jnp.asarray(ref_logps), jnp.asarray(labels), **kwargs)
        if not isinstance(out, (tuple, list)) or len(out) < 3:
            return {"loss": out}
        result = {"loss": out[0]}
        for name, rewards, mask in (("chosen", out[1], labels), ("rejected", out[2], ~labels)):
            result[f"rewards/{name}"] = jnp.sum(rewards) / mask.sum() if mask.any() else None
        _note(notes, "easydel: rewards are returned per example over the whole batch, zero outside their class "
                     "(a convention: compared as class means)")
        if len(out) >= 4:
            result["kl"] = out[3]
        return result

    return _oracle_callable(call, "jax", notes)


def _logit_of(logps):
    """a with log sigmoid(a) = logps (logps < 0), differentiable in torch."""
    import torch  # noqa: PLC0415

    return logps - torch.log(-torch.expm1(logps))


def liger_call(loss_class, policy_logps, ref_logps, labels, beta, kl_policy_logps, kl_ref_logps, notes: list,
               weights: tuple[float, float] = (1.0, 1.0)) -> dict:
    """Run a class with Liger's LigerFusedLinearKTOLoss interface on one case's log-probs (torch float64
    tensors); returns the kto_np quantities (loss, rewards/chosen, rewards/rejected). The class weights go
    to the constructor where it takes desirable_weight / undesirable_weight (Liger's own takes none)."""
    import torch  # noqa: PLC0415

    labels = torch.as_tensor(np.asarray(labels, dtype=bool))
    n = policy_logps.shape[0]
    weight = torch.tensor([[1.0], [0.0]], dtype=policy_logps.dtype)
    hidden = _logit_of(policy_logps).reshape(n, 1, 1)
    ref_hidden = _logit_of(ref_logps).reshape(n, 1, 1)
    target = torch.zeros((n, 1), dtype=torch.long)
    kl = None
    if kl_policy_logps is not None:
        kl = (kl_policy_logps - kl_ref_logps).mean().clamp(min=0).detach()
    settings = {"beta": beta, "use_ref_model": True, "compiled": False}
    accepted = inspect.signature(loss_class.__init__).parameters
    settings.update({k: w for k, w in zip(("desirable_weight", "undesirable_weight"), weights) if k in accepted})
    loss_module = loss_class(**settings)
    out = loss_module(hidden, weight, target, None, labels, ref_hidden, weight, None, kl)
    loss, aux = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, ())
    result = {"loss": loss}
    if isinstance(aux, (tuple, list)) and len(aux) >= 6:  # (logps sums, logits sums, chosen / rejected reward sums)
        count_chosen, count_rejected = int(labels.sum()), int((~labels).sum())
        result["rewards/chosen"] = aux[4] / count_chosen if count_chosen else None
        result["rewards/rejected"] = aux[5] / count_rejected if count_rejected else None
        message = "liger: reward sums per class returned: compared as class means"
        if message not in notes:
            notes.append(message)
    return result


def _adapt_liger(form, ecosystem):
    notes: list = []

    def call(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, kl_policy_logps=None,
             kl_ref_logps=None, *, variant="kto"):
        return liger_call(form.target, policy_logps, ref_logps, labels, beta, kl_policy_logps, kl_ref_logps, notes,
                          (desirable_weight, undesirable_weight))

    return _oracle_callable(call, "torch", notes)


# ---------------------------------------------------------------------------------------------------
# recognising the projects' code by its shape


def _is_split_method(form) -> bool:
    return form.form == "method" and tuple(form.parameters[:6]) == SPLIT_PARAMETERS


def _detect_halos(form, source) -> bool:
    return (form.form == "method" and len(form.parameters) >= 7 and form.parameters[0] == "batch"
            and tuple(form.parameters[1:7]) == SPLIT_PARAMETERS)


def _detect_llamafactory(form, source) -> bool:
    return _is_split_method(form) and (_class_name(form) == "CustomKTOTrainer" or "llamafactory" in source)


def _detect_trl(form, source) -> bool:
    return _is_split_method(form) and (_class_name(form) == "KTOTrainer" or "calculate_KL" in source)


def _detect_openrlhf(form, source) -> bool:
    return form.form == "class" and tuple(form.parameters) in (SPLIT_PARAMETERS, SPLIT_NO_KL) and (
        _class_name(form) in ("KTOLoss", "VanillaKTOLoss") or "all_reduce" in source)


def _detect_easydel(form, source) -> bool:
    return form.form == "function" and set(EASYDEL_PARAMETERS) <= set(form.parameters)


def _detect_liger(form, source) -> bool:
    return form.form == "class" and set(LIGER_PARAMETERS) <= set(form.parameters)


ECOSYSTEMS = {e.name: e for e in (
    Ecosystem("halos", "HALOs train/trainers.py KTOTrainer.loss (token-level log-probs)", "torch",
              ("HALOs returns rewards as r = log pi/pi_ref, not beta r: compared as beta r",
               "HALOs returns per-example losses, chosen first: their mean is the loss",
               "HALOs returns no log-prob metrics: none compared",
               "HALOs builds its KL statistics with torch.Tensor([...]), in float32: --ecosystem halos checks at "
               "float32 tolerance"),
              "float32",  # its KL statistics go through torch.Tensor([...]): float32
              _detect_halos, _adapt_halos),
    Ecosystem("llamafactory", "LLaMA-Factory CustomKTOTrainer.kto_loss (TRL's method on its trainer)", "torch",
              ("per-example losses, chosen first: their mean is the loss", "no log-prob metrics returned"),
              "float64", _detect_llamafactory, _adapt_trl),
    Ecosystem("trl", "TRL <= 1.5 KTOTrainer.kto_loss", "torch",
              ("per-example losses, chosen first: their mean is the loss",
               "no KL pairs is calculate_KL = False (TRL's own switch)", "no log-prob metrics returned"),
              "float64", _detect_trl, _adapt_trl),
    Ecosystem("openrlhf", "OpenRLHF <= 0.9.5 openrlhf/models/loss.py KTOLoss, VanillaKTOLoss", "torch",
              ("OpenRLHF's KTOLoss returns the loss averaged over the batch (per-example losses are averaged "
               "before the comparison)", "no log-prob metrics returned"),
              "float64", _detect_openrlhf, _adapt_openrlhf),
    Ecosystem("easydel", "EasyDeL kto_objective (JAX)", "jax",
              ("EasyDeL returns rewards per example over the batch, zero outside their class: compared as "
               "class means", "no log-prob metrics returned"),
              "float64", _detect_easydel, _adapt_easydel),
    Ecosystem("liger", "Liger-Kernel LigerFusedLinearKTOLoss (hidden states and head weight)", "torch",
              ("Liger returns reward sums per class: compared as class means", "no KL metric returned"),
              "float32",  # log_softmax of logits.float()
              _detect_liger, _adapt_liger),
)}


def detect_ecosystem(form: CandidateForm) -> Ecosystem | None:
    source = _module_source(form)
    for ecosystem in ECOSYSTEMS.values():
        if ecosystem.detect(form, source):
            return ecosystem
    return None


def _convention_adapter(ecosystem: Ecosystem):
    def adapt(form: CandidateForm, kind: str) -> Callable:
        if kind != "kto_loss":
            raise ConventionError(f"--ecosystem {ecosystem.name} checks the loss (kind kto_loss), not {kind!r}")
        if library_missing(ecosystem.library):
            raise ConventionError(f"cannot run {form.label}: {ecosystem.name}'s code needs {ecosystem.library}, "
                                  f"which is not installed (pip install {ecosystem.library})")
        call = ecosystem.adapt(form, ecosystem)
        call.oracle_notes.extend(f"convention ({ecosystem.name}): {c}" for c in ecosystem.conventions)
        return call
    return adapt


def _convention_detector(ecosystem: Ecosystem):
    def detect(form: CandidateForm) -> bool:
        return ecosystem.detect(form, _module_source(form))
    return detect


for _ecosystem in ECOSYSTEMS.values():
    CONVENTIONS[_ecosystem.name] = Convention(_ecosystem.name, ("kto_loss",), (), _convention_adapter(_ecosystem),
                                              _convention_detector(_ecosystem), _ecosystem.takes)


# ---------------------------------------------------------------------------------------------------
# detection from the file alone (the parent process never imports a candidate)


def _named(name: str):
    """A stand-in for a class or function found in the source: the detectors read only its __name__."""
    return types.SimpleNamespace(__name__=name)


def detect_from_file(spec: str) -> Ecosystem | None:
    """The ecosystem a `path/file.py:Name` or `path/file.py:Class.method` spec's code has the shape of, read
    with ast from the file (nothing is imported or run): what the child process would detect, so that the
    parent can choose the ecosystem's tolerance before it starts. None for anything else (a module spec, a
    file that does not parse, a name not found)."""
    path, _, name = spec.rpartition(":")
    if not path.endswith(".py") or not name:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        tree = ast.parse(source)
    except (OSError, SyntaxError, ValueError):
        return None
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}

    def lookup(scope_class, part, seen=()):
        """`part` in a class body, or in the bodies of its bases defined in the same file (inherited)."""
        found = next((n for n in scope_class.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                      and n.name == part), None)
        for base in scope_class.bases if found is None else ():
            if isinstance(base, ast.Name) and base.id in classes and base.id not in seen:
                found = found or lookup(classes[base.id], part, (*seen, scope_class.name))
        return found

    parts = name.split(".")
    owner = None
    node = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == parts[0]),
                None)
    for part in parts[1:]:
        if not isinstance(node, ast.ClassDef):
            return None
        owner, node = node, lookup(node, part)
    if node is None:
        return None
    if isinstance(node, ast.ClassDef):
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "forward"), None)
        if init is None:
            init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__call__"), None)
        parameters = [a.arg for a in init.args.args[1:] + init.args.kwonlyargs] if init is not None else []
        form = CandidateForm("class", _named(node.name), None, tuple(parameters), False, spec)
    else:
        arguments = [a.arg for a in node.args.args + node.args.kwonlyargs]
        is_method = owner is not None or (arguments[:1] == ["self"])
        parameters = arguments[1:] if is_method else arguments
        form = CandidateForm("method" if is_method else "function", _named(node.name),
                             _named(owner.name) if owner is not None else None, tuple(parameters), False, spec)
    return next((e for e in ECOSYSTEMS.values() if e.detect(form, source)), None)
