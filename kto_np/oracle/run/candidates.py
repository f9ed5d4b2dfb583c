"""Calling a candidate: NumPy first, then torch (autograd), then finite differences.

A candidate is called on one case at a time with fresh copies of the inputs; what it returns (loss,
gradients, metrics, intermediates) is parsed into float64 arrays with the place each came from
("returned", "autograd", "vjp", "finite differences"). Gradients it neither returns nor lets autograd
compute are taken by gradcheck's central differences of its loss.
"""

from __future__ import annotations

import hashlib
import sys
import traceback
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ...checkpoint import HF_PREFIX, params_from_axon
from ...dpo import dpo_loss_and_grad
from ...edifice import Edifice
from ...gradcheck import directional_derivatives, numerical_gradient
from ...logprobs import (
    logprobs_backward,
    logprobs_forward,
    sequence_logprobs_backward,
    sequence_logprobs_forward,
)
from ...losses import kto_loss_and_grad
from ..cases.reference import (
    MODEL_KINDS,
    PIPELINE_KINDS,
    Case,
    edifice_params_from_inputs,
    kto_keywords,
    kto_pair_candidate,
    model_reference_outputs,
    pipeline_part,
    resolve_variant,
    trainable_names,
)
from ..integrations.jax_support import holds_jax, holds_library, jax_gradients

FD_STEP = {"float64": 1e-5, "float32": 1e-2}  # by tolerance
FD_STEP_BY_DTYPE = {"float32": 1e-2, "float16": 1e-1, "bfloat16": 1e-1}  # at least this for a candidate's dtype
FD_FULL_MAX_ENTRIES = 512  # larger tensors, and model parameters, are checked along random directions
FD_DIRECTIONS = 2


def _is_torch(value) -> bool:
    return type(value).__module__.split(".")[0] == "torch"


def _holds_torch(value) -> bool:
    return holds_library(value, ("torch",))


def _import_torch():
    try:
        import torch  # noqa: PLC0415  (optional: only for torch candidates)
    except ImportError:
        return None
    return torch


def _as_float64(value, what: str) -> np.ndarray:
    """A candidate's number or array as a float64 NumPy array (torch tensors detached)."""
    if _is_torch(value):
        value = value.detach().cpu()
        if value.is_floating_point() or value.is_complex():
            value = value.double()
        value = value.numpy()
    try:
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"dtype {arr.dtype}")
        return arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be a number or an array of numbers, got {type(value).__name__}") from exc


def _dtype_of(value) -> str:
    return str(getattr(value, "dtype", type(value).__name__)).replace("torch.", "")


class _Arguments(NamedTuple):
    args: list
    kwargs: dict
    differentiable: dict  # gradient name -> the object handed to the candidate


def _call_arguments(case: Case, mode: str, overrides: Mapping[str, np.ndarray] | None = None,
                    requires_grad: bool = False) -> _Arguments:
    """The candidate's arguments for `case` as fresh NumPy copies (mode "numpy") or torch float64 tensors.

    overrides replace differentiable inputs (finite differences); requires_grad marks them for autograd.
    """
    torch = _import_torch() if mode == "torch" else None
    inputs = {**case.inputs, **(overrides or {})}
    differentiable: dict[str, Any] = {}

    def convert(name, grad_name=None):
        value = inputs[name]
        if torch is None:
            arr = np.array(value, copy=True)
        else:
            arr = torch.tensor(np.array(value, copy=True))
            if grad_name is not None and requires_grad:
                arr.requires_grad_(True)
        if grad_name is not None:
            differentiable[grad_name] = arr
        return arr

    args, kwargs = KIND_ARGUMENTS[case.kind](case, inputs, convert)
    return _Arguments(args, kwargs, differentiable)


# ---------------------------------------------------------------------------------------------------
# the kinds: how each one's candidate is called. A new kind adds one function here (its arguments), its
# cases (cases/reference.py), its mutants (mistakes.mutants) and, where its return value differs, a parser below.


def _hyper_parameters(inputs) -> dict:
    return {k: float(inputs[k]) for k in ("beta", "desirable_weight", "undesirable_weight")}


def _kto_loss_arguments(case: Case, inputs, convert) -> tuple[list, dict]:
    kwargs = {"policy_logps": convert("policy_logps", "policy_logps"), "ref_logps": convert("ref_logps"),
              "labels": convert("labels"), **_hyper_parameters(inputs)}
    if case.variant == "kto":
        has_kl = "kl_policy_logps" in inputs
        kwargs["kl_policy_logps"] = convert("kl_policy_logps", "kl_policy_logps") if has_kl else None
        kwargs["kl_ref_logps"] = convert("kl_ref_logps") if has_kl else None
    return [], kwargs


def _dpo_loss_arguments(case: Case, inputs, convert) -> tuple[list, dict]:
    return [convert("policy_chosen_logps", "policy_chosen_logps"),
            convert("policy_rejected_logps", "policy_rejected_logps"),
            convert("ref_chosen_logps"), convert("ref_rejected_logps"), float(inputs["beta"])], {}


def _logprobs_arguments(case: Case, inputs, convert) -> tuple[list, dict]:
    return [convert("logits", "logits"), convert("targets"), convert("mask")], {}


def _sequence_logprobs_arguments(case: Case, inputs, convert) -> tuple[list, dict]:
    return [convert("logits", "logits"), convert("tokens"), convert("completion_mask")], {}


def _model_kto_arguments(case: Case, inputs, convert) -> tuple[list, dict]:
    trainable = set(trainable_names(case))
    state_dict = {}
    for key in sorted(k for k in inputs if k.startswith("state_dict/")):
        name = key[len("state_dict/"):]
        if name not in trainable:
            continue
        state_dict[name] = convert(key, name)
    if "lm_head.weight" not in trainable:  # tied: the same object as the embedding, as in GPT2LMHeadModel
        state_dict["lm_head.weight"] = state_dict[HF_PREFIX + "wte.weight"]
    kwargs = {"state_dict": state_dict, "config": dict(case.config)}
    for name in ("prompt_tokens", "completion_tokens", "completion_mask", "labels", "ref_logps", "kl_ref_logps"):
        kwargs[name] = convert(name)
    kwargs.update(_hyper_parameters(inputs))
    return [], kwargs


EDIFICE_INPUTS = ("tokens", "targets", "mask", "labels", "ref_logps")


def _model_edifice_arguments(case: Case, inputs, convert) -> tuple[list, dict]:
    """params: {"<Axon layer>.<param>": array} (flat, sorted), config: EdificeConfig.to_dict(), the batch
    (tokens, targets, mask: the seed's unshifted contract), labels, ref_logps and the loss's floats."""
    params = {name: convert(f"params/{name}", name) for name in sorted(edifice_params_from_inputs(inputs))}
    kwargs = {"params": params, "config": dict(case.config)}
    kwargs.update({name: convert(name) for name in EDIFICE_INPUTS})
    kwargs.update(_hyper_parameters(inputs))
    return [], kwargs


def parameter_input_key(case: Case, name: str) -> str:
    """The input a gradient name differentiates: "state_dict/<name>" or "params/<name>" for the model kinds."""
    prefix = {"model_kto": "state_dict/", "model_edifice": "params/"}.get(case.kind, "")
    return prefix + name


KIND_ARGUMENTS = {  # kind -> (case, inputs, convert) -> (args, kwargs) in the kto_np convention
    "kto_loss": _kto_loss_arguments,
    "dpo_loss": _dpo_loss_arguments,
    "logprobs": _logprobs_arguments,
    "sequence_logprobs": _sequence_logprobs_arguments,
    "model_kto": _model_kto_arguments,
    "model_edifice": _model_edifice_arguments,
}


class _Output(NamedTuple):
    primary: Any  # the loss (scalar) or the per-sequence log-probs [B]
    grads: dict  # gradient name -> array, as returned by the candidate
    vjp: Callable | None  # logprobs kinds: dlogps -> dlogits
    extras: dict  # metrics and intermediates the candidate returned


def _parse_output(kind: str, out) -> _Output:
    """Split a candidate's return value: loss | (loss, grad) | (loss, grad, metrics) | dict; for the
    log-prob kinds: logps | (logps, vjp)."""
    if kind in ("logprobs", "sequence_logprobs"):
        if isinstance(out, tuple):
            if len(out) != 2 or not callable(out[1]):
                raise TypeError(f"a {kind} candidate returns logps [B] or (logps, vjp) with vjp(dlogps) -> "
                                f"dlogits, got a tuple of {len(out)}")
            return _Output(out[0], {}, out[1], {})
        return _Output(out, {}, None, {})
    extras: dict = {}
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise TypeError(f"a candidate returning a dict must include 'loss', got keys {sorted(out)}")
        primary, grads = out["loss"], out.get("grads", out.get("grad"))
        extras = {k: v for k, v in out.items() if k not in ("loss", "grads", "grad")}
    elif isinstance(out, (tuple, list)):
        if len(out) not in (2, 3):
            raise TypeError(f"a {kind} candidate returns loss, (loss, grad) or (loss, grad, metrics), "
                            f"got a sequence of {len(out)}")
        primary, grads = out[0], out[1]
        if len(out) == 3 and out[2] is not None:
            if not isinstance(out[2], Mapping):
                raise TypeError(f"the third returned value must be a dict of metrics, got {type(out[2]).__name__}")
            extras = dict(out[2])
    else:
        primary, grads = out, None
    return _Output(primary, _grad_dict(kind, grads), None, extras)


def _grad_dict(kind: str, grads) -> dict:
    if grads is None:
        return {}
    if kind == "kto_loss":
        return dict(grads) if isinstance(grads, Mapping) else {"policy_logps": grads}
    if kind == "dpo_loss":
        if isinstance(grads, Mapping):
            return dict(grads)
        if isinstance(grads, (tuple, list)) and len(grads) == 2:
            return {"policy_chosen_logps": grads[0], "policy_rejected_logps": grads[1]}
        raise TypeError("a dpo_loss candidate's gradient is (grad_chosen, grad_rejected) or a dict")
    if not isinstance(grads, Mapping):
        raise TypeError(f"a {kind} candidate's gradients are a dict name -> array, got {type(grads).__name__}")
    if kind == "model_edifice":  # Axon's names as they are: flat "layer.param", or nested {layer: {param: array}}
        out = {}
        for name, value in grads.items():
            if isinstance(value, Mapping):
                out.update({f"{name}.{param}": v for param, v in value.items()})
            else:
                out[name] = value
        return out
    out = {}
    for name, value in grads.items():
        out[name if name.startswith(HF_PREFIX) or name == "lm_head.weight" else HF_PREFIX + name] = value
    return out


class Evaluation(NamedTuple):
    values: dict  # quantity -> (candidate float64 array, source, projection or None)
    notes: list


class CandidateError(Exception):
    """The candidate raised, or returned something the oracle cannot read."""


_ORACLE_FOLDER = str(Path(__file__).resolve().parent)


def _is_library(filename: str) -> bool:
    return any(part in ("site-packages", "dist-packages") for part in Path(filename).parts) or filename.startswith(
        (sys.base_prefix, "<frozen"))


def short_error(exc: BaseException) -> str:
    """"Type: message (at file:line)" at the deepest frame in the candidate's own code (not the oracle's,
    not a library's), else the deepest one outside the oracle."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not str(Path(f.filename).resolve()).startswith(_ORACLE_FOLDER)]
    own = [f for f in frames if not _is_library(f.filename)]
    frame = (own or frames or [None])[-1]
    where = f" (at {Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"


class CandidateUnrunnable(Exception):
    """The candidate cannot be run here (a library it needs is not installed): a usage error (exit status 2),
    not a failed check."""


def _call(candidate, case: Case, mode: str, notes: list, overrides=None, requires_grad=False):
    arguments = _call_arguments(case, mode, overrides, requires_grad)
    kwargs = arguments.kwargs
    if getattr(candidate, "takes_variant", False):  # a project's code (ecosystems.py) is told the loss variant
        kwargs = {**kwargs, "variant": case.variant}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = candidate(*arguments.args, **kwargs)
        except ModuleNotFoundError as exc:
            raise CandidateUnrunnable(f"the candidate imports {exc.name!r}, which is not installed here "
                                      f"({short_error(exc)}): it cannot be run") from exc
    for w in caught:
        message = f"{case.name}: candidate warned ({mode} inputs): {w.category.__name__}: {w.message}"
        if message not in notes:
            notes.append(message)
    for message in getattr(candidate, "oracle_notes", ()):  # what an adapter recognised (conventions)
        if message not in notes:
            notes.append(message)
    return out, arguments


def _objective(kind: str, case: Case, primary):
    """The scalar that gradients are taken of: the loss, or sum_b upstream_b logps_b."""
    if kind in ("logprobs", "sequence_logprobs"):
        upstream = case.inputs["upstream"]
        if _is_torch(primary):
            return (primary * primary.new_tensor(np.array(upstream))).sum()
        return float(np.sum(_as_float64(primary, "logps") * upstream))
    return primary


def evaluate(candidate, case: Case, tolerance: str) -> Evaluation:
    """Call the candidate on one case and collect every quantity it yields, with where it came from."""
    kind, notes = case.kind, []
    if kind in PIPELINE_KINDS:
        values, notes = pipeline_part(kind, "evaluate")(candidate, case, tolerance)
        return Evaluation(values, notes)
    numpy_error, mode = None, getattr(candidate, "array_library", None)  # a project's code says which it takes
    if mode != "torch":
        try:
            out, arguments = _call(candidate, case, "numpy", notes)
            mode = "torch" if _holds_torch(out) else "jax" if holds_jax(out) else "numpy"
        except CandidateUnrunnable:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure on NumPy input means: try torch
            numpy_error, mode = exc, "torch"
    if mode == "torch":
        if _import_torch() is None:
            if numpy_error is None:
                raise CandidateUnrunnable("the candidate computes with torch, which is not installed here")
            raise CandidateError(f"raised on NumPy input ({short_error(numpy_error)}) and torch is not installed")
        try:
            out, arguments = _call(candidate, case, "torch", notes, requires_grad=True)
        except CandidateUnrunnable:
            raise
        except Exception as exc:  # noqa: BLE001
            first = f"on NumPy input: {short_error(numpy_error)}; " if numpy_error else ""
            raise CandidateError(f"raised {first}on torch input: {short_error(exc)}") from exc
    try:
        parsed = _parse_output(kind, out)
    except TypeError as exc:
        raise CandidateError(str(exc)) from exc

    values: dict[str, tuple] = {}
    primary_name = "logps" if kind in ("logprobs", "sequence_logprobs") else "loss"
    if primary_name == "loss" and getattr(parsed.primary, "ndim", 0) == 1:  # per-example losses [n]
        n = int(parsed.primary.shape[0])
        notes.append("the candidate returned a per-example loss vector [n]: its mean was taken as the loss")
        primary = parsed.primary.mean() if _is_torch(parsed.primary) else np.mean(_as_float64(parsed.primary, "loss"))
        if n == 0:
            raise CandidateError("returned an empty loss vector")
        parsed = parsed._replace(primary=primary)
    values[primary_name] = (_as_float64(parsed.primary, primary_name), "returned", None)
    if tolerance == "float64" and _dtype_of(parsed.primary) in ("float32", "float16", "bfloat16"):
        notes.append(f"{case.name}: the candidate returned {_dtype_of(parsed.primary)}; "
                     "for a float32 implementation use tolerance='float32'")
    grad_names = list(arguments.differentiable)
    if kind == "model_edifice":
        _check_axon_names(parsed.grads, grad_names)
    for name, value in parsed.grads.items():
        if name in grad_names:
            values[f"grad/{name}"] = (_as_float64(value, f"grad/{name}"), "returned", None)
        else:
            notes.append(f"{case.name}: returned gradient {name!r} not compared (no such input)")
    for name, value in parsed.extras.items():
        key = name if name in case.expected else f"metrics/{name}"
        if key in case.expected:
            values[key] = (None if value is None else _as_float64(value, key), "returned", None)
        else:
            notes.append(f"{case.name}: returned {name!r} not compared (no reference value)")
    missing = [n for n in grad_names if f"grad/{n}" not in values]
    if kind in MODEL_KINDS and parsed.grads:  # a returned gradient dict must be complete: no filling in
        missing = []
    if parsed.vjp is not None and "logits" in missing:
        upstream = case.inputs["upstream"]
        if mode == "torch":
            upstream = _import_torch().tensor(np.array(upstream))
        values["grad/logits"] = (_as_float64(parsed.vjp(upstream), "vjp(upstream)"), "vjp", None)
        missing.remove("logits")
    if not missing:
        return Evaluation(values, notes)
    objective = _objective(kind, case, parsed.primary)
    if mode == "torch" and _is_torch(objective) and objective.requires_grad:
        torch = _import_torch()
        tensors = [arguments.differentiable[n] for n in missing]
        grads = torch.autograd.grad(objective, tensors, allow_unused=True)
        for name, tensor, grad in zip(missing, tensors, grads):
            values[f"grad/{name}"] = (np.zeros(tuple(tensor.shape)) if grad is None
                                      else _as_float64(grad, f"grad/{name}"), "autograd", None)
        return Evaluation(values, notes)
    if mode == "jax":  # jax.grad, as autograd for torch (jax_support.py)
        values.update(jax_gradients(candidate, case, arguments, missing, notes, parse_output=_parse_output,
                                    as_float64=_as_float64))
        return Evaluation(values, notes)
    step = max(FD_STEP[tolerance], FD_STEP_BY_DTYPE.get(_dtype_of(parsed.primary), 0.0))
    values.update(_finite_difference_grads(candidate, case, mode, missing, step, notes))
    return Evaluation(values, notes)


def _check_axon_names(grads: Mapping, names: list) -> None:
    """A model_edifice candidate's gradients must be keyed by the case's Axon names: others are refused."""
    unknown = sorted(str(n) for n in grads if n not in names)
    if unknown:
        hf = [n for n in unknown if n.startswith(HF_PREFIX) or n.endswith((".weight", "lm_head.weight"))]
        hint = (" (those are Hugging Face GPT-2 names: this kind is Edifice's network)" if hf else "")
        raise CandidateError(
            f"returned gradients under names that are not this case's parameters: {unknown[:4]}"
            f"{' and more' if len(unknown) > 4 else ''}{hint}; model_edifice gradients are keyed by Axon's "
            f"'<layer>.<param>' names as the params it was given, e.g. {names[:2]}, or nested "
            "{layer: {param: array}}")


def fd_matches_reference(case: Case, name: str) -> bool:
    """Whether d(loss)/d(name) by finite differences is the reference gradient: not where the reference
    stops a gradient the loss value depends on (detached z)."""
    if case.kind == "kto_loss":
        return case.variant != "edifice_stop_z_grad" and name != "kl_policy_logps"
    if case.kind in ("data_parallel", "accumulation"):
        return name != "kl_policy_logps"
    if case.kind == "model_kto":
        raw_kl = np.mean(case.expected["kl_policy_logps"] - case.inputs["kl_ref_logps"])
        return bool(raw_kl < 0)  # clamped: z_ref is locally constant
    return True


def _finite_difference_grads(candidate, case: Case, mode: str, names: list, step: float, notes: list) -> dict:
    """Central differences of the candidate's objective: every entry of small inputs, K random unit
    directions of large ones and of model parameters (the quantity is then the K directional derivatives)."""

    def objective_at(overrides) -> float:
        out, _ = _call(candidate, case, mode, notes, overrides)
        primary = _parse_output(case.kind, out).primary
        if case.kind not in ("logprobs", "sequence_logprobs") and getattr(primary, "ndim", 0) == 1:
            primary = np.mean(_as_float64(primary, "loss"))  # per-example losses: their mean, as evaluate takes
        return float(_as_float64(_objective(case.kind, case, primary), "objective"))

    values = {}
    for name in names:
        input_key = parameter_input_key(case, name)
        if not fd_matches_reference(case, name):
            values[f"grad/{name}"] = (None, "not checked", None)
            continue
        x = np.array(case.inputs[input_key], dtype=np.float64)  # perturbed in place by gradcheck

        def objective(x=x, input_key=input_key) -> float:
            return objective_at({input_key: x})

        directions = fd_directions(case.name, name, x.shape)  # [K, ...]
        step = _fit_step(objective, x, directions[0], step, notes)
        if x.size <= FD_FULL_MAX_ENTRIES and case.kind not in MODEL_KINDS:
            values[f"grad/{name}"] = (numerical_gradient(objective, x, step), "finite differences", None)
            continue
        derivatives = directional_derivatives(objective, x, directions, step)
        values[f"grad/{name}"] = (derivatives, f"finite differences ({FD_DIRECTIONS} directions)",
                                  DirectionalProjection(directions))
    return values


def _fit_step(objective, x, direction, step: float, notes: list) -> float:
    """The step, or float32's when the candidate's rounding shows at this one: a directional derivative
    with `step` and with float32's step disagree by more than 1 % (a float64 computation agrees to ~1e-6;
    float32 inside float64 code does not)."""
    large = FD_STEP_BY_DTYPE["float32"]
    if step >= large:
        return step
    fine, coarse = (directional_derivatives(objective, x, direction[None], h)[0] for h in (step, large))
    if abs(fine - coarse) <= 1e-2 * abs(coarse) + 1e-9:
        return step
    note = (f"finite differences with step {step:g} see rounding noise (the candidate computes in float32 "
            f"somewhere): step {large:g} used")
    if note not in notes:
        notes.append(note)
    return large


def fd_directions(case_name: str, name: str, shape: tuple) -> np.ndarray:
    """[K, *shape] random unit directions, seeded by the case and the input's name (the same every run)."""
    seed = int.from_bytes(hashlib.sha256(f"{case_name}/{name}".encode()).digest()[:4], "little")
    directions = np.random.default_rng(seed).standard_normal((FD_DIRECTIONS, *shape))
    norms = np.sqrt((directions ** 2).reshape(FD_DIRECTIONS, -1).sum(axis=1))
    return directions / norms.reshape(-1, *([1] * len(shape)))


class DirectionalProjection(NamedTuple):
    directions: np.ndarray  # [K, *shape] unit vectors

    def __call__(self, full: np.ndarray) -> np.ndarray:
        return np.array([float(np.sum(full * u)) for u in self.directions])



def builtin_candidate(kind: str = "kto_loss", variant: str | None = None, *, kl_rotation: int = -1) -> Callable:
    """kto_np's own functions wrapped as a candidate of `kind` (they pass every case; a model_kto candidate
    builds its KL pairs with kl_rotation; model_edifice's is edifice_candidate, kto_np's Edifice)."""
    variant = resolve_variant(kind, variant)
    if kind in PIPELINE_KINDS:
        return pipeline_part(kind, "builtin")(kind, variant)
    if kind == "kto_loss" and variant == "kto_pair":
        return kto_pair_candidate
    if kind == "kto_loss":
        def kto_candidate(**kwargs):
            inputs = {k: v for k, v in kwargs.items() if v is not None}
            loss, grad, metrics = kto_loss_and_grad(**kto_keywords(inputs, variant))
            grads = {"policy_logps": grad}
            if "kl_policy_logps" in inputs:  # z_ref is detached: no gradient reaches the KL pairs
                grads["kl_policy_logps"] = np.zeros_like(np.asarray(inputs["kl_policy_logps"]))
            return loss, grads, metrics
        return kto_candidate
    if kind == "dpo_loss":
        return dpo_loss_and_grad
    if kind in ("logprobs", "sequence_logprobs"):
        forward, backward = ((logprobs_forward, logprobs_backward) if kind == "logprobs"
                             else (sequence_logprobs_forward, sequence_logprobs_backward))

        def logprobs_candidate(logits, tokens, mask):
            logps, cache = forward(logits, tokens, mask)
            return logps, (lambda dlogps: backward(dlogps, cache))
        return logprobs_candidate
    if kind == "model_edifice":
        return edifice_candidate

    def model_candidate(state_dict, config, **inputs):
        case = Case("candidate", "model_kto", "kto", "",
                    {**{f"state_dict/{k}": v for k, v in state_dict.items()}, **inputs}, {}, config)
        outputs = model_reference_outputs(case, kl_rotation)
        grads = {k[len("grad/"):]: v for k, v in outputs.items() if k.startswith("grad/")}
        metrics = {k[len("metrics/"):]: v for k, v in outputs.items() if k.startswith("metrics/")}
        return {"loss": outputs["loss"], "grads": grads, "logits": outputs["logits"],
                "policy_logps": outputs["policy_logps"], "kl_policy_logps": outputs["kl_policy_logps"],
                "kl_tokens": outputs["kl_tokens"], **metrics}
    return model_candidate


def edifice_candidate(params, config, tokens, targets, mask, labels, ref_logps, beta, desirable_weight,
                      undesirable_weight):
    """kto_np's Edifice as a model_edifice candidate: params (Axon's flat "layer.param" or nested
    {layer: {param}}) -> Edifice; logits -> compute_logprobs' unshifted log-probs -> the 'edifice' KTO loss;
    every gradient by the hand-written backward."""
    settings = {k: config[k] for k in ("max_seq_len", "dropout", "dtype")}
    params, edifice_config = params_from_axon(params, num_heads=config["num_heads"], config_overrides=settings)
    model = Edifice(edifice_config)
    logits, model_cache = model.forward(params, tokens)  # [B, T, V]
    logps, logprobs_cache = logprobs_forward(logits, targets, mask)  # [B], no shift
    loss, dlogps, _ = kto_loss_and_grad(logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                                        variant="edifice", warn_balance=False)
    grads = model.backward(logprobs_backward(dlogps, logprobs_cache), model_cache)
    return {"loss": loss, "grads": grads, "logits": logits, "logps": logps}
