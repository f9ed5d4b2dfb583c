"""Lesson 05's exercises (tutorials/05_training_with_binary_feedback.py): SFT and the metrics of a run: the SFT loss
and its gradient, the rewards of metrics.jsonl.

Each exercise lists its inputs (`calls`), its reference and the typical mistakes its grader names; the
machinery (Exercise, Call, the judges, grade()) is in kit.py and registry.py.
"""

from __future__ import annotations

import numpy as np

from .kit import Call, Exercise, Mistake, closed_form, log_softmax


def _sft(logits, targets, mask, *, per_sequence=False, mask_used=True, sign=1.0):
    logp = log_softmax(logits)
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


EXERCISES = [SFT_LOSS, REWARD_METRICS]
