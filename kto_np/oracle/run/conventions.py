"""Calling conventions: how a candidate's own signature maps onto the oracle's cases, detected by name.

The oracle calls every candidate in the kto_np convention (candidates.KIND_ARGUMENTS). A convention here
is an adapter between that call and the candidate's own: it turns the kto_np arguments into the
candidate's, and the candidate's return value back into what candidates._parse_output reads.

Known conventions (CONVENTIONS; a new one is one Convention entry and its adapter function):
  kto_np  the oracle's own call (docs/oracle/kinds.md); every kind (model_edifice: params, config, tokens,
          targets, mask, labels, ref_logps, beta, desirable_weight, undesirable_weight)
  split   kto_loss as TRL <= 1.5, OpenRLHF and LLaMA-Factory write it: (policy_chosen_logps,
          policy_rejected_logps, policy_KL_logps, reference_chosen_logps, reference_rejected_logps,
          reference_KL_logps) -> (losses, chosen_rewards, rejected_rewards, kl); beta and the weights are
          keywords of the function, arguments of the class's constructor, or attributes of the instance.
  and one convention per project (ecosystems.py: trl, llamafactory, halos, openrlhf, easydel, liger), each
  detected from the code's shape and giving the project's code what it reads around its loss.
Candidate forms: a function, a class (constructed per case with the hyper-parameters its constructor
accepts by name, world_size=1 where asked, then called: forward for a torch module), a class's method
(called on a bare instance with those attributes set), and a function whose first parameter is `self`
(a method copied out of its class: called on a stand-in object with those attributes).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

HYPER_PARAMETERS = ("beta", "desirable_weight", "undesirable_weight")
CONSTRUCTOR_DEFAULTS = {"world_size": 1, "device": "cpu"}  # OpenRLHF asks for both
SPLIT_PARAMETERS = ("policy_chosen_logps", "policy_rejected_logps", "policy_KL_logps", "reference_chosen_logps",
                    "reference_rejected_logps", "reference_KL_logps")


class ConventionError(Exception):
    """The candidate fits no known convention (a usage error: exit status 2)."""


class Convention(NamedTuple):
    name: str
    kinds: tuple[str, ...]  # the kinds it applies to
    parameters: tuple[str, ...]  # the parameter names that identify it (all of them present)
    adapt: Callable  # (form: CandidateForm, kind) -> a callable in the kto_np convention
    detect: Callable | None = None  # (form) -> bool: recognises the code by more than parameter names
    takes: str = ""  # what code it is for (a project's), said in the report


class CandidateForm(NamedTuple):
    """What a spec or object is: a function, a class, or a class's method."""

    form: str  # "function", "class" or "method"
    target: Any  # the function, the class, or the method's function
    owner: type | None  # the class of a method (None: a function whose first parameter is self)
    parameters: tuple[str, ...]  # the call's parameter names (self dropped)
    accepts_any: bool  # has **kwargs: any keyword fits
    label: str


def _parameters(function) -> tuple[tuple[str, ...], bool]:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return (), True
    names = tuple(p.name for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY))
    variadic = any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in signature.parameters.values())
    return names, variadic


def candidate_form(target, owner=None, label: str = "") -> CandidateForm:
    """Classify a candidate (owner: the class whose attribute it is, for `module:Class.method`)."""
    label = label or getattr(target, "__qualname__", type(target).__name__)
    if isinstance(target, type):
        call = getattr(target, "forward", None) or target.__call__
        names, variadic = _parameters(call)
        return CandidateForm("class", target, None, tuple(n for n in names if n != "self"), variadic, label)
    if isinstance(owner, type) and inspect.isfunction(target) and not isinstance(
            inspect.getattr_static(owner, target.__name__, None), (staticmethod, classmethod)):
        names, variadic = _parameters(target)
        return CandidateForm("method", target, owner, names[1:], variadic, label)
    names, variadic = _parameters(target)
    if names[:1] == ("self",) and inspect.isfunction(target):  # a method, whichever class it came from
        return CandidateForm("method", target, None, names[1:], variadic, label)
    return CandidateForm("function", target, None, names, variadic, label)


def _settings(names, values: dict) -> dict:
    return {k: v for k, v in values.items() if k in names}


class StandInSelf:
    """The `self` of a method with no class at hand: only the attributes the oracle sets."""


def _instance(form: CandidateForm, attributes: dict):
    """The object to call for one case: a class constructed with the hyper-parameters (and world_size,
    device) it accepts, or a bare instance of a method's class with `attributes` set."""
    if form.form == "class":
        hyper = {k: attributes[k] for k in HYPER_PARAMETERS if k in attributes}
        names, variadic = _parameters(form.target.__init__)
        settings = _settings(names, {**CONSTRUCTOR_DEFAULTS, **{k: attributes[k] for k in CONSTRUCTOR_DEFAULTS
                                                                if k in attributes}, **hyper})
        if variadic:  # **kwargs: the hyper-parameters by name, nothing else guessed
            settings = {**hyper, **settings}
        return form.target(**settings)
    instance = StandInSelf() if form.owner is None else form.owner.__new__(form.owner)
    for name, value in {**CONSTRUCTOR_DEFAULTS, **attributes}.items():
        try:
            setattr(instance, name, value)
        except (AttributeError, TypeError):  # a read-only property: the method reads its own
            pass
    return instance


def instance_for(form: CandidateForm, attributes: dict) -> Callable:
    """What to call for one case: the function itself, the constructed class, or the method bound to an
    instance (of its class, or a StandInSelf) with `attributes` set."""
    if form.form == "function":
        return form.target
    instance = _instance(form, attributes)
    if form.form == "method":
        return form.target.__get__(instance, form.owner or StandInSelf)
    return instance


_bound = instance_for


def _adapt_kto_np(form: CandidateForm, kind: str) -> Callable:
    if form.form == "function":
        return form.target
    if kind not in ("kto_loss", "model_kto", "model_edifice"):
        def call(*args, **kwargs):
            return _bound(form, {})(*args, **kwargs)
        return call

    def call(**kwargs):
        hyper = {k: kwargs[k] for k in HYPER_PARAMETERS}
        function = _bound(form, hyper)
        if not form.accepts_any:  # the hyper-parameters went to the constructor or the instance
            kwargs = {k: v for k, v in kwargs.items() if k in form.parameters or k not in HYPER_PARAMETERS}
        return function(**kwargs)
    return call


def _mean(values):
    if values is None:
        return None
    if hasattr(values, "numel"):
        return None if values.numel() == 0 else values.double().mean()
    import numpy as np  # noqa: PLC0415

    arr = np.asarray(values, dtype=np.float64)
    return None if arr.size == 0 else float(arr.mean())


def _zeros_like(values, n: int):
    if hasattr(values, "new_zeros"):
        return values.new_zeros(n)
    import numpy as np  # noqa: PLC0415

    return np.zeros(n)


def _adapt_split(form: CandidateForm, kind: str) -> Callable:
    """kto_np's kto_loss call -> the split call; (losses, chosen_rewards, rejected_rewards, kl) -> a dict."""
    if form.form == "function" and not form.accepts_any and not set(HYPER_PARAMETERS) <= set(form.parameters):
        missing = [n for n in HYPER_PARAMETERS if n not in form.parameters]
        raise ConventionError(f"{form.label} follows the split convention but takes no {', '.join(missing)}: give "
                              "the class (module:Class) or its method (module:Class.method), which hold them")

    def call(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, kl_policy_logps=None,
             kl_ref_logps=None):
        hyper = {"beta": beta, "desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight}
        rejected = ~labels
        if kl_policy_logps is None:  # no KL pairs: a zero KL estimate (z_ref = 0)
            kl_policy_logps, kl_ref_logps = _zeros_like(policy_logps, 1), _zeros_like(ref_logps, 1)
        arguments = dict(zip(SPLIT_PARAMETERS, (policy_logps[labels], policy_logps[rejected], kl_policy_logps,
                                                ref_logps[labels], ref_logps[rejected], kl_ref_logps)))
        if form.form == "function":
            arguments.update(hyper if form.accepts_any else _settings(form.parameters, hyper))
        out = _bound(form, hyper)(**arguments)
        if not isinstance(out, (tuple, list)) or len(out) not in (3, 4):
            return {"loss": _mean(out) if getattr(out, "ndim", 0) else out}
        losses, chosen_rewards, rejected_rewards = out[:3]
        result = {"loss": losses.mean() if hasattr(losses, "mean") else _mean(losses),
                  "rewards/chosen": _mean(chosen_rewards), "rewards/rejected": _mean(rejected_rewards)}
        if len(out) == 4 and out[3] is not None:
            result["kl"] = out[3]
        return result

    return call


CONVENTIONS = {c.name: c for c in (
    Convention("kto_np", ("kto_loss", "dpo_loss", "logprobs", "sequence_logprobs", "model_kto", "model_edifice"),
               ("policy_logps", "ref_logps", "labels"), _adapt_kto_np),
    Convention("split", ("kto_loss",), SPLIT_PARAMETERS, _adapt_split),
)}
# the parameters that identify the kto_np convention per kind (positional kinds: none needed)
KTO_NP_PARAMETERS = {"kto_loss": ("policy_logps", "ref_logps", "labels"),
                     "model_kto": ("state_dict", "config", "prompt_tokens", "completion_tokens"),
                     "model_edifice": ("params", "config", "tokens", "targets", "mask")}


def detect(form: CandidateForm, kind: str) -> Convention:
    """A project's convention recognised by the code's shape (ecosystems.py), else the convention whose
    parameter names the candidate has (kto_np for positional kinds and **kwargs)."""
    for convention in CONVENTIONS.values():
        if convention.detect is not None and kind in convention.kinds and convention.detect(form):
            return convention
    names = set(form.parameters)
    if kind not in KTO_NP_PARAMETERS or (form.accepts_any and not names & set(SPLIT_PARAMETERS)):
        return CONVENTIONS["kto_np"]
    if set(KTO_NP_PARAMETERS[kind]) <= names:
        return CONVENTIONS["kto_np"]
    for convention in CONVENTIONS.values():
        if (kind in convention.kinds and convention.name != "kto_np" and convention.detect is None
                and set(convention.parameters) <= names):
            return convention
    known = "; ".join(f"{c.name} ({', '.join(KTO_NP_PARAMETERS[kind] if c.name == 'kto_np' else c.parameters)})"
                      for c in CONVENTIONS.values() if kind in c.kinds and c.detect is None)
    found = ", ".join(form.parameters) or "none"
    other = next((k for k, wanted in KTO_NP_PARAMETERS.items() if k != kind and set(wanted) <= names), None)
    hint = f" (those are {other}'s parameters: check it with --kind {other})" if other else ""
    raise ConventionError(f"{form.label} has the parameters ({found}), which fit no convention known for kind "
                          f"{kind!r}: {known}{hint}; force one with --convention")


def adapt(form: CandidateForm, kind: str, convention: str | None = None) -> tuple[Callable, str]:
    """(a callable in the kto_np convention, a description of how the candidate is called)."""
    if convention is None:
        chosen = detect(form, kind)
    else:
        if convention not in CONVENTIONS:
            raise ConventionError(f"convention must be one of {sorted(CONVENTIONS)}, got {convention!r}")
        chosen = CONVENTIONS[convention]
        if kind not in chosen.kinds:
            raise ConventionError(f"convention {convention!r} applies to kinds {chosen.kinds}, not {kind!r}")
    how = {"function": "a function", "class": "a class, constructed per case with the hyper-parameters it accepts",
           "method": "a method, on a bare instance with beta and the weights set"}[form.form]
    if chosen.detect is not None:  # a project's code
        how = {"function": "a function", "class": "a class, constructed per case",
               "method": "a method, on a stand-in self with what the project's trainer holds"}[form.form]
        return chosen.adapt(form, kind), f"{form.label}: {chosen.name} ecosystem ({chosen.takes}), {how}"
    if chosen.name == "kto_np" and form.form == "function":
        return chosen.adapt(form, kind), ""  # the plain case: nothing to say
    said = "; loss = the mean of the returned per-example losses" if chosen.name == "split" else ""
    return chosen.adapt(form, kind), f"{form.label}: {chosen.name} convention, {how}{said}"
