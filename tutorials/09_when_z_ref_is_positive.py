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
# # 9. The reference point z_ref: a biased estimate, and what happens when it is positive
#
# KTO's reference point is meant to be KL(π ‖ π_ref) = E_{y ~ π}[log π(y|x) − log π_ref(y|x)], which
# is never negative. What KTO computes is
#
# $$ \widehat{KL} = \tfrac{1}{n}\sum_j \big[\log \pi(y_{j-1}|x_j) - \log \pi_{ref}(y_{j-1}|x_j)\big],
#    \qquad z_{ref} = \max(0, \widehat{KL}), $$
#
# on **the dataset's completions** paired with other prompts, not on samples from π. That is not a
# noisy KL: it is a *biased* one. If d is the distribution those mismatched completions come from,
#
# $$ \mathbb{E}_{y\sim d}\big[\log\pi(y|x) - \log\pi_{ref}(y|x)\big] = KL(d\,\|\,\pi_{ref}) - KL(d\,\|\,\pi), $$
#
# which is negative whenever the policy has moved *away* from d, and positive when it has moved
# towards it. The metric `kl` is the clamped z_ref; `kl_raw` (in every record of metrics.jsonl) is
# the estimate before the clamp. This tutorial trains twice from one reference, once on the usual
# half-and-half feedback and once on thumbs-up only, and compares `kl_raw` with the real
# KL(π ‖ π_ref) measured on samples from the policy.

# %%
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from kto_np import checkpoint, plots
from kto_np.data import Tokenizer, collate, make_examples, make_prompts, make_task, prompt_tokens
from kto_np.generate import generate
from kto_np.losses import kto_loss_and_grad
from kto_np.model import GPT
from kto_np.plots import load_metrics_records
from kto_np.step import forward_logps
from kto_np.train import TrainConfig, run

FAST = os.environ.get("KTO_NP_TUTORIAL_FAST") == "1"
OUT = Path(os.environ.get("KTO_NP_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="kto_np_tutorial_"))
OUT.mkdir(parents=True, exist_ok=True)

base = TrainConfig(
    num_digits=3, hidden_size=32, num_layers=2, num_heads=2,
    sft_examples=512 if FAST else 2048, sft_steps=40 if FAST else 300, num_examples=512 if FAST else 2048,
    steps=10 if FAST else 100,
    lr=1e-3, eval_prompts=32 if FAST else 200, eval_every=10 if FAST else 50, checkpoint_every=1000, seed=0,
)
reference_run = OUT / "reference"
run(replace(base, steps=0), reference_run, progress=False, force=True, log=lambda *_: None)


def kto_run(name, **changes):
    """KTO from the reference above (tutorial 6 explains `reference=`): (folder, summary, KTO records)."""
    config = replace(base, **changes)
    folder = OUT / name
    summary = run(config, folder, reference=reference_run, force=True, progress=False, log=lambda *_: None)
    return folder, summary, [r for r in load_metrics_records(folder / "metrics.jsonl") if r["phase"] == "kto"]


# %% [markdown]
# ## The real KL, from samples of the policy
#
# KL(π ‖ π_ref) can be estimated without bias the slow way: sample completions y ~ π for held-out
# prompts (temperature 1), score them under both models, average log π − log π_ref. Each term can
# be negative, the mean converges to a KL, which is ≥ 0.

# %%
tokenizer = Tokenizer()
task = make_task(base.task, base.num_digits)
heldout = make_prompts(task, base.eval_prompts, seed=base.seed)


def sampled_kl(folder, seed=0):
    """Monte-Carlo KL(π ‖ π_ref) of a finished run: mean over sampled y ~ π of log π(y|x) − log π_ref(y|x)."""
    reference = checkpoint.load(folder / "checkpoints" / "reference.npz")
    policy = checkpoint.load(folder / "checkpoints" / "kto.npz").params
    model = GPT(reference.config)
    prompts = prompt_tokens(heldout, tokenizer)  # [B, T0]
    T0 = prompts.shape[1]
    tokens = generate(model, policy, prompts, model.config.max_seq_len - T0, temperature=1.0,
                      rng=np.random.default_rng(seed), stop_token=tokenizer.end_id)  # [B, T]
    new = tokens[:, T0:] == tokenizer.end_id
    before_end = (np.cumsum(new, axis=1) - new) == 0  # up to and including the first end token
    mask = np.zeros(tokens.shape, dtype=model.config.np_dtype)
    mask[:, T0:] = before_end
    log_ratios = (forward_logps(model, policy, tokens, mask)
                  - forward_logps(model, reference.params, tokens, mask))
    return float(np.mean(log_ratios))


# %% [markdown]
# ## Half thumbs-up, half thumbs-down: the estimate goes negative

# %%
balanced_folder, balanced, balanced_records = kto_run("balanced")
kl_raw = np.array([r["kl_raw"] for r in balanced_records])
kl_balanced = sampled_kl(balanced_folder)
print(f"kl_raw: first step {kl_raw[0]:+.3f}, last step {kl_raw[-1]:+.3f}; positive on {np.mean(kl_raw > 0):.0%} "
      f"of the steps; z_ref = max(0, kl_raw) is 0 on {np.mean([r['kl'] == 0 for r in balanced_records]):.0%}")
print(f"KL(π ‖ π_ref) on samples from the policy: {kl_balanced:+.3f}")
assert kl_raw[0] == 0.0  # step 1: the policy is the reference
if not FAST:
    assert kl_raw[-1] < -1.0 and 1.0 < kl_balanced < 2.0

# %% [markdown]
# The policy has moved: its own samples are, on average, about 1.5 nats more likely under itself
# than under the reference. But it moved *away* from the mismatched completions (for this task a
# completion for another prompt is wrong, and KTO learns to avoid wrong answers), so the estimate
# on them is strongly negative and the clamp holds z_ref at 0. With z_ref = 0, KTO's loss is
# APO-zero's (tutorial 1): the reference point does nothing here.
#
# ## Thumbs-up only: the estimate goes positive
#
# Every completion in the data is a correct answer (`desirable_fraction=1.0`). The mismatched pairs
# are then *correct answers for other prompts*: well-formed sorted strings. Early in training, the
# policy learns what correct answers look like in general, and those strings become more likely
# too: the estimate can turn positive, and then z_ref leaves 0.

# %%
positive_folder, positive, positive_records = kto_run("desirable_only", desirable_fraction=1.0)
kl_raw_positive = np.array([r["kl_raw"] for r in positive_records])
z_used = np.array([r["kl"] for r in positive_records])
print("kl_raw, steps 1-20:", kl_raw_positive[:20].round(2))
print(f"positive on {np.mean(kl_raw_positive > 0):.0%} of the steps, largest {kl_raw_positive.max():+.3f} "
      f"at step {int(np.argmax(kl_raw_positive)) + 1}; last step {kl_raw_positive[-1]:+.3f}")
print(f"desirable rate {positive['desirable_rate_before']:.1%} -> {positive['desirable_rate_after']:.1%}; "
      f"KL(π ‖ π_ref) on samples: {sampled_kl(positive_folder):+.3f}")
assert np.all(z_used == np.maximum(kl_raw_positive, 0.0))
if not FAST:
    assert kl_raw_positive[:20].max() > 0.1 and kl_raw_positive[-1] < 0.0
    assert positive["desirable_rate_after"] > positive["desirable_rate_before"] + 0.3

# %% [markdown]
# It leaves 0, but not by much. How far, in the units the loss sees (β z_ref, against rewards β r):

# %%
beta = base.beta
print(f"z_ref > 0 on {np.sum(z_used > 0)} of {z_used.size} steps ({np.sum(z_used[:20] > 0)} of them among the "
      f"first 20); largest z_ref {z_used.max():.3f}, so β z_ref <= {beta * z_used.max():.3f}")
if not FAST:
    assert np.mean(z_used > 0) < 0.3 and beta * z_used.max() < 0.05
    assert np.all(z_used[20:] == 0.0)  # early only

# %% [markdown]
# A shift of the sigmoid's argument by at most a few hundredths, on a minority of the steps, early:
# on this data z_ref is a small correction, not a reference point that changes what is learned.
# Both runs' estimates over the whole run, and the z_ref they gave:

# %%
runs_09 = {"half thumbs-up, half thumbs-down": balanced_records, "thumbs-up only": positive_records}
fig = plots.plot_curves([
    ("The KL estimate on mismatched pairs (kl_raw)", "log-ratio units (nats)",
     {name: ([r["step"] for r in records], [r["kl_raw"] for r in records]) for name, records in runs_09.items()}),
    ("The reference point used, β z_ref = β max(0, kl_raw)", "reward units",
     {name: ([r["step"] for r in records], [beta * r["kl"] for r in records]) for name, records in runs_09.items()}),
], colors={"half thumbs-up, half thumbs-down": "#0072B2", "thumbs-up only": "#009E73"},
    title="The estimate is negative once the policy moves away from the dataset; "
          "positive, briefly, while it moves towards it")
fig  # noqa: B018  (shows the figure in a notebook)

# %% [markdown]
# Later the policy concentrates on the right answer *for each prompt*, the other prompts' answers
# lose probability, and the estimate turns negative again: which sign it has depends on where the
# policy is going relative to the dataset, not on how far it has gone.
#
# ## What a positive z_ref does
#
# z_ref shifts the value function: with u = β(r − z_ref), a desirable completion counts as a gain
# only once its log-ratio exceeds z_ref, and an undesirable one counts as avoided while it stays
# below z_ref. A policy that simply raises *everything* (the unrelated completions as much as the
# good ones) raises z_ref by as much and gains nothing. Only a rise *specific* to the example counts:
# z_ref is RLHF's KL penalty in the form of a reference point. On one desirable example at r = 0.3:

# %%
for z in (0.0, 0.3):
    kl_pair = {"kl_policy_logps": np.array([z]), "kl_ref_logps": np.zeros(1)}
    loss, grad, metrics = kto_loss_and_grad(np.array([0.3]), np.zeros(1), [1], 0.1, variant="kto", **kl_pair)
    print(f"z_ref = {metrics['kl']:.1f}: loss {loss:.5f} (σ(β(r − z)) = {1 - loss:.5f})")
    if z > 0:
        assert abs(loss - 0.5) < 1e-12  # r = z_ref: exactly at the reference point, "half right"

# %% [markdown]
# ## How good is a one-batch estimate?
#
# The estimate is a mean over the n KL rows of *one step's batch*: its spread across batches is the
# noise z_ref adds to every step. TRL's advice is a per-step batch of at least 4 and an effective
# batch of 16 to 128, because gradient accumulation does not help: each step's z_ref comes from its
# own micro-batch. The spread of the estimate over 32 batches of the thumbs-up-only data, for the
# trained policy:

# %%
reference = checkpoint.load(positive_folder / "checkpoints" / "reference.npz")
policy = checkpoint.load(positive_folder / "checkpoints" / "kto.npz").params
model = GPT(reference.config)
examples = make_examples(task, 32 * 64, seed=7, desirable_fraction=1.0)
spread = {}
for batch_size in (2, 4, 16, 64):
    estimates = []
    for b in range(32):
        batch = collate(examples[b * batch_size:(b + 1) * batch_size], tokenizer)
        kl_rows = (batch.kl_tokens, batch.kl_completion_mask)
        estimates.append(float(np.mean(forward_logps(model, policy, *kl_rows)
                                       - forward_logps(model, reference.params, *kl_rows))))
    spread[batch_size] = float(np.std(estimates))
    print(f"per-step batch {batch_size:3d}: estimate {np.mean(estimates):+7.3f} ± {spread[batch_size]:.3f} "
          f"(std over 32 batches)")
assert spread[64] < spread[4] < spread[2]

# %% [markdown]
# ## Exercises
#
# Write each function below in place of its stub and run its cell: `grade` runs your function on the
# grader's inputs and says what is wrong, if anything, in words (against a closed form). To check a file
# of your own (run in a separate process): `kto-np exercise check 09.kl_completions
# my_answers.py:kl_completions`. `kto-np exercise list` lists every exercise; tutorials/README.md has them
# per lesson. Reference solutions: `tutorials/solutions/lesson09.py` (try first).

# %%
from kto_np.exercises import grade  # noqa: E402

# %% [markdown]
# **Exercise 09.kl_completions.** `kl_completions(completions) -> kl_completions`: the completion each
# prompt is paired with for the KL estimate: prompt i with completion i − 1 (TRL's rotation by one;
# completions is [B, T], one row per example).

# %%
def kl_completions(completions):
    raise NotImplementedError  # your code here


print(grade("09.kl_completions", kl_completions).message)

# %% [markdown]
# **Exercise 09.sampled_kl.** `sampled_kl(policy_logps, ref_logps) -> (estimate, standard_error)`: KL(π ‖
# π_ref) from completions sampled from π: the mean of log π − log π_ref over the samples, and its standard
# error (sample standard deviation, ddof=1, over √n).

# %%
def sampled_kl(policy_logps, ref_logps):
    raise NotImplementedError  # your code here


print(grade("09.sampled_kl", sampled_kl).message)
