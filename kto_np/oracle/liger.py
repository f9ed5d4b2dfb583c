"""The installed Liger-Kernel's KTO loss checked against the cases: `kto-np oracle liger`.

Liger's LigerFusedLinearKTOLoss takes no log-probs: it takes hidden states, the head's weight and the target
tokens, and computes the log-probs itself (log_softmax in float32, summed over the target tokens, no shift).
The oracle gives it one token per sequence, a vocabulary of two and a hidden size of one, with head weight
[[1], [0]]: the logits of sequence i are [a_i, 0] and the log-prob of token 0 is log sigmoid(a_i), so
a_i = lp_i - log(1 - exp(lp_i)) makes it exactly the case's log-prob lp_i (< 0), and the gradient reaches
lp_i through a_i. The reference model is the same construction on ref_logps (use_ref_model=True); the KL
estimate is passed as TRL's trainer computes it (kl = max(0, mean(kl_policy - kl_ref)), detached), or None
without KL pairs. Liger returns the loss and reward sums per class; it has no class weights, which the
report shows (weights_ignored) where a case's weights are not 1.

Exit status: 0 passed, 1 failed, 2 when liger-kernel or torch is absent (pip install liger-kernel).
"""

from __future__ import annotations

import importlib.util
import inspect
import sys

import numpy as np

from .. import __version__

LIGER_CLASS = "liger_kernel.chunked_loss:LigerFusedLinearKTOLoss"
LIGER_TOLERANCE = "float32"  # Liger takes log_softmax of logits.float(): float32 log-probs


def _logit_of(logps):
    """a with log sigmoid(a) = logps (logps < 0), differentiable in torch."""
    import torch  # noqa: PLC0415

    return logps - torch.log(-torch.expm1(logps))


def liger_call(loss_class, policy_logps, ref_logps, labels, beta, kl_policy_logps, kl_ref_logps, notes: list,
               weights: tuple[float, float] = (1.0, 1.0)) -> dict:
    """Run a class with Liger's LigerFusedLinearKTOLoss interface on one case's log-probs (torch float64
    tensors); returns the kto_np quantities (loss, rewards/chosen, rewards/rejected). The class weights go
    to the constructor where it takes desirable_weight / undesirable_weight (Liger's own takes none)."""
    import torch  # noqa: PLC0415

    labels = torch.as_tensor(np.asarray(labels, dtype=bool))
    n = policy_logps.shape[0]
    weight = torch.tensor([[1.0], [0.0]], dtype=policy_logps.dtype)
    hidden = _logit_of(policy_logps).reshape(n, 1, 1)
    ref_hidden = _logit_of(ref_logps).reshape(n, 1, 1)
    target = torch.zeros((n, 1), dtype=torch.long)
    kl = None
    if kl_policy_logps is not None:
        kl = (kl_policy_logps - kl_ref_logps).mean().clamp(min=0).detach()
    settings = {"beta": beta, "use_ref_model": True, "compiled": False}
    accepted = inspect.signature(loss_class.__init__).parameters
    settings.update({k: w for k, w in zip(("desirable_weight", "undesirable_weight"), weights) if k in accepted})
    loss_module = loss_class(**settings)
    out = loss_module(hidden, weight, target, None, labels, ref_hidden, weight, None, kl)
    loss, aux = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, ())
    result = {"loss": loss}
    if isinstance(aux, (tuple, list)) and len(aux) >= 6:  # (logps sums, logits sums, chosen / rejected reward sums)
        count_chosen, count_rejected = int(labels.sum()), int((~labels).sum())
        result["rewards/chosen"] = aux[4] / count_chosen if count_chosen else None
        result["rewards/rejected"] = aux[5] / count_rejected if count_rejected else None
        message = "liger: reward sums per class returned: compared as class means"
        if message not in notes:
            notes.append(message)
    return result


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
    from .check import verify  # noqa: PLC0415
    from .loader import LoadError  # noqa: PLC0415

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
        report = verify("kto_np.oracle.liger:installed_liger_candidate", "kto_loss", "kto", tolerance=tolerance,
                        isolate=True)
    except (LoadError, ValueError, TypeError, ImportError, AttributeError) as exc:
        print(f"kto-np oracle liger: cannot run Liger-Kernel {liger_version}: {exc}", file=sys.stderr)
        return 2
    print(f"Liger-Kernel {liger_version} LigerFusedLinearKTOLoss (kto_np {__version__}), tolerance {tolerance}: "
          "Liger computes its log-probs in float32")
    print(report)
    return 0 if report.passed else 1
