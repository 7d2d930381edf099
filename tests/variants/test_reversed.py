"""DependencyViT reversed attention: the two-call fast path (transposed log-sum-exp, then a key
bias) against the dense column-normalised reference; the Transposed pattern's layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnlab as al
from attnlab.testing import MaxNumel, check_pattern_layout, make_geometry
from attnlab.variants import Transposed, reversed_attention, reversed_attention_reference
from variant_checks import check_close, qkv

PATTERNS = [None, al.Causal(), al.SlidingWindow(left=3, right=1), al.Causal() & al.SlidingWindow(left=2, right=0),
            al.SlidingWindow(left=4, right=0) | al.Sinks(2)]


@pytest.mark.parametrize("backend", ["tiled", "reference"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_matches_reference(pattern, backend):
    q, k, v = qkv()  # GQA, L=37 != S=29: causal leaves query rows 0..7 with nothing and
    out = reversed_attention(q, k, v, pattern, backend=backend)  # every key column with some query
    check_close(out, reversed_attention_reference(q, k, v, pattern), (q, k, v), msg=f"{pattern} {backend}")


def test_columns_sum_to_one_and_unseen_keys_send_nothing():
    q, k, _ = qkv(L=9, S=14)
    eye = torch.eye(14, dtype=torch.float64).expand(2, 2, 14, 14)
    A = reversed_attention(q, k, eye, al.Causal())  # v = identity: the output is the weight matrix
    col = A.sum(2)  # (B, Hq, S): keys j <= i + 5 are seen by some query
    torch.testing.assert_close(col, torch.ones_like(col))
    A = reversed_attention(q, k[:, :, :5], eye[:, :, :5, :5], al.Causal())  # L > S: rows 0..3 empty
    assert torch.equal(A[:, :, :4], torch.zeros_like(A[:, :, :4]))
    q2, k2, _ = qkv(L=6, S=6)
    e6 = torch.eye(6, dtype=torch.float64).expand(2, 2, 6, 6)
    A = reversed_attention(q2, k2, e6, lambda b, h, i, j: (j < 3) & (i >= j))  # keys 3..5 seen by no query
    torch.testing.assert_close(A.sum(2)[..., :3], torch.ones(2, 4, 3, dtype=torch.float64))
    assert torch.equal(A[..., 3:], torch.zeros_like(A[..., 3:]))


def test_is_the_transpose_of_softmax_attention_for_self_attention():
    """out = softmax(K Q^T)^T V: child j's row softmax over parents i, sent to them."""
    q, k, v = qkv(Hq=2, Hkv=2, L=11, S=11)
    A = torch.softmax(k @ q.transpose(-1, -2) / 8 ** 0.5, -1)  # (B, H, j, i)
    torch.testing.assert_close(reversed_attention(q, k, v), A.transpose(-1, -2) @ v)


def test_two_dimensional_tokens_and_transposed_layout():
    q, k, v = qkv(Hq=2, Hkv=1, tokens=(5, 6))
    p = al.Neighborhood(kernel_size=(3, 3), is_causal=(True, False))
    check_close(reversed_attention(q, k, v, p), reversed_attention_reference(q, k, v, p), (q, k, v), msg="2-D")
    for pat, gq, gk in [(al.Causal(), (37,), (29,)), (al.SlidingWindow(left=5, right=2), (40,), (40,)),
                        (p, (5, 6), (5, 6))]:
        g = make_geometry(gk, gq, q_heads=2)  # the transposed problem: S queries, L keys
        check_pattern_layout(Transposed(pat), g, 4, 3)


def test_tiled_path_never_forms_an_l_by_s_tensor():
    q, k, v = (torch.randn(1, 2, 1024, 16) for _ in range(3))
    with MaxNumel() as probe:
        reversed_attention(q, k, v, al.SlidingWindow(left=32, right=0), backend="tiled")
    assert probe.max_numel < 1024 * 1024 // 4


def test_bad_inputs():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        reversed_attention(q[:, :3], k, v)
    with pytest.raises(TypeError, match="pattern must be"):
        reversed_attention(q, k, v, pattern="causal")
    with pytest.raises(ValueError, match="max_elements=5"):
        reversed_attention_reference(q, k, v, max_elements=5)


@settings(max_examples=15, deadline=None)
@given(L=st.integers(1, 16), S=st.integers(1, 16), causal=st.booleans())
def test_random_shapes(L, S, causal):
    q, k, v = qkv(B=1, Hq=2, Hkv=1, L=L, S=S, D=4, Dv=3, seed=L * 50 + S)
    p = al.Causal() if causal else None
    with torch.no_grad():
        torch.testing.assert_close(reversed_attention(q, k, v, p), reversed_attention_reference(q, k, v, p),
                                   rtol=1e-9, atol=1e-12)
