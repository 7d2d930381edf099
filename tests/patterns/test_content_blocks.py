"""TopKBlocks / TopPBlocks: the selection re-derived by hand, exact attention over it (outputs
and gradients against the dense reference of the same set), degenerate settings, causality,
composition and errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab as al
from attnlab.patterns import (
    BlockSparse, KeySet, SeerGate, TopKBlocks, TopPBlocks, resolve_pattern, seer_gate_loss,
)
from attnlab.testing import random_qkv, check_pattern_layout, dense_mask

TOL = dict(rtol=1e-9, atol=1e-10)


def _qkv(L=150, **kw):
    return random_qkv(L=L, **kw)


def _pooled_scores_by_hand(q, k, bq, bk):
    """Pooled block logits with explicit loops (the definition, for comparison)."""
    B, Hq, L, D = q.shape
    G = Hq // k.shape[1]
    S = k.shape[2]
    nq, nk = math.ceil(L / bq), math.ceil(S / bk)
    out = torch.empty(B, Hq, nq, nk, dtype=q.dtype)
    for r in range(nq):
        for c in range(nk):
            pq = q[:, :, r * bq:(r + 1) * bq].mean(2)
            pk = k[:, :, c * bk:(c + 1) * bk].mean(2).repeat_interleave(G, 1)
            out[:, :, r, c] = (pq * pk).sum(-1) / math.sqrt(D)
    return out


def test_top_k_layout_is_the_top_k_of_the_pooled_scores():
    q, k, _ = _qkv(L=150, S=130)
    pat = TopKBlocks(3, (32, 16), local=False)
    layout = resolve_pattern(pat, q, k).layout
    scores = _pooled_scores_by_hand(q, k, 32, 16)
    want = torch.zeros_like(layout).scatter_(-1, scores.topk(3, -1).indices, True)
    assert torch.equal(layout, want)


def test_top_k_causal_keeps_local_blocks_and_only_visible_candidates():
    q, k, _ = _qkv(L=150)
    layout = resolve_pattern(TopKBlocks(2, 32) & al.Causal(), q, k).parts[0].layout
    n = layout.shape[-1]
    assert torch.equal(layout.triu(1), torch.zeros_like(layout))  # no future block
    assert layout.diagonal(dim1=-2, dim2=-1).all()  # the local block
    counts = layout.sum(-1)
    assert torch.equal(counts, torch.minimum(torch.arange(1, n + 1), torch.tensor(2)).expand_as(counts))


@pytest.mark.parametrize("pattern", [
    TopKBlocks(2, 32) & al.Causal(),
    TopKBlocks(3, (16, 32), per_query=True) & al.Causal(),
    TopPBlocks(0.5, 32) & al.Causal(),
    TopPBlocks(0.7, 16, per_query=True, local=False),
    TopKBlocks(2, 16) | al.SlidingWindow(8),
    (TopKBlocks(1, 32) | TopPBlocks(0.3, 32)) & al.Causal(),
], ids=repr)
def test_attention_over_the_selection_is_exact(pattern):
    q, k, v = _qkv(L=150, grad=True)
    static = resolve_pattern(pattern, q, k)
    out = al.attention(q, k, v, pattern=pattern)
    ref = al.attention(q, k, v, pattern=static, backend="reference")
    torch.testing.assert_close(out, ref, **TOL)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * go).sum(), (q, k, v)),
                    torch.autograd.grad((ref * go).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, **TOL)


def test_cross_attention_bottom_right_causal_has_no_empty_row_it_can_fill():
    q, k, v = _qkv(L=70, S=150)
    out, lse = al.attention(q, k, v, pattern=TopKBlocks(1, 32) & al.Causal(), return_lse=True)
    assert torch.isfinite(lse).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("per_query", [False, True])
def test_degenerate_settings_are_dense(per_query):
    q, k, v = _qkv(L=100)
    n = math.ceil(100 / 16)
    dense, causal = al.attention(q, k, v), al.attention(q, k, v, pattern=al.Causal())
    torch.testing.assert_close(al.attention(q, k, v, pattern=TopKBlocks(n, 16, per_query=per_query)), dense, **TOL)
    torch.testing.assert_close(al.attention(q, k, v, pattern=TopPBlocks(1.0, 16, per_query=per_query)), dense, **TOL)
    torch.testing.assert_close(
        al.attention(q, k, v, pattern=TopKBlocks(n, 16, per_query=per_query) & al.Causal()), causal, **TOL)


def test_per_query_selection_is_causal():
    """With per-query selection and & Causal(), changing later queries and keys changes nothing
    of earlier outputs (block pooling of queries would let later queries steer the choice)."""
    q, k, v = _qkv(L=96)
    pat = TopKBlocks(2, 16, per_query=True) & al.Causal()
    out = al.attention(q, k, v, pattern=pat)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, 40:] = torch.randn_like(t[:, :, 40:])
    out2 = al.attention(q2, k2, v2, pattern=pat)
    torch.testing.assert_close(out[:, :, :40], out2[:, :, :40], **TOL)


def test_resolved_patterns_have_consistent_layouts():
    q, k, _ = _qkv(L=75, S=90)
    g = al.geometry.check_qkv(q, k, k)
    for pat in (TopKBlocks(2, (8, 16)) & al.Causal(), TopKBlocks(2, 16, per_query=True),
                TopPBlocks(0.5, 8, per_query=True) & al.Causal()):
        static = resolve_pattern(pat, q, k)
        for tiles in ((8, 16), (5, 3), (16, 7)):
            check_pattern_layout(static, g, *tiles)


def test_learned_gate_is_used_and_trains():
    torch.manual_seed(0)
    q, k, v = (t.float() for t in _qkv(B=1, Hq=2, Hkv=2, L=128, D=8))
    gate = SeerGate(8, 2)
    plain = resolve_pattern(TopKBlocks(2, 16), q, k).layout
    with torch.no_grad():
        gate.proj_k.mul_(-1.0)  # a gate that prefers the opposite blocks
    flipped = resolve_pattern(TopKBlocks(2, 16, local=False, gate=gate), q, k).layout
    assert not torch.equal(plain, flipped)
    gate = SeerGate(8, 2, gate_dim=4)
    opt = torch.optim.Adam(gate.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        loss = seer_gate_loss(gate, q, k, 16, causal=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_content_patterns_cannot_be_evaluated_without_inputs():
    g = al.geometry.check_qkv(*_qkv(L=8)[:1] * 3)
    with pytest.raises(TypeError, match="chooses its keys from q and k"):
        TopKBlocks(1, 4).mask(None, None, None, None, g)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: TopKBlocks(0, 16), ValueError, "k must be an int >= 1"),
    (lambda: TopKBlocks(2.5, 16), TypeError, "k must be an int"),
    (lambda: TopKBlocks(2, 0), ValueError, "block_size"),
    (lambda: TopKBlocks(2, 16, local=1), TypeError, "local must be a bool"),
    (lambda: TopPBlocks(0.0, 16), ValueError, r"p must be a float in \(0, 1\]"),
    (lambda: TopPBlocks(1.5, 16), ValueError, r"p must be a float in \(0, 1\]"),
    (lambda: TopPBlocks(0.5, 16, min_blocks=0), ValueError, "min_blocks"),
    (lambda: TopKBlocks(2, 16, gate=3), TypeError, "gate must be callable"),
])
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_k_larger_than_the_number_of_blocks():
    q, k, v = _qkv(L=50)
    with pytest.raises(ValueError, match=r"k=5 is larger than the number of key blocks .* = 4"):
        al.attention(q, k, v, pattern=TopKBlocks(5, 16))


@settings(max_examples=25, deadline=None)
@given(L=st.integers(1, 70), S=st.integers(1, 70), bq=st.integers(1, 20), bk=st.integers(1, 20),
       k=st.integers(1, 4), per_query=st.booleans(), causal=st.booleans(), seed=st.integers(0, 99))
def test_random_configurations_match_the_reference(L, S, bq, bk, k, per_query, causal, seed):
    q, k_, v = _qkv(B=1, Hq=2, Hkv=1, L=L, S=S, D=4, seed=seed)
    k = min(k, math.ceil(S / bk))
    pat = TopKBlocks(k, (bq, bk), per_query=per_query)
    pat = pat & al.Causal() if causal else pat
    static = resolve_pattern(pat, q, k_)
    assert isinstance(static.parts[0] if causal else static, (BlockSparse, KeySet))
    out = al.attention(q, k_, v, pattern=pat, backend="tiled")
    torch.testing.assert_close(out, al.attention(q, k_, v, pattern=static, backend="reference"), **TOL)
    g = al.geometry.check_qkv(q, k_, v)
    if not causal:  # every query keeps exactly min(k, blocks) key blocks
        keys = dense_mask(static, g).sum(-1)
        assert keys.min() >= 1
