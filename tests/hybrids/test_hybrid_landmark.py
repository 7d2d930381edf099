"""Landmark attention: fast path vs dense reference (training formulation and top-k retrieval),
one row by hand, degenerate settings, landmark values never read, causality, the landmark
helpers, errors, the module."""

from __future__ import annotations

import pytest
import torch

from attnlab.hybrids import (
    LandmarkAttention, insert_landmarks, landmark_attention, landmark_attention_reference, landmark_mask,
    remove_landmarks,
)
from hybrid_checks import assert_causal, assert_matches_reference, causal_reference, module_matches_reference, qkv

CASES = [  # Hq, Hkv, L, S, block, top_k
    (2, 2, 37, 37, 4, None),
    (4, 2, 37, 37, 4, 2),  # GQA, partial last block
    (4, 1, 30, 41, 3, None),  # decoding-style L < S
    (2, 2, 30, 41, 3, 3),
    (2, 2, 12, 12, 1, None),  # every other token a landmark
    (2, 2, 12, 12, 1, 1),
]


@pytest.mark.parametrize("Hq,Hkv,L,S,b,top_k", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_fast_matches_reference(Hq, Hkv, L, S, b, top_k):
    q, k, v = qkv(2, Hq, Hkv, L, S, 8, 6)
    kw = dict(block_size=b, top_k=top_k)
    assert_matches_reference(lambda: landmark_attention(q, k, v, **kw),
                             lambda: landmark_attention_reference(q, k, v, **kw), [q, k, v], "qkv")


def test_one_row_by_hand():
    """Blocks of 3 (groups of 4 with the landmark last); query t = 9 is in group 2 with current
    section {8, 9}; landmarks 3 and 7 gate groups 0 and 1."""
    q, k, v = qkv(1, 1, 1, 11, 11, 4)
    with torch.no_grad():
        out = landmark_attention(q, k, v, block_size=3)
        top1 = landmark_attention(q, k, v, block_size=3, top_k=1)
        s = 0.5 * q[0, 0, 9] @ k[0, 0].T
        V = v[0, 0]
        Z = s[8].exp() + s[9].exp() + s[3].exp() + s[7].exp()
        want = (s[8].exp() * V[8] + s[9].exp() * V[9]
                + s[3].exp() * (torch.softmax(s[0:3], 0) @ V[0:3])
                + s[7].exp() * (torch.softmax(s[4:7], 0) @ V[4:7])) / Z
        torch.testing.assert_close(out[0, 0, 9], want, rtol=1e-12, atol=1e-12)
        best = 3 if s[3] > s[7] else 7
        lo = best - 3
        Z1 = s[8].exp() + s[9].exp() + s[best].exp()
        want1 = (s[8].exp() * V[8] + s[9].exp() * V[9] + s[best].exp() * (torch.softmax(s[lo:best], 0) @ V[lo:best])) / Z1
        torch.testing.assert_close(top1[0, 0, 9], want1, rtol=1e-12, atol=1e-12)
        # the landmark query 7 ignores its own landmark: it sees 4, 5, 6 and landmark 3's group
        s7 = 0.5 * q[0, 0, 7] @ k[0, 0].T
        Z7 = s7[4:7].exp().sum() + s7[3].exp()
        want7 = (s7[4:7].exp() @ V[4:7] + s7[3].exp() * (torch.softmax(s7[0:3], 0) @ V[0:3])) / Z7
        torch.testing.assert_close(out[0, 0, 7], want7, rtol=1e-12, atol=1e-12)


def test_degenerate_settings():
    q, k, v = qkv(2, 4, 2, 20, 20, 8)
    # no complete block: plain causal attention
    torch.testing.assert_close(landmark_attention(q, k, v, block_size=20), causal_reference(q, k, v),
                               rtol=1e-9, atol=1e-11)
    # retrieving every block is the training formulation
    n = 20 // 5
    torch.testing.assert_close(landmark_attention(q, k, v, block_size=4, top_k=n),
                               landmark_attention(q, k, v, block_size=4), rtol=1e-9, atol=1e-11)


def test_rows_before_the_first_key_are_zero_not_nan():
    q, k, v = qkv(1, 2, 2, 20, 12, 4)  # L > S: the first 8 queries see no key
    for top_k in (None, 2):
        out = landmark_attention(q, k, v, block_size=3, top_k=top_k)
        assert torch.isfinite(out).all() and out[:, :, :8].abs().max() == 0 and out[:, :, 8:].abs().max() > 0
        torch.testing.assert_close(out, landmark_attention_reference(q, k, v, block_size=3, top_k=top_k),
                                   rtol=1e-9, atol=1e-11)


def test_landmark_values_are_never_read():
    q, k, v = qkv(1, 2, 2, 23, 23, 8)
    with torch.no_grad():
        base = landmark_attention(q, k, v, block_size=4)
        v2 = v.clone()
        v2[:, :, landmark_mask(23, 4)] += 5.0
        torch.testing.assert_close(landmark_attention(q, k, v2, block_size=4), base, rtol=0, atol=1e-12)
    # but their keys gate the blocks
    k2 = k.detach().clone()
    k2[:, :, 4] += 3.0
    assert (landmark_attention(q, k2, v, block_size=4) - base)[:, :, 10:].abs().max() > 1e-3


@pytest.mark.parametrize("top_k", [None, 2])
def test_causal(top_k):
    q, k, v = qkv(1, 2, 2, 34, 34, 8)
    for cut in (1, 9, 10, 33):
        assert_causal(lambda q, k, v: landmark_attention(q, k, v, block_size=4, top_k=top_k), q, k, v, cut)


def test_insert_and_remove_landmarks():
    x = torch.arange(7.0).view(1, 7, 1).expand(2, 7, 3)
    lm = torch.full((3,), -1.0)
    y = insert_landmarks(x, 3, lm)
    assert y.shape == (2, 9, 3)
    assert y[0, :, 0].tolist() == [0, 1, 2, -1, 3, 4, 5, -1, 6]
    assert landmark_mask(9, 3).tolist() == [False, False, False, True] * 2 + [False]
    assert torch.equal(remove_landmarks(y, 3), x)


def test_bad_inputs():
    q, k, v = qkv(1, 2, 2, 15, 15, 4)
    with pytest.raises(ValueError, match=r"top_k=4 is larger than the number of landmark blocks .* = 3"):
        landmark_attention(q, k, v, block_size=4, top_k=4)
    with pytest.raises(ValueError, match=r"top_k must be an int >= 1, got top_k=0"):
        landmark_attention(q, k, v, block_size=4, top_k=0)
    with pytest.raises(ValueError, match=r"block_size must be an int >= 1, got block_size=0"):
        landmark_attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match=r"landmark must be an \(E,\) = \(3,\) tensor"):
        insert_landmarks(torch.randn(1, 4, 3), 2, torch.randn(4))


@pytest.mark.parametrize("top_k", [None, 2])
def test_module_matches_reference(top_k):
    torch.manual_seed(0)
    m = LandmarkAttention(16, 4, block_size=4, top_k=top_k, num_kv_heads=2)
    # the same landmark embedding everywhere: equal landmark scores in one layer, so the
    # retrieval ties are real and both paths must break them the same way (earlier block).
    # Inputs and weights are multiples of 1/16, so every score is exact in float64 whatever
    # order a BLAS sums in (identical columns of one GEMM can differ in the last bit otherwise).
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.round(p * 16) / 16)
    x = torch.round(torch.randn(2, 27, 16) * 16) / 16
    module_matches_reference(m, m.insert(x).detach())
