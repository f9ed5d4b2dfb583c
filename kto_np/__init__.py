"""kto_np: KTO (Kahneman-Tversky Optimization) from scratch in NumPy.

A GPT-2 style transformer with hand-written forward and backward passes, every KTO loss variant with
its explicit gradient, and float64 reference cases for checking other implementations.
"""

__version__ = "0.1.0"

from .logprobs import compute_logprobs, sequence_logprobs  # noqa: E402

__all__ = ["__version__", "compute_logprobs", "sequence_logprobs"]
