"""Mixture-of-Head attention: gates against their written-out formula, the row-skipping fast
path against dense attention times gates, and the load-balance loss."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnlab as al
from attnlab.testing import make_geometry
from attnlab.patterns.layout import Tiling
from attnlab.variants import (
    ActiveRows, mixture_of_heads_attention, mixture_of_heads_attention_reference, moh_balance_loss, moh_gates,
    moh_gates_reference,
)
from variant_checks import check_close, qkv


def _logits(B=2, L=37, shared=1, routed=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: torch.randn(B, L, n, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return mk(routed), (mk(shared) if shared else None), (mk(2) if shared else None)


@pytest.mark.parametrize("shared,top_k", [(1, 2), (0, 1), (2, 2), (0, 3)])
def test_gates_match_their_formula(shared, top_k):
    r, u, w = _logits(shared=shared, routed=4 - shared)
    g1 = moh_gates(r, top_k, u, w)
    g2 = moh_gates_reference(r, top_k, u, w)
    check_close(g1, g2, tuple(t for t in (r, u, w) if t is not None), msg="gates")
    routed = g1[..., shared:]
    assert ((routed > 0).sum(-1) == top_k).all()  # exactly top-k routed heads are on
    if shared:
        assert (g1[..., :shared] > 0).all()  # shared heads always on
    assert (g1.sum(-1) <= 1 + 1e-12).all()


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("pattern", [None, al.Causal(), al.SlidingWindow(left=4, right=0)], ids=repr)
def test_gated_heads_match_reference(pattern, skip):
    q, k, v = qkv()
    r, u, w = _logits()
    out = mixture_of_heads_attention(q, k, v, moh_gates(r, 2, u, w), pattern, skip_inactive=skip)
    ref = mixture_of_heads_attention_reference(q, k, v, moh_gates_reference(r, 2, u, w), pattern)
    check_close(out, ref, (q, k, v, r, u, w), msg=f"{pattern} skip={skip}")


def test_unrouted_rows_are_not_computed():
    g = make_geometry((40,), batch=2, q_heads=3)
    active = torch.zeros(2, 3, 40, dtype=torch.bool)
    active[0, 1, 5] = True  # one row of one head of one batch element
    active[1, 2, :] = True
    lay = ActiveRows(active).block_layout(Tiling(g, (16,), (16,)))
    assert lay.any.shape == (2, 3, 3, 3)
    assert lay.any[0, 1, 0].all() and not lay.any[0, 1, 1:].any() and not lay.any[0, 0].any()
    assert lay.full[1, 2].all() and not lay.full[0, 1].any()
    from attnlab.testing import check_pattern_layout
    check_pattern_layout(ActiveRows(active), g, 16, 16, exact=True)


def test_balance_loss():
    r = torch.zeros(1, 8, 4)  # ties: topk picks the first heads, softmax is uniform
    torch.testing.assert_close(moh_balance_loss(r, 2), torch.tensor(1.0))  # 2 heads twice the load, P = 1/4
    r = torch.eye(4).repeat(1, 2, 1)  # token t prefers head t mod 4: perfectly balanced top-1
    f = moh_balance_loss(r, 1)
    torch.testing.assert_close(f, torch.tensor(1.0))
    assert moh_balance_loss(torch.tensor([[[5.0, 0, 0, 0]] * 8]), 1) > 1.5  # all on one head


def test_bad_inputs():
    q, k, v = qkv()
    r, u, w = _logits()
    with pytest.raises(ValueError, match="top_k=5 exceeds the number of routed heads"):
        moh_gates(r, 5, u, w)
    with pytest.raises(ValueError, match="balance_logits .* are required"):
        moh_gates(r, 1, u)
    with pytest.raises(ValueError, match=r"balance_logits.shape\[-1\]=3, expected 2"):
        moh_gates(r, 1, u, torch.zeros(2, 37, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"gates must have shape \(B, \*L, Hq\) = \(2, 37, 4\)"):
        mixture_of_heads_attention(q, k, v, torch.ones(2, 37, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="skip_inactive must be a bool"):
        mixture_of_heads_attention(q, k, v, moh_gates(r, 2, u, w), skip_inactive=1)
    with pytest.raises(TypeError, match="top_k must be an int"):
        moh_gates(r, 1.5)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 6), data=st.data())
def test_gates_property_on_random_sizes(n, data):
    top_k = data.draw(st.integers(1, n))
    r = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n * 10 + top_k))
    g = moh_gates(r, top_k)
    torch.testing.assert_close(g, moh_gates_reference(r, top_k))
    kept = torch.softmax(r, -1).topk(top_k, -1).values.sum(-1)
    torch.testing.assert_close(g.sum(-1), kept)
