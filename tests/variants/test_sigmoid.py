"""Sigmoid attention: the block-sparse fast path against the dense reference over patterns,
score mods (with learned tables), GQA, L != S, 2-D tokens; memory and errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnlab as al
from attnlab.testing import MaxNumel
from attnlab.variants import sigmoid_attention, sigmoid_attention_reference
from variant_checks import check_close, qkv

PATTERNS = [None, al.Causal(), al.SlidingWindow(left=3, right=0), al.SlidingWindow(left=20, right=5) | al.Sinks(2),
            al.Document(torch.arange(129) // 40)]


@pytest.mark.parametrize("block_elements", [2000, 1 << 21])
@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_matches_reference(pattern, block_elements):
    L = S = 129
    q, k, v = qkv(L=L, S=S)
    out = sigmoid_attention(q, k, v, pattern, block_elements=block_elements)
    check_close(out, sigmoid_attention_reference(q, k, v, pattern), (q, k, v), msg=f"{pattern}")


def test_cross_lengths_and_empty_rows():
    q, k, v = qkv(L=137, S=70)  # causal bottom-right: rows 0..66 see no key
    out = sigmoid_attention(q, k, v, al.Causal(), bias=0.3)
    check_close(out, sigmoid_attention_reference(q, k, v, al.Causal(), bias=0.3), (q, k, v), msg="cross")
    assert torch.equal(out[:, :, :67], torch.zeros_like(out[:, :, :67]))


def test_score_mod_with_a_learned_table():
    q, k, v = qkv(L=70, S=70)
    rb = al.RelativeBias(num_heads=4, num_buckets=8, max_distance=32, bidirectional=False).double()
    with torch.no_grad():
        rb.table.normal_()
    out = sigmoid_attention(q, k, v, al.Causal(), rb, block_elements=3000)
    check_close(out, sigmoid_attention_reference(q, k, v, al.Causal(), rb), (q, k, v, rb.table), msg="rel bias")
    emb = al.RelativeEmbedding(num_heads=4, head_dim=8, max_distance=80).double()  # needs the query
    check_close(sigmoid_attention(q, k, v, al.Causal(), emb), sigmoid_attention_reference(q, k, v, al.Causal(), emb),
                (q, k, v), msg="query-dependent")


def test_neighborhood_in_two_dimensions():
    q, k, v = qkv(Hq=2, Hkv=1, tokens=(9, 11))
    p = al.Neighborhood(kernel_size=(3, 5), dilation=(1, 2))
    check_close(sigmoid_attention(q, k, v, p), sigmoid_attention_reference(q, k, v, p), (q, k, v), msg="2-D")


def test_default_bias_is_minus_log_s_and_formula():
    q, k, v = qkv(L=5, S=7)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(8)
    want = torch.sigmoid(s - math.log(7)) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(sigmoid_attention(q, k, v), want)


def test_sparse_pattern_never_forms_an_l_by_s_tensor():
    q, k, v = (torch.randn(1, 2, 2048, 16, requires_grad=True) for _ in range(3))
    with MaxNumel() as probe:
        out = sigmoid_attention(q, k, v, al.SlidingWindow(left=64, right=0))
        out.sum().backward()
    assert probe.max_numel < 2048 * 2048 // 8


def test_bad_inputs():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="bias must be a float or None"):
        sigmoid_attention(q, k, v, bias="zero")
    with pytest.raises(ValueError, match="bias must be finite"):
        sigmoid_attention(q, k, v, bias=float("nan"))
    with pytest.raises(ValueError, match="block_elements must be a positive int"):
        sigmoid_attention(q, k, v, block_elements=0)
    with pytest.raises(ValueError, match="defined on 2 token axes"):
        sigmoid_attention(q, k, v, al.Neighborhood(kernel_size=(3, 3)))
    with pytest.raises(TypeError, match="k must be a floating-point tensor"):
        sigmoid_attention(q, k.int(), v)


@settings(max_examples=15, deadline=None)
@given(L=st.integers(1, 80), S=st.integers(1, 80), left=st.integers(0, 10))
def test_random_lengths_and_windows(L, S, left):
    q, k, v = qkv(B=1, Hq=2, Hkv=1, L=L, S=S, D=4, Dv=3, seed=L * 100 + S)
    p = al.SlidingWindow(left=left, right=0)
    with torch.no_grad():
        torch.testing.assert_close(sigmoid_attention(q, k, v, p, block_elements=500),
                                   sigmoid_attention_reference(q, k, v, p), rtol=1e-9, atol=1e-12)
