"""Core Context Aware attention: fast path vs dense reference, degenerate settings equal to
causal attention, a core token and one output row by hand, full (causal) reachability,
causality, errors, the module."""

from __future__ import annotations

import pytest
import torch

from attnlab.hybrids import CoreContextAwareAttention, core_context_aware_attention, core_context_aware_attention_reference
from hybrid_checks import F64, assert_causal, assert_matches_reference, causal_reference, module_matches_reference, qkv

CASES = [  # Hq, Hkv, L, group, window
    (2, 2, 37, 4, 6),
    (4, 2, 37, 5, 3),  # GQA, window not a multiple of the group, L not a multiple of the group
    (4, 1, 40, 8, 8),
    (2, 2, 9, 4, 1),
    (2, 2, 20, 3, 20),
]


@pytest.mark.parametrize("Hq,Hkv,L,G,w", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_fast_matches_reference(Hq, Hkv, L, G, w):
    q, k, v = qkv(2, Hq, Hkv, L, L, 8, 6)
    kw = dict(group_size=G, local_window=w)
    assert_matches_reference(lambda: core_context_aware_attention(q, k, v, **kw),
                             lambda: core_context_aware_attention_reference(q, k, v, **kw), [q, k, v], "qkv")


@pytest.mark.parametrize("G,w", [(1, 1), (1, 5), (4, 30), (3, 29)])
def test_degenerate_settings_are_causal_attention(G, w):
    """g = 1: each core token is one key (weight 1) and local + cores partition the causal
    keys; w >= L: the window holds every earlier key."""
    q, k, v = qkv(2, 4, 2, 29, 29, 8)
    got = core_context_aware_attention(q, k, v, group_size=G, local_window=w)
    torch.testing.assert_close(got, causal_reference(q, k, v), rtol=1e-9, atol=1e-11)


def test_one_row_by_hand():
    """g = 3, w = 2, query p = 10: J = floor((10 + 1 - 2) / 3) = 3, so the window is keys 9, 10 and
    the core tokens of groups 0, 1, 2 (keys 0..8), each weighted by its last query's softmax."""
    q, k, v = qkv(1, 1, 1, 12, 12, 4)
    s = 0.5
    with torch.no_grad():
        out = core_context_aware_attention(q, k, v, group_size=3, local_window=2)
        Q, K, V = q[0, 0], k[0, 0], v[0, 0]
        cores_k, cores_v = [], []
        for c in range(3):
            a = torch.softmax(s * K[3 * c: 3 * c + 3] @ Q[3 * c + 2], 0)
            cores_k.append(a @ K[3 * c: 3 * c + 3])
            cores_v.append(a @ V[3 * c: 3 * c + 3])
        keys = torch.stack([K[9], K[10], *cores_k])
        vals = torch.stack([V[9], V[10], *cores_v])
        want = torch.softmax(s * keys @ Q[10], 0) @ vals
    torch.testing.assert_close(out[0, 0, 10], want, rtol=1e-12, atol=1e-12)


def test_every_earlier_key_is_reached():
    q, k, v = qkv(1, 2, 2, 21, 21, 4)
    out = core_context_aware_attention(q, k, v, group_size=3, local_window=4)
    jac = torch.stack([torch.autograd.grad(out[0, 0, i].sum(), v, retain_graph=True)[0][0, 0].abs().sum(-1)
                       for i in range(21)])
    assert torch.equal(jac > 0, torch.ones(21, 21, dtype=torch.bool).tril())


def test_causal():
    q, k, v = qkv(1, 2, 2, 33, 33, 8)
    for cut in (1, 8, 12, 32):
        assert_causal(lambda q, k, v: core_context_aware_attention(q, k, v, group_size=4, local_window=5), q, k, v, cut)


def test_bad_inputs():
    q, k, v = qkv(1, 2, 2, 16, 16, 4)
    with pytest.raises(ValueError, match=r"self-attention: q and k must have the same token shape"):
        core_context_aware_attention(q[:, :, :8], k, v, group_size=4, local_window=4)
    with pytest.raises(ValueError, match=r"group_size must be an int >= 1, got group_size=0"):
        core_context_aware_attention(q, k, v, group_size=0, local_window=4)
    with pytest.raises(TypeError, match=r"local_window must be an int >= 1, got local_window=None"):
        core_context_aware_attention(q, k, v, group_size=4, local_window=None)
    with pytest.raises(ValueError, match=r"one token axis"):
        core_context_aware_attention(q.view(1, 2, 4, 4, 4), k.view(1, 2, 4, 4, 4), v.view(1, 2, 4, 4, 4),
                                     group_size=2, local_window=2)
    with pytest.raises(ValueError, match=r"x.shape=\(2, 5\), expected \(B, L, 16\)"):
        CoreContextAwareAttention(16, 4, 4, 4)(torch.randn(2, 5))


def test_module_matches_reference():
    torch.manual_seed(0)
    m = CoreContextAwareAttention(16, 4, group_size=4, local_window=5, num_kv_heads=2)
    module_matches_reference(m, torch.randn(2, 27, 16, dtype=F64))
