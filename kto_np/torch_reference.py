"""An independent PyTorch twin of kto_np's model and losses: the check the tests, the benchmark and
tutorial 05 compare kto_np against.

Written from the formulas with plain torch ops (explicit attention, no fused kernels), autograd for
every gradient, and nothing from kto_np's NumPy code: a shared mistake cannot hide in both. Torch is
an optional extra and is imported inside each function, so importing this module never needs it.

    logits = gpt2_logits(params, tokens, num_heads=NH)                  # [B, T, V]
    logps = sequence_logps(logits, tokens, completion_mask)             # [B]
    loss = kto_loss(logps, ref_logps, labels, 0.1, kl_policy_logps=..., kl_ref_logps=...)

The model is the dropout-off one (evaluation, or dropout 0): dropout draws different masks in each
library, so there is nothing to compare. Shape letters: B batch, T time, C channels, V vocabulary,
NH heads, HS head size.
"""

from __future__ import annotations

import math

__all__ = ["KTO_VARIANTS", "dpo_loss", "gpt2_logits", "kto_loss", "require_torch", "sequence_logps",
           "sinusoidal_positions"]

KTO_VARIANTS = ("kto", "edifice", "apo_zero_unpaired")
INSTALL_HINT = "pip install -e '.[torch]' (a CPU build such as torch==2.13.0 is enough)"


def require_torch():
    """The torch module, or an ImportError that says how to install it."""
    try:
        import torch  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(f"kto_np.torch_reference needs PyTorch, an optional extra: {INSTALL_HINT}") from exc
    return torch


def _require_tensors(function: str, **arrays):
    """A TypeError naming the argument unless every given array is a torch tensor (NumPy input is
    refused rather than half converted)."""
    torch = require_torch()
    for name, value in arrays.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"torch_reference.{function}: {name} must be a torch tensor, got {type(value).__name__}")
    return torch


def sinusoidal_positions(num_positions: int, hidden_size: int, *, dtype=None, device=None):
    """PE[pos, 2i] = sin(pos / 10000^(2i / C)), PE[pos, 2i + 1] = cos(pos / 10000^(2i / C)): [T, C].

    Computed in float64, then cast to `dtype`.
    """
    torch = require_torch()
    position = torch.arange(num_positions, dtype=torch.float64, device=device)[:, None]  # [T, 1]
    frequency_base = torch.pow(10000.0, torch.arange(0, hidden_size, 2, dtype=torch.float64, device=device)
                               / hidden_size)  # [ceil(C / 2)]: 10000^(2i / C)
    table = torch.zeros(num_positions, hidden_size, dtype=torch.float64, device=device)
    table[:, 0::2] = torch.sin(position / frequency_base)
    table[:, 1::2] = torch.cos(position / frequency_base[: hidden_size // 2])
    return table if dtype is None else table.to(dtype)


def gpt2_logits(params: dict, tokens, *, num_heads: int, positional: str = "learned",
                tie_embeddings: bool = True, layer_norm_eps: float = 1e-5):
    """GPT-2 forward: tokens [B, T] int64 -> logits [B, T, V]. params: kto_np's names -> tensors.

    x = wte[tokens] + positions; per block (pre-LN):
        x = x + c_proj(causal_attention(ln_1(x))),  x = x + mlp_c_proj(gelu_tanh(c_fc(ln_2(x))));
    logits = ln_f(x) @ head^T, head = wte (tie_embeddings) or lm_head. Linear weights are [in, out].
    positional: "learned" (rows of wpe.weight) or "sinusoidal" (fixed table, no parameter).
    """
    torch = _require_tensors("gpt2_logits", tokens=tokens, **{"params['wte.weight']": params["wte.weight"]})
    F = torch.nn.functional
    if positional not in ("learned", "sinusoidal"):
        raise ValueError(f"positional must be 'learned' or 'sinusoidal', got {positional!r}")
    B, T = tokens.shape
    wte = params["wte.weight"]  # [V, C]
    C = wte.shape[1]
    HS = C // num_heads
    num_layers = sum(1 for name in params if name.endswith(".ln_1.weight"))
    if positional == "learned":
        positions = params["wpe.weight"][:T]  # [T, C]
    else:
        positions = sinusoidal_positions(T, C, dtype=wte.dtype, device=wte.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()  # [T, T]: key <= query
    x = wte[tokens] + positions  # [B, T, C]
    for layer in range(num_layers):
        p = f"h.{layer}."
        h = F.layer_norm(x, (C,), params[p + "ln_1.weight"], params[p + "ln_1.bias"], layer_norm_eps)
        qkv = h @ params[p + "attn.c_attn.weight"] + params[p + "attn.c_attn.bias"]  # [B, T, 3C]
        q, k, v = (part.view(B, T, num_heads, HS).transpose(1, 2) for part in qkv.split(C, dim=-1))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(HS))  # [B, NH, T, T]
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        y = (probs @ v).transpose(1, 2).reshape(B, T, C)  # heads side by side
        x = x + y @ params[p + "attn.c_proj.weight"] + params[p + "attn.c_proj.bias"]
        h = F.layer_norm(x, (C,), params[p + "ln_2.weight"], params[p + "ln_2.bias"], layer_norm_eps)
        h = F.gelu(h @ params[p + "mlp.c_fc.weight"] + params[p + "mlp.c_fc.bias"], approximate="tanh")
        x = x + h @ params[p + "mlp.c_proj.weight"] + params[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (C,), params["ln_f.weight"], params["ln_f.bias"], layer_norm_eps)
    head = wte if tie_embeddings else params["lm_head.weight"]  # [V, C]
    return x @ head.T


def sequence_logps(logits, tokens, mask, shift: int = 1):
    """sum_{t >= shift} mask[b, t] log_softmax(logits[b, t - shift])[tokens[b, t]]: [B, T, V] -> [B].

    shift=1: a language model's logits at t score token t + 1 (completion log-probs); shift=0: the
    logits are already aligned with the tokens.
    """
    _require_tensors("sequence_logps", logits=logits, tokens=tokens, mask=mask)
    T = logits.shape[1]
    token_logps = logits[:, :T - shift].log_softmax(dim=-1).gather(-1, tokens[:, shift:, None])[..., 0]
    return (token_logps * mask[:, shift:]).sum(dim=1)


def kto_loss(policy_logps, ref_logps, labels, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0,
             kl_policy_logps=None, kl_ref_logps=None, *, variant: str = "kto", stop_z_grad: bool = False):
    """Mean KTO loss over the batch [B] -> scalar; r = policy_logps - ref_logps, labels True = desirable.

    "kto" (paper, TRL): z = max(0, mean(kl_policy - kl_ref)) detached (0 without KL rows);
        desirable λ_D (1 - σ(β (r - z))), undesirable λ_U (1 - σ(β (z - r))).
    "edifice": kl = β r, z = mean(kl) (detached only with stop_z_grad);
        desirable -λ_D σ(kl - z), undesirable -λ_U σ(-(kl - z)).
    "apo_zero_unpaired": desirable λ_D (1 - σ(β r)), undesirable λ_U σ(β r).
    """
    torch = _require_tensors("kto_loss", policy_logps=policy_logps, ref_logps=ref_logps, labels=labels)
    if variant not in KTO_VARIANTS:
        raise ValueError(f"variant must be one of {KTO_VARIANTS}, got {variant!r}")
    labels = labels if labels.dtype == torch.bool else labels.bool()
    r = policy_logps - ref_logps  # [B]
    if variant == "kto":
        z = torch.zeros((), dtype=r.dtype, device=r.device)
        if kl_policy_logps is not None:
            z = (kl_policy_logps - kl_ref_logps).mean().clamp(min=0).detach()
        desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - z)))
        undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z - r)))
    elif variant == "edifice":
        kl = beta * r
        z = kl.mean().detach() if stop_z_grad else kl.mean()
        desirable = -desirable_weight * torch.sigmoid(kl - z)
        undesirable = -undesirable_weight * torch.sigmoid(-(kl - z))
    else:
        desirable = desirable_weight * (1 - torch.sigmoid(beta * r))
        undesirable = undesirable_weight * torch.sigmoid(beta * r)
    return torch.where(labels, desirable, undesirable).mean()


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1):
    """mean -log σ(β ((π_c - ref_c) - (π_r - ref_r))) over the pairs [B] -> scalar."""
    torch = _require_tensors("dpo_loss", policy_chosen_logps=policy_chosen_logps)
    h = beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
    return -torch.nn.functional.logsigmoid(h).mean()
