"""The routing patterns composed with each other and with static patterns: every content part
is resolved (inside an intersection, restricted by its static parts) and attention over the
combined set is exact."""

import pytest
import torch
from routing_checks import assert_exact_over_selection, assert_layout_agrees

import attnlab as al
from attnlab.patterns import (
    ExpertChoice,
    HierarchicalTopK,
    KMeansRouting,
    LinearEstimateTopK,
    RegionRouting,
    has_content,
    resolve_pattern,
)
from attnlab.testing import random_qkv


def _scores():
    return torch.randn(2, 4, 150, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


@pytest.mark.parametrize("make", [
    lambda: (KMeansRouting(3) | LinearEstimateTopK(2, 16)) & al.Causal(),
    lambda: HierarchicalTopK(3, 16) & ExpertChoice(60, _scores()) & al.Causal(),
    lambda: (RegionRouting(10, 3, local=True) & al.Causal()) | al.SlidingWindow(4),
    lambda: ((KMeansRouting(4) | RegionRouting(15, 2)) & (LinearEstimateTopK(3, 16) | HierarchicalTopK(2, 8, 3))
             & ExpertChoice(100, _scores()) & al.Causal()),
], ids=["kmeans-or-sea-causal", "hip-and-mosa-causal", "region-causal-or-window", "all-five"])
def test_compositions_are_exact(make):
    q, k, v = random_qkv(L=150, grad=True)
    pattern = make()
    assert has_content(pattern)
    static = assert_exact_over_selection(pattern, q, k, v, score_mod=al.Softcap(4.0))
    assert_layout_agrees(static, q, k, [((16,), (16,)), ((7,), (5,))])


def test_selection_inside_an_intersection_sees_only_the_static_parts():
    """In ``X & Y & Causal()`` with two content parts, each is restricted by Causal alone (not by
    the other's choice): X's layout equals that of ``X & Causal()``."""
    q, k, _ = random_qkv(L=150)
    both = resolve_pattern(LinearEstimateTopK(2, 16) & HierarchicalTopK(2, 16) & al.Causal(), q, k)
    alone = resolve_pattern(LinearEstimateTopK(2, 16) & al.Causal(), q, k)
    assert torch.equal(both.parts[0].layout, alone.parts[0].layout)
