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
# # Appendix A1. Verifying a KTO implementation with the oracle
#
# You wrote KTO in PyTorch (or JAX, or NumPy) and want to know whether it is right. A KTO loss that
# is slightly wrong still trains: nothing crashes, the curves look plausible, and the bug shows up,
# if ever, as a worse model. `kto_np.oracle` holds float64 reference cases (loss, gradients, TRL
# metrics) computed by kto_np's finite-difference-checked code, and
#
#     report = oracle.verify(candidate, kind="kto_loss", variant="kto")
#
# runs your function on every case, compares every number, and, when something fails, tries the
# known mistakes to name yours. docs/ORACLE.md is the quickstart, docs/oracle/ the reference; this tutorial:
#
# 1. a NumPy candidate (no torch needed): a correct one, then one with a subtle weighting bug;
# 2. a log-prob candidate that forgets the language-model shift;
# 3. PyTorch candidates: correct (kto_np.torch_reference), z not detached, and the σ(−KL − z) sign
#    slip (skipped without torch);
# 4. exporting the cases and reading one with NumPy alone.

# %%
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from kto_np import oracle, plots

OUT = Path(os.environ.get("KTO_NP_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="kto_np_tutorial_"))
OUT.mkdir(parents=True, exist_ok=True)


def stable_sigmoid(x):
    """σ(x) without overflow: exp(-logaddexp(0, -x)). The cases include |β r| up to ~1.5e3."""
    return np.exp(-np.logaddexp(0.0, -x))


# %% [markdown]
# ## A NumPy candidate
#
# The candidate's signature for `kind="kto_loss"`, `variant="kto"` (paper / TRL):
# `candidate(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
# kl_policy_logps, kl_ref_logps)`. Labels are booleans (True = desirable); the KL arguments are None
# in the case without KL pairs (then z_ref = 0). It may return just the loss, `(loss, grad)`,
# `(loss, grad, metrics)` or a dict.
#
# This one returns the loss and its hand-written gradient (tutorial 1):
#
# loss_i = λ_i (1 − σ(s_i β (r_i − z_ref))), dL/dπ_i = −λ_i s_i β σ(u_i) σ(−u_i) / n.

# %%
def kto_numpy(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
              kl_policy_logps=None, kl_ref_logps=None):
    z_ref = 0.0 if kl_policy_logps is None else max(0.0, float(np.mean(kl_policy_logps - kl_ref_logps)))
    u = beta * (policy_logps - ref_logps - z_ref)
    signs = np.where(labels, 1.0, -1.0)
    weights = np.where(labels, desirable_weight, undesirable_weight)
    loss = np.mean(weights * (1.0 - stable_sigmoid(signs * u)))
    grad = -weights * signs * beta * stable_sigmoid(u) * stable_sigmoid(-u) / u.shape[0]
    return loss, grad


report = oracle.verify(kto_numpy, kind="kto_loss", variant="kto")
print(report)
assert report.passed
largest_error = {"kto_numpy (correct)": max(check.rel_error for check in report.checks)}
float64_rtol = max(check.rtol for check in report.checks)  # the oracle's relative tolerance in float64

# %% [markdown]
# The `source` column says where each number came from: `returned` by the candidate here. The
# gradient with respect to `kl_policy_logps` is `skip`ped: the candidate returned none, and finite
# differences cannot check it, because z_ref is *detached* by definition (the loss value depends on
# the KL pairs, the gradient must not; see tutorial 1). Torch's autograd can check it, below.
#
# ## A subtle bug: normalising by the weights
#
# A common variant of the weighted mean divides by the total weight, Σ w_i loss_i / Σ w_i, instead of
# KTO's mean_i(w_i loss_i). With λ_D = λ_U = 1 the two agree, so a test written with the default
# weights passes. This candidate returns the loss only: the oracle then takes its gradient by central
# finite differences.

# %%
def kto_numpy_weight_normalised(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                                kl_policy_logps=None, kl_ref_logps=None):
    z_ref = 0.0 if kl_policy_logps is None else max(0.0, float(np.mean(kl_policy_logps - kl_ref_logps)))
    u = beta * (policy_logps - ref_logps - z_ref)
    weights = np.where(labels, desirable_weight, undesirable_weight)
    losses = 1.0 - stable_sigmoid(np.where(labels, u, -u))
    return float(np.sum(weights * losses) / np.sum(weights))


rng = np.random.default_rng(0)
equal_weights = dict(policy_logps=rng.normal(-20, 3, 8), ref_logps=rng.normal(-20, 3, 8),
                     labels=np.arange(8) % 2 == 0, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
assert abs(kto_numpy_weight_normalised(**equal_weights) - kto_numpy(**equal_weights)[0]) < 1e-15

report = oracle.verify(kto_numpy_weight_normalised, kind="kto_loss", variant="kto")
for check in report.failures[:4]:
    print(f"FAIL {check.case:32s} {check.quantity:18s} candidate {check.candidate_value:+.10f}  "
          f"reference {check.reference_value:+.10f}")
print(f"... {len(report.failures)} failing checks in all\ndiagnosis: {report.diagnosis}")
assert not report.passed
assert report.diagnosis.mistakes == ("weights_normalise_mean",)
largest_error["weights normalised"] = max(check.rel_error for check in report.checks)

# %% [markdown]
# The oracle's cases use unequal weights on purpose (λ_U = 1.5, λ_D = 3 with λ_U = 0.5, ...), so every
# case catches it, and the diagnosis names the mistake and its fix. It does so by recomputing every
# case with each known mistake built in (`oracle.MISTAKES`), and naming a mistake only when its
# numbers reproduce *every* number the candidate gave.

# %%
for mistake_id in ("z_not_detached", "undesirable_sign", "weights_normalise_mean", "logits_not_shifted"):
    print(f"{mistake_id:24s} {oracle.MISTAKES[mistake_id].title}")

# %% [markdown]
# ## Log-probabilities: the forgotten shift
#
# The same works one level down. `kind="sequence_logprobs"` checks
# `candidate(logits, tokens, completion_mask) -> logps [B]` in the language-model convention (the
# logits at t score token t + 1, tutorial 3). This candidate forgets the shift.

# %%
def sequence_logps_without_shift(logits, tokens, completion_mask):
    log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    token_logps = np.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
    return np.sum(token_logps * completion_mask, axis=1)


report = oracle.verify(sequence_logps_without_shift, kind="sequence_logprobs")
print("passed:", report.passed, "\ndiagnosis:", report.diagnosis)
assert report.diagnosis.mistakes == ("logits_not_shifted",)
largest_error["logits not shifted"] = max(check.rel_error for check in report.checks)

# %% [markdown]
# The three NumPy candidates side by side: the largest relative error over all of each one's checks
# (log scale; an exact match, 0, is drawn at 1e-18). The correct one agrees with the float64
# reference to rounding; each bug is off by orders of magnitude more than the oracle's float64
# relative tolerance (dashed), so a pass and a fail are never a matter of a few ulps.

# %%
for name, error in largest_error.items():
    print(f"{name:22s} largest relative error {error:.2e}")
assert largest_error["kto_numpy (correct)"] < float64_rtol
assert min(largest_error["weights normalised"], largest_error["logits not shifted"]) > 1000 * float64_rtol
plots.plot_bars({name: max(error, 1e-18) for name, error in largest_error.items()},
                title="The oracle's verdicts: largest relative error over every check", log=True,
                xlabel="max |candidate − reference| / max |reference|", ylabel="candidate",
                threshold=float64_rtol, threshold_label="the oracle's float64 rtol")

# %% [markdown]
# ## PyTorch candidates
#
# When a candidate returns torch tensors (or raises on NumPy input), the oracle calls it again with
# **torch float64 tensors** that require grad, and takes every gradient it does not return from
# autograd. That includes dL/d`kl_policy_logps`, which must be zero: this is how "z not detached" is
# caught. Torch is optional; without it this section prints why it is skipped.

# %%
try:
    import torch
except ImportError as exc:  # torch is an optional extra: pip install 'kto_np[torch]'
    torch = None
    print(f"skipping the PyTorch candidates: torch is not installed ({exc})")

# %% [markdown]
# A correct TRL-style implementation: `kto_np.torch_reference.kto_loss`, the independent PyTorch twin
# that kto_np's own tests and benchmark check kto_np against (written from the formulas in plain torch,
# nothing taken from kto_np's NumPy code). Its signature is the `kto_loss` kind's, so it is a candidate
# as it stands. For variant "kto" it computes
#
#     log_ratios = policy_logps - ref_logps
#     z = (kl_policy_logps - kl_ref_logps).mean().clamp(min=0).detach()     # 0 without KL pairs
#     desirable = desirable_weight * (1 - torch.sigmoid(beta * (log_ratios - z)))
#     undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z - log_ratios)))
#     loss = torch.where(labels, desirable, undesirable).mean()

# %%
if torch is not None:
    from kto_np import torch_reference

    report = oracle.verify(torch_reference.kto_loss, kind="kto_loss", variant="kto")
    print(report)
    assert report.passed
    assert {c.source for c in report.checks} == {"returned", "autograd"}

# %% [markdown]
# **Bug 1: z not detached.** Drop the `.detach()` and the loss values are all still right. Only the
# gradient with respect to the KL pairs is wrong, and only where the clamp is inactive (z_ref > 0).
# In a real trainer this bug lets every update also move the log-probs of the mismatched
# (prompt, other completion) pairs, which KTO only means to measure, not to train.

# %%
if torch is not None:
    def kto_torch_z_not_detached(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                                 kl_policy_logps=None, kl_ref_logps=None):
        log_ratios = policy_logps - ref_logps
        z = torch.zeros((), dtype=log_ratios.dtype)
        if kl_policy_logps is not None:
            z = (kl_policy_logps - kl_ref_logps).mean().clamp(min=0)  # no .detach()
        desirable = desirable_weight * (1 - torch.sigmoid(beta * (log_ratios - z)))
        undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z - log_ratios)))
        return torch.where(labels, desirable, undesirable).mean()

    report = oracle.verify(kto_torch_z_not_detached, kind="kto_loss", variant="kto")
    print("failing checks:", sorted({(c.case, c.quantity) for c in report.failures}))
    print("diagnosis:", report.diagnosis)
    assert all(c.quantity == "grad/kl_policy_logps" for c in report.failures)
    assert not {"kto_loss/kto/no_kl_pairs", "kto_loss/kto/kl_pairs_negative"} & {c.case for c in report.failures}
    assert report.diagnosis.mistakes == ("z_not_detached",)

# %% [markdown]
# **Bug 2: σ(−KL − z).** The seed document's module doc writes the undesirable branch as σ(−KL − z);
# the right one is σ(−(KL − z)) = σ(z − KL). Written as `sigmoid(-beta * r - beta * z)`, it agrees with
# the reference whenever z_ref = 0, so it passes the cases without KL pairs, with a negative KL
# estimate (clamped to 0), with a KL estimate of exactly 0 and with desirable examples only.

# %%
if torch is not None:
    def kto_torch_undesirable_sign(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                                   kl_policy_logps=None, kl_ref_logps=None):
        log_ratios = policy_logps - ref_logps
        z = torch.zeros((), dtype=log_ratios.dtype)
        if kl_policy_logps is not None:
            z = (kl_policy_logps - kl_ref_logps).mean().clamp(min=0).detach()
        desirable = desirable_weight * (1 - torch.sigmoid(beta * (log_ratios - z)))
        undesirable = undesirable_weight * (1 - torch.sigmoid(-beta * log_ratios - beta * z))
        return torch.where(labels, desirable, undesirable).mean()

    report = oracle.verify(kto_torch_undesirable_sign, kind="kto_loss", variant="kto")
    passing_cases = sorted({c.case for c in report.checks} - {c.case for c in report.failures})
    print("cases that still pass:", passing_cases)
    print("diagnosis:", report.diagnosis)
    assert set(passing_cases) == {"kto_loss/kto/no_kl_pairs", "kto_loss/kto/kl_pairs_negative",
                                  "kto_loss/kto/desirable_only", "kto_loss/kto/kl_zero"}
    assert report.diagnosis.mistakes == ("undesirable_sign",)

# %% [markdown]
# From the shell the same check is `kto-np oracle check my_module:kto_torch --kind kto_loss
# --variant kto` (exit status 0 when it passes, 1 when it fails). The `model_kto` kind goes further: it
# hands your code the weights of a small GPT-2 and checks the gradient of every parameter through the
# whole pipeline, including building the KL pairs (docs/oracle/kinds.md has a Hugging Face example).
#
# ## Exporting the cases, and reading them without kto_np
#
# `oracle.export(folder)` writes one `.npz` per case and a `manifest.json`. Nothing is pickled, so
# NumPy alone can read them, from any project: `inputs/<name>` are the arguments,
# `expected/loss`, `expected/grad/<name>` and `expected/metrics/<name>` the reference numbers.

# %%
cases_dir = OUT / "oracle_cases"
manifest_path = oracle.export(cases_dir, overwrite=True)
manifest = json.loads(manifest_path.read_text())
print(f"{len(manifest['cases'])} cases, format version {manifest['format_version']}")
entry = next(e for e in manifest["cases"] if e["name"] == "kto_loss/kto/kl_pairs")
print(entry["formula"])
with np.load(cases_dir / entry["file"], allow_pickle=False) as npz:
    inputs = {k.removeprefix("inputs/"): npz[k] for k in npz.files if k.startswith("inputs/")}
    expected = {k.removeprefix("expected/"): npz[k] for k in npz.files if k.startswith("expected/")}
print("inputs:", {k: v.shape for k, v in inputs.items()})
print("expected:", sorted(expected))

# %% [markdown]
# The formula in the manifest, recomputed from the file with plain NumPy:

# %%
beta = float(inputs["beta"])
z_ref = max(0.0, float(np.mean(inputs["kl_policy_logps"] - inputs["kl_ref_logps"])))
u = beta * (inputs["policy_logps"] - inputs["ref_logps"] - z_ref)
weights = np.where(inputs["labels"], inputs["desirable_weight"], inputs["undesirable_weight"])
loss = np.mean(weights * (1.0 - stable_sigmoid(np.where(inputs["labels"], u, -u))))
print(f"recomputed {loss:.15f}\nexpected   {float(expected['loss']):.15f}")
assert abs(loss - float(expected["loss"])) < 1e-12
assert np.all(expected["grad/kl_policy_logps"] == 0.0)  # z_ref is detached
assert abs(float(expected["metrics/kl"]) - z_ref) < 1e-12

# %% [markdown]
# `verify` also reads an export (`cases=folder`), so a CI job can pin the cases of one kto_np version.

# %%
assert oracle.verify(kto_numpy, kind="kto_loss", variant="kto", cases=cases_dir).passed

# %% [markdown]
# ## Exercises
#
# Write each function below in place of its stub and run its cell: `grade` runs your function on the
# grader's inputs and says what is wrong, if anything, in words (through the gradient oracle's diagnosis
# or against a closed form). To check a file of your own (run in a separate process): `kto-np exercise
# check A1.apo_zero_loss my_answers.py:apo_zero_loss`. `kto-np exercise list` lists every exercise;
# tutorials/README.md has them per lesson. Reference solutions: `tutorials/solutions/lessonA1.py` (try
# first).

# %%
from kto_np.exercises import grade  # noqa: E402

# %% [markdown]
# **Exercise A1.apo_zero_loss.** `apo_zero_loss(policy_logps, ref_logps, labels, beta, desirable_weight,
# undesirable_weight) -> loss`: a candidate for the oracle: TRL's unpaired APO-zero loss (desirable λ_D(1
# − σ(βr)), undesirable λ_U σ(βr), mean over the batch), the loss only.

# %%
def apo_zero_loss(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight):
    raise NotImplementedError  # your code here


print(grade("A1.apo_zero_loss", apo_zero_loss).message)

# %% [markdown]
# **Exercise A1.first_mismatch.** `first_mismatch(candidate, reference, rtol, atol) -> int`: the oracle's
# rule: the flat index of the first entry with |c − r| > atol + rtol · max|r| (NaN never agrees), or −1
# when every entry agrees.

# %%
def first_mismatch(candidate, reference, rtol, atol):
    raise NotImplementedError  # your code here


print(grade("A1.first_mismatch", first_mismatch).message)
