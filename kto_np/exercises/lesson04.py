"""Lesson 04's exercises (tutorials/04_backprop_through_the_transformer.py): backward passes: GELU, LayerNorm and
causal attention.

Each exercise lists its inputs (`calls`), its reference and the typical mistakes its grader names; the
machinery (Exercise, Call, the judges, grade()) is in kit.py and registry.py.
"""

from __future__ import annotations

import numpy as np

from .kit import Call, Exercise, Mistake, closed_form, fd_vjp

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


EXERCISES = [GELU_BACKWARD, LAYERNORM_BACKWARD, ATTENTION_BACKWARD]
