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
# # 3. Sequence log-probabilities
#
# KTO's inputs are the summed log-probabilities log π(y|x) of whole completions. A language model
# gives logits [B, T, V] (batch, time, vocabulary); this tutorial turns them into one number per
# sequence and back into a gradient:
#
# 1. log_softmax, computed stably;
# 2. gather the target token's log-prob, mask, sum: the seed's contract, with **no shift**;
# 3. the language-model convention: the logits at position t score token t + 1, and only
#    completion tokens count (prompt and padding are masked out);
# 4. the backward, dlogits = mask · (onehot − softmax) · dlogp, checked by finite differences.

# %%
import numpy as np

from kto_np import compute_logprobs, plots, sequence_logprobs
from kto_np.data import Tokenizer, collate
from kto_np.gradcheck import check_gradients, format_report, rel_error
from kto_np.logprobs import (
    log_softmax,
    logprobs_backward,
    logprobs_forward,
    sequence_logprobs_backward,
    sequence_logprobs_forward,
)

rng = np.random.default_rng(0)

# %% [markdown]
# ## log_softmax, stably
#
# $$ \log \text{softmax}(x)_v = x_v - \log \sum_{w} e^{x_w} = (x_v - m) - \log \sum_w e^{x_w - m},
#    \quad m = \max_w x_w . $$
#
# Subtracting the maximum changes nothing mathematically, but keeps exp() from overflowing: the
# largest exponent is e^0 = 1.

# %%
big_logits = np.array([1000.0, 999.0, 990.0])
with np.errstate(over="ignore", invalid="ignore"):
    naive = big_logits - np.log(np.sum(np.exp(big_logits)))  # exp(1000) = inf
stable = (big_logits - big_logits.max()) - np.log(np.sum(np.exp(big_logits - big_logits.max())))
print("naive: ", naive, "\nstable:", stable)
assert not np.all(np.isfinite(naive))
assert np.allclose(stable, log_softmax(big_logits), rtol=0, atol=1e-12)
assert abs(np.exp(stable).sum() - 1.0) < 1e-12

# %% [markdown]
# ## The seed contract: gather, mask, sum (no shift)
#
# `compute_logprobs(logits, targets, mask)` (the seed API) scores `targets[b, t]` with the logits
# **at the same position t**:
#
# $$ \text{logp}_b = \sum_t \text{mask}_{b,t}\, \log\text{softmax}(\text{logits}_{b,t})[\text{targets}_{b,t}] . $$
#
# Gathering one entry per (b, t) is `np.take_along_axis` along the vocabulary axis.

# %%
B, T, V = 2, 4, 5
logits = rng.standard_normal((B, T, V))
targets = rng.integers(0, V, (B, T))
mask = np.array([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])

token_logps = np.take_along_axis(log_softmax(logits), targets[..., None], axis=-1)[..., 0]  # [B, T]
logps_by_hand = (token_logps * mask).sum(axis=1)  # [B]
print("by hand:        ", logps_by_hand)
print("compute_logprobs:", compute_logprobs(logits, targets, mask))
assert rel_error(compute_logprobs(logits, targets, mask), logps_by_hand) < 1e-14

# %% [markdown]
# ## The language-model convention: shift, prompt mask, padding
#
# A causal language model's logits at position t predict the **next** token: they score token t + 1.
# So the log-probability of a completion is
#
# $$ \log\pi(y|x) = \sum_{t \ge 1} m_t\ \log\text{softmax}(\text{logits}_{t-1})[\text{tokens}_t], $$
#
# with m = `completion_mask`, 1 on completion tokens and 0 on the prompt and on right padding. This
# is `kto_np.sequence_logprobs(logits, tokens, completion_mask)`, the convention TRL uses.
#
# A real batch from kto_np's synthetic sorting task: prompts are digits followed by "=", completions
# end with ".", and "_" (id 0) pads on the right. `collate` builds the tokens and masks.

# %%
tokenizer = Tokenizer()
examples = [("3142=", "1234.", 1), ("3142=", "4321.", 0), ("5501=", "015.", 0)]
batch = collate(examples, tokenizer, dtype="float64")
tokens, completion_mask = batch.tokens, batch.completion_mask  # [B, T]
B, T = tokens.shape
V = tokenizer.vocab_size
print("tokens:\n", tokens, "\ncompletion_mask:\n", completion_mask)
for b in range(B):
    print(f"row {b}: {tokenizer.decode(tokens[b])!r}  scored: "
          f"{''.join(c if m else '·' for c, m in zip(tokenizer.decode(tokens[b]), completion_mask[b]))!r}")

# %% [markdown]
# Any model's logits will do to show the bookkeeping; random ones here. First the sum written as a
# loop, exactly as the formula reads, then the library:

# %%
logits = 2.0 * rng.standard_normal((B, T, V))
log_probs = log_softmax(logits)
loop_logps = np.zeros(B)
for b in range(B):
    for t in range(1, T):  # token 0 has no logits before it
        if completion_mask[b, t]:
            loop_logps[b] += log_probs[b, t - 1, tokens[b, t]]

library_logps = sequence_logprobs(logits, tokens, completion_mask)
print("loop:             ", loop_logps)
print("sequence_logprobs:", library_logps)
assert rel_error(library_logps, loop_logps) < 1e-14

# %% [markdown]
# The shifted helper is the seed contract applied to shifted views: drop the last logits (they
# would score a token after the sequence) and the first token and mask entry (no logits score it).

# %%
shifted_by_hand = compute_logprobs(logits[:, :-1], tokens[:, 1:], completion_mask[:, 1:])
assert rel_error(shifted_by_hand, library_logps) < 1e-14

unshifted = compute_logprobs(logits, tokens, completion_mask)  # the classic bug: no shift
print("without the shift:", unshifted, "(wrong for a language model)")
assert not np.allclose(unshifted, library_logps)

# %% [markdown]
# Masked positions are invisible: changing a padding token, or the logits that would score it,
# leaves the log-probs unchanged. Row 2 has one pad at the end.

# %%
tokens_other_pad = tokens.copy()
tokens_other_pad[2, -1] = 7
logits_other_pad = logits.copy()
logits_other_pad[2, -2] += 5.0 * rng.standard_normal(V)  # the logits that would score the pad
assert np.array_equal(sequence_logprobs(logits_other_pad, tokens_other_pad, completion_mask), library_logps)

# %% [markdown]
# So is a constant added to every logit at a position: softmax is shift invariant.

# %%
assert rel_error(sequence_logprobs(logits + rng.standard_normal((B, T, 1)), tokens, completion_mask),
                 library_logps) < 1e-13

# %% [markdown]
# ## The backward: mask · (onehot − softmax) · dlogp
#
# For one position with logits x and target k, d log softmax(x)_k / d x_v = [v = k] − softmax(x)_v.
# Scaling by the mask and by the upstream gradient dlogp_b = ∂L/∂logp_b (from the KTO loss, in
# training) gives, for the seed contract,
#
# $$ \frac{\partial L}{\partial\, \text{logits}_{b,t,v}} = \text{mask}_{b,t}\ \text{dlogp}_b\
#    \big(\mathbb{1}[v = \text{targets}_{b,t}] - \text{softmax}(\text{logits}_{b,t})_v\big) . $$
#
# The upstream gradient here is random (all ones would hide sign and scale errors).

# %%
dlogps = rng.standard_normal(B)
# the seed contract's inputs, shifted by hand: token t + 1 scored by the logits at t   [B, T-1]
shifted_targets, shifted_mask = tokens[:, 1:], completion_mask[:, 1:]
shifted_logits = logits[:, :-1].copy()
probs = np.exp(log_softmax(shifted_logits))
onehot = np.eye(V)[shifted_targets]  # [B, T-1, V]
dlogits_by_hand = shifted_mask[..., None] * dlogps[:, None, None] * (onehot - probs)

_, cache = logprobs_forward(shifted_logits, shifted_targets, shifted_mask)
dlogits = logprobs_backward(dlogps, cache)
assert rel_error(dlogits, dlogits_by_hand) < 1e-14

# %% [markdown]
# Each position's gradient sums to zero over the vocabulary (both the one-hot and the softmax sum
# to 1): a logit step can only move probability from some tokens to others.

# %%
assert np.max(np.abs(dlogits.sum(axis=-1))) < 1e-15

# %% [markdown]
# The shifted version puts the same numbers one position earlier, and the last position gets zero
# gradient (its logits score nothing). Position t receives gradient exactly when token t + 1 is a
# completion token, so the **last prompt position** (the "=") gets gradient: its logits predict the
# first completion token.

# %%
logps, seq_cache = sequence_logprobs_forward(logits, tokens, completion_mask)
dlogits_shifted = sequence_logprobs_backward(dlogps, seq_cache)
assert rel_error(dlogits_shifted[:, :-1], dlogits) < 1e-14
assert np.all(dlogits_shifted[:, -1] == 0.0)

has_gradient = np.abs(dlogits_shifted).sum(axis=-1) > 0  # [B, T]
print("positions with gradient:\n", has_gradient.astype(int))
assert np.array_equal(has_gradient[:, :-1], completion_mask[:, 1:] == 1)

# %% [markdown]
# ### Finite differences
#
# The backward is the gradient of the scalar Σ_b dlogp_b · logp_b with respect to the logits.
# `kto_np.gradcheck.check_gradients` perturbs every logit by ±h (central differences, float64) and
# compares; the relative error max|a − b| / max(|a| + |b|) should be around 1e-9 or below.

# %%
logits_for_fd = logits.copy()
rows = check_gradients(
    lambda: float(dlogps @ sequence_logprobs(logits_for_fd, tokens, completion_mask)),
    {"sequence_logprobs d/dlogits": logits_for_fd},
    {"sequence_logprobs d/dlogits": dlogits_shifted},
    max_full_size=logits.size,  # every entry, not random directions
)
print(format_report(rows))
assert all(row.passed for row in rows)

# %% [markdown]
# ## Where the gradient goes, as a picture
#
# `plots.synthetic_token_gradients` runs the same chain on four character-level examples (random
# logits, a KTO loss on top) and `plots.plot_token_gradients` draws |dL/dlogits| per token. Column t
# is **token t, scored by the logits at t − 1**: the shift above, so the prompt's tokens, the
# padding and the first token are 0, and the first completion token gets the gradient of the logits
# at the prompt's last position. `figures/token_gradients.png` is the same map for the first KTO step
# of the demo run (`kto-np figures --run runs/demo`). There the policy *is* the reference, so every
# example's dL/dlog π is ±βλ/(4n) and each cell is |onehot − softmax| of the reference at that token,
# scaled: the map shows where the reference was unsure, and that is where KTO's first step pushes.

# %%
synthetic = plots.synthetic_token_gradients(seed=0)
for row, text in zip(synthetic.norms, synthetic.tokens_text):
    scored = row > 0
    assert not scored[0] and np.all(np.array(text)[scored] != "")  # never the first token, never padding
fig = plots.plot_token_gradients(synthetic.norms, synthetic.tokens_text, labels=synthetic.labels)
fig  # noqa: B018  (shows the figure in a notebook)

# %% [markdown]
# ## Exercises
#
# Write each function below in place of its stub and run its cell: `grade` runs your function on the
# grader's inputs and says what is wrong, if anything, in words (against a closed form or through the
# gradient oracle's diagnosis). To check a file of your own (run in a separate process): `kto-np exercise
# check 03.log_softmax my_answers.py:log_softmax`. `kto-np exercise list` lists every exercise;
# tutorials/README.md has them per lesson. Reference solutions: `tutorials/solutions/lesson03.py` (try
# first).

# %%
from kto_np.exercises import grade  # noqa: E402

# %% [markdown]
# **Exercise 03.log_softmax.** `log_softmax(logits) -> log_probs`: log softmax over the last axis, stable
# for logits in the thousands.

# %%
def log_softmax(logits):
    raise NotImplementedError  # your code here


print(grade("03.log_softmax", log_softmax).message)

# %% [markdown]
# **Exercise 03.logprobs_backward.** `logprobs_backward(logits, targets, mask, dlogps) -> dlogits`: the
# backward of compute_logprobs (logps[b] = Σ_t mask[b,t] log softmax(logits[b,t])[targets[b,t]], the
# seed's unshifted contract): dlogits [B, T, V] from dlogps [B].

# %%
def logprobs_backward(logits, targets, mask, dlogps):
    raise NotImplementedError  # your code here


print(grade("03.logprobs_backward", logprobs_backward).message)

# %% [markdown]
# **Exercise 03.sequence_logprobs.** `sequence_logprobs(logits, tokens, completion_mask) -> logps`: log
# π(completion | prompt) per sequence with the language-model shift: logits[:, t] score tokens[:, t + 1],
# counted where completion_mask[:, t + 1] is 1.

# %%
def sequence_logprobs(logits, tokens, completion_mask):
    raise NotImplementedError  # your code here


print(grade("03.sequence_logprobs", sequence_logprobs).message)
