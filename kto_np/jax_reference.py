"""A jax.numpy twin of kto_np's GPT-2 and KTO training step: the benchmark's second peer (jax.jit on the CPU).

Written from the formulas with plain jax.numpy (explicit attention, gradients by jax.grad), and nothing
from kto_np's NumPy code, as kto_np.torch_reference is for PyTorch. JAX is an optional extra and is
imported inside each function, so importing this module never needs it.

    logits = gpt2_logits(params, tokens, num_heads=NH)                  # [B, T, V]
    logps = sequence_logps(logits, tokens, completion_mask)             # [B]
    step = make_kto_step(num_heads=NH, hyper=bench.HYPER)               # jax.jit of one whole step
    params, state, loss = step(params, ref_params, state, batch)

One step is the benchmark's (kto_np.bench): reference forwards on the matched and KL rows and the
policy's forward on the KL rows (no gradient), the policy's forward and backward on the matched rows,
the KTO loss (variant "kto", z detached), AdamW (decoupled weight decay on the matrices, as
kto_np.optim's default decay mask). Dropout is not modelled (the benchmark runs with dropout 0).
JAX computes in float32 unless its 64-bit mode is on (JAX_ENABLE_X64=1).

Shape letters: B batch, T time, C channels, V vocabulary, NH heads, HS head size.
"""

from __future__ import annotations

import math

__all__ = ["adamw_init", "gpt2_logits", "kto_loss", "make_kto_step", "require_jax", "sequence_logps"]

INSTALL_HINT = "pip install -e '.[jax]' (a CPU build such as jax==0.10.2 jaxlib==0.10.2 is enough)"


def require_jax():
    """The jax module, or an ImportError that says how to install it."""
    try:
        import jax  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(f"kto_np.jax_reference needs JAX, an optional extra: {INSTALL_HINT}") from exc
    return jax


def _layer_norm(x, weight, bias, eps):
    import jax.numpy as jnp  # noqa: PLC0415

    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * weight + bias


def _gelu_tanh(x):
    import jax.numpy as jnp  # noqa: PLC0415

    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def gpt2_logits(params: dict, tokens, *, num_heads: int, layer_norm_eps: float = 1e-5):
    """GPT-2 forward (learned positions, tied head): tokens [B, T] int -> logits [B, T, V].

    x = wte[tokens] + wpe[:T]; per block (pre-LN):
        x = x + c_proj(causal_attention(ln_1(x))),  x = x + mlp_c_proj(gelu_tanh(c_fc(ln_2(x))));
    logits = ln_f(x) @ wte^T. Linear weights are [in, out] (GPT-2's Conv1D), as kto_np's.
    """
    require_jax()
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    B, T = tokens.shape
    wte = params["wte.weight"]  # [V, C]
    C = wte.shape[1]
    HS = C // num_heads
    num_layers = sum(1 for name in params if name.endswith(".ln_1.weight"))
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))  # [T, T]: key <= query
    x = wte[tokens] + params["wpe.weight"][:T]  # [B, T, C]
    for layer in range(num_layers):
        p = f"h.{layer}."
        h = _layer_norm(x, params[p + "ln_1.weight"], params[p + "ln_1.bias"], layer_norm_eps)
        qkv = h @ params[p + "attn.c_attn.weight"] + params[p + "attn.c_attn.bias"]  # [B, T, 3C]
        q, k, v = (part.reshape(B, T, num_heads, HS).transpose(0, 2, 1, 3) for part in jnp.split(qkv, 3, axis=-1))
        scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(HS))  # [B, NH, T, T]
        probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        y = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, C)  # heads side by side
        x = x + y @ params[p + "attn.c_proj.weight"] + params[p + "attn.c_proj.bias"]
        h = _layer_norm(x, params[p + "ln_2.weight"], params[p + "ln_2.bias"], layer_norm_eps)
        h = _gelu_tanh(h @ params[p + "mlp.c_fc.weight"] + params[p + "mlp.c_fc.bias"])
        x = x + h @ params[p + "mlp.c_proj.weight"] + params[p + "mlp.c_proj.bias"]
    x = _layer_norm(x, params["ln_f.weight"], params["ln_f.bias"], layer_norm_eps)
    return x @ wte.T


def sequence_logps(logits, tokens, mask):
    """sum_{t >= 1} mask[b, t] log_softmax(logits[b, t - 1])[tokens[b, t]]: [B, T, V] -> [B]."""
    require_jax()
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    token_logps = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], axis=-1), tokens[:, 1:, None],
                                      axis=-1)[..., 0]
    return (token_logps * mask[:, 1:]).sum(axis=1)


def kto_loss(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta=0.1, desirable_weight=1.0,
             undesirable_weight=1.0):
    """Mean KTO loss (variant "kto", paper and TRL): r = policy - ref, z = max(0, mean(kl_policy - kl_ref))
    detached; desirable λ_D (1 - σ(β (r - z))), undesirable λ_U (1 - σ(β (z - r)))."""
    require_jax()
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    r = policy_logps - ref_logps
    z = jax.lax.stop_gradient(jnp.maximum((kl_policy_logps - kl_ref_logps).mean(), 0.0))
    desirable = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (r - z)))
    undesirable = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z - r)))
    return jnp.where(labels == 1, desirable, undesirable).mean()


def adamw_init(params: dict) -> dict:
    """AdamW state: step 0 and zero moments like params."""
    require_jax()
    import jax.numpy as jnp  # noqa: PLC0415

    return {"step": jnp.zeros((), dtype=jnp.int32), "m": {k: jnp.zeros_like(v) for k, v in params.items()},
            "v": {k: jnp.zeros_like(v) for k, v in params.items()}}


def make_kto_step(*, num_heads: int, hyper: dict, donate: bool = True):
    """jax.jit of one benchmark step: (params, ref_params, state, batch) -> (params, state, loss).

    batch: a dict of tokens, completion_mask, kl_tokens, kl_completion_mask, labels. hyper: kto_np.bench's
    HYPER (beta, weights, lr, betas, eps, weight_decay). donate=True lets XLA update params and state in
    place (the arrays passed in are consumed).
    """
    jax = require_jax()
    import jax.numpy as jnp  # noqa: PLC0415

    beta1, beta2 = hyper["betas"]
    lr, eps, weight_decay = hyper["lr"], hyper["eps"], hyper["weight_decay"]

    def logps(params, tokens, mask):
        return sequence_logps(gpt2_logits(params, tokens, num_heads=num_heads), tokens, mask)

    def loss_fn(params, ref_params, batch):
        ref = jax.lax.stop_gradient(logps(ref_params, batch["tokens"], batch["completion_mask"]))
        kl_ref = jax.lax.stop_gradient(logps(ref_params, batch["kl_tokens"], batch["kl_completion_mask"]))
        kl_policy = jax.lax.stop_gradient(logps(params, batch["kl_tokens"], batch["kl_completion_mask"]))
        policy = logps(params, batch["tokens"], batch["completion_mask"])
        return kto_loss(policy, ref, batch["labels"], kl_policy, kl_ref, hyper["beta"], hyper["desirable_weight"],
                        hyper["undesirable_weight"])

    def step(params, ref_params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, ref_params, batch)
        t = state["step"] + 1
        bias_correction1 = 1.0 - beta1 ** t.astype(jnp.float32)
        bias_correction2 = 1.0 - beta2 ** t.astype(jnp.float32)
        new_params, new_m, new_v = {}, {}, {}
        for name, param in params.items():
            grad = grads[name]
            m = beta1 * state["m"][name] + (1.0 - beta1) * grad
            v = beta2 * state["v"][name] + (1.0 - beta2) * grad * grad
            if param.ndim >= 2:  # decoupled weight decay on the matrices
                param = param * (1.0 - lr * weight_decay)
            denom = jnp.sqrt(v) / jnp.sqrt(bias_correction2) + eps
            new_params[name] = (param - (lr / bias_correction1) * m / denom).astype(param.dtype)
            new_m[name], new_v[name] = m.astype(param.dtype), v.astype(param.dtype)
        return new_params, {"step": t, "m": new_m, "v": new_v}, loss

    return jax.jit(step, donate_argnums=(0, 2) if donate else ())
