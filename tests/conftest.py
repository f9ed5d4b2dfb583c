"""Shared test set-up: Hypothesis profiles and small helpers."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# "ci": derandomized, bounded examples, so CI is reproducible; "dev": more examples, random.
settings.register_profile(
    "ci", derandomize=True, max_examples=40, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
