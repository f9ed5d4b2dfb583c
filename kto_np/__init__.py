"""kto_np: KTO (Kahneman-Tversky Optimization) from scratch in NumPy.

A GPT-2 style transformer with hand-written forward and backward passes, every KTO loss variant with
its explicit gradient, and float64 reference cases for checking other implementations.

The names below are imported on first use (PEP 562), so that `kto-np` starts without importing NumPy
before its Ctrl-C handler is in place; `from kto_np import build` works as usual.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# exported name -> the module that defines it
_EXPORTS = {
    "Edifice": "edifice",
    "EdificeConfig": "edifice",
    "generate": "generate",
    "compute_logprobs": "logprobs",
    "sequence_logprobs": "logprobs",
    "VARIANTS": "losses",
    "check_balance": "losses",
    "default_beta": "losses",
    "dpo_loss": "dpo",
    "dpo_loss_and_grad": "dpo",
    "kto_loss": "losses",
    "kto_loss_and_grad": "losses",
    "GPT": "model",
    "GPTConfig": "model",
    "build": "architectures",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:  # a submodule not imported yet: kto_np.losses, kto_np.train, ...
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
