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
# # 11. β in training: not the step size, but how far the policy may go
#
# Tutorial 2 showed that β sets the height of the gradient peak (βλ/4) and its width (∝ 1/β). With
# plain gradient descent the height is the step size: a larger β, a larger step. With Adam(W) it is
# not: Adam divides each gradient by a running estimate of its own magnitude, so multiplying the
# whole loss by a constant changes nothing. What β does change is the *shape*: the log-ratio at
# which an example saturates (|β(r − z)| of a few units). A small β lets the policy move far from the
# reference before the loss stops pulling; a large β stops it early. This tutorial checks the first
# claim on one step and measures the second in three runs, β = 0.01, 0.1 and 1.

# %%
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from kto_np import checkpoint, plots
from kto_np.data import Tokenizer, collate, make_examples, make_prompts, make_task, prompt_tokens
from kto_np.files import write_json
from kto_np.generate import generate
from kto_np.losses import KTOConfig
from kto_np.model import GPT
from kto_np.optim import adamw_init, adamw_step
from kto_np.plots import load_metrics_records
from kto_np.step import forward_logps, kto_step, reference_logps
from kto_np.train import TrainConfig, run

FAST = os.environ.get("KTO_NP_TUTORIAL_FAST") == "1"
OUT = Path(os.environ.get("KTO_NP_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="kto_np_tutorial_"))
OUT.mkdir(parents=True, exist_ok=True)
BETAS = (0.01, 0.1, 1.0)

base = TrainConfig(
    num_digits=3, hidden_size=32, num_layers=2, num_heads=2,
    sft_examples=512 if FAST else 2048, sft_steps=40 if FAST else 300, num_examples=512 if FAST else 2048,
    steps=10 if FAST else 100,
    lr=1e-3, eval_prompts=32 if FAST else 200, eval_every=10 if FAST else 50, checkpoint_every=1000, seed=0,
)
reference_run = OUT / "reference"
run(replace(base, steps=0), reference_run, progress=False, force=True, log=lambda *_: None)
reference = checkpoint.load(reference_run / "checkpoints" / "reference.npz")
model = GPT(reference.config)
tokenizer = Tokenizer()
task = make_task(base.task, base.num_digits)

# %% [markdown]
# ## One step from the reference
#
# At the first step the policy is the reference: every u = β(r − z) is 0 and every example's
# gradient is exactly β λ/(4n) times its log-prob gradient. The whole gradient is proportional to
# β. A gradient-descent step is therefore proportional to β too; the first AdamW step is not (its
# update is m̂ / (√v̂ + ε) = g / (|g| + ε): the sign of each entry, whatever β).

# %%
batch = collate(make_examples(task, base.batch_size, seed=3), tokenizer)
ref_logps, kl_ref_logps = reference_logps(model, reference.params, batch)
gradient_norms, adamw_updates = {}, {}
for beta in BETAS:
    params = {name: value.copy() for name, value in reference.params.items()}
    _, _, grads = kto_step(model, params, batch, ref_logps, kl_ref_logps, KTOConfig(variant="kto", beta=beta))
    gradient_norms[beta] = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values())))
    adamw_step(params, grads, adamw_init(params), lr=base.lr, weight_decay=0.0)
    adamw_updates[beta] = np.concatenate([(params[k] - reference.params[k]).ravel() for k in params])
relative_differences = {}
for beta in BETAS:
    update, update_01 = adamw_updates[beta], adamw_updates[0.1]
    relative_differences[beta] = float(np.linalg.norm(update - update_01) / np.linalg.norm(update_01))
    print(f"β = {beta:<5g} gradient norm {gradient_norms[beta]:.3e} (β × {gradient_norms[beta] / beta:.4f}); "
          f"AdamW update norm {np.linalg.norm(update):.4f}, relative difference from β = 0.1's "
          f"{relative_differences[beta]:.1e}")
assert np.allclose([gradient_norms[b] / b for b in BETAS], gradient_norms[0.1] / 0.1, rtol=1e-4)
assert max(relative_differences.values()) < 0.03

# %% [markdown]
# A 100-fold range of β gives gradients 100 times apart and the same AdamW step, to within about a
# percent (the difference is ε = 1e-8, which matters only for the entries whose gradient is itself
# near ε, and there are more of those when β is small). So under AdamW,
# "a larger β means larger steps" is false. (`run` also clips the gradient norm at 1. That is not a
# constant factor, so AdamW does not simply ignore it: a step whose norm exceeds 1 is scaled by
# 1/norm, a factor that changes from step to step and enters Adam's moment estimates. Below it
# touches only the large β, whose gradients are large: the runs count the clipped steps.)
#
# ## Three runs
#
# Same reference, same data, same optimizer; only β changes. How far the policy has moved is
# KL(π ‖ π_ref), measured on samples from the policy (tutorial 9 explains why the KL estimate in the
# metrics cannot be used for this).

# %%
heldout = make_prompts(task, base.eval_prompts, seed=base.seed)


def sampled_kl(params, seed=0):
    """Monte-Carlo KL(π ‖ π_ref): mean over sampled y ~ π of log π(y|x) − log π_ref(y|x) (tutorial 9)."""
    prompts = prompt_tokens(heldout, tokenizer)
    T0 = prompts.shape[1]
    tokens = generate(model, params, prompts, model.config.max_seq_len - T0, temperature=1.0,
                      rng=np.random.default_rng(seed), stop_token=tokenizer.end_id)
    new = tokens[:, T0:] == tokenizer.end_id
    mask = np.zeros(tokens.shape, dtype=model.config.np_dtype)
    mask[:, T0:] = (np.cumsum(new, axis=1) - new) == 0
    log_ratios = forward_logps(model, params, tokens, mask) - forward_logps(model, reference.params, tokens, mask)
    return float(np.mean(log_ratios))


def kto_run(name, **changes):
    """KTO from the reference above (tutorial 6 explains the resume): (summary, KTO records, policy)."""
    config = replace(base, **changes)
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "checkpoints").mkdir(parents=True)
    shutil.copy(reference_run / "checkpoints" / "reference.npz", folder / "checkpoints" / "reference.npz")
    write_json(folder / "config.json", config.to_dict())
    summary = run(config, folder, resume=True, progress=False, log=lambda *_: None)
    records = [r for r in load_metrics_records(folder / "metrics.jsonl") if r["phase"] == "kto"]
    return summary, records, checkpoint.load(folder / "checkpoints" / "kto.npz").params


runs = {beta: kto_run(f"beta_{beta:g}", beta=beta) for beta in BETAS}
table = {}
print(f"{'β':>6} {'desirable rate':>15} {'KL(π‖π_ref)':>12} {'log-ratio r, thumbs-up':>23} "
      f"{'thumbs-down':>12} {'loss':>7}")
for beta, (summary, records, policy) in runs.items():
    tail = records[-max(1, len(records) // 10):]
    r_up = np.mean([r["rewards/chosen"] for r in tail]) / beta
    r_down = np.mean([r["rewards/rejected"] for r in tail]) / beta
    table[beta] = {"rate": summary["desirable_rate_after"], "kl": sampled_kl(policy), "r_up": r_up,
                   "r_down": r_down, "loss": np.mean([r["loss"] for r in tail])}
    row = table[beta]
    print(f"{beta:>6g} {row['rate']:>15.1%} {row['kl']:>12.3f} {r_up:>23.2f} {r_down:>12.2f} {row['loss']:>7.3f}")
print(f"reference desirable rate: {runs[0.1][0]['desirable_rate_before']:.1%}")
clipped = {beta: float(np.mean([r["grad_norm"] > base.max_grad_norm for r in records]))
           for beta, (_, records, _) in runs.items()}
print("steps whose gradient norm was clipped:", {beta: f"{share:.0%}" for beta, share in clipped.items()})
if not FAST:
    assert clipped[0.01] == clipped[0.1] == 0.0 < clipped[1.0]  # the clip touched only β = 1

# %% [markdown]
# The early steps are the same for every β, as the one-step check predicts: the log-probs after
# five steps (β-free numbers) hardly differ.

# %%
for beta, (_, records, _) in runs.items():
    print(f"β = {beta:<5g} step 5: log π thumbs-up {records[4]['logps/chosen']:.4f}, "
          f"thumbs-down {records[4]['logps/rejected']:.4f}")
early = np.array([[records[4]["logps/chosen"], records[4]["logps/rejected"]] for _, records, _ in runs.values()])
assert np.ptp(early, axis=0).max() < 0.05

# %% [markdown]
# Then they part. With β = 1 the loss saturates once the log-ratios reach a few units: its loss is
# close to 0 at the end, the gradient has faded, and the policy stops. With β = 0.01 the loss
# is still near ½ after the whole run, since β r stays small even for large r: every example keeps
# pulling, and the thumbs-down log-ratios are pushed much further. β bounds how far the policy
# goes, not how fast it starts: it is the KL-regularisation strength of the RLHF objective that KTO
# and DPO are derived from, max E[reward] − β KL(π ‖ π_ref). The measured KL(π ‖ π_ref) in the
# table falls as β grows.
#
# How the policy gets there: `run` saves the policy every 5 steps (`trajectory/`), and the same
# sampled KL(π ‖ π_ref) of each saved policy, every 10 steps, draws the distance against the step.

# %%
kl_steps = {}
for beta in BETAS:
    snapshots = sorted((OUT / f"beta_{beta:g}" / "trajectory").glob("kto_step_*.npz"))[1::2]
    steps = [0] + [int(path.stem.rsplit("_", 1)[1]) for path in snapshots]
    kls = [0.0] + [sampled_kl(checkpoint.load(path).params) for path in snapshots]
    kl_steps[beta] = (steps, kls)
    print(f"β = {beta:<5g} KL(π ‖ π_ref) at steps {steps[1::2]}: {np.round(kls[1::2], 3)}")
fig = plots.plot_curves([("How far the policy moves: KL(π ‖ π_ref) on its samples", "nats",
                          {f"β = {beta:g}": kl_steps[beta] for beta in BETAS})],
                        colors={"β = 0.01": "#D55E00", "β = 0.1": "#009E73", "β = 1": "#0072B2"})
if not FAST:
    assert kl_steps[0.01][1][-1] > kl_steps[0.1][1][-1] > kl_steps[1.0][1][-1] > 0.0
fig  # noqa: B018  (shows the figure in a notebook)

# %% [markdown]
# On this task the policy that moved least is also the one with the best desirable rate: pushing
# the mistakes ever further down (β = 0.01) does not make the right answer more likely, and the
# mass taken from the mistakes partly lands on malformed strings (tutorial 6). This is also why
# TRL advises lowering the learning rate together with β: a small β removes the brake, so the
# learning rate is all that limits the drift.

# %%
if not FAST:
    assert table[1.0]["loss"] < table[0.1]["loss"] < table[0.01]["loss"]
    assert table[0.01]["r_down"] < table[0.1]["r_down"] < table[1.0]["r_down"] < 0.0
    assert table[0.01]["kl"] > table[0.1]["kl"] > table[1.0]["kl"] > 0.0
    assert table[1.0]["rate"] > table[0.01]["rate"]
    assert all(row["rate"] > runs[0.1][0]["desirable_rate_before"] + 0.15 for row in table.values())

# %% [markdown]
# ## Exercises
#
# Write each function below in place of its stub and run its cell: `grade` runs your function on the
# grader's inputs and says what is wrong, if anything, in words (against a closed form). To check a file
# of your own (run in a separate process): `kto-np exercise check 11.adamw_first_step
# my_answers.py:adamw_first_step`. `kto-np exercise list` lists every exercise; tutorials/README.md has
# them per lesson. Reference solutions: `tutorials/solutions/lesson11.py` (try first).

# %%
from kto_np.exercises import grade  # noqa: E402

# %% [markdown]
# **Exercise 11.adamw_first_step.** `adamw_first_step(grad, lr, eps) -> update`: the change of the
# parameters in AdamW's first step from zero moments (β1 = 0.9, β2 = 0.999, bias-corrected, no weight
# decay): what stays of the gradient once Adam has divided it by its own size.

# %%
def adamw_first_step(grad, lr, eps):
    raise NotImplementedError  # your code here


print(grade("11.adamw_first_step", adamw_first_step).message)

# %% [markdown]
# **Exercise 11.saturation_log_ratio.** `saturation_log_ratio(beta, fraction) -> r`: the log-ratio r > 0
# (with z_ref = 0) at which a desirable example's gradient β λ σ(βr) σ(−βr) has fallen to `fraction` of
# its peak β λ / 4: how far β lets the policy go.

# %%
def saturation_log_ratio(beta, fraction):
    raise NotImplementedError  # your code here


print(grade("11.saturation_log_ratio", saturation_log_ratio).message)
