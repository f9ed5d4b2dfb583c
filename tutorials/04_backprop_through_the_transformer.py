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
# # 4. Backpropagation through the transformer, one op at a time
#
# kto_np's GPT-2 has no autograd: every op is a pair
#
#     out, cache = op_forward(inputs...)
#     d_inputs... = op_backward(dout, cache)
#
# where `dout` = ∂L/∂out is the upstream gradient and the cache holds what the backward needs. The
# model's backward is the forward read bottom-up. This tutorial checks each op against central finite
# differences (float64) with `kto_np.gradcheck.check_gradients`, then the whole chain:
# KTO loss → dL/dlogps → dL/dlogits → every parameter.
#
# The trick for checking a backward: pick a random upstream gradient `dout` and differentiate the
# scalar f = Σ dout · out. Its gradient with respect to each input is exactly what `op_backward(dout)`
# must return. (A random dout, not all ones: ones hide sign and transposition errors.)
#
# Shape letters: B batch, T time, C channels, NH heads, HS = C / NH head size, V vocabulary.

# %%
import numpy as np

from kto_np import build, kto_loss, kto_loss_and_grad, plots
from kto_np.data import Tokenizer, collate
from kto_np.gradcheck import check_gradients, format_report, rel_error
from kto_np.layers import (
    attention_backward,
    attention_forward,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
)
from kto_np.logprobs import sequence_logprobs_backward, sequence_logprobs_forward
from kto_np.losses import KTOConfig
from kto_np.model import GPT, block_backward, block_forward
from kto_np.step import completion_logps, kto_step

rng = np.random.default_rng(0)
B, T, C, NH, V = 2, 5, 6, 2, 7
largest_error = {}  # check title -> its largest relative error, drawn at the end


def check_op(title, loss_of_inputs, inputs, analytic, tolerance=1e-7):
    """Finite-difference check of `analytic` (name -> gradient) for the scalar loss_of_inputs():
    prints the table of `check_gradients` rows and fails unless every row passed."""
    rows = check_gradients(loss_of_inputs, inputs, analytic, tolerance=tolerance, max_full_size=256)
    print(format_report(rows, title) + "\n")
    largest_error[title] = max(row.rel_error for row in rows)
    assert all(row.passed for row in rows), title


# %% [markdown]
# ## Embedding: out[b, t] = weight[tokens[b, t]]
#
# The backward scatters: row v of dweight is the sum of dout over every position holding token v.
# A token that appears twice gets both contributions (`np.add.at`, not plain assignment).

# %%
weight = rng.standard_normal((V, C))
tokens = np.array([[1, 3, 3, 0, 6], [2, 3, 5, 1, 1]])  # token 3 three times, token 4 never
dout = rng.standard_normal((B, T, C))
out, cache = embedding_forward(weight, tokens)
dweight = embedding_backward(dout, cache)
check_op("embedding", lambda: np.sum(dout * embedding_forward(weight, tokens)[0]),
         {"weight": weight}, {"weight": dweight})
assert np.allclose(dweight[3], dout[0, 1] + dout[0, 2] + dout[1, 1]) and np.all(dweight[4] == 0)

# %% [markdown]
# ## Linear (GPT-2's Conv1D orientation): out = x @ W + b, W is [in, out]
#
# dx = dout @ Wᵀ, dW = xᵀ @ dout (summed over every leading axis), db = Σ dout.

# %%
x = rng.standard_normal((B, T, C))
W, b = rng.standard_normal((C, 3 * C)), rng.standard_normal(3 * C)
dout = rng.standard_normal((B, T, 3 * C))
dx, dW, db = linear_backward(dout, linear_forward(x, W, b)[1])
check_op("linear", lambda: np.sum(dout * linear_forward(x, W, b)[0]),
         {"x": x, "weight": W, "bias": b}, {"x": dx, "weight": dW, "bias": db})

# %% [markdown]
# ## LayerNorm over the channels
#
# x̂ = (x − mean) · rstd with rstd = 1/√(var + 1e-5), out = x̂ · γ + β. With g = dout · γ,
#
# $$ dx = \text{rstd}\,\big(g - \overline{g} - \hat x\, \overline{g\,\hat x}\big), \quad
#    d\gamma = \textstyle\sum dout\,\hat x, \quad d\beta = \sum dout , $$
#
# the bars being means over the channels. The two subtracted means are the gradients through the
# mean and the variance.

# %%
gamma, beta_ln = 1.0 + 0.1 * rng.standard_normal(C), 0.1 * rng.standard_normal(C)
dout = rng.standard_normal((B, T, C))
dx, dgamma, dbeta = layernorm_backward(dout, layernorm_forward(x, gamma, beta_ln)[1])
check_op("layernorm", lambda: np.sum(dout * layernorm_forward(x, gamma, beta_ln)[0]),
         {"x": x, "weight": gamma, "bias": beta_ln}, {"x": dx, "weight": dgamma, "bias": dbeta})

# %% [markdown]
# ## GELU, tanh approximation (GPT-2's "gelu_new")
#
# gelu(x) = ½ x (1 + tanh(√(2/π) (x + 0.044715 x³))); the derivative is
# ½(1 + t) + ½ x (1 − t²) √(2/π) (1 + 3·0.044715 x²) with t the tanh.

# %%
x_mlp = 2.0 * rng.standard_normal((B, T, 4 * C))
dout = rng.standard_normal((B, T, 4 * C))
dx = gelu_backward(dout, gelu_forward(x_mlp)[1])
check_op("gelu", lambda: np.sum(dout * gelu_forward(x_mlp)[0]), {"x": x_mlp}, {"x": dx})

# %% [markdown]
# ## Causal self-attention
#
#     q, k, v = split(x @ c_attn.weight + c_attn.bias)           3 × [B, NH, T, HS]
#     probs   = softmax(q kᵀ / √HS, causal mask)                  [B, NH, T, T]
#     out     = merge(probs @ v) @ c_proj.weight + c_proj.bias    [B, T, C]
#
# The backward runs these lines bottom-up: the projection, then probs @ v (dprobs = dy vᵀ,
# dv = probsᵀ dy), the softmax (dscores = probs · (dprobs − Σ dprobs · probs)), the scaled q kᵀ, and
# the fused q/k/v projection. Masked (future) entries have probability exactly 0 and gradient 0.

# %%
attn_weights = {
    "c_attn.weight": 0.3 * rng.standard_normal((C, 3 * C)), "c_attn.bias": 0.1 * rng.standard_normal(3 * C),
    "c_proj.weight": 0.3 * rng.standard_normal((C, C)), "c_proj.bias": 0.1 * rng.standard_normal(C),
}


def attention(x_in):
    return attention_forward(x_in, attn_weights["c_attn.weight"], attn_weights["c_attn.bias"],
                             attn_weights["c_proj.weight"], attn_weights["c_proj.bias"], NH)


dout = rng.standard_normal((B, T, C))
out, cache = attention(x)
grads = attention_backward(dout, cache)
check_op("attention", lambda: np.sum(dout * attention(x)[0]), {"x": x, **attn_weights},
         {"x": grads.dx, "c_attn.weight": grads.dc_attn_weight, "c_attn.bias": grads.dc_attn_bias,
          "c_proj.weight": grads.dc_proj_weight, "c_proj.bias": grads.dc_proj_bias})

# %% [markdown]
# Causality, checked directly: changing the input at position 2 changes no output before position 2.

# %%
x_changed = x.copy()
x_changed[:, 2] += 1.0
changed = np.abs(attention(x_changed)[0] - out).max(axis=(0, 2))  # per position
print("max change of the output per position:", changed.round(4))
assert np.all(changed[:2] == 0.0) and np.all(changed[2:] > 0.0)

# %% [markdown]
# ## The tied head: one matrix, two uses
#
# GPT-2 uses the token embedding `wte` twice: to look tokens up at the bottom, and as the output
# head at the top, logits = h @ wteᵀ. Its gradient is the **sum** of both contributions. A toy
# two-use function shows it; leaving out the lookup's contribution fails the check.

# %%
wte = rng.standard_normal((V, C))
dlogits = rng.standard_normal((B, T, V))


def tied_logits(wte_in):
    h, _ = embedding_forward(wte_in, tokens)  # [B, T, C]   (the lookup)
    return h @ wte_in.T  # [B, T, V]   (the head)


h, lookup_cache = embedding_forward(wte, tokens)
dwte_from_head = dlogits.reshape(-1, V).T @ h.reshape(-1, C)  # logits = h @ wte.T
dwte_from_lookup = embedding_backward(dlogits @ wte, lookup_cache)  # h = wte[tokens]
check_op("tied head", lambda: np.sum(dlogits * tied_logits(wte)), {"wte": wte},
         {"wte": dwte_from_head + dwte_from_lookup})
only_head = check_gradients(lambda: np.sum(dlogits * tied_logits(wte)), {"wte": wte}, {"wte": dwte_from_head},
                            max_full_size=256)
print(f"head contribution alone: relative error {only_head[0].rel_error:.2f} (fails)")
assert not only_head[0].passed

# %% [markdown]
# ## The transformer block: where gradients add
#
# GPT-2's block is *pre-LN*: each sub-layer normalises its own input, and its output is added to the
# residual stream, which is never normalised:
#
#     x_mid = x + attn(ln_1(x))
#     out   = x_mid + mlp(ln_2(x_mid))          mlp(h) = c_proj(gelu(c_fc(h)))
#
# Derive the backward from two rules: go through the lines bottom-up, and when a variable is used
# twice, **its gradients add**. x_mid is used twice (the residual term of `out`, and the input of
# ln_2), and so is x (the residual term of x_mid, and the input of ln_1):
#
# $$ \frac{\partial L}{\partial x_{mid}} = dout + \mathrm{ln_2}^\top\big(\mathrm{mlp}^\top(dout)\big), \qquad
#    \frac{\partial L}{\partial x} = \frac{\partial L}{\partial x_{mid}}
#    + \mathrm{ln_1}^\top\Big(\mathrm{attn}^\top\big(\tfrac{\partial L}{\partial x_{mid}}\big)\Big), $$
#
# where op^⊤(d) is that op's backward (the ops checked above). The first term of each is the
# identity path of the residual connection: the upstream gradient reaches x unchanged, whatever the
# sub-layers do. Stacked over L blocks, the gradient at the embeddings is dout plus the branches'
# contributions, which is why deep pre-LN transformers train stably; in the original post-LN order,
# out = ln(x + f(x)), every block's LayerNorm backward would sit on that path.
#
# Written with the ops, the derivation is a dozen lines, and it is what `kto_np.model.block_backward`
# does:

# %%
config = build(hidden_size=C, num_layers=1, num_heads=NH, vocab_size=V, dropout=0.0, max_seq_len=T,
               dtype="float64").config
block = {name: p + 0.1 * rng.standard_normal(p.shape) for name, p in GPT(config).init(seed=1).items()}


def block_by_hand(x_in):
    """The block's forward from the ops; returns out and what the backward needs."""
    w = {name[len("h.0."):]: value for name, value in block.items() if name.startswith("h.0.")}
    ln_1, ln_1_cache = layernorm_forward(x_in, w["ln_1.weight"], w["ln_1.bias"])
    attn, attn_cache = attention_forward(ln_1, w["attn.c_attn.weight"], w["attn.c_attn.bias"],
                                         w["attn.c_proj.weight"], w["attn.c_proj.bias"], NH)
    x_mid = x_in + attn
    ln_2, ln_2_cache = layernorm_forward(x_mid, w["ln_2.weight"], w["ln_2.bias"])
    fc, fc_cache = linear_forward(ln_2, w["mlp.c_fc.weight"], w["mlp.c_fc.bias"])
    act, act_cache = gelu_forward(fc)
    mlp, proj_cache = linear_forward(act, w["mlp.c_proj.weight"], w["mlp.c_proj.bias"])
    return x_mid + mlp, (ln_1_cache, attn_cache, ln_2_cache, fc_cache, act_cache, proj_cache)


def block_backward_by_hand(dout, caches, residual=True):
    """dL/dx of the block, line by line bottom-up; residual=False forgets the two identity paths."""
    ln_1_cache, attn_cache, ln_2_cache, fc_cache, act_cache, proj_cache = caches
    dact = linear_backward(dout, proj_cache)[0]  # mlp^T(dout), from the top
    dln_2 = linear_backward(gelu_backward(dact, act_cache), fc_cache)[0]
    dx_mid = layernorm_backward(dln_2, ln_2_cache)[0] + (dout if residual else 0.0)  # used twice: add
    dln_1 = attention_backward(dx_mid, attn_cache).dx
    return layernorm_backward(dln_1, ln_1_cache)[0] + (dx_mid if residual else 0.0)  # used twice: add


dout = rng.standard_normal((B, T, C))
out, caches = block_by_hand(x)
library_out, library_cache = block_forward(block, 0, x, config, train=False, rng=None)
dx_by_hand = block_backward_by_hand(dout, caches)
dx_library = block_backward(dout, library_cache, 0, {})
assert np.array_equal(out, library_out) and rel_error(dx_by_hand, dx_library) < 1e-12
check_op("transformer block, dL/dx", lambda: np.sum(dout * block_by_hand(x)[0]), {"x": x}, {"x": dx_by_hand})

# %% [markdown]
# Forget the identity paths (keep only the sub-layers' terms) and the check fails: most of the
# gradient of a residual block goes straight through.

# %%
without_residual = check_gradients(lambda: np.sum(dout * block_by_hand(x)[0]), {"x": x},
                                   {"x": block_backward_by_hand(dout, caches, residual=False)}, max_full_size=256)
print(f"without the residual terms: relative error {without_residual[0].rel_error:.2f} (fails)")
assert not without_residual[0].passed

# %% [markdown]
# ## The whole model, and the KTO loss on top
#
# `kto_np.step.kto_step(model, params, batch, ref_logps, kl_ref_logps, config)` runs the chain:
#
#     policy forward          tokens [B, T]          -> logits [B, T, V]
#     sequence log-probs      logits                 -> logps [B]                 (tutorial 3)
#     kto_loss_and_grad       logps, ref_logps, ...  -> loss, dlogps [B]          (tutorial 1)
#     sequence backward       dlogps                 -> dlogits [B, T, V]
#     model backward          dlogits                -> grads, same keys as params
#
# A tiny float64 GPT-2 (2 layers, 8 channels, 2 heads) on a batch of the sorting task. The weights
# are the GPT-2 initialisation plus noise, so that LayerNorm weights are not all 1 and biases not all
# 0 (a symmetric point can hide errors). The reference log-probs come from a second set of weights,
# and its KL-row log-probs are shifted down by 2 (the `- 2.0` below) so that z_ref is positive.

# %%
tokenizer = Tokenizer()
model = build(hidden_size=8, num_layers=2, num_heads=2, vocab_size=tokenizer.vocab_size, dropout=0.0,
              max_seq_len=12, dtype="float64")
params = {name: p + 0.1 * rng.standard_normal(p.shape) for name, p in model.init(seed=0).items()}
ref_params = {name: p + 0.1 * rng.standard_normal(p.shape) for name, p in params.items()}
examples = [("3142=", "1234.", 1), ("3142=", "4321.", 0), ("5501=", "0155.", 1), ("5501=", "015.", 0)]
batch = collate(examples, tokenizer, dtype="float64")
ref_logps = completion_logps(model, ref_params, batch.tokens, batch.completion_mask)[0]
# the reference's KL-row log-probs, lowered by 2: as if the policy had already drifted, so that the KL
# estimate is about +2, the clamp max(0, ·) is inactive, and the check covers a z_ref > 0 in the loss
kl_ref_logps = completion_logps(model, ref_params, batch.kl_tokens, batch.kl_completion_mask)[0] - 2.0
options = dict(variant="kto", beta=0.5, desirable_weight=1.0, undesirable_weight=1.0)

loss, metrics, grads = kto_step(model, params, batch, ref_logps, kl_ref_logps, KTOConfig(**options))
print(f"loss {loss:.6f}, z_ref = {metrics['kl']:.4f}, {model.num_params(params)} parameters")
assert metrics["kl"] > 0  # the clamp is inactive: z_ref is the mean KL estimate
assert list(grads) == list(params)

# %% [markdown]
# The finite-difference objective must be the function the gradient belongs to: z_ref is detached,
# so the KL rows' policy log-probs are held at their current values while the parameters move. The
# model is small enough to check every entry of every tensor (`check_op` sweeps tensors of up to 256
# entries; `check_gradients` checks larger ones along random unit directions instead).

# %%
frozen_kl_policy_logps = completion_logps(model, params, batch.kl_tokens, batch.kl_completion_mask)[0]


def kto_objective():
    logps = completion_logps(model, params, batch.tokens, batch.completion_mask)[0]
    return kto_loss(logps, ref_logps, batch.labels, options["beta"], variant="kto",
                    kl_policy_logps=frozen_kl_policy_logps, kl_ref_logps=kl_ref_logps)


assert abs(kto_objective() - loss) < 1e-14
check_op("KTO loss, every parameter tensor", kto_objective, params, grads, tolerance=1e-6)

# %% [markdown]
# Every check of this lesson on one axis: the largest relative error of each hand-written backward
# against finite differences (log scale), and the two deliberately incomplete ones above (the tied
# head's gradient without the embedding's, the block without its residual terms). A right backward
# agrees to 1e-7 or better; a missing path is wrong in the first digit.

# %%
errors = dict(largest_error)
errors["tied head: head path alone (wrong)"] = only_head[0].rel_error
errors["block: no residual terms (wrong)"] = without_residual[0].rel_error
assert all(error < 1e-6 for error in largest_error.values()) and min(
    only_head[0].rel_error, without_residual[0].rel_error) > 0.1
plots.plot_bars({name: max(error, 1e-18) for name, error in errors.items()}, threshold=1e-6, log=True,
                title="Hand-written backward passes against finite differences",
                xlabel="largest relative error (log scale; 0 drawn at 1e-18)", ylabel="check",
                threshold_label="the loosest tolerance used")

# %% [markdown]
# The same check, for every loss variant and a few model options, is `kto-np gradcheck` on the
# command line (`kto_np.gradcheck_suite.model_checks` in Python).
#
# A last sanity check of the chain: the logits gradient the model backward receives is the one from
# tutorial 3, so the embedding gradient of a token that appears nowhere in the batch (the pad "_" is
# used, but "7" is not) comes from the tied head alone.

# %%
unused = tokenizer.encode("7")[0]
assert not np.any(batch.tokens == unused) and not np.any(batch.kl_tokens == unused)
logits, model_cache = model.forward(params, batch.tokens)
x_final = model_cache.x_final  # [B, T, C], the head's input
logps, logp_cache = sequence_logprobs_forward(logits, batch.tokens, batch.completion_mask)
_, dlogps, _ = kto_loss_and_grad(logps, ref_logps, batch.labels, options["beta"], variant="kto",
                                 kl_policy_logps=frozen_kl_policy_logps, kl_ref_logps=kl_ref_logps)
dlogits = sequence_logprobs_backward(dlogps, logp_cache)
head_only = dlogits[..., unused].reshape(-1) @ x_final.reshape(-1, x_final.shape[-1])
assert rel_error(grads["wte.weight"][unused], head_only) < 1e-12

# %% [markdown]
# ## Exercises
#
# Write each function below in place of its stub and run its cell: `grade` runs your function on the
# grader's inputs and says what is wrong, if anything, in words (against finite differences). To check a
# file of your own (run in a separate process): `kto-np exercise check 04.gelu_backward
# my_answers.py:gelu_backward`. `kto-np exercise list` lists every exercise; tutorials/README.md has them
# per lesson. Reference solutions: `tutorials/solutions/lesson04.py` (try first).

# %%
from kto_np.exercises import grade  # noqa: E402

# %% [markdown]
# **Exercise 04.gelu_backward.** `gelu_backward(dout, x) -> dx`: the backward of GELU's tanh approximation
# 0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³))).

# %%
def gelu_backward(dout, x):
    raise NotImplementedError  # your code here


print(grade("04.gelu_backward", gelu_backward).message)

# %% [markdown]
# **Exercise 04.layernorm_backward.** `layernorm_backward(dout, x, gamma, eps) -> (dx, dgamma, dbeta)`:
# the backward of LayerNorm over the last axis, out = (x − mean) / √(var + eps) · gamma + beta (biased
# variance); dgamma and dbeta summed over every leading axis.

# %%
def layernorm_backward(dout, x, gamma, eps):
    raise NotImplementedError  # your code here


print(grade("04.layernorm_backward", layernorm_backward).message)

# %% [markdown]
# **Exercise 04.attention_backward.** `attention_backward(dout, q, k, v) -> (dq, dk, dv)`: the backward of
# causal softmax attention on [B, NH, T, HS]: out = softmax(q kᵀ / √HS, keys after the query masked) v.

# %%
def attention_backward(dout, q, k, v):
    raise NotImplementedError  # your code here


print(grade("04.attention_backward", attention_backward).message)
