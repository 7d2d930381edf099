"""Selective attention: the chunked fast path against the paper's dense listing, causality,
and the case where nothing is selected (plain causal attention)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnlab as al
from attnlab.testing import MaxNumel
from attnlab.variants import selective_attention, selective_attention_reference
from variant_checks import check_close, qkv


@pytest.mark.parametrize("chunk", [1, 5, 16, 128])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (4, 1)])
def test_matches_reference_for_any_chunk_and_gqa(chunk, heads):
    q, k, v = qkv(Hq=heads[0], Hkv=heads[1], L=37, S=37)
    out = selective_attention(q, k, v, chunk_size=chunk)
    check_close(out, selective_attention_reference(q, k, v), (q, k, v), msg=f"chunk {chunk} heads {heads}")


def test_other_selection_head_and_scale():
    q, k, v = qkv(L=23, S=23)
    out = selective_attention(q, k, v, selection_head=3, scale=0.7, chunk_size=7)
    check_close(out, selective_attention_reference(q, k, v, selection_head=3, scale=0.7), (q, k, v), msg="head 3")


def test_no_selection_is_plain_causal_attention_and_selection_changes_it():
    q, k, v = qkv(L=20, S=20)
    q0 = q.detach().clone()
    q0[:, 0] = 0  # head 0's logits are 0: ReLU gives nothing to subtract
    torch.testing.assert_close(selective_attention(q0, k, v, chunk_size=6), al.attention(q0, k, v, al.Causal()))
    assert (selective_attention(q, k, v) - al.attention(q, k, v, al.Causal())).abs().max() > 1e-3


def test_is_causal_and_the_first_token_is_never_selected_away():
    q, k, v = qkv(L=16, S=16)
    out = selective_attention(q, k, v, chunk_size=4)
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, 9:] = torch.randn_like(t[:, :, 9:])
    torch.testing.assert_close(selective_attention(q2, k2, v2, chunk_size=4)[:, :, :9], out[:, :, :9])
    # neither the BOS key nor a query's own key is ever selected away: their logits keep F = 0,
    # so the ratio of their weights is that of plain causal attention
    eye = torch.eye(16, dtype=torch.float64).expand(2, 2, 16, 16)
    w = selective_attention(q, k, eye, chunk_size=4)  # v = identity: the output is the weights
    w0 = al.attention_weights(q, k, eye, al.Causal())
    i = torch.arange(1, 16)
    torch.testing.assert_close(w[:, :, i, 0] / w[:, :, i, i], w0[:, :, i, 0] / w0[:, :, i, i])
    assert (w[:, :, 2:, 1:-1] - w0[:, :, 2:, 1:-1]).abs().max() > 1e-3  # other keys do move


def test_memory_is_chunk_times_s():
    q, k, v = (torch.randn(1, 2, 1024, 16) for _ in range(3))
    with MaxNumel() as probe:
        selective_attention(q, k, v, chunk_size=64)
    assert probe.max_numel <= 2 * 64 * 1024 * 2


def test_bad_inputs():
    q, k, v = qkv(L=10, S=12)
    with pytest.raises(ValueError, match="needs L == S"):
        selective_attention(q, k, v)
    q, k, v = qkv(L=10, S=10)
    with pytest.raises(ValueError, match=r"selection_head must be in \[0, 4\)"):
        selective_attention(q, k, v, selection_head=4)
    with pytest.raises(TypeError, match="selection_head must be an int"):
        selective_attention(q, k, v, selection_head=0.5)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1, got chunk_size=0"):
        selective_attention(q, k, v, chunk_size=0)
    q2, k2, v2 = qkv(tokens=(3, 4))
    with pytest.raises(ValueError, match="one token axis"):
        selective_attention(q2, k2, v2)
    with pytest.raises(ValueError, match="max_elements=100"):
        selective_attention_reference(q, k, v, max_elements=100)


@settings(max_examples=15, deadline=None)
@given(L=st.integers(1, 24), chunk=st.integers(1, 10))
def test_fast_equals_reference_on_random_lengths(L, chunk):
    q, k, v = qkv(B=1, Hq=2, Hkv=1, L=L, S=L, D=4, Dv=3, seed=L * 7 + chunk)
    torch.testing.assert_close(selective_attention(q, k, v, chunk_size=chunk), selective_attention_reference(q, k, v),
                               rtol=1e-9, atol=1e-12)
