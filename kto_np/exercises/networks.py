"""The exercises about the network: log-probabilities (03), the backward passes (04), SFT and the training
metrics (05), Edifice's backbone (07).

The backward passes are graded against central finite differences (kto_np.gradcheck) of a forward pass
written here; the typical mistakes are wrong backward formulas, recognised by their numbers.
"""

from __future__ import annotations

import numpy as np

from .core import Call, Exercise, Mistake, Verdict, closed_form, fd_vjp, oracle_calls, oracle_cases, oracle_judge

# ---------------------------------------------------------------------------------------------------
# 03: sequence log-probabilities


def _log_softmax(x, axis=-1):
    x = np.asarray(x, dtype=np.float64)
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def _log_softmax_calls():
    rng = np.random.default_rng(3)
    return [Call("random logits [2, 3, 5]", (rng.normal(0, 2, (2, 3, 5)),), {}),
            Call("large logits [2, 4] (around ±1000)", (np.array([[1000.0, 999.0, 990.0, -5.0],
                                                                  [-1000.0, -1001.0, -998.0, -999.5]]),), {})]


def log_softmax_stub(logits):
    raise NotImplementedError("write log_softmax")


def _log_softmax_judge():
    inner = closed_form(("log_softmax",), lambda c: (_log_softmax(c.args[0]),), [
        Mistake("softmax_not_log", "softmax itself, not its logarithm",
                lambda c: (np.exp(_log_softmax(c.args[0])),)),
        Mistake("wrong_axis", "normalising over the first axis instead of the last (the vocabulary)",
                lambda c: (_log_softmax(c.args[0], axis=0),)),
        Mistake("not_normalised", "the logits minus their maximum, without subtracting log Σ exp",
                lambda c: (c.args[0] - np.max(c.args[0], axis=-1, keepdims=True),)),
    ])

    def judge(calls, outcomes):
        for call, outcome in zip(calls, outcomes):
            if outcome.values and not np.all(np.isfinite(outcome.values[0])):
                return Verdict(False, f"log_softmax gives inf or NaN on {call.label}: exp(1000) overflows. "
                                      "Subtract each row's maximum before the exponential (log_softmax(x) = "
                                      "log_softmax(x − max x)).", ("not_stable",))
        return inner(calls, outcomes)

    judge.mistakes = inner.mistakes
    return judge


LOG_SOFTMAX = Exercise(
    "03.log_softmax", "log_softmax", "log_softmax(logits) -> log_probs",
    "log softmax over the last axis, stable for logits in the thousands",
    _log_softmax_calls, _log_softmax_judge(), log_softmax_stub,
)


def _logprobs_cases():
    return oracle_cases("logprobs", None)


def _logprobs_arguments(case):
    i = case.inputs
    return (i["logits"], i["targets"], i["mask"], i["upstream"]), {}


def _logprobs_grad(logits, targets, mask, dlogps, *, sign=1.0, upstream=True, softmax=True):
    probs = np.exp(_log_softmax(logits))
    onehot = np.zeros_like(probs)
    np.put_along_axis(onehot, np.asarray(targets, dtype=np.int64)[..., None], 1.0, axis=-1)
    d = np.asarray(dlogps, dtype=np.float64) if upstream else np.ones(len(dlogps))
    mask = np.asarray(mask, dtype=np.float64)[..., None]
    return sign * mask * (onehot - (probs if softmax else 0.0)) * d[:, None, None]


def logprobs_backward_stub(logits, targets, mask, dlogps):
    raise NotImplementedError("write logprobs_backward")


LOGPROBS_BACKWARD = Exercise(
    "03.logprobs_backward", "logprobs_backward", "logprobs_backward(logits, targets, mask, dlogps) -> dlogits",
    "the backward of compute_logprobs (logps[b] = Σ_t mask[b,t] log softmax(logits[b,t])[targets[b,t]], the "
    "seed's unshifted contract): dlogits [B, T, V] from dlogps [B]",
    oracle_calls(_logprobs_cases, _logprobs_arguments),
    oracle_judge("logprobs", None, ("dlogits",), ("grad/logits",), _logprobs_cases,
                 lambda case: (np.shape(case.inputs["logits"]),), sources=("vjp",), extra=[
                     Mistake("sign_flipped", "softmax − onehot: the sign flipped (raising the target's logit "
                             "raises its log-prob)", lambda c: (_logprobs_grad(*c.args, sign=-1.0),)),
                     Mistake("dlogps_ignored", "the gradient of the plain sum (dlogps taken as 1: the upstream "
                             "gradient is not multiplied in)", lambda c: (_logprobs_grad(*c.args, upstream=False),)),
                     Mistake("softmax_term_missing", "onehot alone, without the softmax term (the log Σ exp "
                             "depends on every logit)", lambda c: (_logprobs_grad(*c.args, softmax=False),)),
                 ]),
    logprobs_backward_stub, how="oracle",
)


def _sequence_cases():
    return oracle_cases("sequence_logprobs", None)


def _sequence_arguments(case):
    i = case.inputs
    return (i["logits"], i["tokens"], i["completion_mask"]), {}


def sequence_stub(logits, tokens, completion_mask):
    raise NotImplementedError("write sequence_logprobs")


SEQUENCE_LOGPROBS = Exercise(
    "03.sequence_logprobs", "sequence_logprobs", "sequence_logprobs(logits, tokens, completion_mask) -> logps",
    "log π(completion | prompt) per sequence with the language-model shift: logits[:, t] score tokens[:, t + 1], "
    "counted where completion_mask[:, t + 1] is 1",
    oracle_calls(_sequence_cases, _sequence_arguments),
    oracle_judge("sequence_logprobs", None, ("logps",), ("logps",), _sequence_cases,
                 lambda case: ((np.shape(case.inputs["tokens"])[0],),)),
    sequence_stub, how="oracle",
)


# ---------------------------------------------------------------------------------------------------
# 04: backward passes


GELU_C = np.sqrt(2.0 / np.pi)
GELU_K = 0.044715


def _gelu(x):
    return 0.5 * x * (1.0 + np.tanh(GELU_C * (x + GELU_K * x ** 3)))


def _gelu_grad(dout, x, *, first=True, chain=True, square=True):
    t = np.tanh(GELU_C * (x + GELU_K * x ** 3))
    inner = GELU_C * (1.0 + (3.0 * GELU_K * x ** 2 if chain else 0.0))
    return dout * ((0.5 * (1.0 + t) if first else 0.0) + 0.5 * x * ((1.0 - t * t) if square else (1.0 - t)) * inner)


def _gelu_calls():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1.5, (3, 4))
    return [Call("x [3, 4], a random upstream gradient", (rng.normal(0, 1, (3, 4)), x), {}),
            Call("x from −4 to 4, upstream 1", (np.ones(9), np.linspace(-4, 4, 9)), {})]


def gelu_backward_stub(dout, x):
    raise NotImplementedError("write gelu_backward")


GELU_BACKWARD = Exercise(
    "04.gelu_backward", "gelu_backward", "gelu_backward(dout, x) -> dx",
    "the backward of GELU's tanh approximation 0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))",
    _gelu_calls,
    closed_form(("dx",), lambda c: fd_vjp(_gelu, (c.args[1],), c.args[0], (0,)), [
        Mistake("product_rule_first_term", "only the tanh's derivative: the product rule's first term "
                "0.5(1 + tanh(·)) is missing", lambda c: (_gelu_grad(*c.args, first=False),)),
        Mistake("chain_rule_inner", "the derivative of tanh's argument without its 3 · 0.044715 x² term",
                lambda c: (_gelu_grad(*c.args, chain=False),)),
        Mistake("tanh_derivative", "1 − tanh in place of tanh's derivative 1 − tanh²",
                lambda c: (_gelu_grad(*c.args, square=False),)),
    ], rtol=1e-6, atol=1e-9),
    gelu_backward_stub, how="finite differences",
)


def _layernorm(x, gamma, beta, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _layernorm_grad(dout, x, gamma, eps, *, mean_term=True, projection=True, gamma_in_dx=True):
    mean = x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
    x_hat = (x - mean) * rstd
    g = dout * gamma if gamma_in_dx else dout
    dx = g - (g.mean(axis=-1, keepdims=True) if mean_term else 0.0)
    if projection:
        dx = dx - x_hat * (g * x_hat).mean(axis=-1, keepdims=True)
    C = x.shape[-1]
    return rstd * dx, (dout * x_hat).reshape(-1, C).sum(axis=0), dout.reshape(-1, C).sum(axis=0)


def _layernorm_calls():
    rng = np.random.default_rng(5)
    x = rng.normal(0.5, 2.0, (2, 3, 5))
    return [Call("x [2, 3, 5], eps = 1e-5", (rng.normal(0, 1, (2, 3, 5)), x, rng.normal(1, 0.3, 5), 1e-5), {}),
            Call("x [4, 6], eps = 0.1", (rng.normal(0, 1, (4, 6)), x.reshape(-1)[:24].reshape(4, 6),
                                         rng.normal(1, 0.3, 6), 0.1), {})]


def _layernorm_reference(call):
    dout, x, gamma, eps = call.args
    beta = np.zeros_like(gamma)
    return fd_vjp(lambda x_, g_, b_: _layernorm(x_, g_, b_, eps), (x, gamma, beta), dout, (0, 1, 2))


def layernorm_backward_stub(dout, x, gamma, eps):
    raise NotImplementedError("write layernorm_backward")


LAYERNORM_BACKWARD = Exercise(
    "04.layernorm_backward", "layernorm_backward", "layernorm_backward(dout, x, gamma, eps) -> (dx, dgamma, dbeta)",
    "the backward of LayerNorm over the last axis, out = (x − mean) / √(var + eps) · gamma + beta (biased "
    "variance); dgamma and dbeta summed over every leading axis",
    _layernorm_calls,
    closed_form(("dx", "dgamma", "dbeta"), _layernorm_reference, [
        Mistake("dx_missing_mean_term", "dx without the − mean(g) term (the mean depends on every x; g = dout · "
                "gamma)", lambda c: _layernorm_grad(*c.args, mean_term=False)),
        Mistake("dx_missing_variance_term", "dx without the − x̂ · mean(g x̂) term (the variance depends on every x)",
                lambda c: _layernorm_grad(*c.args, projection=False)),
        Mistake("dx_only_scaled", "dx = g / √(var + eps), as if the mean and the variance were constants",
                lambda c: _layernorm_grad(*c.args, mean_term=False, projection=False)),
        Mistake("gamma_missing_in_dx", "dx computed from dout instead of g = dout · gamma",
                lambda c: _layernorm_grad(*c.args, gamma_in_dx=False)),
    ], rtol=1e-6, atol=1e-9),
    layernorm_backward_stub, how="finite differences",
)


def _attention(q, k, v):
    T, hs = q.shape[-2], q.shape[-1]
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(hs)
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p = p / p.sum(axis=-1, keepdims=True)
    return p @ v


def _attention_grad(dout, q, k, v, *, scale=True, rowsum=True, dv_transposed=True, dk_transposed=True):
    T, hs = q.shape[-2], q.shape[-1]
    s = 1.0 / np.sqrt(hs)
    scores = q @ np.swapaxes(k, -1, -2) * s
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p = p / p.sum(axis=-1, keepdims=True)
    dv = np.swapaxes(p, -1, -2) @ dout if dv_transposed else p @ dout
    dp = dout @ np.swapaxes(v, -1, -2)
    ds = p * (dp - ((dp * p).sum(axis=-1, keepdims=True) if rowsum else 0.0))
    factor = s if scale else 1.0
    dq = ds @ k * factor
    dk = (np.swapaxes(ds, -1, -2) @ q if dk_transposed else ds @ q) * factor
    return dq, dk, dv


def _attention_calls():
    rng = np.random.default_rng(6)
    shape = (1, 2, 4, 3)
    return [Call("q, k, v [1, 2, 4, 3] (B, NH, T, HS)", (rng.normal(0, 1, shape), rng.normal(0, 1, shape),
                                                        rng.normal(0, 1, shape), rng.normal(0, 1, shape)), {}),
            Call("q, k, v [2, 1, 3, 4]", tuple(rng.normal(0, 1, (2, 1, 3, 4)) for _ in range(4)), {})]


def _attention_reference(call):
    dout, q, k, v = call.args
    return fd_vjp(_attention, (q, k, v), dout, (0, 1, 2))


def attention_backward_stub(dout, q, k, v):
    raise NotImplementedError("write attention_backward")


ATTENTION_BACKWARD = Exercise(
    "04.attention_backward", "attention_backward", "attention_backward(dout, q, k, v) -> (dq, dk, dv)",
    "the backward of causal softmax attention on [B, NH, T, HS]: out = softmax(q kᵀ / √HS, keys after the query "
    "masked) v",
    _attention_calls,
    closed_form(("dq", "dk", "dv"), _attention_reference, [
        Mistake("scale_missing", "dq and dk without the 1/√HS of the scores", lambda c: _attention_grad(*c.args,
                                                                                                       scale=False)),
        Mistake("softmax_backward_rowsum",
                "the softmax backward without its row-sum term (the right one is dS = P · (dP − Σ_j P dP))",
                lambda c: _attention_grad(*c.args, rowsum=False)),
        Mistake("dv_not_transposed", "dv = P dout instead of Pᵀ dout", lambda c: _attention_grad(*c.args,
                                                                                              dv_transposed=False)),
        Mistake("dk_not_transposed", "dk = dS q instead of dSᵀ q", lambda c: _attention_grad(*c.args,
                                                                                          dk_transposed=False)),
    ], rtol=1e-6, atol=1e-9),
    attention_backward_stub, how="finite differences",
)


# ---------------------------------------------------------------------------------------------------
# 05: SFT and the metrics of a run


def _sft(logits, targets, mask, *, per_sequence=False, mask_used=True, sign=1.0):
    logp = _log_softmax(logits)
    m = np.asarray(mask, dtype=np.float64) if mask_used else np.ones(np.shape(targets))
    token = np.take_along_axis(logp, np.asarray(targets, dtype=np.int64)[..., None], axis=-1)[..., 0]
    count = float(m.shape[0]) if per_sequence else float(m.sum())
    loss = -float((token * m).sum()) / count
    probs = np.exp(logp)
    onehot = np.zeros_like(probs)
    np.put_along_axis(onehot, np.asarray(targets, dtype=np.int64)[..., None], 1.0, axis=-1)
    return loss, sign * m[..., None] * (probs - onehot) / count


def _sft_calls():
    rng = np.random.default_rng(55)
    targets = rng.integers(0, 6, (3, 5))
    mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=np.float64)
    return [Call("logits [3, 5, 6], prompt and padding masked", (rng.normal(0, 1.5, (3, 5, 6)), targets, mask), {}),
            Call("logits [2, 4, 7], every token counted", (rng.normal(0, 1.5, (2, 4, 7)), targets[:2, :4],
                                                          np.ones((2, 4))), {})]


def _sft_reference(call):
    logits, targets, mask = call.args
    from ..logprobs import compute_logprobs  # noqa: PLC0415

    count = float(np.sum(mask))

    def loss_of(x):
        return -float(np.sum(compute_logprobs(x, targets, mask))) / count

    work = np.array(logits, dtype=np.float64, copy=True)
    from ..gradcheck import numerical_gradient  # noqa: PLC0415

    return loss_of(work), numerical_gradient(lambda: loss_of(work), work)


def sft_stub(logits, targets, mask):
    raise NotImplementedError("write sft_loss_and_grad")


SFT_LOSS = Exercise(
    "05.sft_loss", "sft_loss_and_grad", "sft_loss_and_grad(logits, targets, mask) -> (loss, dlogits)",
    "the SFT loss of the reference, the mean negative log-likelihood per counted token (mask 1; logits[b, t] "
    "score targets[b, t]), and its gradient with respect to the logits",
    _sft_calls,
    closed_form(("loss", "dlogits"), _sft_reference, [
        Mistake("per_sequence_mean", "the mean over sequences instead of over the counted tokens",
                lambda c: _sft(*c.args, per_sequence=True)),
        Mistake("mask_ignored", "every token counted, the prompt and the padding included (the mask ignored)",
                lambda c: _sft(*c.args, mask_used=False)),
        Mistake("gradient_sign_flipped", "the gradient with its sign flipped (onehot − softmax is the gradient of "
                "the log-likelihood, not of the loss)", lambda c: (lambda r: (r[0], -r[1]))(_sft(*c.args))),
    ], rtol=1e-6, atol=1e-9),
    sft_stub, how="finite differences",
)


def _rewards(policy, ref, labels, beta, *, use_beta=True, swapped=False):
    r = (beta if use_beta else 1.0) * (np.asarray(policy) - np.asarray(ref))
    d = np.asarray(labels) == 1
    chosen, rejected = float(r[d].mean()), float(r[~d].mean())
    if swapped:
        chosen, rejected = rejected, chosen
    return chosen, rejected, chosen - rejected


def _rewards_calls():
    rng = np.random.default_rng(15)
    p = rng.normal(-10, 3, 7)
    return [Call("7 examples, 3 thumbs-up, β = 0.1", (p, p + rng.normal(0, 2, 7), np.array([1, 0, 0, 1, 0, 1, 0]),
                                                      0.1), {}),
            Call("4 examples, 1 thumbs-up, β = 1", (p[:4], p[:4] - 1.0, np.array([0, 0, 1, 0]), 1.0), {})]


def rewards_stub(policy_logps, ref_logps, labels, beta):
    raise NotImplementedError("write reward_metrics")


REWARD_METRICS = Exercise(
    "05.reward_metrics", "reward_metrics",
    "reward_metrics(policy_logps, ref_logps, labels, beta) -> (rewards_chosen, rewards_rejected, rewards_margins)",
    "the training metrics of metrics.jsonl (TRL's names): the mean implied reward β r of the thumbs-up and of "
    "the thumbs-down examples, and their difference",
    _rewards_calls,
    closed_form(("rewards_chosen", "rewards_rejected", "rewards_margins"), lambda c: _rewards(*c.args), [
        Mistake("beta_missing", "the log-ratios without β (the reward is β r)",
                lambda c: _rewards(*c.args, use_beta=False)),
        Mistake("classes_swapped", "the classes swapped (chosen = thumbs-up, label 1)",
                lambda c: _rewards(*c.args, swapped=True)),
    ]),
    rewards_stub,
)


# ---------------------------------------------------------------------------------------------------
# 07: Edifice's backbone


def _embedding(V, H, *, sqrt=True, order="row"):
    t, j = np.meshgrid(np.arange(V), np.arange(H), indexing="ij")
    value = t * H + j if order == "row" else t + j * V
    return value / (np.sqrt(V) if sqrt else 1.0)


def fixed_embedding_stub(vocab_size, hidden_size):
    raise NotImplementedError("write fixed_embedding")


FIXED_EMBEDDING = Exercise(
    "07.fixed_embedding", "fixed_embedding", "fixed_embedding(vocab_size, hidden_size) -> E",
    "Edifice's fixed token embedding, E[t, j] = (t H + j) / √V, a [V, H] array",
    lambda: [Call("V = 5, H = 3", (5, 3), {}), Call("V = 16, H = 8", (16, 8), {})],
    closed_form(("E",), lambda c: (_embedding(*c.args),), [
        Mistake("sqrt_missing", "t H + j without the division by √V", lambda c: (_embedding(*c.args, sqrt=False),)),
        Mistake("column_order", "t + j V (the numbering runs down the columns instead of along the rows)",
                lambda c: (_embedding(*c.args, order="column"),)),
    ]),
    fixed_embedding_stub,
)


def _entropy(tokens, *, base=np.e, pooled=False, summed=False):
    tokens = np.asarray(tokens)
    columns = [tokens.reshape(-1)] if pooled else [tokens[:, t] for t in range(tokens.shape[1])]
    entropies = []
    for column in columns:
        _, counts = np.unique(column, return_counts=True)
        p = counts / counts.sum()
        entropies.append(float(-(p * np.log(p)).sum() / np.log(base)))
    return float(np.sum(entropies) if summed else np.mean(entropies))


def _entropy_calls():
    rng = np.random.default_rng(7)
    return [Call("200 sequences of 4 tokens from 6", (rng.integers(0, 6, (200, 4)),), {}),
            Call("3 sequences of 3 tokens", (np.array([[1, 2, 2], [1, 3, 2], [1, 2, 5]]),), {})]


def entropy_stub(tokens):
    return 0.0  # a placeholder: the entropy of a model that is always right


POSITION_ENTROPY = Exercise(
    "07.position_entropy", "position_entropy", "position_entropy(tokens) -> float",
    "H(token | position) in nats for tokens [N, T]: the mean over positions of the entropy of the tokens seen "
    "there, the lowest mean NLL a model that ignores the tokens can reach on them",
    _entropy_calls,
    closed_form(("entropy",), lambda c: (_entropy(*c.args),), [
        Mistake("bits", "the entropy in bits (log₂) instead of nats (ln), the unit of the NLL",
                lambda c: (_entropy(*c.args, base=2.0),)),
        Mistake("pooled", "the entropy of all the tokens pooled, which ignores the positions",
                lambda c: (_entropy(*c.args, pooled=True),)),
        Mistake("summed", "the sum over positions instead of the mean",
                lambda c: (_entropy(*c.args, summed=True),)),
    ]),
    entropy_stub,
)


EXERCISES = [LOG_SOFTMAX, LOGPROBS_BACKWARD, SEQUENCE_LOGPROBS, GELU_BACKWARD, LAYERNORM_BACKWARD,
             ATTENTION_BACKWARD, SFT_LOSS, REWARD_METRICS, FIXED_EMBEDDING, POSITION_ENTROPY]
