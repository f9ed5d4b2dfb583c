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
# # 7. Edifice's own backbone, and why its logits ignore the tokens
#
# `kto_np.build(architecture="edifice")` is the network `Edifice.Meta.KTO.build/1` makes: pre-norm
# blocks with separate q/k/v/out dense layers, exact-erf GELU, a softmax with +1e-8 in its
# denominator, a fixed sinusoidal position table and a biased `lm_head`, with Axon's parameter names
# and default initialisation. Its token embedding is fixed, not trained:
#
# $$ E[t, j] = \frac{t H + j}{\sqrt V} = \underbrace{\frac{t H}{\sqrt V}}_{\text{per-token constant}}
#    + \underbrace{\frac{j}{\sqrt V}}_{\text{ramp shared by all tokens}} . $$
#
# Every LayerNorm subtracts the mean over the channels, so it cannot see a constant added to all of
# them. Below: that fact, then the whole network giving the same logits for different tokens, what
# that costs in training (the best it can do is the per-position token frequencies), and the repair,
# `token_embedding="learned"`.

# %%
import numpy as np

import kto_np
from kto_np import checkpoint, plots
from kto_np.data import Tokenizer, collate, iterate_batches, make_examples, make_task
from kto_np.layers import layernorm_forward
from kto_np.optim import adamw_init, adamw_step
from kto_np.step import sft_step

model = kto_np.build(architecture="edifice", vocab_size=11, hidden_size=12, num_heads=3, num_layers=2,
                     max_seq_len=8, dropout=0.0, dtype="float64")
params = model.init(0)
print(len(params), "tensors, e.g.", list(params)[:4], "...", list(params)[-2:])
assert "block_1_attn_q.kernel" in params and params["lm_head.kernel"].shape == (12, 11)
nested = checkpoint.params_to_axon(params)  # Axon's {layer: {param: array}} layout
assert set(nested["final_norm"]) == {"gamma", "beta"}

# %% [markdown]
# ## LayerNorm cannot see a constant added to every channel
#
# LN(x + c·1) = LN(x): the mean moves by c, the centred values and the variance do not.

# %%
rng = np.random.default_rng(0)
x = rng.standard_normal((5, 12))
gamma, beta = rng.standard_normal(12), rng.standard_normal(12)
shifted = x + 100.0 * rng.standard_normal((5, 1))  # a different constant per row
assert np.allclose(layernorm_forward(x, gamma, beta)[0], layernorm_forward(shifted, gamma, beta)[0], atol=1e-12)

# %% [markdown]
# ## So the network's logits depend on the positions only
#
# The token's constant t·H/√V enters the residual stream, but every branch reads the stream through a
# LayerNorm, and the head reads it through the final one. Two batches with different tokens (same
# length) give the same logits, to rounding, and every row of a batch the same logits too.

# %%
params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}  # any weights will do
tokens_a = rng.integers(0, 11, (4, 8))
tokens_b = rng.integers(0, 11, (4, 8))
logits_a = model.forward(params, tokens_a)[0]
logits_b = model.forward(params, tokens_b)[0]
difference = np.max(np.abs(logits_a - logits_b))
print(f"different tokens, max |logits_a - logits_b| = {difference:.1e} (logits up to {np.abs(logits_a).max():.2f})")
assert difference < 1e-12

learned = kto_np.build(architecture="edifice", vocab_size=11, hidden_size=12, num_heads=3, num_layers=2,
                       max_seq_len=8, dropout=0.0, dtype="float64", token_embedding="learned")
learned_params = learned.init(0)
learned_difference = np.max(np.abs(learned.forward(learned_params, tokens_a)[0]
                                   - learned.forward(learned_params, tokens_b)[0]))
print(f"with token_embedding='learned': {learned_difference:.1e}")
assert learned_difference > 1e-3

# %% [markdown]
# ## What that costs: at best, the per-position token frequencies
#
# A model whose prediction at each position ignores the tokens can do no better, on any batch, than
# the batch's own frequencies of each token at each position: its mean negative log-likelihood is
# at least the conditional entropy H(token | position) of that batch. We train both variants with the
# SFT loss on the sorting task for the same few steps and compare with that bound.

# %%
tokenizer = Tokenizer()
task = make_task("sort", 4)
examples = make_examples(task, 512, seed=0, desirable_fraction=1.0)
batches = [collate(b, tokenizer, dtype="float64") for b in iterate_batches(examples, 64, seed=0, drop_last=True)]


def position_only_bound(batch) -> float:
    """min over position-only predictors of the batch's mean NLL: H(token | position) on the batch."""
    tokens, mask = batch.tokens, batch.completion_mask
    total, count = 0.0, mask[:, 1:].sum()
    for t in range(1, tokens.shape[1]):
        scored = tokens[mask[:, t] > 0, t]
        if scored.size:
            frequencies = np.bincount(scored) / scored.size
            total -= np.sum(np.log(frequencies[scored]))
    return total / count


def train(architecture_options: dict, steps: int) -> tuple:
    net = kto_np.build(architecture="edifice", vocab_size=tokenizer.vocab_size, hidden_size=32, num_heads=4,
                       num_layers=1, max_seq_len=12, dropout=0.0, dtype="float64", **architecture_options)
    weights = net.init(0)
    state = adamw_init(weights)
    losses = []  # the SFT loss of each step's batch, before its update
    for step in range(steps):
        loss, _, grads = sft_step(net, weights, batches[step % len(batches)])
        losses.append(float(loss))
        adamw_step(weights, grads, state, lr=3e-3, weight_decay=0.0)
    return net, weights, losses


steps = 120
fixed_net, fixed_weights, fixed_losses = train({}, steps)
learned_net, learned_weights, learned_losses = train({"token_embedding": "learned"}, steps)
for batch in batches[:3]:
    bound = position_only_bound(batch)
    fixed_loss = sft_step(fixed_net, fixed_weights, batch)[0]
    learned_loss = sft_step(learned_net, learned_weights, batch)[0]
    print(f"bound {bound:.4f}   fixed embedding {fixed_loss:.4f}   learned embedding {learned_loss:.4f}")
    assert fixed_loss >= bound - 1e-9  # a theorem, not a tendency
    assert learned_loss < bound  # the repaired network already beats every position-only model

# %% [markdown]
# The two training runs, step by step, against the bound of each step's batch: the fixed embedding
# approaches it from above and never gets below it, the learned one goes through it.

# %%
bounds = [position_only_bound(batches[step % len(batches)]) for step in range(steps)]
assert all(loss >= bound - 1e-9 for loss, bound in zip(fixed_losses, bounds))
fig = plots.plot_curves([("SFT on the sorting task: Edifice's network", "cross-entropy per token (nats)", {
    "fixed embedding (Edifice's)": (np.arange(1, steps + 1), fixed_losses),
    "learned embedding (the repair)": (np.arange(1, steps + 1), learned_losses),
    "position-only bound H(token | position) of the batch": (np.arange(1, steps + 1), bounds)})],
    xlabel="SFT step", zero_line=False,
    colors={"fixed embedding (Edifice's)": "#D55E00", "learned embedding (the repair)": "#0072B2",
            "position-only bound H(token | position) of the batch": "0.3"})
fig  # noqa: B018  (shows the figure in a notebook)

# %% [markdown]
# ## On the demo task
#
# Measured with `kto-np demo --architecture edifice` (Edifice's network, fixed embedding) and
# `kto-np demo --architecture edifice --token-embedding learned`, seed 0, the demo's defaults (SFT of
# the reference for 3000 steps, KTO for 400; docs/EDIFICE.md): the fixed-embedding
# reference ends its SFT at a loss of 1.87 and samples digit strings from per-position frequencies,
# so 0.0 % of its completions are right, and KTO from thumbs-up/down labels can only reshape those
# frequencies (0.8 % after). With the learned embedding the same network ends its SFT at 0.37, and KTO
# takes the desirable rate from 52.3 % to 98.4 % (the GPT-2 demo: 51.2 % to 96.9 %).

# %% [markdown]
# ## Exercises
#
# Write each function below in place of its stub and run its cell: `grade` runs your function on the
# grader's inputs and says what is wrong, if anything, in words (against a closed form). To check a file
# of your own (run in a separate process): `kto-np exercise check 07.fixed_embedding
# my_answers.py:fixed_embedding`. `kto-np exercise list` lists every exercise; tutorials/README.md has
# them per lesson. Reference solutions: `tutorials/solutions/lesson07.py` (try first).

# %%
from kto_np.exercises import grade  # noqa: E402

# %% [markdown]
# **Exercise 07.fixed_embedding.** `fixed_embedding(vocab_size, hidden_size) -> E`: Edifice's fixed token
# embedding, E[t, j] = (t H + j) / √V, a [V, H] array.

# %%
def fixed_embedding(vocab_size, hidden_size):
    raise NotImplementedError  # your code here


print(grade("07.fixed_embedding", fixed_embedding).message)

# %% [markdown]
# **Exercise 07.position_entropy.** `position_entropy(tokens) -> float`: H(token | position) in nats for
# tokens [N, T]: the mean over positions of the entropy of the tokens seen there, the lowest mean NLL a
# model that ignores the tokens can reach on them.

# %%
def position_entropy(tokens):
    raise NotImplementedError  # your code here


print(grade("07.position_entropy", position_entropy).message)
