"""JAX candidates: the gradients a JAX function does not return come from jax.grad, as autograd gives torch's.

A candidate that returns JAX arrays on the NumPy call is differentiated with jax.grad of its loss (or, for the
log-prob kinds, of sum_b upstream_b logps_b) with respect to every differentiable input it did not return a
gradient for. A z used without jax.lax.stop_gradient therefore shows as a non-zero dL/dkl_policy_logps, and
"z not detached" is named, as for torch. JAX is optional: it is imported only when a candidate returns its
arrays. JAX computes in float32 unless 64-bit mode is on (JAX_ENABLE_X64=1 in the environment, or
jax.config.update("jax_enable_x64", True) before any array is made): the report says so.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

X64_HINT = ("JAX computes in float32 unless 64-bit mode is on: set JAX_ENABLE_X64=1 (or "
            "jax.config.update('jax_enable_x64', True) before any array is made) to be checked at float64, or "
            "use tolerance 'float32'")


JAX_MODULES = ("jax", "jaxlib")


def holds_library(value, roots: tuple[str, ...]) -> bool:
    """Whether value, or anything in its dicts, tuples and lists, is an object of a top-level module in
    roots (e.g. ("torch",)): how a candidate's output tells which array library computed it."""
    if type(value).__module__.split(".")[0] in roots:
        return True
    if isinstance(value, Mapping):
        return any(holds_library(v, roots) for v in value.values())
    if isinstance(value, (tuple, list)):
        return any(holds_library(v, roots) for v in value)
    return False


def is_jax(value) -> bool:
    return type(value).__module__.split(".")[0] in JAX_MODULES


def holds_jax(value) -> bool:
    return holds_library(value, JAX_MODULES)


def x64_enabled() -> bool:
    import jax  # noqa: PLC0415

    return bool(jax.config.read("jax_enable_x64"))


def _substitute(value, replacements: dict):
    """value with every object whose id is in replacements swapped (inside dicts, lists, tuples): a tied
    weight that is one object stays one object."""
    if id(value) in replacements:
        return replacements[id(value)]
    if isinstance(value, Mapping):
        return {k: _substitute(v, replacements) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_substitute(v, replacements) for v in value)
    return value


def jax_gradients(candidate, case, arguments, names: list, notes: list, *, parse_output, as_float64) -> dict:
    """{"grad/<name>": (array, "jax.grad", None)} for `names`, by jax.grad of the candidate's objective at the
    case's inputs (arguments: the NumPy call's _Arguments; parse_output and as_float64: the caller's
    readers of a candidate's return value and of an array, passed in so this module imports no caller)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    if not x64_enabled():
        if X64_HINT not in notes:
            notes.append(X64_HINT)
    originals = [arguments.differentiable[n] for n in names]

    def objective(*xs):
        replacements = {id(o): x for o, x in zip(originals, xs)}
        args = [_substitute(a, replacements) for a in arguments.args]
        kwargs = {k: _substitute(v, replacements) for k, v in arguments.kwargs.items()}
        primary = parse_output(case.kind, candidate(*args, **kwargs)).primary
        if case.kind in ("logprobs", "sequence_logprobs"):
            return jnp.sum(jnp.asarray(primary) * jnp.asarray(case.inputs["upstream"]))
        primary = jnp.asarray(primary)
        return jnp.mean(primary) if primary.ndim == 1 else primary  # per-example losses: their mean

    grads = jax.grad(objective, argnums=tuple(range(len(originals))))(*(jnp.asarray(o) for o in originals))
    return {f"grad/{name}": (as_float64(np.asarray(g), f"grad/{name}"), "jax.grad", None)
            for name, g in zip(names, grads)}
