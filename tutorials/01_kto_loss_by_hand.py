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
# # 1. The KTO loss by hand
#
# KTO (Kahneman-Tversky Optimization, Ethayarajh et al. 2024) learns from *unpaired* binary feedback:
# each example is a prompt x, a completion y and a thumbs-up (desirable) or thumbs-down (undesirable)
# label. It starts from where its name comes from, Kahneman and Tversky's prospect theory; then it
# computes the loss of a small batch in plain NumPy, one formula at a time, and checks every number
# against `kto_np.kto_loss` and `kto_np.kto_loss_and_grad`:
#
# - Step 1: the log-ratios, the implied rewards;
# - Step 2: the reference point z_ref, from mismatched pairs, clamped and detached;
# - Step 3: the value function per class (and `kto_loss`'s default, which is *not* this loss);
# - Step 4: the gradient, by hand and by finite differences; then the class weights λ_D, λ_U;
# - after the steps: APO-zero, and DPO for contrast.
#
# This is the paper's loss, the one TRL implements. The project started from another formula, the
# seed's (the Elixir library Edifice's `Edifice.Meta.KTO`), which `kto_loss` keeps as its default;
# lesson 8 takes it apart.

# %%
import warnings

import numpy as np

from kto_np import default_beta, dpo_loss_and_grad, kto_loss, kto_loss_and_grad, plots
from kto_np.gradcheck import numerical_gradient, rel_error
from kto_np.losses import check_balance


def sigmoid(x):
    """σ(x) = 1 / (1 + exp(-x)); fine for the moderate arguments of this tutorial."""
    return 1.0 / (1.0 + np.exp(-x))


# %% [markdown]
# ## Prospect theory, and why KTO has this shape
#
# Kahneman and Tversky's prospect theory (1979; cumulative form 1992) describes how people value an
# uncertain outcome x:
#
# - **reference dependence**: x is judged as a gain or a loss relative to a reference point, not in
#   absolute terms;
# - **diminishing sensitivity**: the value v(x) is concave for gains and convex for losses (the step
#   from 0 to 100 feels bigger than the one from 1000 to 1100), which makes people risk-averse for
#   gains and risk-seeking for losses;
# - **loss aversion**: losses weigh more than equal gains, v(−x) ≈ −λ v(x) with λ > 1.
#
# Tversky and Kahneman's fitted form is v(x) = x^α for gains and −λ(−x)^α for losses, α ≈ 0.88,
# λ ≈ 2.25. KTO ("Kahneman-Tversky Optimization") keeps the three properties and swaps the
# ingredients: the outcome is the implied reward β r of a completion, r = log π(y|x) − log π_ref(y|x);
# the reference point is z_ref ≈ KL(π ‖ π_ref) (Step 2); the value is a logistic, σ(β(r − z_ref))
# for a desirable completion. The logistic has the same S shape (concave above the reference point,
# convex below), but it is bounded and smooth at the reference point, where x^α has an infinite
# slope, so it makes a usable loss; β sets how quickly it saturates, the role the curvature α plays
# for risk aversion. λ_D and λ_U weight the two classes.
#
# The paper calls a loss of this kind a **HALO** (human-aware loss): a value function of the
# reward's distance to a reference point, non-decreasing and concave in gains, averaged over the
# data with a sign per example. DPO and PPO-clip are HALOs too; KTO is the one built to follow the
# Kahneman-Tversky value function.

# %%
x = np.linspace(-3.0, 3.0, 601)
tk_value = np.where(x >= 0, np.abs(x) ** 0.88, -2.25 * np.abs(x) ** 0.88)  # Tversky-Kahneman 1992
kto = plots.value_curves(x, desirable_weight=1.0, undesirable_weight=1.5)  # KTO's implied value, λ_U = 1.5
for name, value in (("Tversky-Kahneman", tk_value), ("KTO (logistic)", kto.implied)):
    curvature = np.diff(value, 2)  # second differences: < 0 concave, > 0 convex
    gains, losses = curvature[x[1:-1] > 0.05], curvature[x[1:-1] < -0.05]
    ratio = -value[x == -1.0][0] / value[x == 1.0][0]
    print(f"{name:17s} concave for gains {np.all(gains < 0)}, convex for losses {np.all(losses > 0)}, "
          f"|v(-1)| / v(1) = {ratio:.3f}")
    assert np.all(gains < 0) and np.all(losses > 0) and ratio > 1.0
slope_at_reference = (kto.implied[301] - kto.implied[300]) / (x[301] - x[300])
print(f"KTO's slope at the reference point: {slope_at_reference:.4f} (λ_D/4 = 0.25: finite, unlike x^0.88)")
assert abs(slope_at_reference - 0.25) < 1e-3

# %% [markdown]
# `plots.plot_value_functions` draws KTO's value functions against x = β(r − z), the reward β r
# relative to the reference point β z (left: σ(x) and σ(−x) per class; middle: each class's value
# around the reference point, λ_D(σ(x) − ½) and λ_U(σ(x) − ½), with λ_U = 1.5 > λ_D = 1; right: the
# paper's comparison of the implied value functions of Kahneman-Tversky, KTO and DPO). In KTO the
# weight follows the *label*: an undesirable example is weighted λ_U on both sides of the reference
# point. The `implied` curve checked above splices the two classes (the desirable one for gains, the
# undesirable one for losses): the paper's reading of λ_U > λ_D as loss aversion, in which a gain is a
# desirable outcome and a loss an undesirable one. It is `figures/value_functions.png`.

# %%
fig = plots.plot_value_functions()
fig  # noqa: B018  (shows the figure in a notebook)

# %% [markdown]
# **Loss aversion and the paper's band.** The figure draws λ_U > λ_D because that is what loss
# aversion would mean for KTO. But the paper's practical recommendation (its Eq. 8, used below) is
# λ_D n_D / (λ_U n_U) ∈ [1, 4/3], which on balanced data (n_D = n_U) asks for λ_D ≥ λ_U: the
# opposite. The two are about different things. Loss aversion is the shape of *one* outcome's value;
# the band is a rule for the *classes' total weight* at the start of training (an empirical
# recommendation of the paper; tutorial 2 restates it as the desirable class getting between 1/2 and
# 4/7 of the first step's gradient, tutorial 6 shows what happens outside it).
# Followed on balanced data, the band makes KTO weakly gain-seeking, not loss-averse;
# the loss-averse λ_U = 1.5 λ_D of the figure fits the band only when desirable examples are 1.5
# to 2 times as many as undesirable ones:

# %%
for n_desirable, n_undesirable in ((50, 50), (60, 40), (66, 34)):
    labels_count = np.array([1] * n_desirable + [0] * n_undesirable)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rho = check_balance(labels_count, desirable_weight=1.0, undesirable_weight=1.5)
    print(f"n_D = {n_desirable}, n_U = {n_undesirable}, λ_U = 1.5 λ_D: ρ = {rho:.3f}, "
          f"{'outside the band (warns)' if caught else 'inside the band'}")
    assert bool(caught) == (not 1.0 <= rho <= 4 / 3)

# %% [markdown]
# ## The batch
#
# Six examples. For each we have the summed log-probability of its completion under the policy being
# trained, log π(y|x), and under the frozen reference model, log π_ref(y|x) (tutorial 3 shows how
# these sums are computed from logits). Labels: 1 = desirable, 0 = undesirable.

# %%
beta = default_beta()  # 0.1, the seed's default
labels = np.array([1, 0, 1, 1, 0, 0])
policy_logps = np.array([-12.0, -15.5, -9.0, -20.0, -11.0, -17.5])
ref_logps = np.array([-14.5, -13.0, -10.0, -18.5, -16.0, -19.0])
n = labels.shape[0]
desirable = labels == 1

# %% [markdown]
# ## Step 1: log-ratios
#
# The implied reward of an example is β times its log-ratio,
#
# $$ r_i = \log \pi(y_i|x_i) - \log \pi_{ref}(y_i|x_i), \qquad \text{reward}_i = \beta\, r_i . $$
#
# r_i > 0 means the policy already likes this completion more than the reference does.

# %%
log_ratios = policy_logps - ref_logps
print("r_i      =", log_ratios)
print("β r_i    =", beta * log_ratios)

# %% [markdown]
# ## Step 2: the reference point z from mismatched pairs
#
# Prospect theory judges an outcome relative to a reference point. KTO's reference point is an
# estimate of the KL divergence between policy and reference, KL(π ‖ π_ref). TRL (and the paper)
# estimate it on **mismatched** pairs: prompt i with the completion of another example, which TRL
# picks by rotating the completions by one within the batch, (x_i, y_{i-1}). With the log-probs of those
# pairs under both models,
#
# $$ z_{ref} = \max\Big(0,\ \tfrac{1}{n} \sum_j \big[\log \pi(y_{j-1}|x_j) - \log \pi_{ref}(y_{j-1}|x_j)\big]\Big). $$
#
# Two details: the estimate is **clamped** at 0 (a KL divergence cannot be negative, this estimate
# can), and it is **detached**: z_ref is treated as a constant in the gradient. The estimate is not
# merely noisy but **biased**: it averages over the data set's completions, not over samples from
# π, so it measures how the policy moved on *that* text (tutorial 9 shows it going negative and
# positive in training, and compares it with the real KL).

# %%
kl_policy_logps = np.array([-30.0, -26.0, -33.0, -28.5, -31.0, -27.0])  # log π(y_{j-1} | x_j)
kl_ref_logps = np.array([-33.5, -27.0, -35.0, -31.0, -30.0, -29.5])  # log π_ref(y_{j-1} | x_j)
z_ref = max(0.0, float(np.mean(kl_policy_logps - kl_ref_logps)))
print(f"z_ref = {z_ref:.4f} (log-ratio units)")

# %% [markdown]
# ## Step 3: the value function, per class
#
# With u_i = β(r_i − z_ref), the value of an example is
#
# $$ v_i = \lambda_D\, \sigma(\beta(r_i - z_{ref})) \ \text{(desirable)}, \qquad
#    v_i = \lambda_U\, \sigma(\beta(z_{ref} - r_i)) \ \text{(undesirable)}, $$
#
# and the loss is what is missing from the maximum value: loss_i = λ_i − v_i = λ_i (1 − σ(s_i u_i)),
# with s_i = +1 for desirable and −1 for undesirable examples. L is the mean over all n examples.
# A desirable example wants its reward *above* the reference point, an undesirable one *below*.
#
# **Careful: `kto_loss` defaults to `variant="edifice"`**, the seed's formula (lesson 8), to keep the
# seed's API. The paper's / TRL's loss, this one, needs `variant="kto"`, as below.

# %%
desirable_weight, undesirable_weight = 1.0, 1.0  # λ_D, λ_U
weights = np.where(desirable, desirable_weight, undesirable_weight)  # w_i
signs = np.where(desirable, 1.0, -1.0)  # s_i
u = beta * (log_ratios - z_ref)
values = weights * sigmoid(signs * u)
losses = weights - values
loss_by_hand = losses.mean()

loss_kto_np = kto_loss(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                       variant="kto", kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps)
print(f"by hand: {loss_by_hand:.15f}\nkto_np:  {loss_kto_np:.15f}")
assert abs(loss_by_hand - loss_kto_np) < 1e-12

# %% [markdown]
# The clamp in action: if the mismatched pairs happen to be *more* likely under the reference, the
# mean is negative and z_ref is 0, the same loss as without KL pairs at all.

# %%
kl_ref_logps_higher = kl_policy_logps + 1.0  # mean KL estimate = -1
loss_clamped = kto_loss(policy_logps, ref_logps, labels, beta, variant="kto",
                        kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps_higher)
loss_no_kl_pairs = kto_loss(policy_logps, ref_logps, labels, beta, variant="kto")
by_hand_z0 = np.mean(weights * (1.0 - sigmoid(signs * beta * log_ratios)))
print(f"clamped z: {loss_clamped:.12f}, no KL pairs: {loss_no_kl_pairs:.12f}, by hand: {by_hand_z0:.12f}")
assert loss_clamped == loss_no_kl_pairs
assert abs(loss_clamped - by_hand_z0) < 1e-12

# %% [markdown]
# ## Step 4: the gradient, by hand
#
# Only the matched log-probs log π(y_i|x_i) carry gradient (the reference is frozen, z_ref is
# detached). With σ'(x) = σ(x)σ(−x) and σ(s u)σ(−s u) = σ(u)σ(−u),
#
# $$ \frac{\partial L}{\partial \log\pi(y_i|x_i)} = \frac{1}{n}\frac{\partial\, \text{loss}_i}{\partial r_i}
#    = -\frac{1}{n}\, w_i\, s_i\, \beta\, \sigma(u_i)\, \sigma(-u_i). $$
#
# Negative for desirable examples (gradient descent raises their log-prob), positive for undesirable
# ones, and largest, β w_i / (4n), where the reward sits exactly at the reference point (u_i = 0).

# %%
grad_by_hand = -(weights * signs * beta * sigmoid(u) * sigmoid(-u)) / n
loss, grad, metrics = kto_loss_and_grad(policy_logps, ref_logps, labels, beta, variant="kto",
                                        kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps)
print("by hand:", grad_by_hand)
print("kto_np: ", grad)
assert rel_error(grad, grad_by_hand) < 1e-12
assert np.all((grad < 0) == desirable)

# %% [markdown]
# And by central finite differences, (L(x + h e_i) − L(x − h e_i)) / 2h for every entry i, with
# `kto_np.gradcheck.numerical_gradient` (it perturbs the array in place and restores it):

# %%
policy_for_fd = policy_logps.copy()
numerical = numerical_gradient(
    lambda: kto_loss(policy_for_fd, ref_logps, labels, beta, variant="kto",
                     kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps), policy_for_fd)
print(f"relative error, analytic vs finite differences: {rel_error(grad, numerical):.2e}")
assert rel_error(grad, numerical) < 1e-7

# %% [markdown]
# "Detached" is a choice, not a fact of the function: the loss *value* does depend on the KL pairs
# (through z_ref), so finite differences with respect to `kl_policy_logps` are not zero: every entry
# is (1/n) ∂L/∂z_ref, since z_ref is a mean. KTO simply does not follow that dependence: no gradient
# flows into the KL pairs, which is why a training step only needs a forward pass on them.

# %%
kl_for_fd = kl_policy_logps.copy()
dependence = numerical_gradient(
    lambda: kto_loss(policy_logps, ref_logps, labels, beta, variant="kto",
                     kl_policy_logps=kl_for_fd, kl_ref_logps=kl_ref_logps), kl_for_fd)
print("d L / d kl_policy_logps if z were not detached:", dependence.round(6))
assert np.all(np.abs(dependence) > 1e-6) and np.ptp(dependence) < 1e-9

# %% [markdown]
# The metrics use TRL's names: rewards are β r_i averaged per class, and `kl` is the z_ref used.

# %%
for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins"):
    print(f"{name:18s} {metrics[name]:+.6f}")
assert abs(metrics["kl"] - z_ref) < 1e-12
assert abs(metrics["rewards/chosen"] - np.mean(beta * log_ratios[desirable])) < 1e-12
assert abs(metrics["rewards/rejected"] - np.mean(beta * log_ratios[~desirable])) < 1e-12

# %% [markdown]
# ## The class weights λ_D and λ_U
#
# λ_D and λ_U trade off the two classes. The paper recommends (Eq. 8) keeping
#
# $$ \frac{\lambda_D\, n_D}{\lambda_U\, n_U} \in \left[1, \tfrac{4}{3}\right] . $$
#
# With 2 desirable and 4 undesirable examples and equal weights the ratio is 0.5; kto_np warns (a
# `UserWarning`, not an error) and suggests a λ_D. `warn_balance=False` silences it.

# %%
labels_imbalanced = np.array([1, 0, 0, 1, 0, 0])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ratio = check_balance(labels_imbalanced, desirable_weight=1.0, undesirable_weight=1.0)
print(f"ratio = {ratio}\nwarning: {caught[0].message}")
assert ratio == 0.5 and len(caught) == 1

with warnings.catch_warnings():
    warnings.simplefilter("error")  # no warning once the weights balance the batch
    assert check_balance(labels_imbalanced, desirable_weight=2.5, undesirable_weight=1.0) == 1.25

# %% [markdown]
# ## APO-zero (unpaired)
#
# TRL's APO-zero drops the reference point: desirable loss 1 − σ(β r_i), undesirable σ(β r_i). These
# are exactly the numbers of `variant="kto"` with z_ref = 0 (no KL pairs).

# %%
apo_by_hand = np.mean(np.where(desirable, desirable_weight * (1.0 - sigmoid(beta * log_ratios)),
                               undesirable_weight * sigmoid(beta * log_ratios)))
apo = kto_loss(policy_logps, ref_logps, labels, beta, variant="apo_zero_unpaired")
assert abs(apo - apo_by_hand) < 1e-12
assert abs(apo - loss_no_kl_pairs) < 1e-12
print(f"APO-zero: {apo:.12f} = KTO without KL pairs: {loss_no_kl_pairs:.12f}")

# %% [markdown]
# ## DPO, for contrast
#
# DPO needs **pairs**: for one prompt, a chosen and a rejected completion. Its loss is
#
# $$ L = -\tfrac{1}{n}\sum_i \log \sigma\big(h_i\big), \qquad h_i = \beta\,(r^{chosen}_i - r^{rejected}_i), $$
#
# and its gradient with respect to the chosen log-prob is −β σ(−h_i)/n. Two differences from KTO
# show in the formulas: DPO only sees the *difference* of two rewards (no reference point), and
# −log σ does not saturate on the wrong side: as h → −∞ the gradient tends to −β/n, where KTO's
# σ(u)σ(−u) vanishes (tutorial 2 plots both).

# %%
# pair the examples up by position, as if each pair shared a prompt
chosen, rejected = policy_logps[desirable], policy_logps[~desirable]
ref_chosen, ref_rejected = ref_logps[desirable], ref_logps[~desirable]
h = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
dpo_by_hand = np.mean(-np.log(sigmoid(h)))
dchosen_by_hand = -beta * sigmoid(-h) / h.shape[0]
dpo, (dchosen, drejected), dpo_metrics = dpo_loss_and_grad(chosen, rejected, ref_chosen, ref_rejected, beta)
assert abs(dpo - dpo_by_hand) < 1e-12
assert rel_error(dchosen, dchosen_by_hand) < 1e-12 and rel_error(drejected, -dchosen_by_hand) < 1e-12
print(f"DPO loss {dpo:.6f}, reward accuracy {dpo_metrics['rewards/accuracies']:.2f}")

very_wrong = np.array([-60.0])  # chosen far below the reference: margin h = -6
_, (dpo_grad_wrong, _), _ = dpo_loss_and_grad(very_wrong, np.zeros(1), np.zeros(1), np.zeros(1), beta)
_, kto_grad_wrong, _ = kto_loss_and_grad(very_wrong, np.zeros(1), [1], beta, variant="kto")
print(f"a desirable completion at β r = -6: DPO gradient {dpo_grad_wrong[0]:+.4f}, "
      f"KTO gradient {kto_grad_wrong[0]:+.4f}")
assert abs(dpo_grad_wrong[0]) > 10 * abs(kto_grad_wrong[0])

# %% [markdown]
# That last line is KTO's robustness argument in one number: an example the policy is very far
# from (possibly a mislabelled one) barely moves a KTO update, while DPO keeps pushing on it.
#
# It cuts both ways. A *correctly* labelled example that the policy gets badly wrong (a hard
# example: a good completion the model finds very unlikely) is saturated just the same, and KTO
# ignores it too. Saturation buys robustness to label noise at the price of not learning from the
# hardest correct examples; β sets where that happens (|β(r − z)| of a few units, tutorial 2).

# %% [markdown]
# ## Exercises
#
# Write each function below in place of its stub and run its cell: `grade` runs your function on the
# grader's inputs and says what is wrong, if anything, in words (against a closed form or through the
# gradient oracle's diagnosis). To check a file of your own (run in a separate process): `kto-np exercise
# check 01.z_ref my_answers.py:z_ref`. `kto-np exercise list` lists every exercise; tutorials/README.md
# has them per lesson. Reference solutions: `tutorials/solutions/lesson01.py` (try first).

# %%
from kto_np.exercises import grade  # noqa: E402

# %% [markdown]
# **Exercise 01.z_ref.** `z_ref(kl_policy_logps, kl_ref_logps) -> float`: KTO's reference point from the
# log-probs of the mismatched (KL) pairs: their mean log-ratio, clamped at 0.

# %%
def z_ref(kl_policy_logps, kl_ref_logps):
    raise NotImplementedError  # your code here


print(grade("01.z_ref", z_ref).message)

# %% [markdown]
# **Exercise 01.kto_loss.** `kto_loss_and_grad(policy_logps, ref_logps, labels, kl_policy_logps,
# kl_ref_logps, beta, desirable_weight, undesirable_weight) -> (loss, dloss_dpolicy_logps)`: the paper's
# KTO loss (z_ref from the KL pairs, clamped at 0, detached) and its gradient, NumPy in and out.

# %%
def kto_loss_and_grad(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                      undesirable_weight):
    raise NotImplementedError  # your code here


print(grade("01.kto_loss", kto_loss_and_grad).message)
