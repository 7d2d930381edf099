"""Every hybrid module learns: a few Adam steps on a tiny regression task lower the loss."""

from __future__ import annotations

import time

import pytest
import torch

from attnlab.hybrids import (
    CombinerAttention, CoreContextAwareAttention, HiLoAttention, LandmarkAttention, NativeSparseAttention,
    remove_landmarks,
)
from hybrid_checks import train_loss_drops

E, L = 16, 32


def _causal_target(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A causal mixing task: the running mean of ``x @ w`` plus the token itself."""
    y = x @ w
    return torch.cumsum(y, 1) / torch.arange(1, y.shape[1] + 1).view(1, -1, 1) + 0.5 * x


CAUSAL = {
    "nsa": lambda: NativeSparseAttention(E, 4, block_size=4, num_selected=3, window=6, num_kv_heads=2),
    "combiner": lambda: CombinerAttention(E, 4, region_size=6),
    "cca": lambda: CoreContextAwareAttention(E, 4, group_size=4, local_window=6, num_kv_heads=2),
    "landmark": lambda: LandmarkAttention(E, 4, block_size=4, top_k=3),
}


@pytest.mark.parametrize("name", list(CAUSAL))
def test_causal_module_trains(name):
    torch.manual_seed(0)
    model = CAUSAL[name]()
    x = torch.randn(8, L, E)
    target = _causal_target(x, torch.randn(E, E) / E ** 0.5)
    forward = None
    if name == "landmark":  # the layer runs on the sequence with its landmarks inserted
        forward = lambda m, inp: remove_landmarks(m(m.insert(inp)), m.block_size)  # noqa: E731
    t0 = time.perf_counter()
    first, last = train_loss_drops(model, x, target, forward)
    assert last < 0.6 * first, (first, last)
    assert time.perf_counter() - t0 < 10
    if name == "landmark":
        assert model.landmark.grad is not None and model.landmark.grad.abs().max() > 0


def test_hilo_trains():
    torch.manual_seed(0)
    model = HiLoAttention(E, 4, window=2)
    x = torch.randn(8, 6, 6, E)
    w = torch.randn(E, E) / E ** 0.5
    target = (x @ w).mean((1, 2), keepdim=True).expand_as(x) + 0.5 * x  # global mean plus local
    first, last = train_loss_drops(model, x, target)
    assert last < 0.6 * first, (first, last)
