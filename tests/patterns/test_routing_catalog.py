"""The catalog rows of the routing patterns: well formed, and each example runs through
attention (forward and backward) and is accepted exactly by the backends it lists."""

import pytest
import torch

import attnlab as al
from attnlab.backends.registry import all_backends
from attnlab.patterns.routing_catalog import _region, routing_mechanisms

ROWS = routing_mechanisms()
SHAPES = [(40,), (6, 7), (4, 5, 6)]
CASES = [pytest.param(m, s, id=f"{m.name}-{'x'.join(map(str, s))}") for m in ROWS for s in SHAPES if len(s) in m.ndims]


def test_rows_are_well_formed():
    names = [m.name for m in ROWS]
    assert names == ["kmeans_routing", "region_routing", "linear_estimate_top_k", "hierarchical_top_k", "expert_choice"]
    for m in ROWS:
        assert isinstance(m, al.Mechanism) and m.family == "adaptive" and m.kind == "pattern" and m.exact
        assert len(m.papers) == 1 and 2021 <= m.papers[0].year <= 2025
        assert set(m.backends) <= set(all_backends()) and {"tiled", "reference"} <= set(m.backends)


def test_region_examples_divide_the_grid():
    assert _region((40,)) == (5,) and _region((4096,)) == (512,)
    assert _region((6, 7)) == (3, 1) and _region((4, 5, 6)) == (2, 1, 3)


@pytest.mark.parametrize("mech,shape", CASES)
def test_example_runs_through_attention_and_the_listed_backends_accept_it(mech, shape):
    pattern, score_mod = mech.example(shape, 2)
    q, k = (torch.randn(1, 2, *shape, 8, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, *shape, 4, requires_grad=True)
    out, lse = al.attention(q, k, v, pattern, score_mod, return_lse=True)
    assert out.shape == (1, 2, *shape, 4) and torch.isfinite(out).all() and not torch.isnan(lse).any()
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    with torch.no_grad():
        e = al.explain(q.detach(), k.detach(), v.detach(), pattern, score_mod, options={"allow_cpu": True})
    for name, why in e.reasons.items():
        assert (why == []) == (name in mech.backends), (name, why)
