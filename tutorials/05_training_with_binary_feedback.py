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
# # 5. Training with binary feedback
#
# The whole pipeline on a task small enough to run in seconds:
#
# 1. **SFT of the reference.** A fresh GPT-2 learns to sort digits ("3142=" → "1234.") from a *mix* of
#    right and wrong completions, so that, sampled, it produces both. This is π_ref.
# 2. **KTO.** The policy starts as a copy of the reference and learns from thumbs-up / thumbs-down
#    labels only: no pairs, no preferred alternative, just "this completion was good/bad".
# 3. **Evaluation.** Completions are sampled for held-out prompts and judged by the task's rule;
#    the desirable rate of the reference ("before") is compared with the policy's ("after").
#
# **The data** is offline and rule-generated: a program makes the prompts, the correct answers and
# four named kinds of mistake ("descending", "copy", a "drop"ped or "duplicate"d digit), and the
# task's rule labels each completion. Nothing is sampled from the policy during training (KTO, like
# DPO, learns from a fixed set of judged completions); sampling happens only to evaluate. When the
# evaluation reports **"other"**, the policy produced a wrong completion of a kind that never
# appears in the feedback: a malformed string (too many or too few digits, a digit the prompt does
# not have, no end token). The feedback can push such strings neither up nor down directly.
#
# `kto_np.train.run(config, out_dir)` does all three and writes a run folder (config, metrics,
# checkpoints, summary, curves). Set `KTO_NP_TUTORIAL_FAST=1` for an even smaller run (the tests do).

# %%
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from kto_np.plots import load_metrics_records, plot_training_curves, save_figure
from kto_np.train import TrainConfig, run

FAST = os.environ.get("KTO_NP_TUTORIAL_FAST") == "1"
OUT = Path(os.environ.get("KTO_NP_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="kto_np_tutorial_"))
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## The setting
#
# Three-digit prompts, a 2-layer model with 32 channels (about 26 thousand parameters), a few hundred
# SFT steps and 100 KTO steps (fast mode: fewer of each). Everything else is the `TrainConfig`
# default: the paper / TRL loss (`variant="kto"`), β = 0.1, λ_D = λ_U = 1 with half of the feedback
# examples desirable (so λ_D n_D / (λ_U n_U) = 1, inside the recommended band), AdamW with warm-up
# and a cosine schedule, gradient clipping at norm 1.

# %%
config = TrainConfig(
    num_digits=3, hidden_size=32, num_layers=2, num_heads=2,
    sft_examples=1024 if FAST else 2048, sft_steps=150 if FAST else 300,
    num_examples=1024 if FAST else 2048, steps=40 if FAST else 100, lr=1e-3,
    eval_prompts=64 if FAST else 200, eval_every=20 if FAST else 25, checkpoint_every=1000, seed=0,
)
run_dir = OUT / "run"
print({k: v for k, v in config.to_dict().items()
       if k in ("num_digits", "hidden_size", "num_layers", "sft_steps", "steps", "variant", "beta")})

# %% [markdown]
# ## Run it
#
# `progress=False` turns off the progress bars; `force=True` lets a re-run overwrite the folder.
# A few seconds on one core. If it takes much longer on a busy machine, BLAS threads are fighting
# over the cores: the matrices are tiny, so run with `OPENBLAS_NUM_THREADS=1` (or `OMP_NUM_THREADS=1`).

# %%
summary = run(config, run_dir, progress=False, force=True)
print(f"desirable rate: reference {summary['desirable_rate_before']:.1%} -> "
      f"policy {summary['desirable_rate_after']:.1%} on {summary['eval_prompts']} held-out prompts")
print("what the reference samples:", summary["modes_before"])
print("what the policy samples:   ", summary["modes_after"])
for prompt, completion, label in summary["samples_after"]:
    print(f"  {prompt}{completion:<8} {'thumbs up' if label else 'thumbs down'}")

# %% [markdown]
# ## The run folder
#
# `metrics.jsonl` has one JSON object per step, with TRL's metric names, and one per evaluation.

# %%
print(sorted(p.name for p in run_dir.iterdir()))
records = load_metrics_records(run_dir / "metrics.jsonl")
kto_steps = [r for r in records if r["phase"] == "kto"]
evaluations = [r for r in records if r["phase"] == "eval"]
print(json.dumps(kto_steps[-1], indent=1))
assert len(kto_steps) == config.steps

# %% [markdown]
# ## What is reliably true, even in a short run
#
# **At the first step the policy equals the reference**, so every log-ratio is 0, z_ref is 0, every
# example's value is σ(0) = ½ and the loss is exactly λ · ½ = 0.5.

# %%
first = kto_steps[0]
print(f"step 1: loss {first['loss']:.6f}, margin {first['rewards/margins']:+.2e}, kl {first['kl']}")
assert abs(first["loss"] - 0.5) < 1e-6 and abs(first["rewards/margins"]) < 1e-6

# %% [markdown]
# **The loss falls and the reward margin grows.** The rewards are β r averaged per class; their
# difference, the margin, is how much more the policy (relative to the reference) likes the thumbs-up
# completions than the thumbs-down ones. Compare the first and last tenth of the run, since single
# steps are noisy (each batch is different).

# %%
losses = np.array([r["loss"] for r in kto_steps])
margins = np.array([r["rewards/margins"] for r in kto_steps])
tenth = max(1, len(kto_steps) // 10)
print(f"loss:   first tenth {losses[:tenth].mean():.4f}, last tenth {losses[-tenth:].mean():.4f}")
print(f"margin: first tenth {margins[:tenth].mean():+.4f}, last tenth {margins[-tenth:].mean():+.4f}")
assert losses[-tenth:].mean() < losses[:tenth].mean() - 0.01
assert margins[-tenth:].mean() > margins[:tenth].mean() + 0.05

# %% [markdown]
# Most of the margin comes from pushing the thumbs-down completions *down* (rewards/rejected becomes
# clearly negative) rather than pulling the thumbs-up ones up. There is a ceiling on the second:
# log π(y|x) ≤ 0, so a thumbs-up completion's reward β(log π − log π_ref) can never exceed
# −β log π_ref(y|x), small when the reference already likes the answer; a thumbs-down completion's
# log-prob can fall without limit. For a small model that already produces the right answer often,
# suppressing its mistakes is the cheap way to improve.

# %%
chosen = np.array([r["rewards/chosen"] for r in kto_steps])
rejected = np.array([r["rewards/rejected"] for r in kto_steps])
ceiling = -config.beta * (np.array([r["logps/chosen"] for r in kto_steps]) - chosen / config.beta)  # -β mean log π_ref
assert np.all(chosen <= ceiling + 1e-6)  # (the mean of per-example bounds bounds the mean)
print(f"last tenth: rewards/chosen {chosen[-tenth:].mean():+.4f}, rewards/rejected {rejected[-tenth:].mean():+.4f}")
assert rejected[-tenth:].mean() < 0 and -rejected[-tenth:].mean() > abs(chosen[-tenth:].mean())

# %% [markdown]
# **The KL estimate z_ref.** It is computed on mismatched pairs: each prompt with another example's
# completion. For this task a completion for a different prompt is simply wrong, and KTO learns to
# make wrong answers less likely than the reference did, so the raw estimate mean(log π − log π_ref)
# on those pairs, logged as `kl_raw`, is *negative* on most steps, and the clamp max(0, ·) holds
# z_ref (`kl`) at 0 (on every step of the normal setting, on most steps of the fast one). With
# z_ref = 0 the loss is APO-zero's (tutorial 1).
# That is a property of this task, not a bug: z_ref measures how the policy has moved on
# *unrelated* text from the data set (a biased estimate of the KL, not the KL itself), and here
# unrelated text is what KTO learns to avoid. Tutorial 9 shows it positive.

# %%
kl = np.array([r["kl"] for r in kto_steps])
kl_raw = np.array([r["kl_raw"] for r in kto_steps])
print(f"z_ref: min {kl.min():.4f}, max {kl.max():.4f}; zero on {np.mean(kl == 0):.0%} of the steps")
print(f"kl_raw: min {kl_raw.min():+.3f}, max {kl_raw.max():+.3f}, last {kl_raw[-1]:+.3f}")
assert np.all(kl >= 0.0) and np.array_equal(kl, np.maximum(kl_raw, 0.0))

# %% [markdown]
# **The desirable rate.** This is the number that matters, and the one a tiny budget is least sure
# to move: it is measured on sampled completions, and a few dozen steps may only nudge it. In the
# normal setting of this tutorial it rises clearly (about 30% to about 65% when this was written);
# in fast mode we only print it.

# %%
for r in evaluations:
    print(f"  step {r['step']:4d}: desirable rate {r['desirable_rate']:.1%}")
if not FAST:
    assert summary["desirable_rate_after"] > summary["desirable_rate_before"] + 0.1

# %% [markdown]
# The full `kto-np demo` (4-digit prompts, a 64-channel model, 3000 SFT steps and 400 KTO steps;
# about 40 s on 2 idle cores) takes the desirable rate from 51% to 97% on 256 held-out prompts, with
# every named mistake (descending, copy, dropped and duplicated digits) gone from the samples.
#
# ## The curves
#
# `plots.plot_training_curves` draws eight panels from the metrics records. Top: the SFT loss and
# gradient norm against the SFT step, the KTO loss and gradient norm against the KTO step (each
# phase on its own step axis). Bottom: the rewards per class, the margin, the KL estimate before
# the clamp (`kl_raw`) next to the z_ref used (`kl`), and the desirable rate of the evaluations.
# (`run` writes the same figure as `training_curves.png` in the run folder; `figures/training_curves.png`
# is the demo's.)

# %%
fig = plot_training_curves(records)
figure_path = save_figure(fig, OUT / "05_training_curves.png")
print("saved", figure_path)
assert figure_path.stat().st_size > 0
fig  # noqa: B018  (shows the figure in a notebook)

# %% [markdown]
# ## Exercises
#
# Write each function below in place of its stub and run its cell: `grade` runs your function on the
# grader's inputs and says what is wrong, if anything, in words (against finite differences or against a
# closed form). To check a file of your own (run in a separate process): `kto-np exercise check
# 05.sft_loss my_answers.py:sft_loss_and_grad`. `kto-np exercise list` lists every exercise;
# tutorials/README.md has them per lesson. Reference solutions: `tutorials/solutions/lesson05.py` (try
# first).

# %%
from kto_np.exercises import grade  # noqa: E402

# %% [markdown]
# **Exercise 05.sft_loss.** `sft_loss_and_grad(logits, targets, mask) -> (loss, dlogits)`: the SFT loss of
# the reference, the mean negative log-likelihood per counted token (mask 1; logits[b, t] score targets[b,
# t]), and its gradient with respect to the logits.

# %%
def sft_loss_and_grad(logits, targets, mask):
    raise NotImplementedError  # your code here


print(grade("05.sft_loss", sft_loss_and_grad).message)

# %% [markdown]
# **Exercise 05.reward_metrics.** `reward_metrics(policy_logps, ref_logps, labels, beta) ->
# (rewards_chosen, rewards_rejected, rewards_margins)`: the training metrics of metrics.jsonl (TRL's
# names): the mean implied reward β r of the thumbs-up and of the thumbs-down examples, and their
# difference.

# %%
def reward_metrics(policy_logps, ref_logps, labels, beta):
    raise NotImplementedError  # your code here


print(grade("05.reward_metrics", reward_metrics).message)
