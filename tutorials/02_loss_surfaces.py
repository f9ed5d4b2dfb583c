# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. Loss surfaces: what they teach about β, z and λ
#
# One example's KTO loss depends on its log-ratio r = log π(y|x) − log π_ref(y|x) only through
#
# $$ u = \beta\,(r - z), \qquad \text{loss} = \lambda\,(1 - \sigma(s\,u)), \qquad
#    \Big|\frac{\partial\,\text{loss}}{\partial r}\Big| = \beta\,\lambda\,\sigma(u)\,\sigma(-u), $$
#
# with s = +1 for a desirable example and −1 for an undesirable one. Everything below follows from
# these two lines, and each claim is checked on the numbers `kto_np.plots` computes with
# `kto_loss_and_grad` (not with these formulas):
#
# - the gradient peaks where the reward sits at the reference point, β(r − z) = 0, at βλ/4;
# - β sets both the height (βλ/4) and the width (∝ 1/β) of that peak;
# - far from the reference point the loss saturates and the gradient vanishes (unlike DPO);
# - λ_D / λ_U set how the gradient is shared between the classes, which is how the paper's
#   recommended band (an empirical rule, not derived here) reads as a share of the first step's push.

# %%
import os
import tempfile
from pathlib import Path

import numpy as np

from kto_np import plots

FAST = os.environ.get("KTO_NP_TUTORIAL_FAST") == "1"
OUT = Path(os.environ.get("KTO_NP_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="kto_np_tutorial_"))
OUT.mkdir(parents=True, exist_ok=True)
beta = 0.1

# %% [markdown]
# ## The gradient peaks at the reference point, at βλ/4
#
# `plots.loss_surface` evaluates one example's loss and |gradient| (z held fixed) on a grid of
# log-ratios r (columns) and reference points z (rows). For every z, the steepest point is r = z,
# and its height is σ(0)σ(0) βλ = βλ/4, whatever z is: moving the reference point moves the
# surface, it does not reshape it.

# %%
log_ratios = np.linspace(-30.0, 30.0, 121)  # step 0.5, so every even z below is on the grid
z_values = np.arange(0.0, 21.0, 2.0)
for label, weight in ((1, 1.0), (0, 1.5)):
    surface = plots.loss_surface("kto", "log_ratio", "z", label=label, xs=log_ratios, ys=z_values, beta=beta,
                                 desirable_weight=1.0, undesirable_weight=1.5)
    steepest = surface.xs[np.argmax(surface.grad_norm, axis=1)]  # [NY] the r of the peak, per z
    peak = surface.grad_norm.max(axis=1)
    print(f"{'desirable' if label else 'undesirable'} (λ = {weight}): steepest at r = z for every z: "
          f"{np.array_equal(steepest, z_values)}; peak {peak[0]:.6f} = βλ/4 = {beta * weight / 4:.6f}")
    assert np.array_equal(steepest, z_values)
    assert np.allclose(peak, beta * weight / 4, rtol=1e-12)

# %% [markdown]
# The loss at the peak is λ/2 for either class: at the reference point the model is "half right".
# The desirable loss falls as r grows; the undesirable one rises.

# %%
desirable = plots.loss_surface("kto", "log_ratio", "z", label=1, xs=log_ratios, ys=z_values, beta=beta)
undesirable = plots.loss_surface("kto", "log_ratio", "z", label=0, xs=log_ratios, ys=z_values, beta=beta)
at_reference = log_ratios[None, :] == z_values[:, None]  # [NY, NX]
assert np.allclose(desirable.loss[at_reference], 0.5) and np.allclose(undesirable.loss[at_reference], 0.5)
assert np.all(np.diff(desirable.loss, axis=1) < 0) and np.all(np.diff(undesirable.loss, axis=1) > 0)

# %% [markdown]
# The seed's Edifice formula has the same surface shifted down by λ (−λσ(u) instead of λ(1 − σ(u))),
# so the same gradient: the two differ in *where z comes from* (tutorials 1 and 8), not in the shape.

# %%
edifice = plots.loss_surface("edifice", "log_ratio", "z", label=1, xs=log_ratios, ys=z_values, beta=beta)
assert np.allclose(edifice.loss + 1.0, desirable.loss, rtol=0, atol=1e-12)
assert np.allclose(edifice.grad_norm, desirable.grad_norm, rtol=0, atol=1e-15)

# %% [markdown]
# ## β sets the height and the width
#
# The peak is βλ/4. With plain gradient descent that is the step size: a larger β, larger steps
# near the reference point. With Adam(W), which training uses, it is not: Adam divides each
# gradient entry by a running estimate of its own magnitude, so a constant factor cancels
# (tutorial 11 checks it on one step and shows what β does in training instead). What survives is
# the width. The peak's width shrinks as 1/β: σ(u)σ(−u) falls to half its maximum at
# |u| = 2 artanh(1/√2) ≈ 1.763, that is at |r − z| = 1.763/β. A small β spreads the gradient over a
# wide range of log-ratios, so examples keep being pushed until they are far from the reference; a
# large β concentrates it on the examples near the reference point and stops pushing the others
# early: β bounds how far the policy moves.

# %%
betas = np.array([0.05, 0.1, 0.2, 0.5, 1.0])
step = 0.2 if FAST else 0.05
fine_log_ratios = np.linspace(-80.0, 80.0, int(round(160.0 / step)) + 1)
by_beta = plots.loss_surface("kto", "log_ratio", "beta", label=1, xs=fine_log_ratios, ys=betas, z=0.0)
half_width_u = 2.0 * np.arctanh(1.0 / np.sqrt(2.0))
for beta_value, row in zip(betas, by_beta.grad_norm):
    above_half = fine_log_ratios[row >= row.max() / 2]
    width = above_half[-1] - above_half[0]
    print(f"β = {beta_value:<5g} peak {row.max():.4f} (β/4 = {beta_value / 4:.4f}), "
          f"width at half height {width:6.2f} (2·1.763/β = {2 * half_width_u / beta_value:6.2f})")
    assert abs(row.max() - beta_value / 4) < 1e-12
    assert abs(width - 2 * half_width_u / beta_value) <= 2 * step
assert np.all(np.diff(by_beta.grad_norm.max(axis=1)) > 0)

# %% [markdown]
# ## Saturation: far from the reference point, nothing is learned
#
# For |β(r − z)| large, σ(u)σ(−u) ≈ e^{−|u|}: the loss approaches its bounds (0, or λ) and the
# gradient vanishes. An example the model already gets very right contributes nothing, and so does
# one it gets very wrong. The second half is KTO's robustness to noisy labels, and the contrast with
# DPO, whose loss −log σ(margin) keeps a gradient of β on the wrong side.

# %%
far = np.abs(by_beta.ys[:, None] * by_beta.xs[None, :]) >= 10.0  # [NY, NX] |β (r - z)| >= 10, z = 0
distance_to_bound = np.minimum(by_beta.loss, 1.0 - by_beta.loss)  # the loss is in [0, λ_D] = [0, 1]
print(f"|β(r - z)| >= 10: largest |gradient| {by_beta.grad_norm[far].max():.2e} "
      f"(peak {by_beta.grad_norm.max():.2e}), loss at most {distance_to_bound[far].max():.2e} from 0 or 1")
assert np.all(by_beta.grad_norm[far] <= (by_beta.ys[:, None] * np.exp(-10.0) * np.ones_like(far))[far])
assert np.all(distance_to_bound[far] <= np.exp(-10.0))

# %% [markdown]
# `plots.kto_vs_dpo_curves` puts the three methods side by side against a completion's reward β r
# (for DPO, the other completion of the pair sits at reward 0, so the reward is the margin):

# %%
rewards = np.linspace(-12.0, 12.0, 241)
curves = plots.kto_vs_dpo_curves(rewards, beta=beta, kto_z=5.0)
very_wrong = 0  # index of reward -12: a desirable completion the model finds very unlikely
print(f"desirable completion at reward {rewards[very_wrong]:g}:")
for method, method_curves in curves.items():
    print(f"  {method:18s} loss {method_curves.loss_desirable[very_wrong]:8.4f}, "
          f"|gradient| {method_curves.grad_desirable[very_wrong]:.2e}")
assert abs(curves["dpo"].grad_desirable[very_wrong] - beta) < 1e-5  # DPO: → β, never vanishes
assert curves["kto"].grad_desirable[very_wrong] < 1e-5 * beta  # KTO: saturated
assert curves["dpo"].loss_desirable[very_wrong] > 11.9  # -log σ(-12) ≈ 12: DPO's loss is unbounded
assert curves["kto"].loss_desirable.max() <= 1.0  # KTO's is bounded by λ_D

# %% [markdown]
# KTO's curve is centred at the reference point β z (here 0.5, with z = 5); APO-zero's at 0.

# %%
kto_peak = rewards[np.argmax(curves["kto"].grad_desirable)]
apo_peak = rewards[np.argmax(curves["apo_zero_unpaired"].grad_desirable)]
print(f"steepest reward: KTO {kto_peak:g} (β z = {beta * 5.0:g}), APO-zero {apo_peak:g}")
assert abs(kto_peak - beta * 5.0) < 1e-9 and apo_peak == 0.0

# %% [markdown]
# ## λ_D, λ_U and the recommended band
#
# At the start of KTO training the policy *is* the reference: every r is 0 and (without KL pairs)
# every u is 0, so every example's gradient is βλ_i/(4n). The desirable class's share of the summed
# |gradient| is therefore
#
# $$ \frac{\lambda_D n_D}{\lambda_D n_D + \lambda_U n_U} = \frac{\rho}{1 + \rho}, \qquad
#    \rho = \frac{\lambda_D n_D}{\lambda_U n_U} . $$
#
# The paper's recommended ρ ∈ [1, 4/3] therefore means: the desirable examples should get between
# 1/2 and 4/7 of the push, a little more than the undesirable ones. `plots.class_balance_shares`
# measures the share with `kto_loss_and_grad`:

# %%
fractions = np.linspace(0.1, 0.9, 9 if FAST else 17)
weight_settings = [(1.0, 1.0), (2.0, 1.0), (4.0, 1.0), (1.0, 2.0)]
shares = plots.class_balance_shares(fractions, weight_settings, batch_size=100)  # [S, F]
for (desirable_weight, undesirable_weight), row in zip(weight_settings, shares):
    n_desirable = np.rint(fractions * 100)
    rho = desirable_weight * n_desirable / (undesirable_weight * (100 - n_desirable))
    assert np.allclose(row, rho / (1 + rho), rtol=1e-12)
    low, high = plots.balanced_fraction_range(desirable_weight, undesirable_weight)
    print(f"λ_D = {desirable_weight:g}, λ_U = {undesirable_weight:g}: in the band for desirable fractions "
          f"{low:.3f} to {high:.3f}")
    for fraction in (low, high):
        ratio = desirable_weight * fraction / (undesirable_weight * (1 - fraction))
        assert min(abs(ratio - 1.0), abs(ratio - 4 / 3)) < 1e-12

# %% [markdown]
# Read the other way: with 1 desirable example in 10, λ_D / λ_U should be between 9 and 12.
# `kto_np.check_balance(labels, λ_D, λ_U)` computes ρ and warns (suggesting a λ_D) outside the band.
#
# ## The figures
#
# The plot functions draw the same data; each returns a matplotlib Figure (displayed inline in a
# notebook), saved here into `KTO_NP_TUTORIAL_OUT` (a temporary folder by default). `kto-np figures`
# writes the same figures into `figures/`:
#
# - `value_functions.png`: KTO's value per class, each class's value around the reference point, and
#   the paper's comparison of the implied value functions of Kahneman-Tversky, KTO and DPO (tutorial 1);
# - `loss_surface_z.png`: loss and |gradient| over (r, z), β = 0.1: the peak follows r = z (one
#   gradient panel: with λ_D = λ_U both classes have the same |gradient|);
# - `loss_surface_beta.png`: the same over (r, β), the gradient divided by each row's peak βλ/4 so
#   that every β is visible: the bright band, and the contour at half height, widen as 1/β;
# - `kto_vs_dpo.png`: saturation against DPO's unbounded loss (above);
# - `z_gradient.png`: the seed formula's gradient through z sums to zero (tutorials 1 and 8);
# - `class_balance.png`: the desirable share of the gradient at the first step (r = 0), and the
#   band (above; tutorial 6 trains outside it).

# %%
grid = {} if not FAST else {"xs": np.linspace(-30.0, 30.0, 41), "ys": np.linspace(0.0, 20.0, 21)}
beta_grid = ({"xs": np.linspace(-60.0, 60.0, 121)} if not FAST
             else {"xs": np.linspace(-60.0, 60.0, 41), "ys": np.geomspace(0.01, 1.0, 21)})
figures = {
    "02_value_functions.png": plots.plot_value_functions(),
    "02_loss_surface_kto.png": plots.plot_loss_surface("kto", **grid),
    "02_loss_surface_beta.png": plots.plot_loss_surface("kto", "beta", **beta_grid),
    "02_kto_vs_dpo.png": plots.plot_kto_vs_dpo(),
    "02_z_gradient.png": plots.plot_z_gradient_effect(),
    "02_class_balance.png": plots.plot_class_balance(desirable_fractions=np.linspace(0.05, 0.95, 19 if FAST else 91)),
}
for name, fig in figures.items():
    path = plots.save_figure(fig, OUT / name)
    assert path.stat().st_size > 0
print("saved", sorted(p.name for p in OUT.glob("02_*.png")))

# %% [markdown]
# Each figure in turn. The value functions: left, what KTO's loss rewards for each class; middle,
# each class's value relative to the reference point, an S scaled by that class's weight on both
# sides of it (the weight follows the label, not the sign of r − z); right, the paper's comparison:
# KTO's value is bounded both ways, DPO's log σ is unbounded below, Kahneman-Tversky's steeper for losses.

# %%
figures["02_value_functions.png"]

# %% [markdown]
# The loss and |gradient| over (r, z). The contours are named: the loss at 0.1, 0.5 and 0.9 (0.5 on
# the dashed line r = z), the gradient at fractions of its peak βλ/4 = 0.025. Every contour is a
# straight line parallel to r = z: moving the reference point moves the surface, it does not reshape it.

# %%
figures["02_loss_surface_kto.png"]

# %% [markdown]
# The loss over (r, β): the contours at loss 0.1, 0.5 and 0.9 sit at β r = 2.2, 0 and −2.2, so they
# bend as 1/β on the log-β axis; the normalised gradient shows the same widening directly.

# %%
figures["02_loss_surface_beta.png"]

# %% [markdown]
# KTO against DPO and APO-zero, against a completion's reward β r:

# %%
figures["02_kto_vs_dpo.png"]

# %% [markdown]
# The seed's formula on one batch: through z = mean(β r) the per-example gradients sum to 0 (the
# black bar), so no update can raise every log-probability; with z detached they do not.

# %%
figures["02_z_gradient.png"]

# %% [markdown]
# The desirable share of the first step's |gradient|, ρ/(1 + ρ), against the desirable fraction; the
# thick segments are the fractions inside the paper's band.

# %%
figures["02_class_balance.png"]

# %% [markdown]
# ## The landscape of a trained model: the seed formula's flat valley
#
# Everything above is the loss as a function of its inputs. `kto-np landscape --run runs/demo` draws
# it as a function of a trained policy's *parameters*, on a fixed batch of the run's own data
# (`kto_np.landscape`, float64): filter-normalised random planes (Li et al. 2018), the plane of the
# training trajectory's principal components, the top Hessian eigen-directions, the segment from the
# reference to the policy, and `figures/landscape_variants.png`, which puts one policy under four losses.
#
# That last figure's vertical axis is c, a constant added to *every* policy log-probability the loss
# sees (matched rows and KL rows), the log-probabilities themselves computed by the model. The seed
# formula (`edifice`) takes z = mean(β r) from the same batch, so β(r + c) − z(r + c) = β r − z: its
# landscape is a valley that is exactly flat along c, and its gradient never moves the level of the
# log-probabilities (it can fall together for right and wrong completions at no cost). With
# `stop_z_grad` the value is the same, but the update descends the loss with z frozen, which slopes
# along c: it drifts along that valley. `apo_zero_unpaired` (no z) is anchored at r = 0. `kto` is
# anchored by its clamp z_ref = max(0, mean KL-row log-ratio): where z_ref is clamped at 0, as at the
# demo's policy, lowering every log-probability costs; while it is above 0, `kto` is flat along c too.
# Here is the same computation on a tiny model, checked:

# %%
from kto_np import landscape  # noqa: E402  (this section stands on its own)
from kto_np.architectures import build  # noqa: E402
from kto_np.data import Tokenizer, collate  # noqa: E402

tiny = build(hidden_size=8, num_layers=1, num_heads=2, vocab_size=Tokenizer().vocab_size, dropout=0.0,
             max_seq_len=8, dtype="float64")
reference = tiny.init(0)
rng = np.random.default_rng(1)
policy = {k: v + 0.05 * rng.standard_normal(v.shape) for k, v in reference.items()}
batch = collate([("21=", "12.", 1), ("43=", "3.", 0), ("70=", "07.", 1), ("58=", "585.", 0), ("96=", "69.", 1)],
                Tokenizer(), dtype="float64")
problems = {v: landscape.make_problem(tiny, reference, batch, v, center=policy) for v in landscape.COMPARISON_VARIANTS}
shifts = np.linspace(-30.0, 30.0, 13)
along_c = landscape.shift_losses(problems, reference, policy, [1.0], shifts)  # {variant: [1, 13]}
for name, losses in along_c.items():
    print(f"{name:<20} loss along c at the policy: max - min = {np.ptp(losses):.2e}")
assert np.ptp(along_c["edifice"]) < 1e-12 and np.ptp(along_c["apo_zero_unpaired"]) > 1e-3

# %% [markdown]
# The landscape itself: the four losses over (t, c), t along the segment from the reference (t = 0)
# to this policy (t = 1), c the shift of every log-probability (`landscape.plot_variant_comparison`,
# the figure `kto-np landscape` draws for a trained run). The seed formula's row along c is flat.

# %%
ts = np.linspace(-0.5, 1.5, 5 if FAST else 9)
plane = landscape.shift_losses(problems, reference, policy, ts, shifts)  # {variant: [len(ts), len(shifts)]}
assert np.allclose(plane["edifice"], plane["edifice"][:, :1], rtol=0, atol=1e-12)  # flat along c at every t
plots.inline(landscape.plot_variant_comparison(ts, shifts, plane, beta=problems["edifice"].config.beta))

# %% [markdown]
# The same in parameter space: `logprob_shift_direction` is the smallest parameter step d whose
# effect on every log-probability of the batch is +1 per unit (J d = 1, J the model's Jacobian).
# The edifice loss has zero slope along it; apo_zero does not.

# %%
h = 1e-5
for name in ("edifice", "apo_zero_unpaired"):
    d = landscape.logprob_shift_direction(problems[name], policy)
    plus = {k: policy[k] + h * d[k] for k in policy}
    minus = {k: policy[k] - h * d[k] for k in policy}
    slope = (landscape.loss_value(problems[name], plus) - landscape.loss_value(problems[name], minus)) / (2 * h)
    print(f"{name:<20} slope along the parameter direction that shifts every log-prob: {slope:+.2e}")
    assert (abs(slope) < 1e-9) if name == "edifice" else (abs(slope) > 1e-5)

# %% [markdown]
# ## Exercises
#
# Write each function below in place of its stub and run its cell: `grade` runs your function on the
# grader's inputs and says what is wrong, if anything, in words (against a closed form). To check a file
# of your own (run in a separate process): `kto-np exercise check 02.kto_gradient
# my_answers.py:kto_gradient`. `kto-np exercise list` lists every exercise; tutorials/README.md has them
# per lesson. Reference solutions: `tutorials/solutions/lesson02.py` (try first).

# %%
from kto_np.exercises import grade  # noqa: E402

# %% [markdown]
# **Exercise 02.kto_gradient.** `kto_gradient(log_ratios, labels, z_ref, beta, desirable_weight,
# undesirable_weight) -> dloss_dr`: d loss_i / d r_i for each example, loss_i = λ_i (1 − σ(s_i β (r_i −
# z_ref))) (not divided by n): the curve whose peak is βλ/4.

# %%
def kto_gradient(log_ratios, labels, z_ref, beta, desirable_weight, undesirable_weight):
    raise NotImplementedError  # your code here


print(grade("02.kto_gradient", kto_gradient).message)

# %% [markdown]
# **Exercise 02.desirable_share.** `desirable_gradient_share(labels, desirable_weight, undesirable_weight)
# -> float`: the desirable class's share of the summed |gradient| at the first step (policy = reference,
# every u = 0).

# %%
def desirable_gradient_share(labels, desirable_weight, undesirable_weight):
    raise NotImplementedError  # your code here


print(grade("02.desirable_share", desirable_gradient_share).message)
