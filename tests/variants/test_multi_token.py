"""Multi-Token Attention: the chunked conv2d fast path against the literal double sum, the
identity kernel as plain attention, causality, and errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnlab as al
from attnlab.testing import MaxNumel
from attnlab.variants import multi_token_attention, multi_token_attention_reference
from variant_checks import check_close, qkv


def _params(H=4, cq=3, ck=4, group=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(H, cq, ck, generator=g, dtype=torch.float64).requires_grad_()
    m = torch.randn(H // group, group, group, generator=g, dtype=torch.float64).requires_grad_()
    return w, m


@pytest.mark.parametrize("position", ["post", "pre", None])
@pytest.mark.parametrize("pattern", [None, al.Causal(), al.SlidingWindow(left=3, right=1)], ids=repr)
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_matches_reference_outputs_and_gradients(pattern, position, chunk):
    q, k, v = qkv()  # GQA 4/2, L=37, S=29, ck even (asymmetric key window)
    w, m = _params()
    mix = None if position is None else m
    kw = dict(head_mix=mix, head_mix_position=position or "post")
    out = multi_token_attention(q, k, v, w, pattern, chunk_size=chunk, **kw)
    ref = multi_token_attention_reference(q, k, v, w, pattern, **kw)
    check_close(out, ref, (q, k, v, w) + ((m,) if mix is not None else ()), msg=f"{pattern} {position} {chunk}")


def test_identity_kernel_is_plain_attention():
    q, k, v = qkv(L=21, S=21)
    for cq, ck in [(1, 1), (4, 5), (2, 6)]:
        w = torch.zeros(4, cq, ck, dtype=torch.float64)
        w[:, 0, ck // 2] = 1.0
        torch.testing.assert_close(multi_token_attention(q, k, v, w, al.Causal(), chunk_size=5),
                                   al.attention(q, k, v, al.Causal()))


def test_a_shifted_kernel_reads_the_previous_query_and_the_next_key():
    """kernel[a, b] weighs the logit of query i - a and key j - b + ck // 2."""
    q, k, v = qkv(B=1, Hq=1, Hkv=1, L=6, S=6)
    w = torch.zeros(1, 2, 3, dtype=torch.float64)
    w[0, 1, 0] = 1.0  # query i - 1, key j + 1
    eye = torch.eye(6, dtype=torch.float64).view(1, 1, 6, 6)
    probs = multi_token_attention(q, k, eye, w)  # v = identity: the output is the weights
    A = (q @ k.transpose(-1, -2) / 8 ** 0.5)[0, 0]
    C = torch.zeros(6, 6, dtype=torch.float64)
    C[1:, :-1] = A[:-1, 1:]
    torch.testing.assert_close(probs[0, 0], torch.softmax(C, -1))


def test_causal_mask_keeps_the_future_out():
    q, k, v = qkv(L=18, S=18)
    w, m = _params(cq=4, ck=5)
    out = multi_token_attention(q, k, v, w, al.Causal(), head_mix=m, chunk_size=5)
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, 11:] += torch.randn_like(t[:, :, 11:])
    out2 = multi_token_attention(q2, k2, v2, w, al.Causal(), head_mix=m, chunk_size=5)
    torch.testing.assert_close(out2[:, :, :11], out[:, :, :11])


def test_empty_rows_are_zero():
    q, k, v = qkv(L=10, S=4)
    w, _ = _params()
    out = multi_token_attention(q, k, v, w, al.Causal(), chunk_size=2)  # chunks 0-2 see no key
    assert torch.equal(out[:, :, :6], torch.zeros_like(out[:, :, :6]))
    check_close(out, multi_token_attention_reference(q, k, v, w, al.Causal()), (q, k, v, w), msg="empty chunks")


def test_memory_is_chunk_times_s():
    q, k, v = (torch.randn(1, 2, 1024, 16) for _ in range(3))
    w = torch.randn(2, 3, 5)
    with MaxNumel() as probe:
        multi_token_attention(q, k, v, w, al.Causal(), chunk_size=64)
    assert probe.max_numel <= 2 * (64 + 2) * (1024 + 4) * 2
    with MaxNumel() as probe:  # a window: each chunk computes only the keys its rows see
        multi_token_attention(q, k, v, w, al.SlidingWindow(left=31, right=0), chunk_size=64)
    assert probe.max_numel <= 2 * (64 + 2) * (64 + 31 + 2 * 16) * 2


def test_bad_inputs():
    q, k, v = qkv()
    w, m = _params()
    with pytest.raises(ValueError, match=r"kernel must have shape \(4, 3, 4\), got kernel.shape=\(3, 3, 4\)"):
        multi_token_attention(q, k, v, w[:3])
    with pytest.raises(ValueError, match="kernel must be a tensor of shape"):
        multi_token_attention(q, k, v, w[0])
    with pytest.raises(ValueError, match="does not group Hq=4 heads"):
        multi_token_attention(q, k, v, w, head_mix=torch.zeros(3, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="head_mix_position must be one of"):
        multi_token_attention(q, k, v, w, head_mix=m, head_mix_position="middle")
    with pytest.raises(TypeError, match="kernel must be a floating-point tensor"):
        multi_token_attention(q, k, v, w.long())
    q2, k2, v2 = qkv(tokens=(3, 4))
    with pytest.raises(ValueError, match="one token axis"):
        multi_token_attention(q2, k2, v2, w)


@settings(max_examples=12, deadline=None)
@given(L=st.integers(1, 14), S=st.integers(1, 14), cq=st.integers(1, 4), ck=st.integers(1, 5),
       chunk=st.integers(1, 6))
def test_fast_equals_reference_on_random_shapes(L, S, cq, ck, chunk):
    q, k, v = qkv(B=1, Hq=2, Hkv=1, L=L, S=S, D=4, Dv=3, seed=L + 20 * S)
    w = torch.randn(2, cq, ck, dtype=torch.float64, generator=torch.Generator().manual_seed(cq * ck))
    torch.testing.assert_close(multi_token_attention(q, k, v, w, al.Causal(), chunk_size=chunk),
                               multi_token_attention_reference(q, k, v, w, al.Causal()), rtol=1e-9, atol=1e-12)
