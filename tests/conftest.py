"""Shared fixtures and Hypothesis settings for the flagcore test-suite.

* ``gen``: a freshly seeded ``torch.Generator`` (CPU) per test, so every test is reproducible
  and independent of test order and of torch's global RNG.
* Hypothesis profiles: ``default`` (random exploration, ~40 examples per property so the suite
  stays fast on 2 CPU cores) and ``ci`` (same budget, derandomized, for bit-for-bit repeatable
  CI runs). Select with ``HYPOTHESIS_PROFILE=ci``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("default", **_COMMON)
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

SEED = 20240611


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU ``torch.Generator`` (fresh for each test)."""
    return torch.Generator().manual_seed(SEED)
