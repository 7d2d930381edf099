"""Context broadcasting and uniform attention over a pattern."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnlab as al
from attnlab.variants import (
    context_broadcasting, context_broadcasting_reference, uniform_attention, uniform_attention_reference,
)
from variant_checks import check_close, qkv


def test_context_broadcasting_is_x_plus_uniform_attention():
    x = torch.randn(3, 11, 6, dtype=torch.float64, requires_grad=True)
    s = torch.rand(6, dtype=torch.float64, requires_grad=True)
    check_close(context_broadcasting(x), context_broadcasting_reference(x), (x,), msg="cb")
    check_close(context_broadcasting(x, 1, s), context_broadcasting_reference(x, 1, s), (x, s), msg="scaled")
    check_close(context_broadcasting(x, -1), context_broadcasting_reference(x, -1), (x,), msg="other axis")
    torch.testing.assert_close(context_broadcasting(x) - x, x.mean(1, keepdim=True).expand_as(x))


@pytest.mark.parametrize("pattern", [None, al.Causal(), al.SlidingWindow(left=3, right=1), al.Sinks(2) | al.Causal()],
                         ids=repr)
def test_uniform_attention_matches_reference(pattern):
    q, k, v = qkv()  # GQA, L != S; causal rows 0..7 see no key
    out = uniform_attention(q, k, v, pattern)
    check_close(out, uniform_attention_reference(q, k, v, pattern), (q, k, v), msg=f"{pattern}")


def test_uniform_attention_is_attention_with_zero_logits_and_empty_rows_are_zero():
    q, k, v = qkv(L=12, S=5)
    zq = torch.zeros_like(q)
    torch.testing.assert_close(uniform_attention(q, k, v, al.Causal()),
                               al.attention(zq, k, v, al.Causal(), backend="reference"))
    assert torch.equal(uniform_attention(q, k, v, al.Causal())[:, :, :7], torch.zeros(2, 4, 7, 5, dtype=torch.float64))


def test_two_dimensional_tokens():
    q, k, v = qkv(Hq=2, Hkv=1, tokens=(4, 6))
    for p in (None, al.Neighborhood(kernel_size=(3, 3))):
        check_close(uniform_attention(q, k, v, p), uniform_attention_reference(q, k, v, p), (q, k, v), msg=f"{p}")


def test_bad_inputs():
    with pytest.raises(ValueError, match="dim=3 is not an axis"):
        context_broadcasting(torch.zeros(2, 3, 4), dim=3)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        context_broadcasting(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="no tokens"):
        context_broadcasting(torch.zeros(2, 0, 4))
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k and v must have the same token axes"):
        uniform_attention(q, k, v[:, :, :5])


@settings(max_examples=15, deadline=None)
@given(L=st.integers(1, 20), S=st.integers(1, 20))
def test_causal_prefix_mean(L, S):
    q, k, v = qkv(B=1, Hq=1, Hkv=1, L=L, S=S, D=2, Dv=3, seed=L * 21 + S)
    with torch.no_grad():
        torch.testing.assert_close(uniform_attention(q, k, v, al.Causal()),
                                   uniform_attention_reference(q, k, v, al.Causal()))
