"""kto_np: KTO (Kahneman-Tversky Optimization) from scratch in NumPy.

A GPT-2 style transformer with hand-written forward and backward passes, every KTO loss variant with
its explicit gradient, and float64 reference cases for checking other implementations.
"""

__version__ = "0.1.0"

from .edifice import Edifice, EdificeConfig  # noqa: E402
from .generate import generate  # noqa: E402
from .logprobs import compute_logprobs, sequence_logprobs  # noqa: E402
from .losses import (  # noqa: E402
    VARIANTS,
    check_balance,
    default_beta,
    dpo_loss,
    dpo_loss_and_grad,
    kto_loss,
    kto_loss_and_grad,
)
from .model import GPT, GPTConfig, build  # noqa: E402

__all__ = [
    "GPT",
    "Edifice",
    "EdificeConfig",
    "GPTConfig",
    "VARIANTS",
    "__version__",
    "build",
    "check_balance",
    "compute_logprobs",
    "default_beta",
    "dpo_loss",
    "dpo_loss_and_grad",
    "generate",
    "kto_loss",
    "kto_loss_and_grad",
    "sequence_logprobs",
]
