"""Lesson 03's exercises (tutorials/03_sequence_logprobs.py): sequence log-probabilities: a stable log softmax, the
backward of compute_logprobs, log π(completion | prompt) with the shift.

Each exercise lists its inputs (`calls`), its reference and the typical mistakes its grader names; the
machinery (Exercise, Call, the judges, grade()) is in kit.py and registry.py.
"""

from __future__ import annotations

import numpy as np

from .kit import Call, Exercise, Mistake, Verdict, closed_form, log_softmax, oracle_calls, oracle_cases, oracle_judge


def _log_softmax_calls():
    rng = np.random.default_rng(3)
    return [Call("random logits [2, 3, 5]", (rng.normal(0, 2, (2, 3, 5)),), {}),
            Call("large logits [2, 4] (around ±1000)", (np.array([[1000.0, 999.0, 990.0, -5.0],
                                                                  [-1000.0, -1001.0, -998.0, -999.5]]),), {})]


def log_softmax_stub(logits):
    raise NotImplementedError("write log_softmax")


def _log_softmax_judge():
    inner = closed_form(("log_softmax",), lambda c: (log_softmax(c.args[0]),), [
        Mistake("softmax_not_log", "softmax itself, not its logarithm",
                lambda c: (np.exp(log_softmax(c.args[0])),)),
        Mistake("wrong_axis", "normalising over the first axis instead of the last (the vocabulary)",
                lambda c: (log_softmax(c.args[0], axis=0),)),
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
    probs = np.exp(log_softmax(logits))
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


EXERCISES = [LOG_SOFTMAX, LOGPROBS_BACKWARD, SEQUENCE_LOGPROBS]
