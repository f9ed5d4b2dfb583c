"""Lesson 09's exercises (tutorials/09_when_z_ref_is_positive.py): the KL estimate: the mismatched completions, and
KL(π ‖ π_ref) from samples with its standard error.

Each exercise lists its inputs (`calls`), its reference and the typical mistakes its grader names; the
machinery (Exercise, Call, the judges, grade()) is in kit.py and registry.py.
"""

from __future__ import annotations

import numpy as np

from .kit import Call, Exercise, Mistake, closed_form


def _rotation_calls():
    rng = np.random.default_rng(9)
    return [
        Call("4 completions of 5 tokens", (rng.integers(0, 12, (4, 5)),), {}),
        Call("3 completions of 2 tokens", (np.array([[1, 2], [3, 4], [5, 6]]),), {}),
        Call("5 completions of 1 token", (np.arange(5)[:, None] + 10,), {}),
    ]


def rotation_stub(completions):
    return completions  # a placeholder: the matched pairs, which is the mistake to avoid


KL_COMPLETIONS = Exercise(
    "09.kl_completions", "kl_completions",
    "kl_completions(completions) -> kl_completions",
    "the completion each prompt is paired with for the KL estimate: prompt i with completion i − 1 "
    "(TRL's rotation by one; completions is [B, T], one row per example)",
    _rotation_calls,
    closed_form(("kl_completions",), lambda c: (np.roll(c.args[0], 1, axis=0),), [
        Mistake("kl_pairs_not_mismatched", "matched pairs, prompt i with its own completion i (the KL estimate "
                "then measures the rewards being scored)", lambda c: (c.args[0],)),
        Mistake("kl_pairs_rotated_wrong_way", "the rotation the other way, completion i + 1",
                lambda c: (np.roll(c.args[0], -1, axis=0),)),
        Mistake("kl_pairs_reversed", "reversing the batch: the middle example of an odd batch keeps its own "
                "completion", lambda c: (c.args[0][::-1],)),
        Mistake("rotated_tokens", "rotating the tokens inside each completion (axis 1) instead of the rows",
                lambda c: (np.roll(c.args[0], 1, axis=1),)),
    ], rtol=0.0, atol=0.0),
    rotation_stub,
)


def _sampled_calls():
    rng = np.random.default_rng(19)
    p = rng.normal(-8.0, 2.0, 64)
    return [
        Call("64 samples", (p, p - rng.gamma(2.0, 0.4, 64)), {}),
        Call("5 samples", (p[:5], p[:5] + rng.normal(0.0, 1.0, 5)), {}),
    ]


def _sampled(p, r, ddof=1, se=True, sign=1.0):
    d = sign * (np.asarray(p) - np.asarray(r))
    std = float(np.std(d, ddof=ddof))
    return float(d.mean()), std / np.sqrt(len(d)) if se else std


def sampled_stub(policy_logps, ref_logps):
    raise NotImplementedError("write sampled_kl")


SAMPLED_KL = Exercise(
    "09.sampled_kl", "sampled_kl",
    "sampled_kl(policy_logps, ref_logps) -> (estimate, standard_error)",
    "KL(π ‖ π_ref) from completions sampled from π: the mean of log π − log π_ref over the samples, and its "
    "standard error (sample standard deviation, ddof=1, over √n)",
    _sampled_calls,
    closed_form(("estimate", "standard_error"), lambda c: _sampled(*c.args), [
        Mistake("std_not_standard_error", "the standard deviation of the samples, not of their mean (÷ √n missing)",
                lambda c: _sampled(*c.args, se=False)),
        Mistake("ddof_0", "the standard deviation with ddof=0 (the biased one: use ddof=1)",
                lambda c: _sampled(*c.args, ddof=0)),
        Mistake("ratio_reversed", "the log-ratio the wrong way round, log π_ref − log π",
                lambda c: _sampled(*c.args, sign=-1.0)),
    ]),
    sampled_stub,
)


EXERCISES = [KL_COMPLETIONS, SAMPLED_KL]
