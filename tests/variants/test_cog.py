"""Cog attention (signed weights): the two-softmax fast path against the dense reference and
against plain softmax attention where all logits have one sign."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnlab as al
from attnlab.testing import MaxNumel
from attnlab.variants import cog_attention, cog_attention_reference
from variant_checks import check_close, qkv

PATTERNS = [None, al.Causal(), al.SlidingWindow(left=3, right=3), al.SlidingWindow(left=5, right=0) | al.Sinks(1)]


@pytest.mark.parametrize("backend", ["tiled", "reference"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_matches_reference(pattern, backend):
    q, k, v = qkv()  # GQA, L != S, empty rows under Causal
    out = cog_attention(q, k, v, pattern, backend=backend)
    check_close(out, cog_attention_reference(q, k, v, pattern), (q, k, v), msg=f"{pattern} {backend}")


def test_score_mod_applies_before_the_sign_split():
    q, k, v = qkv(L=25, S=25)
    alibi = al.ALiBi(num_heads=4)
    out = cog_attention(q, k, v, al.Causal(), alibi, backend="tiled")
    check_close(out, cog_attention_reference(q, k, v, al.Causal(), alibi), (q, k, v), msg="alibi")


def test_positive_logits_give_softmax_attention_and_negative_ones_its_negation():
    q, k, v = qkv(L=15, S=15)
    qp, kp = q.detach().abs() + 0.1, k.detach().abs() + 0.1  # every logit > 0
    torch.testing.assert_close(cog_attention(qp, kp, v), al.attention(qp, kp, v), rtol=1e-10, atol=1e-12)
    # all logits < 0: weights -softmax(|s|) = -softmax(-s)
    torch.testing.assert_close(cog_attention(-qp, kp, v), -al.attention(qp, kp, v), rtol=1e-10, atol=1e-12)


def test_weights_can_be_negative_and_abs_weights_sum_to_one():
    q, k, _ = qkv(L=10, S=10)
    eye = torch.eye(10, dtype=torch.float64).expand(2, 2, 10, 10)
    w = cog_attention_reference(q, k, eye)  # v = identity: the output is the weight matrix
    assert (w < 0).any() and (w > 0).any()
    torch.testing.assert_close(w.abs().sum(-1), torch.ones(2, 4, 10, dtype=torch.float64))
    torch.testing.assert_close(cog_attention(q, k, eye), w)


def test_logits_hidden_by_a_score_mod_and_empty_rows_are_zero():
    q, k, v = qkv(L=9, S=4)
    out = cog_attention(q, k, v, al.Causal(), backend="tiled")
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    hide = lambda s, b, h, i, j: torch.where(j == 0, torch.full_like(s, float("-inf")), s)  # noqa: E731
    out = cog_attention(q, k, v, None, hide)
    ref = cog_attention(q, k[:, :, 1:], v[:, :, 1:])
    torch.testing.assert_close(out, ref)
    assert all(torch.isfinite(t).all() for t in torch.autograd.grad(out.sum(), (q, k, v)))


def test_sparse_pattern_stays_linear_in_memory():
    q, k, v = (torch.randn(1, 2, 1024, 16) for _ in range(3))
    with MaxNumel() as probe:
        cog_attention(q, k, v, al.SlidingWindow(left=32, right=0), backend="tiled")
    assert probe.max_numel < 1024 * 1024 // 4


def test_bad_inputs():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="score_mod must be"):
        cog_attention(q, k, v, score_mod=3)
    with pytest.raises(ValueError, match="same head dimension"):
        cog_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="unknown backend='nope'"):
        cog_attention(q, k, v, backend="nope")


@settings(max_examples=15, deadline=None)
@given(L=st.integers(1, 16), S=st.integers(1, 16), causal=st.booleans())
def test_fast_equals_reference_on_random_shapes(L, S, causal):
    q, k, v = qkv(B=1, Hq=2, Hkv=1, L=L, S=S, D=4, Dv=3, seed=L * 17 + S)
    p = al.Causal() if causal else None
    torch.testing.assert_close(cog_attention(q, k, v, p), cog_attention_reference(q, k, v, p), rtol=1e-9, atol=1e-12)
