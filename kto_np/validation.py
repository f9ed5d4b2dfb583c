"""Input checks shared by the public functions.

Each check raises ValueError or TypeError with the argument's name, what was expected and what was
received, so a bad call fails at the door instead of as a NaN or a traceback deep inside NumPy.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .backend import array_module

__all__ = [
    "NonFiniteError",
    "as_float_array",
    "as_index_array",
    "as_token_batch",
    "as_labels",
    "reject_autograd",
    "check_bool",
    "check_choice",
    "check_finite",
    "check_finite_scalar",
    "check_fraction",
    "check_param_dtypes",
    "check_param_shapes",
    "check_positive_int",
    "check_rng",
    "check_same_shape",
]


class NonFiniteError(ValueError):
    """A quantity that must be finite is NaN or infinite (raised by check_finite). Training stops on it
    with the step named (train.TrainingDiverged); everywhere else it is the ValueError of a bad input."""


def check_finite(name: str, value) -> None:
    """`value` is finite, else NonFiniteError naming it: the one finiteness check of the package, used
    wherever a NaN or an infinity must stop the work. value: a number, an array, or a dict of arrays
    (gradients, parameters: the message names the non-finite keys).

    An array is summed first (one pass, no temporary): a finite sum means finite entries, and only a
    non-finite sum (or an overflowing sum of finite entries) looks at every entry."""
    if isinstance(value, numbers.Real):
        if not math.isfinite(value):
            raise NonFiniteError(f"{name} must be finite, got {value}")
        return
    arrays = value if isinstance(value, dict) else {None: value}
    bad = []
    for key, array in arrays.items():
        xp = array_module(array)
        with np.errstate(over="ignore", invalid="ignore"):
            total = array.sum()
        if not bool(xp.isfinite(total)) and not bool(xp.isfinite(array).all()):
            bad.append(key)
    if bad:
        where = "" if bad == [None] else f" in {bad[:5]}" + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(f"{name} must be finite, got NaN or infinite values{where}")


def _describe(value) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__} of shape {tuple(shape)} and dtype {getattr(value, 'dtype', '?')}"
    return f"{type(value).__name__} {value!r}"


def reject_autograd(name: str, value) -> None:
    """A torch tensor that requires grad cannot become an array silently: kto_np computes its own
    gradients, so the caller detaches it (and sees that autograd will not reach through)."""
    if getattr(value, "requires_grad", False) is True:
        raise TypeError(f"{name} is a torch tensor that requires grad: pass {name}.detach() "
                        "(kto_np computes gradients itself; autograd would not reach through it)")


def _asarray(xp, name: str, value, expected: str):
    reject_autograd(name, value)
    try:
        return xp.asarray(value)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise TypeError(f"{name} must be {expected}, got {_describe(value)}") from exc


def as_float_array(name: str, value, *, ndim: int | None = None, allow_empty: bool = False,
                   finite: bool = True):
    """`value` as a floating array (NumPy or CuPy, whichever it is; lists become NumPy).

    Integer and boolean input is promoted to float64; floating input keeps its dtype.
    Checks the number of dimensions, non-emptiness and finiteness (NaN/inf are rejected).
    """
    xp = array_module(value)
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{name} must be an array of numbers, got {_describe(value)}")
    arr = _asarray(xp, name, value, "an array of numbers")
    if arr.dtype.kind in "biu":
        arr = arr.astype(np.float64)
    elif arr.dtype.kind != "f":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(arr.shape)}")
    if not allow_empty and arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(arr.shape)}")
    if finite and arr.size and not bool(xp.isfinite(arr).all()):
        bad = int((~xp.isfinite(arr)).sum())
        raise ValueError(f"{name} must be finite, got {bad} NaN or infinite value(s)")
    return arr


def as_index_array(name: str, value, *, upper: int, shape: tuple | None = None):
    """`value` as an integer array with every entry in [0, upper)."""
    xp = array_module(value)
    arr = _asarray(xp, name, value, "an integer array")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(arr.shape)}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= upper:
            raise ValueError(f"{name} must be in [0, {upper}), got values from {lo} to {hi}")
    return arr


def as_token_batch(name: str, value, *, vocab_size: int, max_len: int, range_note: str = ""):
    """`value` as a non-empty 2-D integer array [B, T] of ids in [0, vocab_size), T <= max_len.

    range_note is appended to the message for ids out of range (what the model would do with them).
    """
    try:
        tokens = as_index_array(name, value, upper=vocab_size)
    except ValueError as exc:
        if not range_note:
            raise
        raise ValueError(f"{exc} {range_note}") from None
    if tokens.ndim != 2:
        raise ValueError(f"{name} must be 2-D [batch, seq], got shape {tuple(tokens.shape)}")
    if tokens.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(tokens.shape)}")
    if tokens.shape[1] > max_len:
        raise ValueError(f"{name} has sequence length {tokens.shape[1]}, more than max_seq_len={max_len}")
    return tokens


def as_labels(name: str, value, n: int):
    """Binary labels (1 desirable, 0 undesirable) of length n, returned as a boolean array."""
    xp = array_module(value)
    arr = _asarray(xp, name, value, "an array of 0/1 labels")
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold 0/1 labels, got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(arr.shape)}")
    if arr.dtype.kind != "b" and arr.size:
        ok = (arr == 0) | (arr == 1)
        if not bool(ok.all()):
            bad = [float(v) for v in arr[~ok][:3].tolist()]
            raise ValueError(f"{name} must contain only 0 and 1, got {bad}")
    return arr.astype(bool)


def check_same_shape(name: str, arr, ref_name: str, ref) -> None:
    if tuple(arr.shape) != tuple(ref.shape):
        raise ValueError(
            f"{name} must have the same shape as {ref_name} {tuple(ref.shape)}, got {tuple(arr.shape)}"
        )


def check_finite_scalar(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    """A real, finite number; optionally > 0 or >= 0. Returns it as a Python float."""
    reject_autograd(name, value)
    given = value
    if getattr(value, "shape", None) == () and hasattr(value, "item") and not isinstance(value, numbers.Real):
        value = value.item()  # a 0-d array (NumPy, CuPy, torch): its Python number
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {_describe(given)}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range, e.g. 10**400
        raise ValueError(f"{name} must be finite, got an integer too large for a float ({len(str(value))} "
                         "digits)") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_fraction(name: str, value, *, include_one: bool = False) -> float:
    """A real number in [0, 1) (dropout, Adam's betas), or in [0, 1] with include_one. Returns a float."""
    value = check_finite_scalar(name, value)
    if not (0.0 <= value <= 1.0 if include_one else 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, {'1]' if include_one else '1)'}, got {value}")
    return value


def check_rng(rng, needed_when: str) -> np.random.Generator:
    """A numpy.random.Generator, needed because of `needed_when` (e.g. "temperature > 0")."""
    if rng is None:
        raise ValueError(f"rng must be a numpy.random.Generator when {needed_when}, got None")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def check_positive_int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an integer, got {_describe(value)}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {int(value)}")
    return int(value)


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:  # (a 0-d array would compare elementwise)
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    """A bool (or NumPy bool); anything else, 0 and 1 included, is a TypeError."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_param_shapes(params, expected: dict, name: str = "params") -> None:
    """A params dict with exactly the keys and shapes of `expected` (name -> shape); ValueError naming
    every missing, extra or mis-shaped key, TypeError for a non-dict."""
    if not isinstance(params, dict):
        raise TypeError(f"{name} must be a dict of arrays, got {type(params).__name__}")
    missing = [k for k in expected if k not in params]
    extra = [k for k in params if k not in expected]
    wrong = [f"{k}: expected {expected[k]}, got {tuple(getattr(params[k], 'shape', ()))}"
             for k in expected if k in params and tuple(getattr(params[k], "shape", ())) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if extra:
        problems.append(f"unexpected keys {extra}")
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong))
    if problems:
        raise ValueError(f"{name} do not match the config: " + ". ".join(problems))


def check_param_dtypes(params: dict, dtype, name: str = "params") -> None:
    """Every array of params has `dtype` (the config's); TypeError listing the others."""
    wrong = [f"{k}: {p.dtype}" for k, p in params.items() if p.dtype != dtype]
    if wrong:
        raise TypeError(f"{name} must all have dtype {dtype} (config.dtype), got " + ", ".join(wrong))
