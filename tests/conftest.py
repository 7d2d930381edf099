"""Shared test setup: a fixed torch seed per test, and one intra-op thread.

The tests use small tensors, for which intra-op parallelism only adds scheduling overhead
(and, on a loaded 2-core machine, makes the suite several times slower).
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global torch RNG state (score-mod initialisers use it)."""
    torch.manual_seed(0)
    yield
