"""One training step, from token ids to the gradient of every parameter: the tensor batch, the KL
rows (the one rotation of completions), the reference log-probabilities, the KTO step and the SFT step.

    tokens [B, T] --model.forward--> logits [B, T, V] --sequence_logprobs--> logps [B]
    --KTO loss--> dL/dlogps [B] --logprobs backward--> dL/dlogits [B, T, V] --model.backward--> grads

That is the reading edition's step, and the public completion_logps' always. A fast GPT
(build(..., fast=True)) gives the same numbers while skipping what the loss never reads:

    without dropout:  tokens --kto_np.fast.packed (each row to its last scored position, rows end to end)
                      --> x_final [M, C] --kto_np.fast.head (the logits where a completion token is scored
                      only, [N, V])--> logps [B]
    with dropout:     tokens --GPT.body_forward (whole rows: the reading edition's dropout masks)
                      --> x_final [B, T, C] --kto_np.fast.head--> logps [B]

Shape letters: B batch, T the longest prompt + completion row, T' the longest KL row, V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import logprobs
from .architectures import Model
from .backend import array_module, asarray, resolve_dtype, to_module
from .fast import head as fast_head
from .fast import logprobs as fast_logprobs
from .fast import packed as fast_packed
from .losses import KTOConfig
from .model import GPT
from .validation import as_float_array, check_bool, check_finite, check_positive_int, check_rng, reject_autograd

__all__ = [
    "KL_ROTATION",
    "Batch",
    "KTOConfig",
    "completion_logps",
    "forward_logps",
    "kl_partner_indices",
    "kto_dlogits",
    "kto_step",
    "make_batch",
    "reference_logps",
    "sft_step",
]

# KL row i pairs prompt i with the completion of example (i + KL_ROTATION) mod B: -1 is TRL's
# rotation (completions [c_{B-1}, c_0, ..., c_{B-2}]); HALOs and OpenRLHF use +1.
KL_ROTATION = -1


class Batch(NamedTuple):
    """A batch: matched rows (prompt i + completion i) and KL rows (prompt i + completion of
    example (i + rotation) mod B). Arrays belong to the selected backend; the strings are optional
    (data.collate fills them, synthetic batches leave them empty)."""

    tokens: object              # [B, T]  int64, right-padded with pad_id
    completion_mask: object     # [B, T]  float, 1 on completion tokens
    labels: object              # [B]     int64, 1 desirable, 0 undesirable
    kl_tokens: object           # [B, T'] int64, prompt i + completion (i + rotation) mod B
    kl_completion_mask: object  # [B, T'] float
    prompts: tuple = ()         # B prompt strings
    completions: tuple = ()     # B completion strings
    kl_completions: tuple = ()  # B completion strings of the KL rows


def kl_partner_indices(batch_size: int, rotation: int = KL_ROTATION) -> np.ndarray:
    """For each prompt i, the example whose completion it is paired with for the KL estimate:
    j = (i + rotation) mod B, so j != i for every i and each completion is used once, when B > 1 and
    rotation is not a multiple of B. A batch of one has no mismatched pair: ValueError."""
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 for KL pairs (a batch of one has no mismatched pair: "
                         f"its only KL row would be the example itself), got {batch_size}")
    return (np.arange(batch_size) + rotation) % batch_size


def _pad_rows(prompt_ids, completion_ids, length, pad_id: int, dtype, row_name: str):
    """Right-padded tokens [B, T] and completion mask [B, T] for rows prompt + completion."""
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    if length is None:
        length = max(lengths)
    elif max(lengths) > length:
        raise ValueError(f"max_len must be >= the longest {row_name} ({max(lengths)} tokens), got {length}")
    tokens = np.full((len(lengths), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(lengths), length), dtype=dtype)
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        tokens[b, : len(p) + len(c)] = list(p) + list(c)
        mask[b, len(p): len(p) + len(c)] = 1
    return tokens, mask


_MAX_ID = (1 << 62) - 1  # ids are stored as int64


def _check_id_lists(name: str, rows) -> list[list[int]]:
    """Each row a sequence of non-negative integer ids, returned as plain ints."""
    checked = []
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not hasattr(row, "__iter__"):
            raise TypeError(f"{name}[{i}] must be a list of ids, got {type(row).__name__}")
        ids = []
        for token in row:
            if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
                raise TypeError(f"{name}[{i}] must hold integer ids, got {type(token).__name__} {token!r}")
            if not 0 <= int(token) <= _MAX_ID:
                raise ValueError(f"{name}[{i}] ids must be in [0, {_MAX_ID}], got {int(token)}")
            ids.append(int(token))
        checked.append(ids)
    return checked


def _check_rows(prompt_ids, completion_ids, labels, rotation) -> None:
    for name, rows in (("prompt_ids", prompt_ids), ("completion_ids", completion_ids)):
        if isinstance(rows, (str, bytes)) or not hasattr(rows, "__len__"):
            raise TypeError(f"{name} must be a list of token-id lists, got {type(rows).__name__}")
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids must not be empty, got 0 rows")
    labels = np.asarray(labels)
    if len(completion_ids) != len(prompt_ids) or labels.shape != (len(prompt_ids),):
        raise ValueError(f"prompt_ids, completion_ids and labels must have one entry per example, got "
                         f"{len(prompt_ids)}, {len(completion_ids)} and shape {labels.shape}")
    if labels.dtype.kind not in "biu" or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (undesirable) or 1 (desirable), got {labels.tolist()}")
    if isinstance(rotation, bool) or not isinstance(rotation, (int, np.integer)):
        raise TypeError(f"rotation must be an integer (KL row i pairs with completion i + rotation), "
                        f"got {type(rotation).__name__} {rotation!r}")
    if len(prompt_ids) > 1 and rotation % len(prompt_ids) == 0:
        raise ValueError(f"rotation must not be a multiple of the batch size {len(prompt_ids)}: every KL pair "
                         f"would be matched (prompt i with its own completion), got {rotation}")


def make_batch(prompt_ids, completion_ids, labels, *, pad_id: int = 0, dtype="float32", max_len=None,
               rotation: int = KL_ROTATION, prompts=(), completions=()) -> Batch:
    """A Batch from token-id lists: prompt_ids[i], completion_ids[i] (lists of ints), labels [B].

    Matched row i = prompt i + completion i; KL row i = prompt i + completion kl_partner_indices[i]
    (for B = 1 the KL row is the matched row: usable for SFT and the variants without KL pairs).
    Rows are right-padded with pad_id to the longest row (or max_len). The ids' upper bound (the
    vocabulary) is the model's to check (model.check_tokens); the structure, the ids' type and sign
    and pad_id are checked here.
    """
    reject_autograd("labels", labels)
    _check_rows(prompt_ids, completion_ids, labels, rotation)
    prompt_ids = _check_id_lists("prompt_ids", prompt_ids)
    completion_ids = _check_id_lists("completion_ids", completion_ids)
    pad_id = check_positive_int("pad_id", pad_id, minimum=0)
    if pad_id > _MAX_ID:
        raise ValueError(f"pad_id must be <= {_MAX_ID}, got {pad_id}")
    # a batch of one has no KL pair: its KL row is its matched row, which kto_dlogits refuses to use
    partners = kl_partner_indices(len(prompt_ids), rotation) if len(prompt_ids) > 1 else [0]
    kl_completion_ids = [completion_ids[j] for j in partners]
    np_dtype = resolve_dtype(dtype)
    tokens, mask = _pad_rows(prompt_ids, completion_ids, max_len, pad_id, np_dtype, "prompt + completion")
    kl_tokens, kl_mask = _pad_rows(prompt_ids, kl_completion_ids, max_len, pad_id, np_dtype,
                                   "prompt + KL completion")
    kl_completions = tuple(completions[j] for j in partners) if completions else ()
    return Batch(tokens=asarray(tokens), completion_mask=asarray(mask),
                 labels=asarray(np.asarray(labels, dtype=np.int64)), kl_tokens=asarray(kl_tokens),
                 kl_completion_mask=asarray(kl_mask), prompts=tuple(prompts), completions=tuple(completions),
                 kl_completions=kl_completions)


# ----------------------------------------------------------------------------------------------
# log-probabilities of completions


def _logprob_ops(model):
    """The log-prob op pairs that go with the model's layers: the fast room's for a fast model."""
    return fast_logprobs if model.fast else logprobs


def _scored_logits_only(model) -> bool:
    """Whether the step computes the head only where a completion token is scored: a fast GPT (the fast
    room's head and packed body are written for GPT's parameters). The numbers are those of the full logits."""
    return model.fast and isinstance(model, GPT)


def _completion_logps(model, params: dict, tokens, completion_mask, *, keep_cache: bool, train=False, rng=None,
                      dense=False):
    """Forward + shifted log-probs of the completion tokens, on checked arguments: [B, T] -> [B], and
    the caches that the backward (_completion_grads) needs (None when not keep_cache): (model cache,
    log-prob cache) of the dense path, or a fast GPT's (GPTCache or PackedBodyCache, HeadLogprobsCache)
    (see the module docstring; dense=True takes the dense path for a fast model too)."""
    if _scored_logits_only(model) and not dense:
        if train and model.config.dropout > 0:  # dropout draws its masks over the whole rows
            x_final, model_cache = model.body_forward(params, tokens, train=train, rng=rng, keep_cache=keep_cache)
            row_starts = None
        else:  # the positions the loss reads, rows packed end to end (kto_np.fast.packed)
            spans, row_starts = fast_packed.row_spans(completion_mask)
            x_final, model_cache = fast_packed.body_forward(model, params, tokens, spans, keep_cache=keep_cache)
        logps, head_cache = fast_head.head_logprobs_forward(x_final, model.head_weight(params), tokens,
                                                            completion_mask, row_starts)  # [B]
        return logps, ((model_cache, head_cache) if keep_cache else None)
    logits, model_cache = model.forward(params, tokens, train=train, rng=rng, keep_cache=keep_cache,
                                        check=False)  # [B, T, V]
    logps, logp_cache = _logprob_ops(model).sequence_logprobs_forward(logits, tokens, completion_mask)  # [B]
    return logps, ((model_cache, logp_cache) if keep_cache else None)


def _completion_grads(model, dlogps, caches) -> dict:
    """The gradient of every parameter from dL/dlogps [B], through the caches of _completion_logps:
    the head at the scored positions, then the packed or the whole-row body; or the dense log-prob
    backward, then model.backward."""
    model_cache, logp_cache = caches
    if isinstance(logp_cache, fast_head.HeadLogprobsCache):
        dx_final, dhead_weight = fast_head.head_logprobs_backward(dlogps, logp_cache)
        if isinstance(model_cache, fast_packed.PackedBodyCache):
            return fast_packed.body_backward(model, dx_final, dhead_weight, model_cache)
        return model.body_backward(dx_final, dhead_weight, model_cache)
    dlogits = _logprob_ops(model).sequence_logprobs_backward(dlogps, logp_cache)  # [B, T, V]
    return model.backward(dlogits, model_cache, check=False)


def completion_logps(model, params: dict, tokens, completion_mask, *, train=False, rng=None):
    """Forward + shifted log-probs of the completion tokens: [B, T] -> [B], and the caches
    (model cache, log-prob cache) that model.backward and the log-prob backward need: the dense path
    (every logit), for a fast model too. The model checks params and tokens."""
    logits, model_cache = model.forward(params, tokens, train=train, rng=rng)  # [B, T, V]
    logps, logp_cache = _logprob_ops(model).sequence_logprobs_forward(logits, tokens, completion_mask)  # [B]
    return logps, (model_cache, logp_cache)


def forward_logps(model, params: dict, tokens, completion_mask):
    """Completion log-probs [B] with no gradient (the frozen reference; the policy's KL rows, whose
    z is detached). Keeps no activations: it costs the memory of one layer at a time."""
    model.check_params(params)
    tokens = model.check_tokens(tokens)
    completion_mask = as_float_array("completion_mask", completion_mask, ndim=2)
    if tuple(completion_mask.shape) != tuple(tokens.shape):
        raise ValueError(f"completion_mask must have the shape of tokens {tuple(tokens.shape)}, got "
                         f"{tuple(completion_mask.shape)}")
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite log-probs are reported below, by name
        logps = _completion_logps(model, params, tokens, completion_mask, keep_cache=False)[0]
    check_finite("the log-probabilities (params give non-finite logits)", logps)
    return logps


def reference_logps(model, ref_params: dict, batch: Batch):
    """The frozen reference's log-probs of a batch's matched rows and KL rows: ([B], [B])."""
    _check_model_and_batch(model, ref_params, batch, "ref_params")
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite log-probs are reported below, by name
        ref = _completion_logps(model, ref_params, batch.tokens, batch.completion_mask, keep_cache=False)[0]
        kl_ref = _completion_logps(model, ref_params, batch.kl_tokens, batch.kl_completion_mask,
                                   keep_cache=False)[0]
    check_finite("the reference log-probabilities (ref_params give non-finite logits)",
                 {"matched rows": ref, "KL rows": kl_ref})
    return ref, kl_ref


# ----------------------------------------------------------------------------------------------
# the door of a step: everything a step takes is checked here, once


def _check_model_and_batch(model, params: dict, batch: Batch, params_name: str = "params") -> None:
    """The model is a kto_np Model, params are its own, and the batch's token ids fit its vocabulary and
    context (make_batch checked the rest of the batch)."""
    if not isinstance(model, Model):
        raise TypeError(f"model must be a model from kto_np (build, Edifice), got {type(model).__name__}")
    model.check_params(params, params_name)
    if not isinstance(batch, Batch):
        raise TypeError(f"batch must be a step.Batch (from make_batch or data.collate), got {type(batch).__name__}")
    config = model.config
    for name in ("tokens", "kl_tokens"):
        tokens = getattr(batch, name)
        if int(tokens.max()) >= config.vocab_size:
            raise ValueError(f"batch.{name} must be in [0, {config.vocab_size}) (the model's vocab_size), "
                             f"got ids up to {int(tokens.max())}")
        if tokens.shape[1] > config.max_seq_len:
            raise ValueError(f"batch.{name} has sequence length {tokens.shape[1]}, more than "
                             f"max_seq_len={config.max_seq_len}")


def _check_step(model, params: dict, batch: Batch, train, rng) -> None:
    _check_model_and_batch(model, params, batch)
    if check_bool("train", train) and model.config.dropout > 0:
        check_rng(rng, "train=True and dropout > 0")


def _check_reference(name: str, value, batch_size: int):
    """Reference log-probs [B] as given by reference_logps (a NumPy/CuPy float array, finite)."""
    value = as_float_array(name, value, ndim=1)
    if value.shape[0] != batch_size:
        raise ValueError(f"{name} must have shape ({batch_size},), one per example of the batch, got "
                         f"{tuple(value.shape)}")
    return value


# ----------------------------------------------------------------------------------------------
# the KTO step and the SFT step


def kto_dlogits(model, params: dict, batch: Batch, ref_logps, kl_ref_logps, config: KTOConfig, *,
                train=False, rng=None):
    """The KTO loss of a batch and its gradient w.r.t. the policy's logits:
    (loss, metrics, dlogits [B, T, V], model cache). Checks its arguments, as kto_step."""
    ref_logps, kl_ref_logps = _check_kto_step(model, params, batch, ref_logps, kl_ref_logps, config, train, rng)
    return _kto_dlogits(model, params, batch, ref_logps, kl_ref_logps, config, train, rng)


def _check_kto_step(model, params, batch, ref_logps, kl_ref_logps, config, train, rng):
    _check_step(model, params, batch, train, rng)
    if not isinstance(config, KTOConfig):
        raise TypeError(f"config must be a KTOConfig (from kto_np.losses), got {type(config).__name__}")
    B = batch.tokens.shape[0]
    xp = array_module(*params.values())  # the policy's log-probs live there: the references join them
    ref_logps = to_module(_check_reference("ref_logps", ref_logps, B), xp)
    if config.uses_kl_pairs and kl_ref_logps is not None:
        if B < 2:
            raise ValueError("a KTO step with KL pairs needs a batch of at least 2 examples (a batch of one "
                             "has no mismatched pair), got 1")
        kl_ref_logps = to_module(_check_reference("kl_ref_logps", kl_ref_logps, B), xp)
    else:
        kl_ref_logps = None  # only "kto" uses the KL rows
    return ref_logps, kl_ref_logps


def _kto_dlogits(model, params: dict, batch: Batch, ref_logps, kl_ref_logps, config: KTOConfig, train, rng):
    """kto_dlogits on checked arguments."""
    loss, metrics, dlogps, (model_cache, logp_cache) = _kto_loss(model, params, batch, ref_logps, kl_ref_logps,
                                                                 config, train, rng, dense=True)
    dlogits = _logprob_ops(model).sequence_logprobs_backward(dlogps, logp_cache)
    return loss, metrics, dlogits, model_cache


def _kto_loss(model, params: dict, batch: Batch, ref_logps, kl_ref_logps, config: KTOConfig, train, rng, *,
              dense=False):
    """The KTO loss of a batch and its gradient w.r.t. the policy's log-probs, on checked arguments:
    (loss, metrics, dL/dlogps [B], the caches of the matched rows' forward).

    The KL rows go through a policy forward only (z_ref is detached, so they need no backward), run
    before the policy forward so that its activations are not held meanwhile.
    """
    kl_logps = None
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite loss is reported below, by name
        if kl_ref_logps is not None:  # log-probs only, never dlogits: no dense path needed
            kl_logps, _ = _completion_logps(model, params, batch.kl_tokens, batch.kl_completion_mask,
                                            keep_cache=False)
        logps, caches = _completion_logps(model, params, batch.tokens, batch.completion_mask, keep_cache=True,
                                          train=train, rng=rng, dense=dense)
        check_finite("the policy's log-probabilities (params give non-finite logits)",
                     {"matched rows": logps, **({} if kl_logps is None else {"KL rows": kl_logps})})
        loss, dlogps, metrics = config.loss_and_grad(logps, ref_logps, batch.labels, kl_logps, kl_ref_logps)
    check_finite("the KTO loss", loss)
    return loss, metrics, dlogps, caches


def kto_step(model, params: dict, batch: Batch, ref_logps, kl_ref_logps, config: KTOConfig, *,
             train=False, rng=None):
    """The whole KTO gradient of one batch: (loss, metrics, grads of every policy parameter).

        policy forward -> sequence log-probs [B] -> KTO loss -> dL/dlogps [B]
        -> dL/dlogits [B, T, V] -> model backward -> grads (same keys as params)

    ref_logps, kl_ref_logps: from reference_logps (kl_ref_logps is used by variant "kto" only).
    The arguments are checked here, once; the model, the log-probs and the loss then run unchecked.
    A NaN or infinite loss or gradient raises validation.NonFiniteError.
    """
    ref_logps, kl_ref_logps = _check_kto_step(model, params, batch, ref_logps, kl_ref_logps, config, train, rng)
    loss, metrics, dlogps, caches = _kto_loss(model, params, batch, ref_logps, kl_ref_logps, config, train, rng)
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite gradients are reported below, by name
        grads = _completion_grads(model, dlogps, caches)
    check_finite("the gradients (params overflow on the way back)", grads)
    return loss, metrics, grads


def sft_step(model, params: dict, batch: Batch, *, train=False, rng=None):
    """Supervised fine-tuning: the mean negative log-likelihood per completion token.

    L = -sum_b logp_b / N_tokens, so dL/dlogp_b = -1 / N_tokens for every sequence.
    Returns (loss, {}, grads).
    """
    _check_step(model, params, batch, train, rng)
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite loss is reported below, by name
        logps, caches = _completion_logps(model, params, batch.tokens, batch.completion_mask, keep_cache=True,
                                          train=train, rng=rng)
        num_tokens = float(batch.completion_mask.sum())
        loss = -float(logps.sum()) / num_tokens
    check_finite("the SFT loss (params give non-finite logits)", loss)
    dlogps = array_module(logps).full(logps.shape, -1.0 / num_tokens, dtype=logps.dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite gradients are reported below, by name
        grads = _completion_grads(model, dlogps, caches)
    check_finite("the gradients (params overflow on the way back)", grads)
    return loss, {}, grads
