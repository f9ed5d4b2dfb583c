"""Loading a candidate from a spec: "package.module:function", "path/to/file.py:function",
"module:Class" or "module:Class.method".

Any exception while importing becomes one LoadError line naming the spec and where in the candidate it
was raised (a usage error: exit status 2). sys.exit during the import is left to the caller (the worker
reports it as a failed check). The convention a candidate follows is detected in conventions.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ..integrations import ecosystems  # noqa: F401  (importing it registers the projects' conventions)
from .candidates import short_error
from .conventions import ConventionError, adapt, candidate_form


class LoadError(Exception):
    """The candidate cannot be loaded or called as any known convention (exit status 2)."""


def _import_file(spec: str, module_name: str):
    path = Path(module_name)
    if not path.is_file():
        raise LoadError(f"spec {spec!r}: no file {module_name!r}")
    folder = str(path.resolve().parent)
    if folder not in sys.path:  # the file's own imports of its neighbours work, as with `python file.py`
        sys.path.insert(0, folder)
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    registered = sys.modules.setdefault(path.stem, module) is module  # dataclasses look modules up by name
    try:
        module_spec.loader.exec_module(module)
    except BaseException as exc:
        if registered:
            sys.modules.pop(path.stem, None)
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            raise
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            raise LoadError(f"spec {spec!r}: cannot run {module_name!r} here: it imports {exc.name!r}, which is not "
                            f"installed ({short_error(exc)})") from exc
        raise LoadError(f"spec {spec!r}: importing {module_name!r} raised {short_error(exc)}") from exc
    return module


def _import_module(spec: str, module_name: str):
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise LoadError(f"spec {spec!r}: cannot import module {module_name!r}: {exc}") from exc
        raise LoadError(f"spec {spec!r}: importing {module_name!r} raised {short_error(exc)}") from exc
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        raise LoadError(f"spec {spec!r}: importing {module_name!r} raised {short_error(exc)}") from exc
    finally:
        if added and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())


def resolve_spec(spec: str) -> tuple:
    """(the object a spec names, the object it is an attribute of), not yet checked."""
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string 'package.module:function', got {type(spec).__name__}")
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"spec must look like 'package.module:function', got {spec!r}")
    module = _import_file(spec, module_name) if module_name.endswith(".py") else _import_module(spec, module_name)
    target = owner = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise LoadError(f"spec {spec!r}: {module_name!r} has no attribute {attribute!r}")
        owner, target = target, getattr(target, part)
    return target, owner


def load_callable(spec: str) -> Callable:
    """The callable named by a spec. ValueError for a malformed spec, ImportError when the module cannot
    be imported (or raises while imported), AttributeError for a missing name, TypeError for something
    that is not callable; each message quotes the spec."""
    try:
        target, _ = resolve_spec(spec)
    except LoadError as exc:
        error = AttributeError if "has no attribute" in str(exc) else ImportError
        raise error(str(exc)) from exc
    if not callable(target):
        raise TypeError(f"spec {spec!r}: {spec.partition(':')[2]!r} is a {type(target).__name__}, not a callable")
    return target


def load_candidate(spec: str, *, kind: str, convention: str | None = None) -> tuple[Callable, str]:
    """(the candidate a spec names, adapted to the kto_np call of `kind`, how it is called); LoadError when it
    cannot be imported or fits no convention."""
    try:
        target, owner = resolve_spec(spec)
    except (ValueError, TypeError) as exc:
        raise LoadError(str(exc)) from exc
    if not callable(target):
        raise LoadError(f"spec {spec!r}: {spec.partition(':')[2]!r} is a {type(target).__name__}, not a callable")
    return adapt_candidate(target, kind, convention, owner=owner, label=spec)


def adapt_candidate(target, kind: str, convention: str | None = None, *, owner=None,
                    label: str = "") -> tuple[Callable, str]:
    """A callable candidate adapted to the kto_np call of `kind` by its detected (or forced) convention."""
    try:
        return adapt(candidate_form(target, owner, label), kind, convention)
    except ConventionError as exc:
        raise LoadError(str(exc)) from exc
