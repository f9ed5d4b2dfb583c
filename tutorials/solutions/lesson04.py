"""Lesson 04: backpropagation through the transformer."""

import numpy as np


def gelu_backward(dout, x):
    """04.gelu_backward: the product rule on 0.5 x (1 + tanh(a)), a = √(2/π)(x + 0.044715 x³)."""
    c = np.sqrt(2.0 / np.pi)
    t = np.tanh(c * (x + 0.044715 * x ** 3))
    da_dx = c * (1.0 + 3.0 * 0.044715 * x ** 2)
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t ** 2) * da_dx)


def layernorm_backward(dout, x, gamma, eps):
    """04.layernorm_backward: with x̂ = (x − mean) rstd and g = dout gamma,
    dx = rstd (g − mean(g) − x̂ mean(g x̂)), dgamma = Σ dout x̂, dbeta = Σ dout."""
    mean = x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
    x_hat = (x - mean) * rstd
    g = dout * gamma
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - x_hat * (g * x_hat).mean(axis=-1, keepdims=True))
    C = x.shape[-1]
    return dx, (dout * x_hat).reshape(-1, C).sum(axis=0), dout.reshape(-1, C).sum(axis=0)


def attention_backward(dout, q, k, v):
    """04.attention_backward: recompute P = softmax(S), S = q kᵀ / √HS (causal), then
    dv = Pᵀ dout, dP = dout vᵀ, dS = P (dP − Σ_j P dP), dq = dS k / √HS, dk = dSᵀ q / √HS."""
    T, hs = q.shape[-2], q.shape[-1]
    scale = 1.0 / np.sqrt(hs)
    scores = q @ np.swapaxes(k, -1, -2) * scale
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    dv = np.swapaxes(p, -1, -2) @ dout
    dp = dout @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
    return ds @ k * scale, np.swapaxes(ds, -1, -2) @ q * scale, dv
