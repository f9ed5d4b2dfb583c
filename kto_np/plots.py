"""Figures of the KTO loss family: value functions, loss and gradient surfaces, KTO against DPO, the
effect of the gradient through z, class balance, training curves and where in a sequence the gradient
goes. Every number drawn is computed with kto_np.losses (and kto_np.logprobs for token gradients).

Each `plot_*` function draws on the axes it is given (or on a new `KTOFigure`, a
`matplotlib.figure.Figure` that needs no backend and no pyplot and that a notebook displays as a
PNG when a cell ends with it) and returns the Figure; the `*_curves`/`*_surface`/`*_batch`/
`*_shares` functions return the data behind a figure. `make_all_figures` writes them all as PNGs.

Conventions: r = log π(y|x) − log π_ref(y|x) (the log-ratio); z is the reference point in log-ratio
units, so the sigmoid argument is u = β(r − z); gradients are ∂loss_i/∂r_i = ∂loss_i/∂ log π(y_i|x_i).
Shape letters: N points on a curve, NY × NX a grid, S weight settings, F desirable fractions,
B examples, T positions, V vocabulary.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .dpo import dpo_loss_and_grad
from .files import atomic_write
from .logprobs import sequence_logprobs, sequence_logprobs_backward, sequence_logprobs_forward
from .losses import BALANCE_RANGE, VARIANTS, kto_loss_and_grad
from .validation import as_float_array, check_choice, check_finite_scalar, check_positive_int

__all__ = [
    "DESIRABLE_COLOR",
    "FIGURE_DPI",
    "FIGURE_NAMES",
    "NOTEBOOK_DPI",
    "UNDESIRABLE_COLOR",
    "InlineFigure",
    "KTOFigure",
    "LossSurface",
    "MethodCurves",
    "TokenGradients",
    "ValueCurves",
    "ZGradientBatch",
    "balanced_fraction_range",
    "class_balance_shares",
    "kto_vs_dpo_curves",
    "load_metrics_records",
    "moving_average",
    "loss_surface",
    "make_all_figures",
    "dpo_implied_value",
    "inline",
    "kahneman_tversky_value",
    "plot_bars",
    "plot_class_balance",
    "plot_curves",
    "plot_kto_vs_dpo",
    "plot_loss_surface",
    "plot_token_gradients",
    "plot_training_curves",
    "plot_value_functions",
    "plot_z_gradient_effect",
    "synthetic_token_gradients",
    "value_curves",
    "z_gradient_batch",
]

# Okabe–Ito colours (readable with colour-vision deficiencies), the same in every figure.
DESIRABLE_COLOR = "#0072B2"
UNDESIRABLE_COLOR = "#D55E00"
CLASS_COLORS = {True: DESIRABLE_COLOR, False: UNDESIRABLE_COLOR}
CLASS_NAMES = {True: "desirable", False: "undesirable"}
METHOD_STYLES = {  # method -> (legend name, colour, line style)
    "kto": ("KTO", "#009E73", "-"),
    "apo_zero_unpaired": ("APO-zero (unpaired)", "#E69F00", "--"),
    "dpo": ("DPO", "#CC79A7", ":"),
}
SETTING_COLORS = ("#000000", "#56B4E9", "#009E73", "#CC79A7", "#E69F00", "#F0E442")

FIGURE_DPI = 110
NOTEBOOK_DPI = 100  # the inline PNG of a figure in a notebook: legends and contour labels readable
FIGURE_NAMES = (
    "value_functions.png", "loss_surface_z.png", "loss_surface_beta.png", "kto_vs_dpo.png",
    "z_gradient.png", "class_balance.png", "token_gradients.png", "training_curves.png",
)
SURFACE_AXES = ("z", "beta")
TRAINING_PHASES = ("sft", "kto", "eval")

# ---------------------------------------------------------------------------------------------------
# shared pieces


def _notebook_png(fig: Figure) -> bytes:
    """The inline PNG: NOTEBOOK_DPI, reduced to a 256-colour palette (no dithering), which keeps a
    figure's look and cuts a heatmap's bytes about three times: notebooks with many figures stay small."""
    from PIL import Image  # noqa: PLC0415  (Pillow comes with matplotlib)

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=NOTEBOOK_DPI, metadata={"Software": None})
    image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    palette = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = io.BytesIO()
    palette.save(out, format="PNG", optimize=True)
    return out.getvalue()


class KTOFigure(Figure):
    """A Figure that Jupyter displays inline (IPython calls `_repr_png_`), with no pyplot involved:
    a cell ending in a figure shows it in a fresh kernel, whatever the matplotlib backend."""

    def _repr_png_(self) -> bytes:
        return _notebook_png(self)


class InlineFigure:
    """Any matplotlib Figure (e.g. one of kto_np.landscape's), displayed inline like a KTOFigure."""

    def __init__(self, figure: Figure):
        if not isinstance(figure, Figure):
            raise TypeError(f"figure must be a matplotlib Figure, got {type(figure).__name__}")
        self.figure = figure

    def _repr_png_(self) -> bytes:
        return _notebook_png(self.figure)

    def __repr__(self) -> str:
        width, height = self.figure.bbox.width, self.figure.bbox.height
        return f"<InlineFigure size {width:g}x{height:g} with {len(self.figure.axes)} Axes>"


def inline(figure: Figure) -> InlineFigure:
    """`figure` wrapped so that a notebook cell ending with it shows it as a PNG (no pyplot needed)."""
    return InlineFigure(figure)


def _prepare_axes(axes, shape: tuple[int, int], figsize: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    """The figure and a flat list of rows*cols axes: new ones on a new Figure when axes is None."""
    count = shape[0] * shape[1]
    if axes is None:
        fig = KTOFigure(figsize=figsize, layout="constrained")
        return fig, list(fig.subplots(*shape, squeeze=False).ravel())
    flat = [axes] if isinstance(axes, Axes) else list(np.asarray(axes, dtype=object).ravel())
    if len(flat) != count or not all(isinstance(ax, Axes) for ax in flat):
        raise ValueError(
            f"axes must be None or {count} matplotlib Axes (a {shape[0]}x{shape[1]} grid), got "
            f"{len(flat)} object(s) of type(s) {sorted({type(ax).__name__ for ax in flat})}"
        )
    figures = {id(ax.get_figure(root=True)) for ax in flat}
    if len(figures) != 1:
        raise ValueError(f"axes must all belong to one figure, got axes from {len(figures)} figures")
    return flat[0].get_figure(root=True), flat


def _as_label(name: str, value) -> bool:
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"{name} must be 1 (desirable) or 0 (undesirable), got {value!r}")


def _as_grid(name: str, values, *, positive: bool = False) -> np.ndarray:
    """A 1-D, finite, strictly increasing float64 array of at least 2 points."""
    arr = np.asarray(as_float_array(name, values, ndim=1), dtype=np.float64)
    if arr.shape[0] < 2 or not bool(np.all(np.diff(arr) > 0)):
        raise ValueError(f"{name} must be strictly increasing with at least 2 points, got {arr[:5]}...")
    if positive and not bool(np.all(arr > 0)):
        raise ValueError(f"{name} must be > 0 everywhere, got minimum {arr.min()}")
    return arr


def _add_legend_if_several(ax: Axes, **kwargs) -> None:
    handles, _ = ax.get_legend_handles_labels()
    if len(handles) > 1:
        ax.legend(**kwargs)


def _example_loss_and_slope(variant: str, log_ratio: float, desirable: bool, *, beta: float, z: float,
                            weight: float) -> tuple[float, float]:
    """(loss_i, ∂loss_i/∂r_i with z held fixed) of one example, computed with kto_loss_and_grad.

    z is in log-ratio units for every variant. "kto": a KL pair with log-ratio z (the variant clamps
    it at 0). "edifice": z is the batch mean of β r, so the example is paired with a zero-weight
    example of the other class at log-ratio 2z − r (pair mean z); loss and gradient of the pair are
    halved by the batch mean, hence the factor 2, and stop_z_grad holds z fixed.
    "apo_zero_unpaired": no z (the caller passes z = 0).
    """
    class_weights = {"desirable_weight": weight if desirable else 0.0,
                     "undesirable_weight": 0.0 if desirable else weight}
    if variant == "edifice":
        loss, grad, _ = kto_loss_and_grad(
            np.array([log_ratio, 2.0 * z - log_ratio]), np.zeros(2), [int(desirable), int(not desirable)],
            beta, **class_weights, variant="edifice", stop_z_grad=True, warn_balance=False)
        return 2.0 * loss, 2.0 * float(grad[0])
    kl_pair = {"kl_policy_logps": np.array([z]), "kl_ref_logps": np.zeros(1)} if variant == "kto" else {}
    loss, grad, _ = kto_loss_and_grad(np.array([log_ratio]), np.zeros(1), [int(desirable)], beta,
                                      **class_weights, variant=variant, warn_balance=False, **kl_pair)
    return loss, float(grad[0])


def save_figure(fig: Figure, path) -> Path:
    """Write `fig` as a PNG with no date or version in its bytes, atomically (files.atomic_write)."""
    path = Path(path)
    with atomic_write(path, "wb") as stream:
        fig.savefig(stream, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
    return path


# ---------------------------------------------------------------------------------------------------
# value functions


class ValueCurves(NamedTuple):
    rewards: np.ndarray  # [N] x = β(r − z): the reward β r relative to the reference point β z
    desirable: np.ndarray  # [N] v_D(x) = λ_D σ(x), what KTO rewards for a desirable example
    undesirable: np.ndarray  # [N] v_U(x) = λ_U σ(−x), what KTO rewards for an undesirable example
    implied: np.ndarray  # [N] λ_D (σ(x) − ½) for x >= 0, λ_U (σ(x) − ½) for x < 0: the two curves below, spliced
    desirable_centred: np.ndarray  # [N] λ_D (σ(x) − ½): a desirable example's value, 0 at the reference point
    undesirable_centred: np.ndarray  # [N] λ_U (σ(x) − ½): an undesirable example's, the same S scaled by λ_U


def value_curves(rewards, desirable_weight: float = 1.0, undesirable_weight: float = 1.5) -> ValueCurves:
    """KTO's value functions over x = β(r − z), from the "kto" loss: v = λ − loss.

    v_D(x) = λ_D σ(x), v_U(x) = λ_U σ(−x). Centred at the reference point, a desirable example's value
    is v_D(x) − λ_D/2 = λ_D(σ(x) − ½) and an undesirable one's λ_U/2 − v_U(x) = λ_U(σ(x) − ½): one S
    (concave above the reference point, convex below), scaled by the *label's* weight on both sides.
    `implied` splices them (the desirable curve for gains x >= 0, the undesirable one for losses): the
    Kahneman–Tversky reading in which a gain is a desirable outcome and a loss an undesirable one, with
    loss aversion λ_U / λ_D.
    """
    rewards = np.asarray(as_float_array("rewards", rewards, ndim=1), dtype=np.float64)
    desirable_weight = check_finite_scalar("desirable_weight", desirable_weight, positive=True)
    undesirable_weight = check_finite_scalar("undesirable_weight", undesirable_weight, positive=True)
    weights = {True: desirable_weight, False: undesirable_weight}
    values = {}
    for desirable in (True, False):  # β = 1 and z = 0, so the log-ratio is x itself
        losses = [_example_loss_and_slope("kto", x, desirable, beta=1.0, z=0.0, weight=weights[desirable])[0]
                  for x in rewards]
        values[desirable] = weights[desirable] - np.array(losses)
    desirable_centred = values[True] - desirable_weight / 2
    undesirable_centred = undesirable_weight / 2 - values[False]
    implied = np.where(rewards >= 0, desirable_centred, undesirable_centred)
    return ValueCurves(rewards, values[True], values[False], implied, desirable_centred, undesirable_centred)


def kahneman_tversky_value(x, *, alpha: float = 0.88, loss_aversion: float = 2.25) -> np.ndarray:
    """Tversky and Kahneman's (1992) fitted value function: x^α for gains, −λ(−x)^α for losses."""
    x = np.asarray(as_float_array("x", x, ndim=1), dtype=np.float64)
    alpha = check_finite_scalar("alpha", alpha, positive=True)
    loss_aversion = check_finite_scalar("loss_aversion", loss_aversion, positive=True)
    return np.where(x >= 0, np.abs(x) ** alpha, -loss_aversion * np.abs(x) ** alpha)


def dpo_implied_value(x) -> np.ndarray:
    """DPO's implied value of a margin x, relative to x = 0: log σ(x) + log 2 = log 2 − (DPO loss),
    computed with dpo_loss_and_grad (chosen at log-ratio x, β = 1, rejected at 0)."""
    x = np.asarray(as_float_array("x", x, ndim=1), dtype=np.float64)
    zero = np.zeros(1)
    return np.array([np.log(2.0) - dpo_loss_and_grad(np.array([m]), zero, zero, zero, 1.0)[0] for m in x])


def plot_value_functions(axes=None, *, rewards=None, desirable_weight: float = 1.0,
                         undesirable_weight: float = 1.5) -> Figure:
    """Three panels against x = β(r − z). Left: KTO's per-class values v_D, v_U. Middle: each
    class's value centred at the reference point, λ_y(σ(x) − ½), drawn on both sides of it (the
    weight follows the label, not the sign of x). Right: the implied value functions of the paper's
    comparison, Kahneman–Tversky's, KTO's (λ = 1) and DPO's, all 0 at the reference point."""
    rewards = np.linspace(-6.0, 6.0, 241) if rewards is None else rewards
    curves = value_curves(rewards, desirable_weight, undesirable_weight)
    fig, (ax_class, ax_centred, ax_compare) = _prepare_axes(axes, (1, 3), (16.0, 4.8))
    x = curves.rewards
    x_label = r"$x = \beta(r - z)$: reward $\beta r$ minus $\beta z$"

    ax_class.plot(x, curves.desirable, color=DESIRABLE_COLOR, linewidth=2.0,
                  label=rf"desirable: $\lambda_D\,\sigma(x)$, $\lambda_D$ = {desirable_weight:g}")
    ax_class.plot(x, curves.undesirable, color=UNDESIRABLE_COLOR, linewidth=2.0,
                  label=rf"undesirable: $\lambda_U\,\sigma(-x)$, $\lambda_U$ = {undesirable_weight:g}")
    ax_class.axvline(0.0, color="0.6", linewidth=0.8, linestyle="--")
    ax_class.set(title="KTO's value of each class (loss = λ − value)", xlabel=x_label, ylabel="value v(x)")
    ax_class.set_ylim(-0.05, 1.4 * max(desirable_weight, undesirable_weight))  # room for the legend
    ax_class.legend(loc="upper center")

    ax_centred.plot(x, curves.desirable_centred, color=DESIRABLE_COLOR, linewidth=2.0,
                    label=r"desirable example: $\lambda_D(\sigma(x) - \frac{1}{2})$")
    ax_centred.plot(x, curves.undesirable_centred, color=UNDESIRABLE_COLOR, linewidth=2.0, linestyle="--",
                    label=r"undesirable example: $\lambda_U(\sigma(x) - \frac{1}{2})$")
    ax_centred.axhline(0.0, color="0.6", linewidth=0.8)
    ax_centred.axvline(0.0, color="0.6", linewidth=0.8)
    ratio = undesirable_weight / desirable_weight
    ax_centred.text(0.98, 0.04, "each class: one S, concave above the\nreference point, convex below; the weight\n"
                    rf"follows the label: $\lambda_U / \lambda_D$ = {ratio:.3g}",
                    transform=ax_centred.transAxes, ha="right", va="bottom", fontsize="small")
    ax_centred.set(title="Value relative to the reference point, per class",
                   xlabel=x_label, ylabel="value − value at the reference point")
    ax_centred.legend(loc="upper left")

    compare = np.linspace(-3.0, 3.0, 241)
    kto = value_curves(compare, 1.0, 1.0).desirable_centred
    ax_compare.plot(compare, kahneman_tversky_value(compare), color="0.2", linewidth=2.0,
                    label=r"Kahneman–Tversky: $x^{0.88}$, $-2.25(-x)^{0.88}$")
    ax_compare.plot(compare, kto, color=METHOD_STYLES["kto"][1], linewidth=2.0,
                    label=r"KTO: $\sigma(x) - \frac{1}{2}$ (bounded both ways)")
    ax_compare.plot(compare, dpo_implied_value(compare), color=METHOD_STYLES["dpo"][1], linewidth=2.0,
                    linestyle=":", label=r"DPO: $\log\sigma(x) + \log 2$ (unbounded below)")
    ax_compare.axhline(0.0, color="0.6", linewidth=0.8)
    ax_compare.axvline(0.0, color="0.6", linewidth=0.8)
    ax_compare.set(title="Implied value functions (the paper's comparison)",
                   xlabel="x: outcome relative to the reference point (DPO: the margin)",
                   ylabel="implied value")
    ax_compare.legend(loc="lower right")
    return fig


# ---------------------------------------------------------------------------------------------------
# loss and gradient surfaces


class LossSurface(NamedTuple):
    xs: np.ndarray  # [NX] log-ratios r
    ys: np.ndarray  # [NY] z (log-ratio units) or β
    loss: np.ndarray  # [NY, NX] the example's loss
    grad_norm: np.ndarray  # [NY, NX] |∂loss/∂r| with z held fixed


def _default_surface_ys(variant: str, y: str) -> np.ndarray:
    if y == "beta":
        return np.geomspace(0.01, 1.0, 61)
    return np.linspace(0.0 if variant == "kto" else -20.0, 20.0, 61)


def loss_surface(variant: str = "kto", x: str = "log_ratio", y: str = "z", *, label=1, xs=None, ys=None,
                 beta: float = 0.1, z: float = 0.0, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0) -> LossSurface:
    """Loss and |gradient| of one example over (log-ratio r, z) or (log-ratio r, β), via kto_loss_and_grad.

    y="z": ys are reference points z (log-ratio units; "kto" clamps z < 0 to 0), β fixed.
    y="beta": ys are β values, z fixed. The sigmoid argument is u = β(r − z).
    loss[i, j] = the variant's loss_i of an example with label `label` at r = xs[j], y = ys[i]
    ("edifice": −λσ(±u); "kto": λ(1 − σ(±u)); "apo_zero_unpaired": as "kto" with z = 0);
    grad_norm[i, j] = |∂loss_i/∂r_i| = β λ σ(u) σ(−u), with z held fixed.
    """
    variant = check_choice("variant", variant, VARIANTS)
    check_choice("x", x, ("log_ratio",))
    y = check_choice("y", y, SURFACE_AXES)
    desirable = _as_label("label", label)
    beta = check_finite_scalar("beta", beta, positive=True)
    z = check_finite_scalar("z", z)
    weight = check_finite_scalar("desirable_weight" if desirable else "undesirable_weight",
                                 desirable_weight if desirable else undesirable_weight, positive=True)
    if variant == "apo_zero_unpaired" and (y == "z" or z != 0.0):
        raise ValueError(
            f"variant='apo_zero_unpaired' has no reference point z: use y='beta' and z=0, got y={y!r}, z={z}"
        )
    xs = _as_grid("xs", np.linspace(-30.0, 30.0, 101) if xs is None else xs)
    ys = _as_grid("ys", _default_surface_ys(variant, y) if ys is None else ys, positive=y == "beta")
    loss = np.empty((ys.shape[0], xs.shape[0]))  # [NY, NX]
    grad_norm = np.empty_like(loss)
    for i, y_value in enumerate(ys):
        point_beta, point_z = (beta, float(y_value)) if y == "z" else (float(y_value), z)
        for j, log_ratio in enumerate(xs):
            loss[i, j], slope = _example_loss_and_slope(variant, float(log_ratio), desirable, beta=point_beta,
                                                        z=point_z, weight=weight)
            grad_norm[i, j] = abs(slope)
    return LossSurface(xs, ys, loss, grad_norm)


def _draw_heatmap(ax: Axes, xs, ys, values, *, cmap: str, colorbar_label: str, levels=None,
                  level_names=None, vmin=None, vmax=None) -> None:
    """pcolormesh + colorbar + labelled white contours at `levels` (default 3 evenly spaced), each
    labelled with its entry of `level_names` (default: its value)."""
    mesh = ax.pcolormesh(xs, ys, values, cmap=cmap, shading="nearest", vmin=vmin, vmax=vmax)
    colorbar = ax.get_figure(root=True).colorbar(mesh, ax=ax)
    colorbar.set_label(colorbar_label)
    low, high = float(values.min()), float(values.max())
    if levels is None:
        levels = np.linspace(low, high, 5)[1:-1]
    names = dict(zip(levels, level_names)) if level_names is not None else {}
    levels = [level for level in levels if low < level < high]
    if levels and high - low > 1e-12 * max(1.0, abs(high)):
        contours = ax.contour(xs, ys, values, levels=levels, colors="white", linewidths=1.0)
        texts = ax.clabel(contours, fontsize=9, inline_spacing=3,
                          fmt={level: names.get(level, f"{level:.3g}") for level in contours.levels})
        for text in texts:  # readable on a bright background too
            text.set_bbox({"facecolor": "black", "alpha": 0.55, "edgecolor": "none", "pad": 1.0})


PEAK_FRACTIONS = (0.1, 0.5, 0.9)  # the gradient contours: these fractions of the peak βλ/4


def plot_loss_surface(variant: str = "kto", y: str = "z", axes=None, *, xs=None, ys=None, beta: float = 0.1,
                      z: float = 0.0, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> Figure:
    """Heatmaps with labelled contours over (log-ratio, z) for y="z" or (log-ratio, β) for y="beta",
    data from loss_surface: the loss of a desirable and of an undesirable example, and |∂loss/∂r| (z
    fixed). That gradient, βλσ(u)σ(−u), is the same for both classes when λ_D = λ_U: then one panel
    draws it for both (1x3); otherwise each class has its own (2x2: losses on top, gradients below).

    Contours: the loss at 0.1, 0.5 and 0.9 of λ (0.5 λ: the reference point r = z); the gradient at
    0.1, 0.5 and 0.9 of its peak βλ/4. y="beta": the gradient is divided by its row's peak βλ/4 (one
    colour scale for β = 1 would leave every β <= 0.1 row dark), so each row shows the *width* of its
    peak, ∝ 1/β; the contour at ½ is the half height, at |r − z| = 1.763/β."""
    same_gradient = desirable_weight == undesirable_weight
    fig, flat_axes = _prepare_axes(axes, (1, 3) if same_gradient else (2, 2),
                                   (17.0, 4.8) if same_gradient else (12.0, 8.5))
    y_label = r"reference point $z$ (log-ratio units)" if y == "z" else r"$\beta$ (log scale)"
    gradient_axes = flat_axes[2:] if not same_gradient else flat_axes[2:3]
    for column, desirable in enumerate((True, False)):
        surface = loss_surface(variant, "log_ratio", y, label=int(desirable), xs=xs, ys=ys, beta=beta, z=z,
                               desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
        weight = desirable_weight if desirable else undesirable_weight
        fractions = (0.1, 0.5, 0.9) if variant != "edifice" else (-0.9, -0.5, -0.1)
        loss_levels = [weight * f for f in fractions]
        panels = [(flat_axes[column], surface.loss, "viridis", "loss", loss_levels,
                   [f"loss {level:.3g}" for level in loss_levels], (None, None))]
        if column < len(gradient_axes):
            who = CLASS_NAMES[desirable] if not same_gradient else "both classes"
            if y == "beta":
                peak = surface.grad_norm.max(axis=1, keepdims=True)  # [NY, 1] βλ/4 when r = z is on the grid
                panels.append((gradient_axes[column], surface.grad_norm / peak, "magma",
                               f"|∂loss/∂r| ÷ its row's peak βλ/4 ({who})", [0.5],
                               ["½ peak: |r − z| = 1.763/β"], (0.0, 1.0)))
            else:
                peak = beta * weight / 4
                panels.append((gradient_axes[column], surface.grad_norm, "magma",
                               f"|∂loss/∂r| ({who}); peak βλ/4 = {peak:.3g}",
                               [f * peak for f in PEAK_FRACTIONS], [f"{f:g} × peak" for f in PEAK_FRACTIONS],
                               (0.0, None)))
        for ax, values, cmap, what, levels, names, (vmin, vmax) in panels:
            _draw_heatmap(ax, surface.xs, surface.ys, values, cmap=cmap, colorbar_label=what, levels=levels,
                          level_names=names, vmin=vmin, vmax=vmax)
            if y == "z":
                reference = np.maximum(surface.ys, 0.0) if variant == "kto" else surface.ys
                ax.plot(reference, surface.ys, color="cyan", linestyle="--", linewidth=1.2,
                        label="reward 0 (r = z)")
                ax.set_xlim(surface.xs[0], surface.xs[-1])
            else:
                ax.set_yscale("log")
                ax.axvline(z, color="cyan", linestyle="--", linewidth=1.2, label=f"reward 0 (r = z = {z:g})")
            title = what.split(" (")[0] if ax is not panels[0][0] else "loss"
            name = CLASS_NAMES[desirable] + " example" if ax is panels[0][0] or not same_gradient else "either example"
            ax.set_title(f"{name}: {title}", color=CLASS_COLORS[desirable] if name != "either example" else "black")
            ax.set(xlabel=r"log-ratio $r = \log \pi - \log \pi_{ref}$", ylabel=y_label)
    fixed = rf"$\beta$ = {beta:g}" if y == "z" else f"z = {z:g}"
    note = "" if y == "z" else "; gradient normalised per row: the peak widens as 1/β"
    fig.suptitle(f"KTO loss surface, variant={variant!r}, {fixed}; gradient with z held fixed{note}")
    return fig


# ---------------------------------------------------------------------------------------------------
# KTO against DPO and APO-zero


class MethodCurves(NamedTuple):
    loss_desirable: np.ndarray  # [N] loss of a desirable (chosen) completion with reward x
    loss_undesirable: np.ndarray  # [N] loss of an undesirable (rejected) completion with reward x
    grad_desirable: np.ndarray  # [N] |∂loss/∂ log π| of that desirable completion
    grad_undesirable: np.ndarray  # [N] |∂loss/∂ log π| of that undesirable completion


def kto_vs_dpo_curves(rewards, *, beta: float = 0.1, kto_z: float = 5.0, desirable_weight: float = 1.0,
                      undesirable_weight: float = 1.0) -> dict[str, MethodCurves]:
    """Loss and |gradient| of one completion against its reward x = β r, per method.

    "kto": λ_D(1 − σ(x − β z)) / λ_U(1 − σ(β z − x)), z = kto_z (a KL estimate, log-ratio units);
    "apo_zero_unpaired": λ_D(1 − σ(x)) / λ_U σ(x); "dpo": −log σ(x) for a chosen completion and
    −log σ(−x) for a rejected one, the other completion of the pair at reward 0 (so x is the margin).
    """
    rewards = np.asarray(as_float_array("rewards", rewards, ndim=1), dtype=np.float64)
    beta = check_finite_scalar("beta", beta, positive=True)
    kto_z = check_finite_scalar("kto_z", kto_z, nonnegative=True)
    weights = {True: check_finite_scalar("desirable_weight", desirable_weight, positive=True),
               False: check_finite_scalar("undesirable_weight", undesirable_weight, positive=True)}
    log_ratios = rewards / beta
    curves = {}
    for variant, z in (("kto", kto_z), ("apo_zero_unpaired", 0.0)):
        columns = {}
        for desirable in (True, False):
            points = np.array([_example_loss_and_slope(variant, r, desirable, beta=beta, z=z,
                                                       weight=weights[desirable]) for r in log_ratios])
            columns[desirable] = (points[:, 0], np.abs(points[:, 1]))
        curves[variant] = MethodCurves(columns[True][0], columns[False][0], columns[True][1], columns[False][1])
    zero = np.zeros(1)
    chosen, rejected = [], []
    for r in log_ratios:
        loss, (grad_chosen, _), _ = dpo_loss_and_grad(np.array([r]), zero, zero, zero, beta)
        chosen.append((loss, abs(float(grad_chosen[0]))))
        loss, (_, grad_rejected), _ = dpo_loss_and_grad(zero, np.array([r]), zero, zero, beta)
        rejected.append((loss, abs(float(grad_rejected[0]))))
    chosen, rejected = np.array(chosen), np.array(rejected)
    curves["dpo"] = MethodCurves(chosen[:, 0], rejected[:, 0], chosen[:, 1], rejected[:, 1])
    return curves


def plot_kto_vs_dpo(axes=None, *, rewards=None, beta: float = 0.1, kto_z: float = 5.0,
                    desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> Figure:
    """2x2: rows loss / |gradient| (log scale), columns desirable (chosen) / undesirable (rejected),
    one line per method, against the completion's reward β r. KTO's σ flattens on both sides; DPO's
    −log σ keeps a gradient of β wherever its margin is negative."""
    rewards = np.linspace(-12.0, 12.0, 241) if rewards is None else rewards
    curves = kto_vs_dpo_curves(rewards, beta=beta, kto_z=kto_z, desirable_weight=desirable_weight,
                               undesirable_weight=undesirable_weight)
    x = np.asarray(rewards, dtype=np.float64)
    fig, (ax_loss_d, ax_loss_u, ax_grad_d, ax_grad_u) = _prepare_axes(axes, (2, 2), (11.5, 8.0))
    for method, method_curves in curves.items():
        name, color, style = METHOD_STYLES[method]
        if method == "kto":
            name = f"{name} (z = {kto_z:g}: centred at β z = {beta * kto_z:.3g})"
        for ax, values in ((ax_loss_d, method_curves.loss_desirable), (ax_loss_u, method_curves.loss_undesirable),
                           (ax_grad_d, method_curves.grad_desirable), (ax_grad_u, method_curves.grad_undesirable)):
            ax.plot(x, values, color=color, linestyle=style, linewidth=2.0, label=name)
    for desirable, ax_loss, ax_grad in ((True, ax_loss_d, ax_grad_d), (False, ax_loss_u, ax_grad_u)):
        who = "desirable / chosen" if desirable else "undesirable / rejected"
        ax_loss.set_title(f"loss of a {who} completion", color=CLASS_COLORS[desirable])
        ax_grad.set_title(f"|gradient| of a {who} completion (log scale)", color=CLASS_COLORS[desirable])
        ax_loss.set(xlabel=r"its reward $\beta r$ (DPO: margin vs. the other completion at 0)", ylabel="loss")
        ax_grad.set(xlabel=r"its reward $\beta r$ (DPO: margin vs. the other completion at 0)",
                    ylabel=r"$|\partial loss / \partial \log \pi(y|x)|$")
        ax_grad.set_yscale("log")
        for ax in (ax_loss, ax_grad):
            ax.axvline(0.0, color="0.7", linewidth=0.8)
            ax.legend(fontsize="small")
    fig.suptitle(rf"KTO vs DPO vs APO-zero, $\beta$ = {beta:g}: KTO's sigmoid saturates both ways, "
                 "DPO keeps a gradient for negative margins")
    return fig


# ---------------------------------------------------------------------------------------------------
# the gradient through z (edifice formula)


class ZGradientBatch(NamedTuple):
    labels: np.ndarray  # [B] bool, True = desirable
    log_ratios: np.ndarray  # [B] r
    grad_through_z: np.ndarray  # [B] dL/dpolicy_logps, z = mean(β r) passes gradient
    grad_stop_z: np.ndarray  # [B] dL/dpolicy_logps, z detached


def z_gradient_batch(*, seed: int = 0, batch_size: int = 12, beta: float = 0.1, desirable_weight: float = 1.0,
                     undesirable_weight: float = 1.0) -> ZGradientBatch:
    """Per-example gradients of one seeded random batch under the edifice formula, with and without
    stop-gradient on z. Through z: dL/dr_j = β(g_j − mean_i g_i), which sums to 0 over the batch."""
    batch_size = check_positive_int("batch_size", batch_size, minimum=2)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(batch_size) < (batch_size + 1) // 2 + 1)
    log_ratios = rng.normal(2.0, 8.0, batch_size)
    ref_logps = rng.normal(-40.0, 5.0, batch_size)
    policy_logps = ref_logps + log_ratios
    grads = {}
    for stop_z_grad in (False, True):
        _, grads[stop_z_grad], _ = kto_loss_and_grad(
            policy_logps, ref_logps, labels.astype(np.int64), beta, desirable_weight, undesirable_weight,
            variant="edifice", stop_z_grad=stop_z_grad, warn_balance=False)
    return ZGradientBatch(labels, log_ratios, np.asarray(grads[False]), np.asarray(grads[True]))


def plot_z_gradient_effect(axes=None, *, seed: int = 0, batch_size: int = 12, beta: float = 0.1,
                           desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> Figure:
    """Two panels on one scale, the same batch under the seed's (edifice) formula: left, each example's
    gradient with the gradient through z = mean(β r); right, with z detached (stop_z_grad). Bar colour
    is the example's class; the last bar (black) is the sum over the batch, 0 on the left."""
    batch = z_gradient_batch(seed=seed, batch_size=batch_size, beta=beta, desirable_weight=desirable_weight,
                             undesirable_weight=undesirable_weight)
    fig, (ax_through, ax_stop) = _prepare_axes(axes, (1, 2), (14.0, 5.0))
    positions = np.arange(batch.labels.shape[0] + 1)  # the examples, then their sum
    colors = [CLASS_COLORS[bool(d)] for d in batch.labels] + ["black"]
    ticks = [f"{i}\nr={r:.1f}" for i, r in enumerate(batch.log_ratios)] + ["sum"]
    limit = 1.15 * float(np.abs(np.concatenate([batch.grad_through_z, batch.grad_stop_z,
                                                [batch.grad_through_z.sum(), batch.grad_stop_z.sum()]])).max())
    for ax, grads, title in (
            (ax_through, batch.grad_through_z, "gradient through z (the seed's formula)"),
            (ax_stop, batch.grad_stop_z, "z detached (stop_z_grad=True)")):
        total = float(grads.sum())
        ax.bar(positions, np.append(grads, total), width=0.7, color=colors)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.axvline(positions[-1] - 0.5, color="0.6", linewidth=0.8, linestyle=":")
        ax.set_xticks(positions, ticks, fontsize=8)
        ax.set_ylim(-limit, limit)
        ax.annotate(f"{total:+.1e}", (positions[-1], total), textcoords="offset points",
                    xytext=(0, 4 if total >= 0 else -12), ha="center", fontsize=8)
        ax.set_title(f"{title}\nsum over the batch = {total:+.2e}")
        ax.set(xlabel="example in the batch (its log-ratio r)",
               ylabel=r"$\partial L / \partial \log \pi(y_i|x_i)$")
    ax_through.legend(handles=[Patch(color=DESIRABLE_COLOR, label="desirable example"),
                               Patch(color=UNDESIRABLE_COLOR, label="undesirable example"),
                               Patch(color="black", label="sum of the batch's gradients")], loc="upper left")
    fig.suptitle(r"Seed formula, z = mean($\beta r$): through z the per-example gradients sum to 0, so no "
                 "update can raise every log-probability; with z detached they do not")
    return fig


# ---------------------------------------------------------------------------------------------------
# class balance


def _weight_settings(weight_settings) -> list[tuple[float, float]]:
    try:
        pairs = [tuple(pair) for pair in weight_settings]
    except TypeError as exc:
        raise TypeError(f"weight_settings must be a sequence of (desirable_weight, undesirable_weight) "
                        f"pairs, got {weight_settings!r}") from exc
    if not pairs or any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"weight_settings must be a non-empty sequence of (desirable_weight, "
                         f"undesirable_weight) pairs, got {weight_settings!r}")
    return [(check_finite_scalar(f"weight_settings[{i}][0]", d, positive=True),
             check_finite_scalar(f"weight_settings[{i}][1]", u, positive=True)) for i, (d, u) in enumerate(pairs)]


def class_balance_shares(desirable_fractions, weight_settings, *, variant: str = "kto", beta: float = 0.1,
                         batch_size: int = 100, log_ratios=None) -> np.ndarray:
    """Desirable share of the gradient, sum_{desirable}|g_i| / sum_i |g_i|, g = dL/dpolicy_logps.

    For each (λ_D, λ_U) in weight_settings [S] and fraction f in desirable_fractions [F], a batch of
    batch_size examples whose first round(f·n) are desirable, with the given log-ratios [n]
    (default 0: policy = reference, the start of KTO training). Returns [S, F].
    """
    variant = check_choice("variant", variant, VARIANTS)
    fractions = np.asarray(as_float_array("desirable_fractions", desirable_fractions, ndim=1), dtype=np.float64)
    settings = _weight_settings(weight_settings)
    batch_size = check_positive_int("batch_size", batch_size, minimum=2)
    if log_ratios is None:
        log_ratios = np.zeros(batch_size)
    log_ratios = np.asarray(as_float_array("log_ratios", log_ratios, ndim=1), dtype=np.float64)
    if log_ratios.shape[0] != batch_size:
        raise ValueError(f"log_ratios must have shape ({batch_size},) = (batch_size,), got {log_ratios.shape}")
    desirable_counts = np.rint(fractions * batch_size).astype(np.int64)
    if desirable_counts.min() < 1 or desirable_counts.max() > batch_size - 1:
        raise ValueError(f"desirable_fractions must leave both classes non-empty in a batch of {batch_size} "
                         f"(each in [1/{batch_size}, 1 − 1/{batch_size}]), got {fractions.min()} to "
                         f"{fractions.max()}")
    shares = np.empty((len(settings), fractions.shape[0]))  # [S, F]
    for s, (desirable_weight, undesirable_weight) in enumerate(settings):
        for f, num_desirable in enumerate(desirable_counts):
            labels = (np.arange(batch_size) < num_desirable).astype(np.int64)
            _, grad, _ = kto_loss_and_grad(log_ratios, np.zeros(batch_size), labels, beta, desirable_weight,
                                           undesirable_weight, variant=variant, warn_balance=False)
            magnitudes = np.abs(grad)
            total = float(magnitudes.sum())
            if total == 0.0:
                raise ValueError(f"every gradient is 0 at desirable fraction {fractions[f]} with weights "
                                 f"{(desirable_weight, undesirable_weight)}: log_ratios saturate the sigmoid")
            shares[s, f] = float(magnitudes[:num_desirable].sum()) / total
    return shares


def balanced_fraction_range(desirable_weight: float, undesirable_weight: float) -> tuple[float, float]:
    """Desirable fractions f with λ_D f / (λ_U (1 − f)) in the paper's [1, 4/3]: f = ρλ_U / (λ_D + ρλ_U)."""
    return tuple(ratio * undesirable_weight / (desirable_weight + ratio * undesirable_weight)
                 for ratio in BALANCE_RANGE)


def plot_class_balance(ax=None, *, weight_settings=((1.0, 1.0), (2.0, 1.0), (4.0, 1.0), (1.0, 2.0)),
                       desirable_fractions=None, variant: str = "kto", beta: float = 0.1, batch_size: int = 100,
                       log_ratios=None) -> Figure:
    """Desirable share of the gradient against the desirable fraction, one line per (λ_D, λ_U);
    the fractions where λ_D n_D / (λ_U n_U) is in the paper's [1, 4/3] are shaded and drawn thick.
    With log_ratios None the batch is at the first step of KTO (policy = reference, every r = 0)."""
    fractions = np.linspace(0.05, 0.95, 91) if desirable_fractions is None else desirable_fractions
    settings = _weight_settings(weight_settings)
    shares = class_balance_shares(fractions, settings, variant=variant, beta=beta, batch_size=batch_size,
                                  log_ratios=log_ratios)
    fractions = np.asarray(fractions, dtype=np.float64)
    fig, (ax,) = _prepare_axes(ax, (1, 1), (9.0, 5.5))
    for s, (desirable_weight, undesirable_weight) in enumerate(settings):
        color = SETTING_COLORS[s % len(SETTING_COLORS)]
        ax.plot(fractions, shares[s], color=color, linewidth=1.4,
                label=rf"$\lambda_D$ = {desirable_weight:g}, $\lambda_U$ = {undesirable_weight:g}")
        low, high = balanced_fraction_range(desirable_weight, undesirable_weight)
        ax.axvspan(low, high, color=color, alpha=0.12, linewidth=0)
        inside = (fractions >= low) & (fractions <= high)
        ax.plot(fractions[inside], shares[s][inside], color=color, linewidth=4.0, solid_capstyle="butt")
    ax.axhline(0.5, color="0.6", linestyle="--", linewidth=0.8)
    ax.plot([], [], color="0.3", linewidth=4.0,
            label=r"paper's band: $\lambda_D n_D / (\lambda_U n_U) \in [1, 4/3]$ (shaded)")
    when = "at the first step (policy = reference, r = 0)" if log_ratios is None else "at the given log-ratios"
    ax.set(title=f"Gradient share of the desirable class {when}, variant={variant!r}",
           xlabel=r"desirable fraction of the batch $n_D / n$",
           ylabel="desirable share of the summed |gradient|", xlim=(0.0, 1.0), ylim=(0.0, 1.0))
    ax.legend(fontsize="small", loc="upper left")
    return fig


# ---------------------------------------------------------------------------------------------------
# training curves


def load_metrics_records(path) -> list[dict]:
    """The records of a run's metrics.jsonl, one dict per non-empty line."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    records = []
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: line {number} is not valid JSON ({exc.msg})") from exc
    return records


def _check_records(records) -> dict[str, list[tuple[int, Mapping]]]:
    """Records grouped by phase as (index, record), after checking each has a phase and a step."""
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Sequence):
        raise TypeError(f"records must be a list of dicts (one per metrics.jsonl line), got "
                        f"{type(records).__name__}")
    if len(records) == 0:
        raise ValueError("records must not be empty: give at least one metrics record")
    by_phase: dict[str, list[tuple[int, Mapping]]] = {phase: [] for phase in TRAINING_PHASES}
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise TypeError(f"records[{index}] must be a dict, got {type(record).__name__}")
        if "phase" not in record:
            raise ValueError(f"records[{index}] has no 'phase' key (expected one of {TRAINING_PHASES}), "
                             f"got keys {sorted(record)}")
        if record["phase"] not in by_phase:
            continue
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, Real):
            raise ValueError(f"records[{index}]['step'] must be a number, got {step!r}")
        by_phase[record["phase"]].append((index, record))
    if not any(by_phase.values()):
        phases = sorted({str(record["phase"]) for record in records})
        raise ValueError(f"records have no phase in {TRAINING_PHASES}, got phases {phases}")
    return by_phase


def _series(indexed_records, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric, skipping records where it is None or missing."""
    steps, values = [], []
    for index, record in indexed_records:
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"records[{index}][{key!r}] must be a number or None, got {value!r}")
        steps.append(float(record["step"]))
        values.append(float(value))
    return np.array(steps), np.array(values)


def plot_training_curves(records, axes=None) -> Figure:
    """Eight panels from metrics records. Top row: SFT loss, SFT gradient norm (SFT steps), KTO loss,
    KTO gradient norm (KTO steps). Bottom row: rewards per class, reward margin, the KL estimate (kl_raw,
    before the clamp) next to the z used (kl), the evaluation's desirable rate (KTO steps).
    Values that are None (a class absent from a batch, kl_raw of a variant without KL pairs) are skipped."""
    by_phase = _check_records(records)
    fig, flat_axes = _prepare_axes(axes, (2, 4), (19.0, 8.0))
    panels = (
        ("SFT loss (the reference model)", "SFT step", "cross-entropy per token",
         [("sft", "loss", "SFT loss", "0.2", "-")]),
        ("SFT gradient norm (before clipping)", "SFT step", "global grad norm",
         [("sft", "grad_norm", "SFT", "0.2", "-")]),
        ("KTO loss", "KTO step", "loss", [("kto", "loss", "KTO loss", "#009E73", "-")]),
        ("KTO gradient norm (before clipping)", "KTO step", "global grad norm",
         [("kto", "grad_norm", "KTO", "#009E73", "-")]),
        (r"Rewards $\beta r$ per class", "KTO step", "mean reward",
         [("kto", "rewards/chosen", "desirable (chosen)", DESIRABLE_COLOR, "-"),
          ("kto", "rewards/rejected", "undesirable (rejected)", UNDESIRABLE_COLOR, "-")]),
        ("Reward margin", "KTO step", "chosen − rejected",
         [("kto", "rewards/margins", "margin (chosen − rejected)", "0.2", "-")]),
        ("KL estimate on mismatched pairs", "KTO step", "log-ratio units",
         [("kto", "kl_raw", "estimate before the clamp (kl_raw)", "#CC79A7", "-"),
          ("kto", "kl", "z used (kl)", "0.2", "--")]),
        ("Desirable rate (evaluation)", "KTO step", "fraction desirable",
         [("eval", "desirable_rate", "desirable rate", DESIRABLE_COLOR, "-")]),
    )
    for ax, (title, xlabel, ylabel, lines) in zip(flat_axes, panels):
        drawn = 0
        for phase, key, name, color, style in lines:
            steps, values = _series(by_phase[phase], key)
            if steps.size:
                few_points = steps.size <= 1 or len(by_phase[phase]) < 30
                ax.plot(steps, values, color=color, linestyle=style, marker="." if few_points else None,
                        label=name)
                drawn += 1
        if drawn == 0:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        _add_legend_if_several(ax, fontsize="small", loc="lower left")
    ax_rewards, ax_margin, ax_kl, ax_rate = flat_axes[4:]
    for ax in (ax_rewards, ax_margin, ax_kl):
        ax.axhline(0.0, color="0.7", linewidth=0.8)
    if ax_rate.lines:
        ax_rate.set_ylim(0.0, 1.0)
    fig.suptitle("Training curves")
    return fig


# ---------------------------------------------------------------------------------------------------
# curves and bars of what a lesson measured


def moving_average(values, window: int) -> np.ndarray:
    """The trailing mean of the last `window` values at each point (fewer at the start), shape kept."""
    values = np.asarray(as_float_array("values", values, ndim=1), dtype=np.float64)
    window = check_positive_int("window", window)
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, values.shape[0] + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def _series_pair(where: str, series) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(series, Sequence) or len(series) != 2:
        raise ValueError(f"{where} must be an (x, y) pair of 1-D arrays, got {type(series).__name__}")
    x = np.asarray(as_float_array(f"{where} x", series[0], ndim=1), dtype=np.float64)
    y = np.asarray(as_float_array(f"{where} y", series[1], ndim=1), dtype=np.float64)
    if x.shape != y.shape or x.shape[0] == 0:
        raise ValueError(f"{where}: x and y must have the same non-zero length, got {x.shape} and {y.shape}")
    return x, y


def plot_curves(panels, axes=None, *, xlabel: str = "KTO step", smooth: int = 1, colors=None,
                title: str | None = None, zero_line: bool = True) -> Figure:
    """One panel per (panel title, y label, {series name: (x, y)}) in `panels`, side by side.

    Every series of a name has the same colour in every panel (`colors`: name -> colour, else the
    Okabe–Ito cycle). smooth (one int, or one per panel) > 1: the raw values are drawn faint and their
    trailing moving average (`moving_average`, that window) on top, the line the eye should follow in
    noisy per-batch metrics."""
    if isinstance(panels, Mapping) or not isinstance(panels, Sequence) or not panels:
        raise TypeError("panels must be a non-empty list of (title, ylabel, {name: (x, y)}) tuples")
    windows = [smooth] * len(panels) if isinstance(smooth, (int, np.integer)) else list(smooth)
    if len(windows) != len(panels):
        raise ValueError(f"smooth must be one int or one per panel ({len(panels)}), got {smooth!r}")
    windows = [check_positive_int(f"smooth[{index}]", window) for index, window in enumerate(windows)]
    names: list[str] = []
    for index, panel in enumerate(panels):
        if not isinstance(panel, Sequence) or len(panel) != 3 or not isinstance(panel[2], Mapping) or not panel[2]:
            raise ValueError(f"panels[{index}] must be (title, ylabel, {{name: (x, y)}}) with at least one series")
        names += [name for name in panel[2] if name not in names]
    colors = dict(colors or {})
    palette = iter(color for color in SETTING_COLORS + ("#D55E00", "#0072B2") if color not in colors.values())
    colors = {name: colors[name] if name in colors else next(palette) for name in names}
    fig, flat_axes = _prepare_axes(axes, (1, len(panels)), (max(6.0, 5.6 * len(panels)), 4.6))
    for ax, (panel_title, ylabel, series), smooth in zip(flat_axes, panels, windows):
        for name, pair in series.items():
            x, y = _series_pair(f"panel {panel_title!r} series {name!r}", pair)
            if smooth > 1:
                ax.plot(x, y, color=colors[name], linewidth=0.8, alpha=0.3)
                ax.plot(x, moving_average(y, smooth), color=colors[name], linewidth=2.0, label=name)
            else:
                ax.plot(x, y, color=colors[name], linewidth=2.0, marker="o" if x.shape[0] <= 25 else None,
                        markersize=4, label=name)
        if zero_line:
            ax.axhline(0.0, color="0.6", linewidth=0.8)
        note = f" (faint: per step; line: mean of the last {smooth})" if smooth > 1 else ""
        ax.set(title=panel_title, xlabel=xlabel + note, ylabel=ylabel)
        _add_legend_if_several(ax)
    if title:
        fig.suptitle(title)
    return fig


def plot_bars(values, ax=None, *, title: str, xlabel: str, ylabel: str = "", log: bool = False,
              threshold: float | None = None, threshold_label: str = "tolerance") -> Figure:
    """Horizontal bars, one per (name, value) of `values` (top to bottom in its order). With a
    threshold: a dashed line there, and bars coloured by their side of it (below: blue, above: orange)."""
    if not isinstance(values, Mapping) or not values:
        raise TypeError("values must be a non-empty dict of name -> number")
    names = [str(name) for name in values]
    numbers = np.array([check_finite_scalar(f"values[{name!r}]", value) for name, value in values.items()])
    if log and not bool(np.all(numbers > 0)):
        raise ValueError(f"values must be > 0 on a log scale, got minimum {numbers.min()}")
    if threshold is not None:
        threshold = check_finite_scalar("threshold", threshold, positive=log)
    fig, (ax,) = _prepare_axes(ax, (1, 1), (11.5, 0.42 * len(names) + 1.8))
    positions = np.arange(len(names))[::-1]
    if threshold is None:
        colors = ["0.35"] * len(names)
    else:
        colors = [DESIRABLE_COLOR if value <= threshold else UNDESIRABLE_COLOR for value in numbers]
    ax.barh(positions, numbers, color=colors, height=0.7)
    ax.set_yticks(positions, names)
    if log:
        ax.set_xscale("log")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label=f"{threshold_label} {threshold:g}")
        ax.legend(handles=[ax.lines[-1], Patch(color=DESIRABLE_COLOR, label="within it"),
                           Patch(color=UNDESIRABLE_COLOR, label="beyond it")],
                  loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return fig


# ---------------------------------------------------------------------------------------------------
# where in a sequence the gradient goes


class TokenGradients(NamedTuple):
    norms: np.ndarray  # [B, T] |dL/dlogits| of the logits that score token t (0 where not scored)
    tokens_text: list[list[str]]  # [B][T] the text of each token ("" for padding)
    labels: np.ndarray  # [B] bool, True = desirable


_SYNTHETIC_EXAMPLES = (  # (prompt, completion, desirable)
    ("Q: 2+3? A:", " 5, easy.", True),
    ("Q: 2+3? A:", " 6, I think", False),
    ("Say hi:", " Hello there!", True),
    ("Say hi:", " Go away.", False),
)


def synthetic_token_gradients(*, seed: int = 0, beta: float = 0.1) -> TokenGradients:
    """Per-token gradient norms of a synthetic KTO batch, from kto_np.logprobs only.

    Random policy logits [B, T, V] (reference = policy + noise) over the characters of four
    prompt/completion pairs; shifted completion log-probs; dL/dlogps from the "kto" loss;
    sequence_logprobs_backward -> dlogits; norm over V. Column t holds the norm at the logits that
    score token t (position t − 1), so prompt tokens and padding show 0.
    """
    rng = np.random.default_rng(seed)
    texts = [prompt + completion for prompt, completion, _ in _SYNTHETIC_EXAMPLES]
    vocabulary = sorted(set("".join(texts)))
    B, T, V = len(texts), max(len(text) for text in texts), len(vocabulary)
    tokens = np.zeros((B, T), dtype=np.int64)
    completion_mask = np.zeros((B, T))
    tokens_text = []
    for b, (prompt, completion, _) in enumerate(_SYNTHETIC_EXAMPLES):
        text = prompt + completion
        tokens[b, : len(text)] = [vocabulary.index(char) for char in text]
        completion_mask[b, len(prompt): len(text)] = 1.0
        tokens_text.append(list(text) + [""] * (T - len(text)))
    policy_logits = rng.normal(0.0, 1.0, (B, T, V))  # [B, T, V]
    ref_logits = policy_logits + rng.normal(0.0, 0.5, (B, T, V))
    labels = np.array([desirable for _, _, desirable in _SYNTHETIC_EXAMPLES])
    policy_logps, cache = sequence_logprobs_forward(policy_logits, tokens, completion_mask)  # [B]
    ref_logps = sequence_logprobs(ref_logits, tokens, completion_mask)
    _, dlogps, _ = kto_loss_and_grad(policy_logps, ref_logps, labels.astype(np.int64), beta, variant="kto")
    dlogits = sequence_logprobs_backward(dlogps, cache)  # [B, T, V]; position t scores token t + 1
    norms = np.zeros((B, T))
    norms[:, 1:] = np.sqrt((dlogits[:, :-1] ** 2).sum(axis=-1))
    return TokenGradients(norms, tokens_text, labels)


def _tokens_text(tokens_text, shape: tuple[int, int]) -> list[list[str]]:
    B, T = shape
    if isinstance(tokens_text, str) or not isinstance(tokens_text, Sequence):
        raise TypeError(f"tokens_text must be a sequence of {B} rows (str or list of str), got "
                        f"{type(tokens_text).__name__}")
    if len(tokens_text) != B:
        raise ValueError(f"tokens_text must have {B} rows (one per row of dlogits_norms), got {len(tokens_text)}")
    rows = []
    for b, row in enumerate(tokens_text):
        row = list(row)
        if len(row) != T or not all(isinstance(token, str) for token in row):
            raise ValueError(f"tokens_text[{b}] must be {T} strings (a str of {T} characters or a list of "
                             f"{T} str), got {len(row)} item(s)")
        rows.append(row)
    return rows


TOKEN_GRADIENTS_TITLE = "Where the gradient goes: |dL/dlogits| per token"
FIRST_STEP_TOKEN_GRADIENTS_TITLE = (
    "Where the gradient goes at the first KTO step (policy = reference)\n"
    "there every dL/dlog π is ±βλ/(4n), so |dL/dlogits| shows\n"
    "the reference's uncertainty |onehot − softmax| at each token")


def plot_token_gradients(dlogits_norms, tokens_text, ax=None, *, labels=None,
                         title: str = TOKEN_GRADIENTS_TITLE) -> Figure:
    """Heatmap of per-token gradient norms, rows = examples [B], columns = positions [T], each cell
    annotated with its token's text (a space drawn as ␣). Column t is token t, scored by the logits
    at t − 1 (so the first token, never scored, is 0). dlogits_norms [B, T] >= 0; tokens_text: B
    strings of T characters or B lists of T strings; labels [B] 0/1 (optional) name and colour the rows."""
    norms = np.asarray(as_float_array("dlogits_norms", dlogits_norms, ndim=2), dtype=np.float64)
    if float(norms.min()) < 0:
        raise ValueError(f"dlogits_norms must be >= 0 (they are norms), got minimum {norms.min()}")
    B, T = norms.shape
    rows = _tokens_text(tokens_text, (B, T))
    if labels is not None:
        labels = [_as_label(f"labels[{b}]", label) for b, label in enumerate(np.asarray(labels).tolist())]
        if len(labels) != B:
            raise ValueError(f"labels must have shape ({B},), got ({len(labels)},)")
    fig, (ax,) = _prepare_axes(ax, (1, 1), (max(6.0, 0.42 * T + 2.5), 0.6 * B + 1.8))
    image = ax.imshow(norms, aspect="auto", cmap="Blues", interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label("|dL/dlogits|")
    bright = 0.6 * float(norms.max())
    for b, row in enumerate(rows):
        for t, token in enumerate(row):
            shown = "␣" if token == " " else token
            ax.text(t, b, shown, ha="center", va="center", fontsize=9, parse_math=False,
                    color="white" if norms[b, t] > bright else "black")
    ax.set_xticks(np.arange(T))
    if labels is None:
        ax.set_yticks(np.arange(B))
    else:
        ax.set_yticks(np.arange(B), [f"{b}: {CLASS_NAMES[d]}" for b, d in enumerate(labels)])
        for tick, desirable in zip(ax.get_yticklabels(), labels, strict=True):
            tick.set_color(CLASS_COLORS[desirable])
    ax.set(title=title, xlabel="token t, scored by the logits at t − 1", ylabel="example")
    return fig


# ---------------------------------------------------------------------------------------------------
# everything


def make_all_figures(out_dir, *, metrics_records=None, token_gradients: TokenGradients | None = None,
                     seed: int = 0) -> list[Path]:
    """Write every figure as a PNG into out_dir (created if needed) and return the paths.

    Names: value_functions, loss_surface_z, loss_surface_beta, kto_vs_dpo, z_gradient, class_balance,
    token_gradients (+ training_curves when metrics_records is given). token_gradients: the per-token
    gradient norms of a run's first KTO step (train.run_token_gradients); synthetic ones when None.
    Fixed dpi, no date or version in the bytes (same inputs, same bytes); each file is written to a
    temporary name and renamed.
    """
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a str or os.PathLike, got {type(out_dir).__name__} {out_dir!r}")
    check_positive_int("seed", seed, minimum=0)
    if metrics_records is not None:
        _check_records(metrics_records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    token_title = FIRST_STEP_TOKEN_GRADIENTS_TITLE
    if token_gradients is None:
        token_gradients, token_title = synthetic_token_gradients(seed=seed), TOKEN_GRADIENTS_TITLE
    figures = [
        ("value_functions.png", lambda: plot_value_functions()),
        ("loss_surface_z.png", lambda: plot_loss_surface("kto", "z")),
        ("loss_surface_beta.png", lambda: plot_loss_surface("kto", "beta", xs=np.linspace(-60.0, 60.0, 121))),
        ("kto_vs_dpo.png", lambda: plot_kto_vs_dpo()),
        ("z_gradient.png", lambda: plot_z_gradient_effect(seed=seed)),
        ("class_balance.png", lambda: plot_class_balance()),
        ("token_gradients.png", lambda: plot_token_gradients(token_gradients.norms, token_gradients.tokens_text,
                                                             labels=token_gradients.labels, title=token_title)),
    ]
    if metrics_records is not None:
        figures.append(("training_curves.png", lambda: plot_training_curves(metrics_records)))
    return [save_figure(draw(), out_dir / name) for name, draw in figures]
