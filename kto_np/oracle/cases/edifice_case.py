"""The oracle's model-level case for Edifice's backbone: weights under Axon's names, the seed's
unshifted compute_logprobs contract and its KTO loss, with every expected number in float64.

edifice_model_case_arrays(seed) builds one deterministic case, as Edifice/Axon users would compute it:

    logits = Edifice.Meta.KTO.build(vocab_size: 11, hidden_size: 12, num_heads: 3, num_layers: 2)(tokens)
    logps  = compute_logprobs(logits, targets, mask)       no shift: logits[:, t] score targets[:, t]
    loss   = kto_loss(logps, ref_logps, labels, beta: 0.5, desirable_weight: 1.0, undesirable_weight: 1.2)
    grads  = dloss / d every parameter (Axon's "<layer>.<param>" names)

The oracle's kind model_edifice (oracle/cases/reference.py) stores these arrays as its two cases (seed 0 fixed,
seed 1 learned); docs/oracle/kinds.md ("model_edifice") describes them.

The weights are Axon's default initialisation plus 0.1 N(0, 1) noise (so biases and betas are not
zero and every path carries gradient); dropout is off (inference mode).
"""

from __future__ import annotations

import numpy as np

from ...backend import to_numpy
from ...edifice import Edifice, EdificeConfig
from ...logprobs import logprobs_backward, logprobs_forward
from ...losses import kto_loss_and_grad
from ...validation import check_choice, check_positive_int

__all__ = ["edifice_model_case_arrays"]

CASE_SHAPE = {"vocab_size": 11, "hidden_size": 12, "num_heads": 3, "num_layers": 2, "max_seq_len": 8}
CASE_LOSS = {"variant": "edifice", "beta": 0.5, "desirable_weight": 1.0, "undesirable_weight": 1.2}
BATCH, TIME, PROMPT = 4, 6, 2


def edifice_model_case_arrays(seed: int = 0, token_embedding: str = "fixed") -> dict:
    """One model-level case for Edifice's network, float64 and deterministic in `seed`.

    Returns {"config": EdificeConfig.to_dict(), "loss_options": {variant, beta, desirable_weight,
    undesirable_weight}, "weights": {"<layer>.<param>": array}, "tokens" [B, T] int64, "targets"
    [B, T] int64 (the next token; the last position is masked), "mask" [B, T] (completion tokens, 0 on
    the prompt and on padding), "labels" [B] int64, "ref_logps" [B], "expected": {"logits" [B, T, V],
    "logps" [B], "loss" float, "grads": {"<layer>.<param>": array}}} with B=4, T=6, V=11.
    token_embedding="fixed" is Edifice's network; "learned" the repaired one (adds token_embed.kernel).
    """
    seed = check_positive_int("seed", seed, minimum=0)
    check_choice("token_embedding", token_embedding, ("fixed", "learned"))
    config = EdificeConfig(**CASE_SHAPE, dropout=0.0, dtype="float64", token_embedding=token_embedding)
    model = Edifice(config)
    rng = np.random.default_rng([seed, 11])
    weights = {name: np.asarray(to_numpy(value)) + 0.1 * rng.standard_normal(value.shape)
               for name, value in model.init(seed).items()}
    tokens = rng.integers(0, config.vocab_size, (BATCH, TIME))
    targets = np.concatenate([tokens[:, 1:], np.zeros((BATCH, 1), dtype=tokens.dtype)], axis=1)
    mask = np.zeros((BATCH, TIME))
    mask[:, PROMPT - 1:TIME - 1] = 1.0  # the logits at t score token t + 1: the completion is tokens[PROMPT:]
    mask[1, 4:] = mask[3, 3:] = 0.0  # two shorter completions (right padding)
    labels = np.array([1, 0, 1, 0])

    logits, model_cache = model.forward(weights, tokens)
    logps, logprobs_cache = logprobs_forward(logits, targets, mask)
    ref_logps = logps + 0.3 * rng.standard_normal(BATCH)  # a reference near the policy
    loss, dlogps, _ = kto_loss_and_grad(logps, ref_logps, labels, CASE_LOSS["beta"], CASE_LOSS["desirable_weight"],
                                        CASE_LOSS["undesirable_weight"], variant=CASE_LOSS["variant"],
                                        warn_balance=False)
    grads = model.backward(logprobs_backward(dlogps, logprobs_cache), model_cache)
    return {
        "config": config.to_dict(),
        "loss_options": dict(CASE_LOSS),
        "weights": weights,
        "tokens": tokens.astype(np.int64),
        "targets": targets.astype(np.int64),
        "mask": mask,
        "labels": labels.astype(np.int64),
        "ref_logps": np.asarray(ref_logps, dtype=np.float64),
        "expected": {
            "logits": np.asarray(to_numpy(logits)),
            "logps": np.asarray(to_numpy(logps)),
            "loss": float(loss),
            "grads": {name: np.asarray(to_numpy(g)) for name, g in grads.items()},
        },
    }
