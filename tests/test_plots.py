"""Figures: the numbers behind each plot against closed forms recomputed here, the figures' labels,
and make_all_figures' files (valid, non-blank, byte-identical across runs)."""

import io
import json
import math

import numpy as np
import pytest
from matplotlib.colorbar import Colorbar
from matplotlib.figure import Figure
from matplotlib.image import imread

from kto_np import plots
from kto_np.losses import kto_loss

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def logistic(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def assert_close(name, mine, expected, rtol=1e-10, atol=1e-13):
    mine, expected = np.asarray(mine, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if not np.allclose(mine, expected, rtol=rtol, atol=atol):
        diff = np.abs(mine - expected)
        worst = np.unravel_index(np.argmax(diff), diff.shape) if diff.ndim else ()
        raise AssertionError(
            f"{name}: max abs diff {diff.max():.3e} at {worst}; plots {mine.ravel()[:6]} vs "
            f"expected {expected.ravel()[:6]}"
        )


def metrics_records():
    """A small run: SFT, then KTO with one class missing from some batches, then evaluations."""
    records = [{"phase": "sft", "step": s, "loss": 3.0 - 0.1 * s, "grad_norm": 1.0 + 0.05 * s,
                "learning_rate": 1e-3} for s in range(5)]
    for s in range(8):
        chosen = None if s in (2, 5) else 0.1 * s
        rejected = None if s == 6 else -0.05 * s
        records.append({
            "phase": "kto", "step": s, "loss": 0.5 - 0.02 * s, "kl": max(0.0, 0.02 * s - 0.05),
            "kl_raw": None if s == 3 else 0.02 * s - 0.05, "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": None if chosen is None or rejected is None else chosen - rejected,
            "logps/chosen": -10.0, "logps/rejected": -12.0, "grad_norm": 0.3, "learning_rate": 1e-4,
        })
    records += [{"phase": "eval", "step": s, "desirable_rate": 0.25 + 0.1 * s // 4} for s in (0, 4, 8)]
    return records


def axes_with_content(fig):
    return [ax for ax in fig.axes if not isinstance(getattr(ax, "_colorbar", None), Colorbar)]


# ---------------------------------------------------------------------------------------------------
# numbers


@pytest.mark.parametrize("variant, y", [("kto", "z"), ("kto", "beta"), ("edifice", "z"), ("edifice", "beta"),
                                        ("apo_zero_unpaired", "beta")])
@pytest.mark.parametrize("label", [1, 0])
def test_loss_surface_matches_closed_form(variant, y, label):
    xs = np.array([-25.0, -7.5, -0.3, 4.0, 18.0])
    if y == "z":
        ys = np.array([-4.0, 0.0, 3.0, 12.0]) if variant != "kto" else np.array([0.0, 2.5, 12.0])
    else:
        ys = np.array([0.02, 0.1, 0.7])
    beta, z, weights = 0.3, (1.5 if variant != "apo_zero_unpaired" else 0.0), (0.7, 1.9)
    surface = plots.loss_surface(variant, "log_ratio", y, label=label, xs=xs, ys=ys, beta=beta, z=z,
                                 desirable_weight=weights[0], undesirable_weight=weights[1])
    assert surface.loss.shape == surface.grad_norm.shape == (ys.size, xs.size)
    weight, sign = (weights[0], 1.0) if label else (weights[1], -1.0)
    grid_y, grid_r = np.meshgrid(ys, xs, indexing="ij")
    grid_beta, grid_z = (np.full_like(grid_y, beta), grid_y) if y == "z" else (grid_y, np.full_like(grid_y, z))
    if variant == "kto":
        grid_z = np.maximum(grid_z, 0.0)
    u = grid_beta * (grid_r - grid_z)
    expected_loss = -weight * logistic(sign * u) if variant == "edifice" else weight * (1 - logistic(sign * u))
    expected_grad = grid_beta * weight * logistic(u) * logistic(-u)
    assert_close(f"{variant} surface loss over (r, {y})", surface.loss, expected_loss)
    assert_close(f"{variant} surface |grad| over (r, {y})", surface.grad_norm, expected_grad)


def test_loss_surface_equals_kto_loss_at_grid_points():
    xs, ys = np.linspace(-20.0, 20.0, 7), np.array([0.0, 4.0, 9.0])
    surface = plots.loss_surface("kto", y="z", label=0, xs=xs, ys=ys, beta=0.2, undesirable_weight=1.3)
    for i, j in [(0, 0), (1, 3), (2, 6), (2, 2)]:
        direct = kto_loss(np.array([xs[j] - 5.0]), np.array([-5.0]), [0], 0.2, 1.0, 1.3, variant="kto",
                          kl_policy_logps=np.array([ys[i] - 1.0]), kl_ref_logps=np.array([-1.0]))
        assert_close(f"surface.loss[{i}, {j}]", surface.loss[i, j], direct, rtol=1e-9)


def test_value_curves_match_closed_form():
    rewards = np.array([-7.0, -2.5, -0.1, 0.0, 0.4, 3.0, 9.0])
    curves = plots.value_curves(rewards, desirable_weight=0.8, undesirable_weight=1.7)
    assert_close("v_D", curves.desirable, 0.8 * logistic(rewards))
    assert_close("v_U", curves.undesirable, 1.7 * logistic(-rewards))
    expected_implied = np.where(rewards >= 0, 0.8, 1.7) * (logistic(rewards) - 0.5)
    assert_close("implied value", curves.implied, expected_implied)
    # each class's value centred at the reference point: the label's weight on both sides of it
    assert_close("desirable, centred", curves.desirable_centred, 0.8 * (logistic(rewards) - 0.5))
    assert_close("undesirable, centred", curves.undesirable_centred, 1.7 * (logistic(rewards) - 0.5))


def test_comparison_value_functions_match_closed_form():
    x = np.array([-3.0, -0.5, 0.0, 0.7, 2.0])
    assert_close("Kahneman-Tversky", plots.kahneman_tversky_value(x),
                 np.where(x >= 0, 1.0, -2.25) * np.abs(x) ** 0.88)
    assert_close("DPO implied value", plots.dpo_implied_value(x), np.log(logistic(x)) + np.log(2.0))
    assert plots.dpo_implied_value([0.0])[0] == 0.0


def test_moving_average_is_the_trailing_mean():
    values = np.array([1.0, 4.0, -2.0, 8.0, 0.5, 3.0])
    expected = [np.mean(values[max(0, i - 2):i + 1]) for i in range(values.size)]
    assert_close("moving average", plots.moving_average(values, 3), expected)
    assert_close("window 1", plots.moving_average(values, 1), values)


def test_implied_value_has_the_kahneman_tversky_shape():
    rewards = np.linspace(-5.0, 5.0, 201)
    curves = plots.value_curves(rewards, desirable_weight=1.0, undesirable_weight=1.5)
    second_difference = np.diff(curves.implied, 2)  # centred at rewards[1:-1]
    centres = rewards[1:-1]
    assert np.all(second_difference[centres > 0.05] < 0), "gains must be concave"
    assert np.all(second_difference[centres < -0.05] > 0), "losses must be convex"
    gain, loss = curves.implied[rewards > 0], curves.implied[rewards < 0][::-1]
    assert np.all(-loss > gain), "losses must weigh more than gains of the same size (λ_U > λ_D)"


def test_kto_vs_dpo_curves_match_closed_form():
    rewards = np.array([-12.0, -3.0, -0.2, 0.0, 1.1, 6.0])
    beta, kto_z = 0.25, 4.0
    curves = plots.kto_vs_dpo_curves(rewards, beta=beta, kto_z=kto_z, desirable_weight=1.2,
                                     undesirable_weight=0.9)
    u = rewards - beta * kto_z
    expected = {
        "kto": (1.2 * (1 - logistic(u)), 0.9 * (1 - logistic(-u)),
                beta * 1.2 * logistic(u) * logistic(-u), beta * 0.9 * logistic(u) * logistic(-u)),
        "apo_zero_unpaired": (1.2 * (1 - logistic(rewards)), 0.9 * logistic(rewards),
                              beta * 1.2 * logistic(rewards) * logistic(-rewards),
                              beta * 0.9 * logistic(rewards) * logistic(-rewards)),
        "dpo": (np.log1p(np.exp(-rewards)), np.log1p(np.exp(rewards)),
                beta * logistic(-rewards), beta * logistic(rewards)),
    }
    assert set(curves) == set(expected)
    for method, columns in expected.items():
        for field, values in zip(plots.MethodCurves._fields, columns, strict=True):
            assert_close(f"{method} {field}", getattr(curves[method], field), values)


def test_only_dpo_keeps_a_gradient_for_negative_margins():
    curves = plots.kto_vs_dpo_curves(np.array([-12.0, 12.0]), beta=0.1)
    assert curves["dpo"].grad_desirable[0] > 0.99 * 0.1  # chosen far below: still pushed with ~β
    assert curves["dpo"].grad_desirable[1] < 1e-5
    for method in ("kto", "apo_zero_unpaired"):
        assert max(curves[method].grad_desirable) < 1e-5, f"{method} should saturate both ways"


def test_z_gradient_sums_to_zero_only_through_z():
    batch = plots.z_gradient_batch(seed=3, batch_size=10, beta=0.2, desirable_weight=1.0,
                                   undesirable_weight=1.4)
    scale = np.abs(batch.grad_through_z).sum()
    assert abs(batch.grad_through_z.sum()) < 1e-13 * scale, batch.grad_through_z
    assert abs(batch.grad_stop_z.sum()) > 1e-2 * np.abs(batch.grad_stop_z).sum(), batch.grad_stop_z
    # independent recomputation: g_i = ∂loss_i/∂u_i / n, u_i = β r_i − mean(β r)
    n, weights = batch.labels.size, np.where(batch.labels, 1.0, 1.4)
    signs = np.where(batch.labels, 1.0, -1.0)
    u = 0.2 * batch.log_ratios - np.mean(0.2 * batch.log_ratios)
    per_example = -weights * signs * logistic(u) * logistic(-u) / n
    assert_close("grad_stop_z", batch.grad_stop_z, 0.2 * per_example)
    assert_close("grad_through_z", batch.grad_through_z, 0.2 * (per_example - per_example.mean()))


def test_z_gradient_batch_is_seeded():
    first, second = plots.z_gradient_batch(seed=5), plots.z_gradient_batch(seed=5)
    for field in plots.ZGradientBatch._fields:
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field), err_msg=field)
    assert not np.array_equal(first.log_ratios, plots.z_gradient_batch(seed=6).log_ratios)


@pytest.mark.parametrize("variant", ["kto", "edifice"])
def test_class_balance_share_matches_recomputation(variant):
    rng = np.random.default_rng(7)
    n, beta, (lambda_d, lambda_u) = 20, 0.1, (2.0, 0.8)
    log_ratios = rng.normal(0.0, 12.0, n)
    shares = plots.class_balance_shares([0.3, 0.6], [(1.0, 1.0), (lambda_d, lambda_u)], variant=variant,
                                        beta=beta, batch_size=n, log_ratios=log_ratios)
    assert shares.shape == (2, 2)
    desirable = np.arange(n) < 6  # round(0.3 * 20)
    weights, signs = np.where(desirable, lambda_d, lambda_u), np.where(desirable, 1.0, -1.0)
    rewards = beta * log_ratios
    u = rewards - rewards.mean() if variant == "edifice" else rewards
    g = -weights * signs * logistic(u) * logistic(-u) / n
    if variant == "edifice":
        g = g - g.mean()
    expected = np.abs(g[desirable]).sum() / np.abs(g).sum()
    assert_close(f"{variant} desirable share at f=0.3, λ=({lambda_d}, {lambda_u})", shares[1, 0], expected)


def test_class_balance_at_the_start_of_training_is_the_weighted_count():
    fractions = np.array([0.05, 0.25, 0.5, 0.8, 0.95])
    settings = [(1.0, 1.0), (4.0, 1.0), (1.0, 2.0)]
    shares = plots.class_balance_shares(fractions, settings, batch_size=100)
    for s, (lambda_d, lambda_u) in enumerate(settings):
        expected = lambda_d * fractions / (lambda_d * fractions + lambda_u * (1 - fractions))
        assert_close(f"shares for λ=({lambda_d}, {lambda_u})", shares[s], expected)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (4.0, 1.0), (0.5, 3.0)])
def test_balanced_fraction_range_hits_the_paper_band(weights):
    low, high = plots.balanced_fraction_range(*weights)
    ratio = [weights[0] * f / (weights[1] * (1 - f)) for f in (low, high)]
    assert_close("balance ratio at the band edges", ratio, [1.0, 4.0 / 3.0])


def test_synthetic_token_gradients_only_on_completion_tokens():
    grads = plots.synthetic_token_gradients(seed=0)
    B, T = grads.norms.shape
    assert len(grads.tokens_text) == B and all(len(row) == T for row in grads.tokens_text)
    for b, (prompt, completion, desirable) in enumerate(plots._SYNTHETIC_EXAMPLES):
        assert "".join(grads.tokens_text[b]) == prompt + completion
        assert grads.labels[b] == desirable
        end = len(prompt) + len(completion)
        assert np.all(grads.norms[b, : len(prompt)] == 0), f"prompt of row {b} got gradient"
        assert np.all(grads.norms[b, end:] == 0), f"padding of row {b} got gradient"
        assert np.all(grads.norms[b, len(prompt): end] > 0), f"completion of row {b} got no gradient"
    np.testing.assert_array_equal(grads.norms, plots.synthetic_token_gradients(seed=0).norms)


# ---------------------------------------------------------------------------------------------------
# figures


SMALL = {"xs": np.linspace(-10.0, 10.0, 9), "ys": np.linspace(0.0, 8.0, 5)}
PLOT_CASES = {
    "value_functions": lambda: plots.plot_value_functions(rewards=np.linspace(-4, 4, 21)),
    "loss_surface_z": lambda: plots.plot_loss_surface("kto", "z", **SMALL),
    "loss_surface_beta": lambda: plots.plot_loss_surface("edifice", "beta", xs=SMALL["xs"],
                                                         ys=np.geomspace(0.01, 1.0, 5)),
    "kto_vs_dpo": lambda: plots.plot_kto_vs_dpo(rewards=np.linspace(-6, 6, 25)),
    "loss_surface_unequal_weights": lambda: plots.plot_loss_surface("kto", "z", undesirable_weight=1.5, **SMALL),
    "z_gradient": lambda: plots.plot_z_gradient_effect(seed=1, batch_size=6),
    "curves": lambda: plots.plot_curves([("loss", "loss", {"a": ([0, 1, 2], [1.0, 0.5, 0.2]),
                                                           "b": ([0, 1, 2], [1.0, 0.8, 0.7])}),
                                         ("rate", "fraction", {"a": ([0, 2], [0.1, 0.9])})], smooth=2),
    "bars": lambda: plots.plot_bars({"ok": 1e-10, "bug": 0.3}, title="errors", xlabel="relative error", ylabel="check",
                                    log=True, threshold=1e-6),
    "class_balance": lambda: plots.plot_class_balance(desirable_fractions=np.linspace(0.1, 0.9, 9),
                                                      batch_size=20),
    "token_gradients": lambda: plots.plot_token_gradients(np.array([[0.0, 0.5, 1.0], [0.2, 0.0, 0.3]]),
                                                          ["ab$", ["x", " ", "zz"]], labels=[1, 0]),
    "training_curves": lambda: plots.plot_training_curves(metrics_records()),
}


@pytest.mark.parametrize("name", list(PLOT_CASES))
def test_every_plot_is_a_labelled_figure(name):
    fig = PLOT_CASES[name]()
    assert isinstance(fig, Figure)
    panels = axes_with_content(fig)
    assert panels, f"{name}: no axes"
    for index, ax in enumerate(panels):
        where = f"{name} axes[{index}]"
        assert ax.get_title(), f"{where} has no title"
        assert ax.get_xlabel() and ax.get_ylabel(), f"{where} lacks an axis label"
        _, labels = ax.get_legend_handles_labels()
        data_lines = [line for line in ax.lines if not line.get_label().startswith("_")]  # not guides
        if len(data_lines) > 1 or len(labels) > 1:
            assert ax.get_legend() is not None, f"{where} has {len(data_lines)} lines and no legend"


@pytest.mark.parametrize("shape, draw", [
    ((1, 3), lambda axes: plots.plot_value_functions(axes, rewards=np.linspace(-2, 2, 5))),
    ((1, 2), lambda axes: plots.plot_z_gradient_effect(axes, seed=1, batch_size=4)),
    ((1, 3), lambda axes: plots.plot_loss_surface("kto", "z", axes, **SMALL)),
    ((2, 2), lambda axes: plots.plot_loss_surface("kto", "z", axes, undesirable_weight=2.0, **SMALL)),
    ((1, 2), lambda axes: plots.plot_curves([("a", "y", {"s": ([0, 1], [0, 1])}),
                                             ("b", "y", {"s": ([0, 1], [1, 0])})], axes)),
    ((2, 2), lambda axes: plots.plot_kto_vs_dpo(axes, rewards=np.linspace(-2, 2, 5))),
    ((1, 1), lambda axes: plots.plot_class_balance(axes[0, 0], desirable_fractions=[0.3, 0.5], batch_size=10)),
    ((2, 4), lambda axes: plots.plot_training_curves(metrics_records(), axes)),
])
def test_plots_draw_on_the_axes_they_are_given(shape, draw):
    fig = Figure()
    axes = fig.subplots(*shape, squeeze=False)
    assert draw(axes) is fig
    assert all(ax.get_title() for ax in axes.ravel())


def test_wrong_axes_are_rejected():
    fig = Figure()
    with pytest.raises(ValueError, match="axes"):
        plots.plot_kto_vs_dpo(fig.subplots(1, 3), rewards=[0.0, 1.0])
    with pytest.raises(ValueError, match="axes"):
        plots.plot_value_functions([fig.add_subplot(), Figure().add_subplot()], rewards=[0.0, 1.0])


def test_loss_surface_draws_one_gradient_panel_when_the_classes_share_it():
    """|∂loss/∂r| = βλσ(u)σ(−u) is the same for both classes when λ_D = λ_U: one panel, not two copies;
    with λ_D ≠ λ_U each class gets its own. The contours are named by what they mean."""
    wide = {"xs": np.linspace(-40.0, 40.0, 33), "ys": np.linspace(0.0, 8.0, 5)}
    same = axes_with_content(plots.plot_loss_surface("kto", "z", **wide))
    assert [ax.get_title() for ax in same] == ["desirable example: loss", "undesirable example: loss",
                                               "either example: |∂loss/∂r|"]
    labels = {text.get_text() for ax in same for text in ax.texts}
    assert {"loss 0.1", "loss 0.5", "loss 0.9", "0.5 × peak"} <= labels, labels
    unequal = axes_with_content(plots.plot_loss_surface("kto", "z", undesirable_weight=2.0, **wide))
    assert len(unequal) == 4 and {"loss 1.8", "loss 0.9"} <= {t.get_text() for ax in unequal for t in ax.texts}


def test_z_gradient_figure_draws_each_batch_sum():
    batch = plots.z_gradient_batch(seed=2, batch_size=6)
    through, stopped = axes_with_content(plots.plot_z_gradient_effect(seed=2, batch_size=6))
    for ax, grads in ((through, batch.grad_through_z), (stopped, batch.grad_stop_z)):
        heights = [patch.get_height() for patch in ax.patches]
        assert_close(ax.get_title(), heights, np.append(grads, grads.sum()))
    assert "sum over the batch = " in through.get_title()
    assert abs(through.patches[-1].get_height()) < 1e-15 < abs(stopped.patches[-1].get_height())


def test_curves_keep_one_colour_per_series_and_smooth_on_request():
    fig = plots.plot_curves([("p1", "y", {"a": ([0, 1, 2, 3], [4.0, 0.0, 2.0, 2.0]), "b": ([0, 1], [1.0, 1.0])}),
                             ("p2", "y", {"b": ([0, 1], [0.0, 0.0]), "a": ([0, 1], [1.0, 1.0])})], smooth=2)
    first, second = axes_with_content(fig)
    named = [{line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
             for ax in (first, second)]
    assert named[0]["a"].get_color() == named[1]["a"].get_color() != named[0]["b"].get_color()
    assert_close("smoothed a", named[0]["a"].get_ydata(), [4.0, 2.0, 1.0, 2.0])
    raw = [line for line in first.lines if line.get_label().startswith("_") and len(line.get_ydata()) == 4]
    assert_close("raw a", raw[0].get_ydata(), [4.0, 0.0, 2.0, 2.0])


def test_bars_are_coloured_by_their_side_of_the_threshold():
    fig = plots.plot_bars({"ok": 1e-10, "bug": 0.3, "edge": 1e-6}, title="t", xlabel="x", log=True, threshold=1e-6)
    (ax,) = axes_with_content(fig)
    colours = [tuple(patch.get_facecolor()) for patch in ax.patches]
    assert colours[0] == colours[2] != colours[1]
    assert [patch.get_width() for patch in ax.patches] == [1e-10, 0.3, 1e-6]
    assert ax.get_xscale() == "log"


def test_inline_shows_any_figure_as_a_notebook_png():
    figure = Figure(figsize=(2.0, 1.0))
    figure.add_subplot().plot([0, 1], [1, 0])
    assert repr(plots.inline(figure)) == "<InlineFigure size 200x100 with 1 Axes>"
    png = plots.inline(figure)._repr_png_()
    assert png[:8] == PNG_SIGNATURE
    assert imread(io.BytesIO(png)).shape[1] == round(2.0 * plots.NOTEBOOK_DPI)
    assert plots.NOTEBOOK_DPI >= 100


def test_inline_png_is_a_palette_image_close_to_the_full_colour_one():
    from PIL import Image

    fig = plots.plot_loss_surface("kto", "z", **SMALL)
    inline = Image.open(io.BytesIO(fig._repr_png_()))
    assert inline.mode == "P"
    full = io.BytesIO()
    fig.savefig(full, format="png", dpi=plots.NOTEBOOK_DPI)
    full_rgb = np.asarray(Image.open(full).convert("RGB"), dtype=np.float64)
    inline_rgb = np.asarray(inline.convert("RGB"), dtype=np.float64)
    assert inline_rgb.shape == full_rgb.shape
    assert np.abs(inline_rgb - full_rgb).mean() < 2.0  # on a 0-255 scale: the same picture
    assert fig._repr_png_() == fig._repr_png_()  # deterministic


def test_training_curves_skip_none_values():
    records = metrics_records()
    fig = plots.plot_training_curves(records)
    lines = {line.get_label(): line for ax in fig.axes for line in ax.lines}
    kto = [r for r in records if r["phase"] == "kto"]
    for label, key in (("desirable (chosen)", "rewards/chosen"), ("undesirable (rejected)", "rewards/rejected"),
                       ("margin (chosen − rejected)", "rewards/margins"), ("KTO loss", "loss")):
        kept = [r for r in kto if r[key] is not None]
        np.testing.assert_array_equal(lines[label].get_xdata(), [r["step"] for r in kept], err_msg=label)
        np.testing.assert_allclose(lines[label].get_ydata(), [r[key] for r in kept], err_msg=label)
    np.testing.assert_array_equal(lines["desirable rate"].get_xdata(), [0, 4, 8])
    # the KL panel: the raw estimate (one record without it) next to the clamped z
    raw = [r for r in kto if r["kl_raw"] is not None]
    np.testing.assert_allclose(lines["estimate before the clamp (kl_raw)"].get_ydata(), [r["kl_raw"] for r in raw])
    np.testing.assert_allclose(lines["z used (kl)"].get_ydata(), [r["kl"] for r in kto])
    assert min(lines["estimate before the clamp (kl_raw)"].get_ydata()) < 0 == min(lines["z used (kl)"].get_ydata())


def test_figures_display_inline_in_a_notebook():
    """IPython shows an object with _repr_png_ as a PNG: no pyplot, no backend needed."""
    fig = plots.plot_class_balance(desirable_fractions=[0.3, 0.5], batch_size=10)
    png = fig._repr_png_()
    assert png[:8] == PNG_SIGNATURE
    assert imread(io.BytesIO(png)).shape[1] == round(fig.get_figwidth() * plots.NOTEBOOK_DPI)


def test_training_curves_put_sft_and_kto_on_their_own_step_axes():
    fig = plots.plot_training_curves(metrics_records())
    panels = {ax.get_title(): ax for ax in axes_with_content(fig)}
    assert panels["SFT gradient norm (before clipping)"].get_xlabel() == "SFT step"
    assert panels["KTO gradient norm (before clipping)"].get_xlabel() == "KTO step"
    sft = [r for r in metrics_records() if r["phase"] == "sft"]
    np.testing.assert_array_equal(panels["SFT gradient norm (before clipping)"].lines[0].get_xdata(),
                                  [r["step"] for r in sft])


def test_training_curves_without_sft_or_eval_records():
    fig = plots.plot_training_curves([r for r in metrics_records() if r["phase"] == "kto"])
    sft_panel = axes_with_content(fig)[0]
    assert not sft_panel.lines and any(text.get_text() == "no data" for text in sft_panel.texts)


def test_load_metrics_records_round_trip(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = metrics_records()
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    assert plots.load_metrics_records(path) == records
    path.write_text('{"phase": "sft", "step": 0}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        plots.load_metrics_records(path)


# ---------------------------------------------------------------------------------------------------
# make_all_figures


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """make_all_figures twice, into two directories: with and without metrics records."""
    first, second = tmp_path_factory.mktemp("figures_a"), tmp_path_factory.mktemp("figures_b") / "nested"
    return (first, plots.make_all_figures(first, metrics_records=metrics_records(), seed=0),
            second, plots.make_all_figures(str(second), seed=0))


def test_make_all_figures_writes_the_named_files(two_runs):
    first, paths_with_records, second, paths_without = two_runs
    assert [p.name for p in paths_with_records] == list(plots.FIGURE_NAMES)
    assert [p.name for p in paths_without] == [n for n in plots.FIGURE_NAMES if n != "training_curves.png"]
    assert all(p.parent == first for p in paths_with_records)
    assert sorted(p.name for p in first.iterdir()) == sorted(plots.FIGURE_NAMES), "stray temporary files"
    assert not (second / "training_curves.png").exists()


def test_make_all_figures_pngs_are_valid_and_not_blank(two_runs):
    for path in two_runs[1]:
        assert path.read_bytes()[:8] == PNG_SIGNATURE, path.name
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200, (path.name, image.shape)
        pixels = image.reshape(-1, image.shape[-1])
        assert np.unique(pixels[:: max(1, pixels.shape[0] // 20000)], axis=0).shape[0] > 10, \
            f"{path.name} is (nearly) a single colour"


def test_make_all_figures_is_deterministic(two_runs):
    _, paths_with_records, second, _ = two_runs
    for path in paths_with_records:
        if path.name != "training_curves.png":
            assert path.read_bytes() == (second / path.name).read_bytes(), f"{path.name} differs between runs"
    assert b"Matplotlib" not in paths_with_records[0].read_bytes(), "PNG carries the software version"


# ---------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("call, error, match", [
    (lambda: plots.loss_surface("dpo"), ValueError, "variant"),
    (lambda: plots.plot_loss_surface("kto_paper", xs=[0.0, 1.0], ys=[0.0, 1.0]), ValueError, "variant"),
    (lambda: plots.class_balance_shares([0.5], [(1, 1)], variant="unknown"), ValueError, "variant"),
    (lambda: plots.loss_surface("kto", y="lambda"), ValueError, "y"),
    (lambda: plots.loss_surface("kto", x="reward"), ValueError, "x"),
    (lambda: plots.loss_surface("apo_zero_unpaired", y="z"), ValueError, "y='beta'"),
    (lambda: plots.loss_surface("kto", label=2), ValueError, "label"),
    (lambda: plots.loss_surface("kto", xs=[1.0, 0.0]), ValueError, "xs"),
    (lambda: plots.loss_surface("kto", y="beta", ys=[-0.1, 0.5]), ValueError, "ys"),
    (lambda: plots.loss_surface("kto", beta=0.0), ValueError, "beta"),
    (lambda: plots.value_curves([0.0, math.nan]), ValueError, "rewards"),
    (lambda: plots.value_curves([0.0], undesirable_weight=-1.0), ValueError, "undesirable_weight"),
    (lambda: plots.kto_vs_dpo_curves([0.0], kto_z=-1.0), ValueError, "kto_z"),
    (lambda: plots.z_gradient_batch(batch_size=1), ValueError, "batch_size"),
    (lambda: plots.class_balance_shares([0.0, 0.5], [(1, 1)]), ValueError, "desirable_fractions"),
    (lambda: plots.class_balance_shares([0.5], [(1, 1, 1)]), ValueError, "weight_settings"),
    (lambda: plots.class_balance_shares([0.5], [(1, 0)]), ValueError, r"weight_settings\[0\]\[1\]"),
    (lambda: plots.class_balance_shares([0.5], [(1, 1)], batch_size=4, log_ratios=[0.0] * 3),
     ValueError, "log_ratios"),
    (lambda: plots.plot_training_curves([]), ValueError, "records"),
    (lambda: plots.plot_training_curves({"phase": "kto"}), TypeError, "records"),
    (lambda: plots.plot_training_curves([{"step": 0, "loss": 1.0}]), ValueError, r"records\[0\]"),
    (lambda: plots.plot_training_curves([{"phase": "dpo", "step": 0}]), ValueError, "records"),
    (lambda: plots.plot_training_curves([{"phase": "kto", "loss": 1.0}]), ValueError, r"records\[0\]\['step'\]"),
    (lambda: plots.plot_training_curves([{"phase": "kto", "step": 0, "loss": "low"}]), TypeError,
     r"records\[0\]\['loss'\]"),
    (lambda: plots.plot_token_gradients([[1.0, 2.0]], ["a"]), ValueError, r"tokens_text\[0\]"),
    (lambda: plots.plot_token_gradients([[1.0, 2.0]], ["ab", "cd"]), ValueError, "tokens_text"),
    (lambda: plots.plot_token_gradients([[1.0, 2.0]], "ab"), TypeError, "tokens_text"),
    (lambda: plots.plot_token_gradients([[1.0, -2.0]], ["ab"]), ValueError, "dlogits_norms"),
    (lambda: plots.plot_token_gradients([1.0, 2.0], ["ab"]), ValueError, "dlogits_norms"),
    (lambda: plots.plot_token_gradients([[1.0, 2.0]], ["ab"], labels=[1, 0]), ValueError, "labels"),
    (lambda: plots.moving_average([1.0, 2.0], 0), ValueError, "window"),
    (lambda: plots.plot_curves([("t", "y", {"a": ([0], [1.0])})], smooth=(1, 2)), ValueError, "smooth"),
    (lambda: plots.plot_curves([("t", "y", {"a": ([0], [1.0])})], smooth=0), ValueError, r"smooth\[0\]"),
    (lambda: plots.plot_curves([]), TypeError, "panels"),
    (lambda: plots.plot_curves([("t", "y", {})]), ValueError, r"panels\[0\]"),
    (lambda: plots.plot_curves([("t", "y", {"a": ([0, 1], [1.0])})]), ValueError, "'a'"),
    (lambda: plots.plot_bars({}, title="t", xlabel="x"), TypeError, "values"),
    (lambda: plots.plot_bars({"a": 0.0}, title="t", xlabel="x", log=True), ValueError, "log"),
    (lambda: plots.inline("not a figure"), TypeError, "figure"),
    (lambda: plots.make_all_figures(None), TypeError, "out_dir"),
    (lambda: plots.make_all_figures("/nonexistent-never", seed=-1), ValueError, "seed"),
    (lambda: plots.make_all_figures("/nonexistent-never", metrics_records=[]), ValueError, "records"),
])
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
