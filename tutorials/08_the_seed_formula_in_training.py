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
# # 8. Why the seed formula fails, in training
#
# The project started from a seed: the documentation of the Elixir library Edifice's module
# `Edifice.Meta.KTO`, whose KTO formula differs from the paper's (lesson 1): the reference point is
# the batch's own mean reward, z = mean_i β r_i, not clamped and not detached. This lesson first
# computes it by hand and derives two facts about it:
#
# - through z, the per-example gradients **sum to zero**: an update cannot raise all log-probs;
# - equivalently, the loss is **invariant** to adding one constant to every log-ratio of the batch:
#   nothing anchors the *level* of the log-probs, only their differences within a batch.
#
# Then it trains with it.
#
# A desirable example is rewarded for sitting above the batch mean, not for being likely. Push the
# thumbs-down completions down and the mean falls; the thumbs-up ones are then "above the reference
# point" without having moved. This tutorial trains the three formulas from one reference: the
# seed's, the seed's with a stop-gradient on z (`stop_z_grad=True`), and the paper's (`"kto"`),
# whose z_ref comes from mismatched pairs, is clamped at 0 and is detached.

# %% [markdown]
# Lesson 1's batch: six examples, their summed log-probs under the policy and the reference, β = 0.1
# and λ_D = λ_U = 1.

# %%
import numpy as np

from kto_np import default_beta, kto_loss, kto_loss_and_grad
from kto_np.gradcheck import numerical_gradient, rel_error


def sigmoid(x):
    """σ(x) = 1 / (1 + exp(-x)); fine for the moderate arguments of this lesson."""
    return 1.0 / (1.0 + np.exp(-x))


beta = default_beta()
labels = np.array([1, 0, 1, 1, 0, 0])
policy_logps = np.array([-12.0, -15.5, -9.0, -20.0, -11.0, -17.5])
ref_logps = np.array([-14.5, -13.0, -10.0, -18.5, -16.0, -19.0])
n = labels.shape[0]
desirable = labels == 1
desirable_weight, undesirable_weight = 1.0, 1.0
weights = np.where(desirable, desirable_weight, undesirable_weight)
signs = np.where(desirable, 1.0, -1.0)
log_ratios = policy_logps - ref_logps

# %% [markdown]
# ## The seed's formula, by hand
#
# The seed document (the Elixir library Edifice, `Edifice.Meta.KTO`) writes KTO differently from the
# paper (lesson 1), and this is `kto_loss`'s default `variant="edifice"`:
#
# $$ KL_i = \beta r_i, \quad z = \tfrac{1}{n}\sum_i KL_i, \quad u_i = KL_i - z, $$
# $$ \text{loss}_i = -\lambda_D\, \sigma(u_i)\ \text{(desirable)}, \qquad
#    \text{loss}_i = -\lambda_U\, \sigma(-u_i)\ \text{(undesirable)} . $$
#
# KL_i = β r_i is the reward (the seed calls u_i the reward; in these lessons the reward is always
# β r, and u_i is the sigmoid's argument, the reward measured from the reference point z).
#
# Three differences from the paper's loss of lesson 1: z is the mean of the batch's *own* (matched)
# rewards, in reward units; it is **not** clamped; and it is **not** detached, so gradient flows through the mean. (The
# seed's module doc writes σ(−KL − z) for the undesirable case; its function doc and code use
# σ(−(KL − z)), which is what kto_np implements.) The loss is negative: −λ σ(·) instead of λ(1 − σ(·)).

# %%
kl_terms = beta * log_ratios
z_edifice = kl_terms.mean()
u = kl_terms - z_edifice  # the reward β r measured from z
edifice_losses = np.where(desirable, -desirable_weight * sigmoid(u), -undesirable_weight * sigmoid(-u))
edifice_by_hand = edifice_losses.mean()
edifice_kto_np = kto_loss(policy_logps, ref_logps, labels, beta)  # the default variant
print(f"z = mean(β r) = {z_edifice:+.4f} (can be negative)")
print(f"by hand: {edifice_by_hand:.15f}\nkto_np:  {edifice_kto_np:.15f}")
assert abs(edifice_by_hand - edifice_kto_np) < 1e-12

# %% [markdown]
# ### The gradient through z
#
# Write g_i = ∂loss_i/∂u_i / n = −w_i s_i σ(u_i) σ(−u_i) / n. Since
# u_i = β r_i − (β/n) Σ_j r_j, every r_j moves every u_i:
#
# $$ \frac{\partial L}{\partial r_j} = \beta\, g_j - \frac{\beta}{n} \sum_i g_i = \beta\,(g_j - \bar g) . $$
#
# With a stop-gradient on z (`stop_z_grad=True`) only the first term remains, β g_j.

# %%
g = -(weights * signs * sigmoid(u) * sigmoid(-u)) / n
grad_through_z_by_hand = beta * (g - g.mean())
grad_stop_z_by_hand = beta * g
_, grad_through_z, _ = kto_loss_and_grad(policy_logps, ref_logps, labels, beta)
_, grad_stop_z, _ = kto_loss_and_grad(policy_logps, ref_logps, labels, beta, stop_z_grad=True)
assert rel_error(grad_through_z, grad_through_z_by_hand) < 1e-12
assert rel_error(grad_stop_z, grad_stop_z_by_hand) < 1e-12

policy_for_fd = policy_logps.copy()
numerical = numerical_gradient(lambda: kto_loss(policy_for_fd, ref_logps, labels, beta), policy_for_fd)
print(f"through z, analytic vs finite differences: {rel_error(grad_through_z, numerical):.2e}")
assert rel_error(grad_through_z, numerical) < 1e-7

print("gradient through z:", grad_through_z.round(5), " sum:", f"{grad_through_z.sum():+.1e}")
print("stop-gradient on z:", grad_stop_z.round(5), " sum:", f"{grad_stop_z.sum():+.1e}")

# %% [markdown]
# ### What the z gradient does
#
# It subtracts the batch mean from every example's gradient, so **the gradients sum to zero**: an
# update cannot raise (or lower) all log-probabilities together. Equivalently, the loss is invariant
# to adding the same constant to every policy log-prob (z absorbs it). The stop-gradient version has
# no such constraint: it pushes desirable examples up and undesirable ones down independently.

# %%
assert abs(grad_through_z.sum()) < 1e-15
assert abs(kto_loss(policy_logps + 3.0, ref_logps, labels, beta) - edifice_kto_np) < 1e-12
assert abs(grad_stop_z.sum()) > 1e-5

# %% [markdown]
# An extreme case makes the point: a batch of thumbs-up examples only, all at the same log-ratio.
# Through z, every u_i is 0 whatever the log-ratio, so the batch teaches nothing; with z detached,
# it raises every log-prob.

# %%
same_ratio_policy = ref_logps[:4] + 2.0
all_desirable = np.ones(4, dtype=int)
_, grad_only_thumbs_up, _ = kto_loss_and_grad(same_ratio_policy, ref_logps[:4], all_desirable, beta)
_, grad_only_thumbs_up_stop, _ = kto_loss_and_grad(same_ratio_policy, ref_logps[:4], all_desirable, beta,
                                                   stop_z_grad=True)
print("through z:", grad_only_thumbs_up, "\nstop z:   ", grad_only_thumbs_up_stop)
assert np.max(np.abs(grad_only_thumbs_up)) < 1e-15 and np.all(grad_only_thumbs_up_stop < 0.0)

# %% [markdown]
# That example hides the worse half of the story. Give the thumbs-up examples *different*
# log-ratios: through z the gradients still sum to zero, so if some are pushed up, others must be
# pushed down, and gradient descent **lowers the log-prob of a desirable completion**. Which ones?
# Those whose σ(u)σ(−u) is below the batch mean: the examples far from the batch's mean
# reward, here the one the policy already likes most.

# %%
spread_ratios = np.array([0.0, 1.0, 2.0, 30.0])  # thumbs-up only; the last one well above the mean
_, grad_spread, _ = kto_loss_and_grad(ref_logps[:4] + spread_ratios, ref_logps[:4], all_desirable, beta)
_, grad_spread_stop, _ = kto_loss_and_grad(ref_logps[:4] + spread_ratios, ref_logps[:4], all_desirable, beta,
                                           stop_z_grad=True)
print("through z:", grad_spread.round(5), "\nstop z:   ", grad_spread_stop.round(5))
assert grad_spread[-1] > 0.0  # a thumbs-up example pushed down
assert np.all(grad_spread_stop < 0.0)  # with z detached, every thumbs-up example is pushed up

# %% [markdown]
# ## In training: three formulas from one reference
#
# Tutorial 5's setting (3-digit sorting, a 2-layer 32-channel GPT-2), trained with the seed's formula,
# the seed's with `stop_z_grad=True`, and the paper's.

# %%
import os  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from kto_np import plots  # noqa: E402
from kto_np.plots import load_metrics_records  # noqa: E402
from kto_np.train import TrainConfig, run  # noqa: E402

FAST = os.environ.get("KTO_NP_TUTORIAL_FAST") == "1"
OUT = Path(os.environ.get("KTO_NP_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="kto_np_tutorial_"))
OUT.mkdir(parents=True, exist_ok=True)

# Tutorial 5's setting, with a learning rate of 3e-3 and 200 steps: enough to see where each formula goes.
base = TrainConfig(
    num_digits=3, hidden_size=32, num_layers=2, num_heads=2,
    sft_examples=512 if FAST else 2048, sft_steps=40 if FAST else 300, num_examples=512 if FAST else 2048,
    steps=10 if FAST else 200,
    lr=3e-3, eval_prompts=32 if FAST else 200, eval_every=5 if FAST else 50, checkpoint_every=1000, seed=0,
)
reference_run = OUT / "reference"
run(replace(base, steps=0), reference_run, progress=False, force=True, log=lambda *_: None)


def kto_run(name, **changes):
    """KTO from the reference above (tutorial 6 explains `reference=`): (summary, KTO records, evaluations)."""
    config = replace(base, **changes)
    folder = OUT / name
    summary = run(config, folder, reference=reference_run, force=True, progress=False, log=lambda *_: None)
    records = load_metrics_records(folder / "metrics.jsonl")
    return (summary, [r for r in records if r["phase"] == "kto"], [r for r in records if r["phase"] == "eval"])


# %% [markdown]
# ## Three runs, one reference

# %%
runs = {
    "edifice": kto_run("edifice", variant="edifice"),
    "edifice, stop_z_grad": kto_run("edifice_stop_z", variant="edifice", stop_z_grad=True),
    "kto (paper)": kto_run("kto", variant="kto"),
}
print(f"{'desirable rate at':22s}" + "".join(f"{'step ' + str(r['step']):>10}" for r in runs["kto (paper)"][2])
      + "   malformed ('other') at the end")
for name, (summary, _, evaluations) in runs.items():
    print(f"{name:22s}" + "".join(f"{r['desirable_rate']:>10.1%}" for r in evaluations)
          + f"   {summary['modes_after'].get('other', 0.0):.1%}")

# %% [markdown]
# The paper's formula keeps improving. The seed's stalls near where it was after the first
# evaluation, with close to half of its samples malformed; with the stop-gradient it does a little
# better early on and then falls back.

# %%
edifice, stopped, paper = (runs[name][0] for name in runs)
stopped_rates = [r["desirable_rate"] for r in runs["edifice, stop_z_grad"][2]]
if not FAST:
    assert paper["desirable_rate_after"] > 0.75
    assert paper["desirable_rate_after"] > max(edifice["desirable_rate_after"], stopped["desirable_rate_after"]) + 0.2
    assert edifice["modes_after"].get("other", 0.0) > 0.3
    assert max(stopped_rates) > stopped_rates[-1] + 0.05  # a peak, then worse

# %% [markdown]
# ## Where it goes wrong: the reference point follows the batch down
#
# `kl` in the metrics is the z each formula used: the batch mean β r for the seed's (reward units),
# z_ref for the paper's (log-ratio units). The table puts both in reward units, β z (the paper's
# β z_ref), next to the mean log-prob of the batch's thumbs-up completions (nats) and the mean
# reward β r of each class (reward units, r the log-ratio in nats):

# %%
beta = base.beta


def z_in_reward_units(name, record):
    """The metrics' `kl` as β z: the seed's is already a mean reward, the paper's z_ref a log-ratio."""
    return record["kl"] if name.startswith("edifice") else beta * record["kl"]


print(f"{'':22s}{'step':>5} {'β z':>8} {'log π(thumbs-up)':>17} {'β r thumbs-up':>14} {'β r thumbs-down':>16}")
print(f"{'':22s}{'':>5} {'(reward)':>8} {'(nats)':>17} {'(reward)':>14} {'(reward)':>16}")
for name, (_, records, _) in runs.items():
    for r in (records[0], records[len(records) // 2], records[-1]):
        print(f"{name:22s}{r['step']:>5} {z_in_reward_units(name, r):>8.3f} {r['logps/chosen']:>17.3f} "
              f"{r['rewards/chosen']:>14.3f} {r['rewards/rejected']:>16.3f}")

# %% [markdown]
# Three rows per run hide what happens in between. Every step, drawn: the reference point β z, and
# the log-prob of the thumbs-up completions (each step's batch has other completions, so the
# per-step values are noisy; the line is the mean of the last 10 steps).

# %%
steps = {name: np.array([r["step"] for r in records]) for name, (_, records, _) in runs.items()}
fig = plots.plot_curves([
    ("The reference point each formula used", "β z (reward units)",
     {name: (steps[name], [z_in_reward_units(name, r) for r in records]) for name, (_, records, _) in runs.items()}),
    ("log π of the thumbs-up completions", "mean log π(y|x) of the batch's thumbs-up (nats)",
     {name: (steps[name], [r["logps/chosen"] for r in records]) for name, (_, records, _) in runs.items()}),
], smooth=10, colors={"edifice": "#D55E00", "edifice, stop_z_grad": "#E69F00", "kto (paper)": "#009E73"},
    title="Three formulas from one reference: where z goes, and what happens to the thumbs-up")
fig  # noqa: B018  (shows the figure in a notebook)

# %% [markdown]
# The right panel is the clearest picture of the seed formula's flaw: it was told these completions
# are good, and it makes them *less* likely. Their mean log-ratio r = log π − log π_ref over the run
# (computed from each step's β r):

# %%
mean_log_ratio_up = {name: float(np.mean([r["rewards/chosen"] for r in records])) / beta
                     for name, (_, records, _) in runs.items()}
for name, value in mean_log_ratio_up.items():
    print(f"{name:22s} mean log-ratio of the thumbs-up completions over the run: {value:+.2f} nats")
if not FAST:
    assert mean_log_ratio_up["edifice"] < -0.2  # below the reference: the thumbs-up were pushed down
    assert mean_log_ratio_up["edifice, stop_z_grad"] < 0.0
    assert mean_log_ratio_up["kto (paper)"] > 0.3

# %% [markdown]
# In every run the thumbs-down completions are pushed far down (their reward becomes clearly
# negative). In the seed's formula that drags the batch mean z down with them, and a thumbs-up
# example's argument β r − z is then positive although its own reward β r has hardly moved: its
# σ saturates, its gradient fades, and the correct answers are never made more likely. Their
# log-prob ends about where the reference had it, and the probability mass taken from the mistakes
# has nowhere defined to go: much of it lands on malformed strings.
#
# The paper's z_ref is measured on other text (mismatched pairs), clamped at 0 and detached. Here
# it is 0 on all but one step (the raw estimate is negative, tutorial 9), so a thumbs-up example is rewarded only
# for rising *above the reference model*, and it does: its log-prob climbs towards 0 (probability 1).

# %%
kto_first, kto_last = runs["kto (paper)"][1][0], runs["kto (paper)"][1][-1]
edifice_first, edifice_last = runs["edifice"][1][0], runs["edifice"][1][-1]
paper_z = np.array([r["kl"] for r in runs["kto (paper)"][1]])
print(f"paper's z_ref is 0 on {np.sum(paper_z == 0.0)} of the {paper_z.size} steps; largest {paper_z.max():.3f} "
      f"(β z_ref = {beta * paper_z.max():.3f})")
if not FAST:
    assert edifice_last["kl"] < -1.0  # the seed's z followed the thumbs-down rewards down
    assert np.sum(paper_z > 0.0) <= 1 and beta * paper_z.max() < 0.05  # the clamp held z_ref at 0
    assert kto_last["logps/chosen"] > kto_first["logps/chosen"] + 0.5
    assert abs(edifice_last["logps/chosen"] - edifice_first["logps/chosen"]) < 0.5
    assert edifice_last["rewards/chosen"] - edifice_last["kl"] > 1.0  # "above the reference point" at rest

# %% [markdown]
# ## Why the stop-gradient is not enough
#
# `stop_z_grad=True` removes the zero-sum constraint (the gradient β(g_j − ḡ) derived above becomes β g_j),
# so for a while the policy can raise the correct answers. But z is still the batch's own mean reward:
# the reference point still follows the thumbs-down completions down, the thumbs-up examples still
# saturate without rising, and nothing stops the drift. What worked here is narrower than "the
# paper's z_ref": in this run z_ref was 0 on 199 of the 200 steps (0.20 on the other), so the
# paper's formula trained as KTO with a reference point fixed at 0 (APO-zero's loss, tutorial 1).
# The evidence is for an anchor that does not follow the examples being scored and carries no
# gradient; whether the mismatched-pair estimate helps when it is positive is tutorial 9's question.

# %% [markdown]
# ## Exercises
#
# Write each function below in place of its stub and run its cell: `grade` runs your function on the
# grader's inputs and says what is wrong, if anything, in words (through the gradient oracle's diagnosis).
# To check a file of your own (run in a separate process): `kto-np exercise check 08.seed_loss
# my_answers.py:seed_loss_and_grad`. `kto-np exercise list` lists every exercise; tutorials/README.md has
# them per lesson. Reference solutions: `tutorials/solutions/lesson08.py` (try first).

# %%
from kto_np.exercises import grade  # noqa: E402

# %% [markdown]
# **Exercise 08.seed_loss.** `seed_loss_and_grad(policy_logps, ref_logps, labels, beta, desirable_weight,
# undesirable_weight) -> (loss, dloss_dpolicy_logps)`: the seed's formula (z = mean β r of the batch
# itself, not clamped, not detached: gradient flows through z) and its gradient.

# %%
def seed_loss_and_grad(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight):
    raise NotImplementedError  # your code here


print(grade("08.seed_loss", seed_loss_and_grad).message)

# %% [markdown]
# **Exercise 08.seed_loss_stop_z.** `seed_loss_stop_z_and_grad(policy_logps, ref_logps, labels, beta,
# desirable_weight, undesirable_weight) -> (loss, dloss_dpolicy_logps)`: the seed's formula with a
# stop-gradient on z (stop_z_grad=True: z is a constant in the gradient).

# %%
def seed_loss_stop_z_and_grad(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight):
    raise NotImplementedError  # your code here


print(grade("08.seed_loss_stop_z", seed_loss_stop_z_and_grad).message)
