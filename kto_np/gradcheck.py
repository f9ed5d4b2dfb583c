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

from .backend import array_module, to_numpy

__all__ = [
    "GradCheckRow",
    "check_gradients",
    "directional_derivatives",
    "format_report",
    "numerical_gradient",
    "reference_error",
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


def reference_error(candidate, reference) -> tuple[float, float, float]:
    """Errors of `candidate` against a trusted `reference` (the oracle's measure, normwise like rel_error
    but scaled by the reference alone): (max|c - r|, max|r|, max|c - r| / max|r|).

    A NaN or inf difference counts as inf; any error against an all-zero reference is a relative inf.
    """
    c = np.asarray(to_numpy(candidate), dtype=np.float64)
    r = np.asarray(to_numpy(reference), dtype=np.float64)
    if c.shape != r.shape:
        raise ValueError(f"reference_error: shapes differ, candidate {c.shape} vs reference {r.shape}")
    if c.size == 0:
        return 0.0, 0.0, 0.0
    diff = np.abs(c - r)
    max_abs = float(np.max(np.where(np.isfinite(diff), diff, np.inf)))
    scale = float(np.max(np.abs(r)))
    if max_abs == 0:
        return 0.0, scale, 0.0
    return max_abs, scale, (max_abs / scale if scale > 0 else float("inf"))


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
