"""Softmax+1: through attnlab.attention(return_lse=True) on every backend, against its dense
reference and against an independent construction (an appended zero key with a zero value)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnlab as al
from attnlab.testing import MaxNumel
from attnlab.variants import softmax1_attention, softmax1_attention_reference
from variant_checks import check_close, qkv

PATTERNS = [None, al.Causal(), al.SlidingWindow(left=4, right=2), al.SlidingWindow(left=6, right=0) | al.Sinks(2)]


@pytest.mark.parametrize("backend", ["tiled", "reference", "auto"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_matches_reference_outputs_and_gradients(pattern, backend):
    q, k, v = qkv()  # GQA 4/2, L=37 != S=29 (causal bottom-right: rows 0..7 see no key)
    out = softmax1_attention(q, k, v, pattern, backend=backend)
    check_close(out, softmax1_attention_reference(q, k, v, pattern), (q, k, v), msg=f"{pattern} {backend}")


def test_gradients_flow_through_lse_on_the_tiled_backend():
    """The gate sigmoid(lse) carries gradient: the tiled backward must fold dlse in."""
    q, k, v = qkv(L=40, S=40)
    out = softmax1_attention(q, k, v, al.Causal(), backend="tiled")
    (gq,) = torch.autograd.grad(out.sum(), q)
    plain = al.attention(q, k, v, al.Causal(), backend="tiled")
    (gq_plain,) = torch.autograd.grad((plain * torch.sigmoid(torch.zeros(()))).sum(), q)
    assert not torch.allclose(gq, gq_plain)  # lse's gradient is not dropped
    ref = softmax1_attention_reference(q, k, v, al.Causal())
    (gq_ref,) = torch.autograd.grad(ref.sum(), q)
    torch.testing.assert_close(gq, gq_ref, rtol=1e-7, atol=1e-9)


def test_score_mod_and_learned_parameters():
    q, k, v = qkv(L=30, S=30)
    rb = al.RelativeBias(num_heads=4, num_buckets=8, max_distance=16).double()
    with torch.no_grad():
        rb.table.normal_()
    out = softmax1_attention(q, k, v, al.Causal(), rb, backend="tiled")
    ref = softmax1_attention_reference(q, k, v, al.Causal(), rb)
    check_close(out, ref, (q, k, v, rb.table), msg="relative bias")


def test_equals_attention_with_an_appended_zero_key_and_value():
    q, k, v = qkv(L=20, S=20)
    k0 = torch.cat([k, torch.zeros_like(k[:, :, :1])], 2)
    v0 = torch.cat([v, torch.zeros_like(v[:, :, :1])], 2)
    torch.testing.assert_close(softmax1_attention(q, k, v), al.attention(q, k0, v0), rtol=1e-10, atol=1e-12)


def test_empty_rows_are_zero_without_nan():
    q, k, v = qkv(L=12, S=5)
    out = softmax1_attention(q, k, v, al.Causal(), backend="tiled")
    assert torch.equal(out[:, :, : 12 - 5], torch.zeros_like(out[:, :, :7]))
    g = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(t).all() for t in g)


def test_two_dimensional_tokens():
    q, k, v = qkv(Hq=2, Hkv=2, tokens=(5, 6))
    p = al.Neighborhood(kernel_size=(3, 3))
    check_close(softmax1_attention(q, k, v, p), softmax1_attention_reference(q, k, v, p), (q, k, v), msg="2-D")


def test_tiled_path_never_forms_an_l_by_s_tensor():
    q, k, v = (torch.randn(1, 2, 1024, 16) for _ in range(3))
    with MaxNumel() as probe:
        softmax1_attention(q, k, v, al.SlidingWindow(left=32, right=0), backend="tiled")
    assert probe.max_numel < 1024 * 1024 // 4


def test_bad_inputs_name_the_argument():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        softmax1_attention(q.tolist(), k, v)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        softmax1_attention(q[:, :3], k, v)
    with pytest.raises(TypeError, match="pattern must be"):
        softmax1_attention(q, k, v, pattern=3)
    with pytest.raises(ValueError, match="max_elements=10"):
        softmax1_attention_reference(q, k, v, max_elements=10)


@settings(max_examples=15, deadline=None)
@given(L=st.integers(1, 20), S=st.integers(1, 20), shift=st.floats(-30, 30))
def test_weights_sum_below_one_and_shift_invariance_breaks_as_expected(L, S, shift):
    """Row sums of the weights are sigmoid(lse) < 1; adding a constant c to every logit scales
    the output by sigmoid(lse + c) / sigmoid(lse) (the extra zero logit does not move)."""
    g = torch.Generator().manual_seed(L * 31 + S)
    q = torch.randn(1, 1, L, 4, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, S, 4, generator=g, dtype=torch.float64)
    ones = torch.ones(1, 1, S, 1, dtype=torch.float64)
    total = softmax1_attention_reference(q, k, ones)[..., 0]  # row sums of the weights
    assert (total < 1).all() and (total > 0).all()
    _, lse = al.attention(q, k, ones, return_lse=True)
    shifted = softmax1_attention(q, k, ones, score_mod=lambda s, b, h, i, j: s + shift)[..., 0]
    torch.testing.assert_close(shifted, torch.sigmoid(lse + shift), rtol=1e-9, atol=1e-12)
