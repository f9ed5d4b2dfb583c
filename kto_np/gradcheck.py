"""Central finite differences in float64, for checking every hand-written gradient.

The relative error of an analytic gradient `a` against a numerical one `b` is measured normwise,

    rel_error(a, b) = max|a - b| / max(tiny, max(|a| + |b|)),

so that entries that are exactly zero analytically (masked positions, say) and are a few 1e-12 of
finite-difference noise numerically do not blow up the measure. Small tensors are swept entry by
entry; large ones are checked along random unit directions (a directional derivative compares
`<grad, u>` with `(f(x + h u) - f(x - h u)) / 2h`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from . import logprobs, losses, step
from .backend import array_module, to_numpy
from .losses import KTOConfig
from .model import build

__all__ = [
    "GradCheckRow",
    "check_gradients",
    "directional_derivatives",
    "format_report",
    "numerical_gradient",
    "rel_error",
]

TINY = 1e-30
DEFAULT_STEP = 1e-5
DEFAULT_TOLERANCE = 1e-7


def rel_error(analytic, numerical, tiny: float = TINY) -> float:
    """max|a - b| / max(tiny, max(|a| + |b|)); 0.0 when both are all zeros."""
    a = to_numpy(analytic).astype(np.float64)
    b = to_numpy(numerical).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ, analytic {a.shape} vs numerical {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(tiny, float(np.max(np.abs(a) + np.abs(b)))))


def numerical_gradient(f: Callable[[], float], x, step: float = DEFAULT_STEP) -> np.ndarray:
    """d f / d x by central differences, one entry at a time.

    f takes no arguments and reads `x`, which is perturbed in place and restored exactly.
    Returns a NumPy float64 array of x's shape.
    """
    grad = np.zeros(x.shape, dtype=np.float64)
    for index in np.ndindex(*x.shape):
        old = x[index].item()
        x[index] = old + step
        f_plus = float(f())
        x[index] = old - step
        f_minus = float(f())
        x[index] = old
        grad[index] = (f_plus - f_minus) / (2.0 * step)
    return grad


def directional_derivatives(
    f: Callable[[], float], x, directions: np.ndarray, step: float = DEFAULT_STEP
) -> np.ndarray:
    """(f(x + h u) - f(x - h u)) / 2h for each direction u (rows of `directions`, shaped like x)."""
    xp = array_module(x)
    original = x.copy()
    out = np.zeros(len(directions), dtype=np.float64)
    for k, u in enumerate(directions):
        u_dev = xp.asarray(u, dtype=x.dtype)
        x[...] = original + step * u_dev
        f_plus = float(f())
        x[...] = original - step * u_dev
        f_minus = float(f())
        out[k] = (f_plus - f_minus) / (2.0 * step)
    x[...] = original
    return out


@dataclass(frozen=True)
class GradCheckRow:
    """One tensor's check: how it was checked and how far analytic and numerical are apart."""

    name: str
    shape: tuple
    mode: str  # "full" (every entry) or "dir:K" (K random directions)
    max_abs_error: float
    rel_error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.rel_error) and self.rel_error <= self.tolerance)


def check_gradients(
    f: Callable[[], float],
    tensors: Mapping[str, object],
    analytic: Mapping[str, object],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    max_full_size: int = 64,
    num_directions: int = 4,
    step: float = DEFAULT_STEP,
    seed: int = 0,
) -> list[GradCheckRow]:
    """Check `analytic[name]` = d f / d tensors[name] for every name.

    f is a scalar function of the tensors (it reads them; they are perturbed in place and restored).
    Tensors with at most `max_full_size` entries are swept entry by entry; larger ones are checked
    along `num_directions` random unit directions drawn from `seed`. Use float64 tensors.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for name, x in tensors.items():
        if name not in analytic:
            raise KeyError(f"check_gradients: no analytic gradient for {name!r}")
        grad = to_numpy(analytic[name]).astype(np.float64)
        if grad.shape != tuple(x.shape):
            raise ValueError(
                f"check_gradients: gradient of {name!r} has shape {grad.shape}, tensor has {tuple(x.shape)}"
            )
        if x.size <= max_full_size:
            numerical = numerical_gradient(f, x, step)
            mode, a, b = "full", grad, numerical
        else:
            directions = rng.standard_normal((num_directions, *x.shape))
            directions /= np.sqrt((directions**2).reshape(num_directions, -1).sum(axis=1)).reshape(
                -1, *([1] * x.ndim)
            )
            numerical = directional_derivatives(f, x, directions, step)
            analytic_dir = np.array([float(np.sum(grad * u)) for u in directions])
            # scale: the directional derivatives live on the scale of |grad| (|u| = 1)
            mode, a, b = f"dir:{num_directions}", analytic_dir, numerical
        err = float(np.max(np.abs(a - b))) if a.size else 0.0
        if mode.startswith("dir"):
            scale = max(TINY, float(np.sqrt(np.sum(grad**2))) * 2.0)
            rel = err / scale
        else:
            rel = rel_error(a, b)
        rows.append(GradCheckRow(name, tuple(x.shape), mode, err, rel, tolerance))
    return rows


def format_report(rows: list[GradCheckRow], title: str | None = None) -> str:
    """A fixed-width table: name, shape, mode, max abs error, relative error, pass/FAIL."""
    name_width = max([len("tensor"), *(len(r.name) for r in rows)])
    shape_width = max([len("shape"), *(len(str(r.shape)) for r in rows)])
    header = (f"{'tensor':<{name_width}}  {'shape':<{shape_width}}  {'mode':<6} {'max abs err':>12} "
              f"{'rel err':>10}  result")
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name:<{name_width}}  {str(r.shape):<{shape_width}}  {r.mode:<6} {r.max_abs_error:>12.3e} "
            f"{r.rel_error:>10.3e}  {'pass' if r.passed else 'FAIL'}"
        )
    return "\n".join(lines)


def loss_and_logprob_checks(seed: int = 0, tolerance: float = DEFAULT_TOLERANCE) -> list[GradCheckRow]:
    """Finite-difference checks of compute_logprobs, the shifted helper and every loss variant.

    Random float64 inputs from `seed`; one row per function and option.
    """
    rng = np.random.default_rng(seed)
    rows: list[GradCheckRow] = []

    B, T, V = 3, 5, 7
    logits = 2.0 * rng.standard_normal((B, T, V))
    targets = rng.integers(0, V, (B, T))
    mask = (rng.random((B, T)) > 0.25).astype(np.float64)
    upstream = rng.standard_normal(B)
    for name, forward, backward in [
        ("compute_logprobs", logprobs.logprobs_forward, logprobs.logprobs_backward),
        ("sequence_logprobs", logprobs.sequence_logprobs_forward, logprobs.sequence_logprobs_backward),
    ]:
        analytic = backward(upstream, forward(logits, targets, mask)[1])
        rows += check_gradients(
            lambda forward=forward: float(upstream @ forward(logits, targets, mask)[0]),
            {f"{name} d/dlogits": logits}, {f"{name} d/dlogits": analytic},
            tolerance=tolerance, max_full_size=B * T * V,
        )

    n = 6
    policy = -5.0 + rng.standard_normal(n)
    ref = policy + 0.5 * rng.standard_normal(n)
    labels = np.array([1, 0, 1, 1, 0, 0])
    kl_policy = -6.0 + rng.standard_normal(n)
    kl_ref = kl_policy - np.abs(rng.standard_normal(n))  # positive KL estimate: the clamp is inactive
    cases = [
        ("edifice", dict(variant="edifice")),
        ("edifice stop_z_grad", dict(variant="edifice", stop_z_grad=True)),
        ("kto, no KL pairs", dict(variant="kto")),
        ("kto, KL pairs", dict(variant="kto", kl_policy_logps=kl_policy, kl_ref_logps=kl_ref)),
        ("apo_zero_unpaired", dict(variant="apo_zero_unpaired")),
    ]
    for label, kwargs in cases:
        kwargs = dict(beta=0.5, desirable_weight=1.0, undesirable_weight=1.2, warn_balance=False, **kwargs)
        _, grad, _ = losses.kto_loss_and_grad(policy, ref, labels, **kwargs)
        name = f"kto_loss[{label}] d/dpolicy_logps"
        if kwargs.get("stop_z_grad"):
            loss_fn = _edifice_loss_with_frozen_z(policy, ref, labels, **kwargs)
        else:
            loss_fn = lambda kwargs=kwargs: losses.kto_loss(policy, ref, labels, **kwargs)  # noqa: E731
        rows += check_gradients(loss_fn, {name: policy}, {name: grad}, tolerance=tolerance)

    chosen, rejected = policy[:3].copy(), policy[3:].copy()
    ref_chosen, ref_rejected = ref[:3], ref[3:]
    _, (grad_chosen, grad_rejected), _ = losses.dpo_loss_and_grad(chosen, rejected, ref_chosen, ref_rejected, 0.5)
    rows += check_gradients(
        lambda: losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.5),
        {"dpo_loss d/dpolicy_chosen": chosen, "dpo_loss d/dpolicy_rejected": rejected},
        {"dpo_loss d/dpolicy_chosen": grad_chosen, "dpo_loss d/dpolicy_rejected": grad_rejected},
        tolerance=tolerance,
    )
    return rows


def _edifice_loss_with_frozen_z(policy, ref, labels, *, beta, desirable_weight, undesirable_weight, **_):
    """The edifice loss as a function of policy with z held at its current value: the function whose
    gradient kto_loss_and_grad(..., stop_z_grad=True) returns."""
    z = float(np.mean(beta * (policy - ref)))
    desirable = np.asarray(labels) == 1

    def loss() -> float:
        reward = beta * (policy - ref) - z
        per_example = np.where(desirable, -desirable_weight * losses.sigmoid(reward),
                               -undesirable_weight * losses.sigmoid(-reward))
        return float(np.mean(per_example))

    return loss


def model_checks(seed: int = 0, variant: str = "kto", tolerance: float = 1e-6, *, positional: str = "learned",
                 tie_embeddings: bool = True) -> list[GradCheckRow]:
    """End to end: the gradient of the KTO loss w.r.t. every parameter of a small GPT-2, through the
    model, the shifted completion log-probs and the loss `variant` (step.kto_step), against finite
    differences.

    Config V=11, C=12, NH=3, L=2, T=6, B=4 in float64; prompts of 2 tokens, right padding on two rows.
    """
    rng = np.random.default_rng(seed)
    model = build(hidden_size=12, num_layers=2, num_heads=3, vocab_size=11, dropout=0.0, max_seq_len=8,
                  dtype="float64", positional=positional, tie_embeddings=tie_embeddings)
    params = model.init(seed)
    params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}  # off the init's symmetry
    tokens = rng.integers(1, 11, (4, 6))
    completion_lengths = [4, 3, 4, 2]  # rows 1 and 3 end in padding
    batch = step.make_batch([row[:2].tolist() for row in tokens],
                            [row[2:2 + n].tolist() for row, n in zip(tokens, completion_lengths)],
                            [1, 0, 1, 0], dtype="float64")
    ref_logps = step.forward_logps(model, params, batch.tokens, batch.completion_mask) + 0.3 * rng.standard_normal(4)
    # kl_ref below the policy's KL-row log-probs: z > 0, so the clamp is inactive
    kl_ref_logps = step.forward_logps(model, params, batch.kl_tokens, batch.kl_completion_mask) - 0.5
    config = KTOConfig(variant, beta=0.5, desirable_weight=1.0, undesirable_weight=1.2)
    _, _, grads = step.kto_step(model, params, batch, ref_logps, kl_ref_logps, config)
    # z is detached in "kto": the function differentiated holds the KL rows' policy log-probs fixed.
    kl_policy_logps, kl_ref = None, None
    if config.uses_kl_pairs:
        kl_policy_logps = step.forward_logps(model, params, batch.kl_tokens, batch.kl_completion_mask)
        kl_ref = kl_ref_logps

    def loss() -> float:
        logps = step.forward_logps(model, params, batch.tokens, batch.completion_mask)
        return config.loss_and_grad(logps, ref_logps, batch.labels, kl_policy_logps, kl_ref)[0]

    return check_gradients(loss, params, grads, tolerance=tolerance, seed=seed)
