"""The lazy facade of a package (PEP 562): its names are imported on first use.

kto_np, kto_np.oracle and kto_np.exercises export names defined in their modules without importing any of
them up front: `kto-np` starts without NumPy before its Ctrl-C handler is in place, and a package's
__init__ that imports none of its parts takes part in no import cycle (tests/test_layout.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_facade(package: str, namespace: dict, exports: dict[str, str],
                aliases: dict[str, str] | None = None) -> tuple[Callable, Callable]:
    """(__getattr__, __dir__) for `package`: exports maps a name to the submodule that defines it, aliases an
    old name to its exported one; any other name is looked up as a submodule (kto_np.losses, ...). A name,
    once imported, is stored in the package's namespace, so __getattr__ runs once per name."""
    aliases = aliases or {}

    def __getattr__(name: str):
        exported = aliases.get(name, name)
        if exported in exports:
            value = getattr(importlib.import_module(f".{exports[exported]}", package), exported)
        else:  # a submodule not imported yet
            try:
                value = importlib.import_module(f".{name}", package)
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports, *aliases})

    return __getattr__, __dir__
