"""The array module behind every computation: NumPy by default, CuPy when selected.

Array code asks this module for `xp` (the module that owns its arrays) instead of importing NumPy
or CuPy itself. The few operations that differ between the two (scatter-add, moving to host) live
here and nowhere else.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = [
    "BACKENDS",
    "array_module",
    "asarray",
    "get_backend",
    "resolve_dtype",
    "scatter_add",
    "set_backend",
    "to_module",
    "to_numpy",
    "xp",
]

BACKENDS = ("numpy", "cupy")
DTYPES = {"float32": np.float32, "float64": np.float64}

_ENV_VAR = "KTO_NP_BACKEND"
_state: dict[str, Any] = {"name": None, "module": None}


def _import_cupy():
    try:
        import cupy  # noqa: PLC0415  (optional dependency, imported only when asked for)
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ImportError(
            "backend 'cupy' was requested but CuPy is not installed; "
            "install it with: pip install 'kto_np[gpu]'"
        ) from exc
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(f"backend 'cupy' was requested but no CUDA device is usable: {exc}") from exc
    return cupy


def set_backend(name: str) -> Any:
    """Select the array module for new arrays: "numpy" or "cupy". Returns the module."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    module = np if name == "numpy" else _import_cupy()
    _state["name"], _state["module"] = name, module
    return module


def get_backend() -> str:
    """Name of the selected backend ("numpy" unless KTO_NP_BACKEND or set_backend says otherwise)."""
    if _state["name"] is None:
        set_backend(os.environ.get(_ENV_VAR, "numpy").strip().lower() or "numpy")
    return _state["name"]


def xp() -> Any:
    """The selected array module (numpy or cupy), used to create new arrays."""
    get_backend()
    return _state["module"]


def array_module(*arrays: Any) -> Any:
    """The module that owns `arrays`: cupy if any of them is a CuPy array, else numpy.

    Functions that receive arrays compute with the module of their inputs, so a CuPy array stays
    on the GPU whatever the selected backend is.
    """
    for a in arrays:
        if type(a).__module__.split(".")[0] == "cupy":
            import cupy  # noqa: PLC0415

            return cupy
    return np


def to_numpy(a: Any) -> np.ndarray:
    """Copy an array (NumPy or CuPy) or scalar to a NumPy array on the host."""
    if type(a).__module__.split(".")[0] == "cupy":
        return a.get()
    return np.asarray(a)


def to_module(a: Any, module: Any) -> Any:
    """`a` as an array of `module` (numpy or cupy): an explicit copy between host and device when it lives
    on the other one, else `a` itself."""
    return to_numpy(a) if module is np else module.asarray(a)


def asarray(a: Any, dtype: Any = None) -> Any:
    """`a` as an array of the selected backend (no copy when it already is one)."""
    return xp().asarray(a, dtype=dtype)


def scatter_add(target: Any, indices: Any, values: Any) -> None:
    """In place: target[indices[k]] += values[k] for every k, summing repeated indices.

    target: [N, C]; indices: integer array of any shape S; values: [*S, C].
    """
    module = array_module(target, values)
    flat_indices = indices.reshape(-1)
    flat_values = values.reshape(-1, *target.shape[1:])
    if module is np:
        np.add.at(target, flat_indices, flat_values)
    else:  # on the CPU, tests/strict_cupy.py stands in for cupyx
        import cupyx  # noqa: PLC0415

        cupyx.scatter_add(target, flat_indices, flat_values)


def resolve_dtype(dtype: Any) -> np.dtype:
    """Accept "float32"/"float64" or the NumPy dtype; anything else is a ValueError."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        return np.dtype(DTYPES[dtype])
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}") from None
    if resolved not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {resolved}")
    return resolved

