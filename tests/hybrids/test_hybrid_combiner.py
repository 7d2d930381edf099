"""Combiner-Fixed: fast path vs dense reference, one region (or one token per region) equal to
plain attention, full support, causality, errors, the module."""

from __future__ import annotations

import pytest
import torch

import attnlab as al
from attnlab.hybrids import CombinerAttention, combiner_attention, combiner_attention_reference
from attnlab.hybrids.combiner import region_pool
from hybrid_checks import F64, assert_causal, assert_matches_reference, module_matches_reference, qkv

CASES = [  # Hq, Hkv, L, region, causal, pool
    (2, 2, 37, 5, True, "max"),
    (4, 2, 37, 5, False, "mean"),  # GQA, L not a multiple of the region
    (4, 1, 40, 8, True, "mean"),
    (2, 2, 23, 4, False, "max"),
]


@pytest.mark.parametrize("Hq,Hkv,L,R,causal,pool", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_fast_matches_reference(Hq, Hkv, L, R, causal, pool):
    q, k, v = qkv(2, Hq, Hkv, L, L, 8, 6)
    kw = dict(region_size=R, causal=causal, pool=pool)
    assert_matches_reference(lambda: combiner_attention(q, k, v, **kw),
                             lambda: combiner_attention_reference(q, k, v, **kw), [q, k, v], "qkv")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("R", [1, 23, 40])
def test_one_region_or_one_token_regions_is_plain_attention(causal, R):
    """One region: only direct attention. Regions of one token: kbar = k_j and vbar = v_j, so
    the abstractions are the keys themselves and the joint softmax is plain attention."""
    q, k, v = qkv(2, 4, 2, 23, 23, 8)
    want = al.attention(q, k, v, al.Causal() if causal else None, backend="reference")
    got = combiner_attention(q, k, v, region_size=R, causal=causal)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_region_summaries_by_hand():
    x = torch.tensor([1.0, 5.0, 2.0, -1.0, 3.0], dtype=F64).view(1, 1, 5, 1)
    assert region_pool(x, 2, "max").flatten().tolist() == [5.0, 2.0, 3.0]
    assert region_pool(x, 2, "mean").flatten().tolist() == [3.0, 0.5, 3.0]


@pytest.mark.parametrize("causal", [True, False])
def test_full_support(causal):
    """Every output depends on the value of every (earlier) key, directly or through its region's
    abstraction."""
    q, k, v = qkv(1, 2, 2, 20, 20, 4)
    out = combiner_attention(q, k, v, region_size=4, causal=causal)
    jac = torch.stack([torch.autograd.grad(out[0, 0, i].sum(), v, retain_graph=True)[0][0, 0].abs().sum(-1)
                       for i in range(20)])  # (query, key)
    reach = jac > 0
    want = torch.ones(20, 20, dtype=torch.bool)
    if causal:
        want = want.tril()
    assert torch.equal(reach, want)


def test_causal():
    q, k, v = qkv(1, 2, 2, 31, 31, 8)
    for cut in (1, 8, 13, 30):
        assert_causal(lambda q, k, v: combiner_attention(q, k, v, region_size=4), q, k, v, cut)


def test_bad_inputs():
    q, k, v = qkv(1, 2, 2, 16, 16, 4)
    with pytest.raises(ValueError, match=r"self-attention: q and k must have the same token shape"):
        combiner_attention(q, k[:, :, :8], v[:, :, :8], region_size=4)
    with pytest.raises(ValueError, match=r"region_size must be an int >= 1, got region_size=0"):
        combiner_attention(q, k, v, region_size=0)
    with pytest.raises(ValueError, match=r"pool must be one of \('max', 'mean'\), got pool='min'"):
        combiner_attention(q, k, v, region_size=4, pool="min")
    with pytest.raises(TypeError, match=r"causal must be a bool, got causal=1"):
        combiner_attention(q, k, v, region_size=4, causal=1)
    with pytest.raises(ValueError, match=r"num_heads=4 must be a multiple of num_kv_heads=3"):
        CombinerAttention(16, 4, 4, num_kv_heads=3)


@pytest.mark.parametrize("causal", [True, False])
def test_module_matches_reference(causal):
    torch.manual_seed(0)
    m = CombinerAttention(16, 4, region_size=5, causal=causal, num_kv_heads=2)
    module_matches_reference(m, torch.randn(2, 27, 16))
