"""Lesson 09: the reference point z_ref."""

import numpy as np


def kl_completions(completions):
    """09.kl_completions: prompt i with completion i − 1 (row i of the result is row i − 1, row 0 the last)."""
    return np.roll(np.asarray(completions), 1, axis=0)


def sampled_kl(policy_logps, ref_logps):
    """09.sampled_kl: the mean of log π − log π_ref over samples of π, and its standard error."""
    d = np.asarray(policy_logps, dtype=np.float64) - np.asarray(ref_logps, dtype=np.float64)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
