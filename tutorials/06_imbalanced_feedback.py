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
# # 6. Imbalanced feedback: when thumbs-down outnumber thumbs-up
#
# Real feedback is rarely balanced. Tutorial 2 showed, on paper, that at the first step the
# desirable class receives a share ρ / (1 + ρ) of the gradient, with ρ = λ_D n_D / (λ_U n_U), and
# that the paper recommends ρ ∈ [1, 4/3]. This tutorial trains with 10 % desirable feedback, first
# with λ_D = λ_U = 1 (ρ ≈ 0.11) and then with λ_D set by the band, and shows what the imbalance does
# to the policy. The setting is tutorial 5's (3-digit sorting, a 2-layer 32-channel GPT-2); only the
# feedback changes.

# %%
import os
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from kto_np import plots
from kto_np.plots import load_metrics_records
from kto_np.train import TrainConfig, run

FAST = os.environ.get("KTO_NP_TUTORIAL_FAST") == "1"
OUT = Path(os.environ.get("KTO_NP_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="kto_np_tutorial_"))
OUT.mkdir(parents=True, exist_ok=True)

base = TrainConfig(
    num_digits=3, hidden_size=32, num_layers=2, num_heads=2,
    sft_examples=512 if FAST else 2048, sft_steps=40 if FAST else 300, num_examples=512 if FAST else 2048,
    steps=10 if FAST else 100,
    lr=1e-3, eval_prompts=32 if FAST else 200, eval_every=5 if FAST else 25, checkpoint_every=1000, seed=0,
)

# %% [markdown]
# ## One reference, several KTO runs
#
# `run` with `steps=0` trains and saves the reference only. Each run below starts from it with
# `run(..., reference=that folder)`: the reference is copied into the new run folder, the SFT is
# skipped and KTO starts from the same π_ref, so the runs differ only in their KTO settings.
# (`reference=` checks that the saved model is the one the config describes.)

# %%
reference_run = OUT / "reference"
run(replace(base, steps=0), reference_run, progress=False, force=True, log=lambda *_: None)


def kto_run(name, **changes):
    """KTO from the reference above, with `changes` to the base config: (summary, metrics records)."""
    config = replace(base, **changes)
    folder = OUT / name
    summary = run(config, folder, reference=reference_run, force=True, progress=False, log=lambda *_: None)
    return summary, load_metrics_records(folder / "metrics.jsonl")


def kto_records(records):
    return [r for r in records if r["phase"] == "kto"]


# %% [markdown]
# ## 10 % desirable, λ_D = λ_U = 1
#
# `run` checks the balance of the whole feedback set with `check_balance` and warns: ρ is far below
# the band, and the warning suggests a λ_D.

# %%
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    equal, equal_records = kto_run("equal_weights", desirable_fraction=0.1)
print(caught[0].message)
assert len(caught) == 1 and "outside [1, 4/3]" in str(caught[0].message)
print(f"desirable rate: reference {equal['desirable_rate_before']:.1%} -> policy {equal['desirable_rate_after']:.1%}")
print("what the policy samples:", equal["modes_after"])

# %% [markdown]
# The desirable rate does not just fail to rise: it **collapses**, and what the policy samples is
# neither a correct answer nor one of the named mistakes it was told about, but "other": malformed
# strings that never appeared in the feedback (the wrong number of digits, digits the prompt does not
# have, a missing end token).
#
# The metrics show why. 90 % of every batch says "lower this", and at the first step those examples
# get 90 % of the push (the share ρ/(1 + ρ) of tutorial 2). The cheapest way for a small model to
# lower the log-probability of its typical mistakes is to lower everything that looks like its
# typical output, correct answers included: the log-prob of the *thumbs-up* completions falls with
# that of the thumbs-down ones, and the probability mass goes where no feedback reaches.

# %%
first, last = kto_records(equal_records)[0], kto_records(equal_records)[-1]
print(f"log π of the thumbs-up completions: step 1 {first['logps/chosen']:.2f}, "
      f"step {last['step']} {last['logps/chosen']:.2f}")
print(f"log π of the thumbs-down completions: step 1 {first['logps/rejected']:.2f}, "
      f"step {last['step']} {last['logps/rejected']:.2f}")
if not FAST:
    assert equal["desirable_rate_after"] < 0.05 < equal["desirable_rate_before"]
    assert equal["modes_after"].get("other", 0.0) > 0.9
    assert last["logps/chosen"] < first["logps/chosen"] - 5.0  # the correct answers were pushed down too
    assert last["rewards/chosen"] < 0.0

# %% [markdown]
# ## 10 % desirable, λ_D from the band
#
# With 10 % desirable, ρ = λ_D n_D / (λ_U n_U) ∈ [1, 4/3] asks for λ_D / λ_U between about 9 and
# 12 (the warning above gave the exact range for this data set). λ_D = 10:

# %%
with warnings.catch_warnings():
    warnings.simplefilter("error")  # no balance warning this time
    weighted, weighted_records = kto_run("band_weights", desirable_fraction=0.1, desirable_weight=10.0)
print(f"desirable rate: reference {weighted['desirable_rate_before']:.1%} -> "
      f"policy {weighted['desirable_rate_after']:.1%}")
print("what the policy samples:", weighted["modes_after"])
first, last = kto_records(weighted_records)[0], kto_records(weighted_records)[-1]
print(f"log π of the thumbs-up completions: step 1 {first['logps/chosen']:.2f}, "
      f"step {last['step']} {last['logps/chosen']:.2f}")
if not FAST:
    assert weighted["desirable_rate_after"] > weighted["desirable_rate_before"] + 0.2
    assert weighted["desirable_rate_after"] > equal["desirable_rate_after"] + 0.5
    assert last["logps/chosen"] > first["logps/chosen"]  # the correct answers went up

# %% [markdown]
# Same data, same reference, same steps: only λ_D changed, and the policy went from unusable to
# better than the reference. The desirable rate over the run, for both:

# %%
print(f"{'step':>5}  {'λ_D = 1':>8}  {'λ_D = 10':>8}")
rates_equal = [r for r in equal_records if r["phase"] == "eval"]
rates_weighted = [r for r in weighted_records if r["phase"] == "eval"]
for a, b in zip(rates_equal, rates_weighted):
    print(f"{a['step']:>5}  {a['desirable_rate']:>8.1%}  {b['desirable_rate']:>8.1%}")

# %% [markdown]
# Drawn, with the log-prob of the thumbs-up completions at every step next to it (the line is the
# mean of the last 10 steps): with λ_D = 1 it falls by tens of nats along with the rate; with
# λ_D = 10 it stays near the reference's and ends higher than it started.

# %%
runs_06 = {"λ_D = 1 (ρ ≈ 0.11)": equal_records, "λ_D = 10 (in the band)": weighted_records}
fig = plots.plot_curves([
    ("Desirable rate of sampled completions", "fraction desirable",
     {name: ([r["step"] for r in records if r["phase"] == "eval"],
             [r["desirable_rate"] for r in records if r["phase"] == "eval"]) for name, records in runs_06.items()}),
    ("log π of the thumbs-up completions", "mean log π(y|x), thumbs-up (nats)",
     {name: ([r["step"] for r in kto_records(records)], [r["logps/chosen"] for r in kto_records(records)])
      for name, records in runs_06.items()}),
], smooth=(1, 10), colors={"λ_D = 1 (ρ ≈ 0.11)": "#D55E00", "λ_D = 10 (in the band)": "#0072B2"},
    title="10 % thumbs-up, same reference and data: only λ_D differs")
fig.axes[0].set_ylim(0.0, 1.0)
fig  # noqa: B018  (shows the figure in a notebook)

# %% [markdown]
# ## The figure: the band as a gradient share
#
# `plots.plot_class_balance` draws the desirable class's share of the summed |gradient| at the
# first step (policy = reference, r = 0) against the desirable fraction, for a few (λ_D, λ_U); the
# thick segments are the fractions inside the band. The share is ρ/(1 + ρ), so the band is a share
# between 1/2 and 4/7: the desirable examples should get a little *more* than half of the push. In
# the first run above the share was ρ/(1 + ρ) ≈ 0.1. (Later in training the rewards move away from
# the reference point and the shares change with them; the band is a rule for the start.)

# %%
shares = plots.class_balance_shares(np.array([0.1]), [(1.0, 1.0), (10.0, 1.0)], batch_size=100)
print(f"first-step desirable share at 10 % desirable: λ_D = 1: {shares[0, 0]:.3f}, λ_D = 10: {shares[1, 0]:.3f}")
assert abs(shares[0, 0] - (1 / 9) / (1 + 1 / 9)) < 1e-12 and abs(shares[1, 0] - (10 / 9) / (1 + 10 / 9)) < 1e-12
fig = plots.plot_class_balance(weight_settings=((1.0, 1.0), (10.0, 1.0), (2.0, 1.0), (1.0, 2.0)),
                               desirable_fractions=np.linspace(0.05, 0.95, 19 if FAST else 91))
plots.save_figure(fig, OUT / "06_class_balance.png")
fig  # noqa: B018  (shows the figure in a notebook)

# %% [markdown]
# ## Exercises
#
# Write each function below in place of its stub and run its cell: `grade` runs your function on the
# grader's inputs and says what is wrong, if anything, in words (against a closed form). To check a file
# of your own (run in a separate process): `kto-np exercise check 06.balance_ratio
# my_answers.py:balance_ratio`. `kto-np exercise list` lists every exercise; tutorials/README.md has them
# per lesson. Reference solutions: `tutorials/solutions/lesson06.py` (try first).

# %%
from kto_np.exercises import grade  # noqa: E402

# %% [markdown]
# **Exercise 06.balance_ratio.** `balance_ratio(labels, desirable_weight, undesirable_weight) -> float`:
# the paper's ρ = λ_D n_D / (λ_U n_U), which its Eq. 8 asks to keep in [1, 4/3].

# %%
def balance_ratio(labels, desirable_weight, undesirable_weight):
    raise NotImplementedError  # your code here


print(grade("06.balance_ratio", balance_ratio).message)

# %% [markdown]
# **Exercise 06.band_weights.** `band_desirable_weights(labels, undesirable_weight) -> (low, high)`: the
# range of λ_D that puts ρ = λ_D n_D / (λ_U n_U) in the paper's band [1, 4/3].

# %%
def band_desirable_weights(labels, undesirable_weight):
    raise NotImplementedError  # your code here


print(grade("06.band_weights", band_desirable_weights).message)
