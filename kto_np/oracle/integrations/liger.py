"""The installed Liger-Kernel's KTO loss checked against the cases: `kto-np oracle liger`.

Liger's LigerFusedLinearKTOLoss takes no log-probs: it takes hidden states, the head's weight and the target
tokens, and computes the log-probs itself (log_softmax in float32, summed over the target tokens, no shift).
The oracle gives it one token per sequence, a vocabulary of two and a hidden size of one, with head weight
[[1], [0]]: the logits of sequence i are [a_i, 0] and the log-prob of token 0 is log sigmoid(a_i), so
a_i = lp_i - log(1 - exp(lp_i)) makes it exactly the case's log-prob lp_i (< 0), and the gradient reaches
lp_i through a_i. The reference model is the same construction on ref_logps (use_ref_model=True); the KL
estimate is passed as TRL's trainer computes it (kl = max(0, mean(kl_policy - kl_ref)), detached), or None
without KL pairs. Liger returns the loss and reward sums per class; it has no class weights, which the
report shows (weights_ignored) where a case's weights are not 1. The call itself is ecosystems.liger_call,
shared with `--ecosystem liger` (a class with Liger's interface in a project's own source).

Exit status: 0 passed, 1 failed, 2 when liger-kernel or torch is absent (pip install liger-kernel).
"""

from __future__ import annotations

import importlib.util
import sys

from ... import __version__
from .ecosystems import liger_call

LIGER_CLASS = "liger_kernel.chunked_loss:LigerFusedLinearKTOLoss"
LIGER_TOLERANCE = "float32"  # Liger takes log_softmax of logits.float(): float32 log-probs


def installed_liger_candidate(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                              kl_policy_logps=None, kl_ref_logps=None):
    """The installed Liger KTO loss as a kto_np-convention candidate (desirable_weight and undesirable_weight
    are taken and not used: Liger has none)."""
    from liger_kernel.chunked_loss import LigerFusedLinearKTOLoss  # noqa: PLC0415

    return liger_call(LigerFusedLinearKTOLoss, policy_logps, ref_logps, labels, beta, kl_policy_logps,
                      kl_ref_logps, [])


installed_liger_candidate.array_library = "torch"


def main_liger(tolerance: str = LIGER_TOLERANCE) -> int:
    """`kto-np oracle liger`: the installed Liger-Kernel's KTO loss on the kto cases, in a child process."""
    from ..check import verify  # noqa: PLC0415
    from ..run.loader import LoadError  # noqa: PLC0415

    missing = [name for name in ("torch", "liger_kernel") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"kto-np oracle liger: cannot check Liger-Kernel: {', '.join(missing)} not installed "
              "(pip install liger-kernel)", file=sys.stderr)
        return 2
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        liger_version = version("liger-kernel")
    except PackageNotFoundError:  # pragma: no cover - importable but not an installed distribution
        liger_version = "unknown"
    try:
        report = verify("kto_np.oracle.integrations.liger:installed_liger_candidate", "kto_loss", "kto",
                        tolerance=tolerance, isolate=True)
    except (LoadError, ValueError, TypeError, ImportError, AttributeError) as exc:
        print(f"kto-np oracle liger: cannot run Liger-Kernel {liger_version}: {exc}", file=sys.stderr)
        return 2
    print(f"Liger-Kernel {liger_version} LigerFusedLinearKTOLoss (kto_np {__version__}), tolerance {tolerance}: "
          "Liger computes its log-probs in float32")
    print(report)
    return 0 if report.passed else 1
