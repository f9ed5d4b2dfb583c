"""kto_np: KTO (Kahneman-Tversky Optimization) from scratch in NumPy.

A GPT-2 style transformer with hand-written forward and backward passes, every KTO loss variant with
its explicit gradient, and float64 reference cases for checking other implementations.

The names below are imported on first use (PEP 562), so that `kto-np` starts without importing NumPy
before its Ctrl-C handler is in place; `from kto_np import build` works as usual.
"""

from __future__ import annotations

from ._facade import lazy_facade

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


__getattr__, __dir__ = lazy_facade(__name__, globals(), _EXPORTS)
