"""The gradcheck suite behind `kto-np gradcheck`: every hand-written gradient of the package against
central finite differences in float64 — compute_logprobs, the shifted helper, every KTO variant, DPO,
and the whole model (every parameter tensor, through every variant and architecture).

The measure and the finite differences are the core's (kto_np.gradcheck); this module only builds
the inputs and calls them.
"""

from __future__ import annotations

import numpy as np

from . import dpo, logprobs, losses, step
from .architectures import build
from .backend import to_numpy
from .gradcheck import DEFAULT_TOLERANCE, GradCheckRow, check_gradients
from .losses import KTOConfig

__all__ = ["loss_and_logprob_checks", "model_checks"]


def loss_and_logprob_checks(seed: int = 0, tolerance: float = DEFAULT_TOLERANCE) -> list[GradCheckRow]:
    """Finite-difference checks of compute_logprobs, the shifted helper and every loss variant.

    Random float64 inputs from `seed`; one row per function and option.
    """
    rng = np.random.default_rng(seed)
    rows: list[GradCheckRow] = []

    B, T, V = 3, 5, 7
    logits = 2.0 * rng.standard_normal((B, T, V))
    targets = rng.integers(0, V, (B, T))
    mask = (rng.random((B, T)) > 0.25).astype(np.float64)
    upstream = rng.standard_normal(B)
    for name, forward, backward in [
        ("compute_logprobs", logprobs.logprobs_forward, logprobs.logprobs_backward),
        ("sequence_logprobs", logprobs.sequence_logprobs_forward, logprobs.sequence_logprobs_backward),
    ]:
        analytic = backward(upstream, forward(logits, targets, mask)[1])
        rows += check_gradients(
            lambda forward=forward: float(upstream @ forward(logits, targets, mask)[0]),
            {f"{name} d/dlogits": logits}, {f"{name} d/dlogits": analytic},
            tolerance=tolerance, max_full_size=B * T * V,
        )

    n = 6
    policy = -5.0 + rng.standard_normal(n)
    ref = policy + 0.5 * rng.standard_normal(n)
    labels = np.array([1, 0, 1, 1, 0, 0])
    kl_policy = -6.0 + rng.standard_normal(n)
    kl_ref = kl_policy - np.abs(rng.standard_normal(n))  # positive KL estimate: the clamp is inactive
    cases = [
        ("edifice", dict(variant="edifice")),
        ("edifice stop_z_grad", dict(variant="edifice", stop_z_grad=True)),
        ("kto, no KL pairs", dict(variant="kto")),
        ("kto, KL pairs", dict(variant="kto", kl_policy_logps=kl_policy, kl_ref_logps=kl_ref)),
        ("apo_zero_unpaired", dict(variant="apo_zero_unpaired")),
    ]
    for label, kwargs in cases:
        kwargs = dict(beta=0.5, desirable_weight=1.0, undesirable_weight=1.2, warn_balance=False, **kwargs)
        _, grad, _ = losses.kto_loss_and_grad(policy, ref, labels, **kwargs)
        name = f"kto_loss[{label}] d/dpolicy_logps"
        if kwargs.get("stop_z_grad"):
            loss_fn = _edifice_loss_with_frozen_z(policy, ref, labels, **kwargs)
        else:
            loss_fn = lambda kwargs=kwargs: losses.kto_loss(policy, ref, labels, **kwargs)  # noqa: E731
        rows += check_gradients(loss_fn, {name: policy}, {name: grad}, tolerance=tolerance)

    chosen, rejected = policy[:3].copy(), policy[3:].copy()
    ref_chosen, ref_rejected = ref[:3], ref[3:]
    _, (grad_chosen, grad_rejected), _ = dpo.dpo_loss_and_grad(chosen, rejected, ref_chosen, ref_rejected, 0.5)
    rows += check_gradients(
        lambda: dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.5),
        {"dpo_loss d/dpolicy_chosen": chosen, "dpo_loss d/dpolicy_rejected": rejected},
        {"dpo_loss d/dpolicy_chosen": grad_chosen, "dpo_loss d/dpolicy_rejected": grad_rejected},
        tolerance=tolerance,
    )
    return rows


def _edifice_loss_with_frozen_z(policy, ref, labels, *, beta, desirable_weight, undesirable_weight, **_):
    """The edifice loss as a function of policy with z held at its current value: the function whose
    gradient kto_loss_and_grad(..., stop_z_grad=True) returns."""
    z = float(np.mean(beta * (policy - ref)))
    desirable = np.asarray(labels) == 1

    def loss() -> float:
        reward = beta * (policy - ref) - z
        per_example = np.where(desirable, -desirable_weight * losses.sigmoid(reward),
                               -undesirable_weight * losses.sigmoid(-reward))
        return float(np.mean(per_example))

    return loss


def model_checks(seed: int = 0, variant: str = "kto", tolerance: float = 1e-6, *, positional: str = "learned",
                 tie_embeddings: bool = True, architecture: str = "gpt2",
                 token_embedding: str = "fixed") -> list[GradCheckRow]:
    """End to end: the gradient of the KTO loss w.r.t. every parameter of a small GPT-2 (or, with
    architecture="edifice", Edifice's backbone with its `token_embedding`), through the model, the
    shifted completion log-probs and the loss `variant` (step.kto_step), against finite differences.

    Config V=11, C=12, NH=3, L=2, T=6, B=4 in float64; prompts of 2 tokens, right padding on two rows.
    """
    rng = np.random.default_rng(seed)
    options = (dict(positional=positional, tie_embeddings=tie_embeddings) if architecture == "gpt2"
               else dict(architecture=architecture, token_embedding=token_embedding))
    model = build(hidden_size=12, num_layers=2, num_heads=3, vocab_size=11, dropout=0.0, max_seq_len=8,
                  dtype="float64", **options)
    params = model.init(seed)
    params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}  # off the init's symmetry
    tokens = rng.integers(1, 11, (4, 6))
    completion_lengths = [4, 3, 4, 2]  # rows 1 and 3 end in padding
    batch = step.make_batch([row[:2].tolist() for row in tokens],
                            [row[2:2 + n].tolist() for row, n in zip(tokens, completion_lengths)],
                            [1, 0, 1, 0], dtype="float64")
    ref_logps = step.forward_logps(model, params, batch.tokens, batch.completion_mask) + 0.3 * rng.standard_normal(4)
    # kl_ref below the policy's KL-row log-probs: z > 0, so the clamp is inactive
    kl_ref_logps = step.forward_logps(model, params, batch.kl_tokens, batch.kl_completion_mask) - 0.5
    config = KTOConfig(variant, beta=0.5, desirable_weight=1.0, undesirable_weight=1.2)
    _, _, grads = step.kto_step(model, params, batch, ref_logps, kl_ref_logps, config)
    # z is detached in "kto": the function differentiated holds the KL rows' policy log-probs fixed.
    kl_policy_logps, kl_ref = None, None
    if config.uses_kl_pairs:
        kl_policy_logps = step.forward_logps(model, params, batch.kl_tokens, batch.kl_completion_mask)
        kl_ref = kl_ref_logps

    def loss() -> float:
        logps = step.forward_logps(model, params, batch.tokens, batch.completion_mask)
        return config.loss_and_grad(logps, ref_logps, batch.labels, kl_policy_logps, kl_ref)[0]

    rows = check_gradients(loss, params, grads, tolerance=tolerance, seed=seed)
    if architecture == "edifice":
        # Some of Edifice's gradients are tiny or exactly 0: a key bias adds q . b_k to every score of a
        # query's row, which the softmax (its +1e-8 variant too, since the row max moves with it) ignores,
        # and with the fixed embedding every position's keys are alike, so the q and k weights get ~1e-5.
        # Finite differences cannot resolve those to 1e-6 of themselves (their noise is ~1e-11), so a
        # tensor's error is measured against at least 1e-3 of the model's largest gradient entry
        # ("floor" rows). A wrong gradient of such a tensor is still off by about its own size.
        floor = 1e-3 * max(float(np.max(np.abs(to_numpy(g)))) for g in grads.values())
        rows = [GradCheckRow(r.name, r.shape, "floor", r.max_abs_error, r.max_abs_error / floor, r.tolerance)
                if r.rel_error == 0.0 or r.max_abs_error / r.rel_error < floor else r for r in rows]
    return rows
