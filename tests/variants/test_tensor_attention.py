"""Triple-wise tensor attention: the chunked fast path against the Kronecker-matrix reference,
the reduction to softmax attention when k2 and v2 are all ones, and the size guards."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnlab as al
from attnlab.variants import tensor_attention, tensor_attention_reference
from variant_checks import check_close, qkv


def _second(k, v, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k.shape, generator=g, dtype=k.dtype).requires_grad_(),
            torch.randn(v.shape, generator=g, dtype=v.dtype).requires_grad_())


@pytest.mark.parametrize("chunk_elements", [1, 3000, 1 << 21])
@pytest.mark.parametrize("pattern", [None, al.Causal(), al.SlidingWindow(left=3, right=1)], ids=repr)
def test_matches_reference(pattern, chunk_elements):
    q, k, v = qkv(L=13, S=11)  # GQA; causal with L > S has rows without a visible pair
    k2, v2 = _second(k, v)
    out = tensor_attention(q, k, v, k2, v2, pattern, chunk_elements=chunk_elements)
    ref = tensor_attention_reference(q, k, v, k2, v2, pattern)
    check_close(out, ref, (q, k, v, k2, v2), msg=f"{pattern} {chunk_elements}")


def test_defaults_to_k_and_v_and_the_scale():
    q, k, v = qkv(L=9, S=9)
    check_close(tensor_attention(q, k, v, scale=0.2), tensor_attention_reference(q, k, v, k, v, scale=0.2), (q, k, v),
                msg="k2 = k")


def test_all_ones_second_keys_and_values_give_softmax_attention():
    """<q_i, k_j * 1> = q_i . k_j for every l, and sum_l (v_j * 1) / S = v_j: plain attention."""
    q, k, v = qkv(L=10, S=8)
    ones_k, ones_v = torch.ones_like(k), torch.ones_like(v)
    for p in (None, al.Causal()):
        torch.testing.assert_close(tensor_attention(q, k, v, ones_k, ones_v, p), al.attention(q, k, v, p))


def test_rows_without_a_pair_are_zero():
    q, k, v = qkv(L=8, S=3)
    out = tensor_attention(q, k, v, pattern=al.Causal())
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert all(torch.isfinite(t).all() for t in torch.autograd.grad(out.sum(), (q, k, v)))


def test_size_guards_name_the_size_and_the_limit():
    q, k, v = qkv(L=13, S=11)
    with pytest.raises(ValueError, match=r"B\*Hq\*L\*S\^2\*D = 2\*4\*13\*11\^2\*8 = 100672 .* max_work=1000"):
        tensor_attention(q, k, v, max_work=1000)
    with pytest.raises(ValueError, match="= 12584 elements, above its guard max_elements=100"):
        tensor_attention_reference(q, k, v, max_elements=100)


def test_bad_inputs():
    q, k, v = qkv(L=13, S=11)
    with pytest.raises(ValueError, match="k2 must match k in shape"):
        tensor_attention(q, k, v, k2=k[:, :, :5])
    with pytest.raises(TypeError, match="v2 must be a torch.Tensor or None"):
        tensor_attention(q, k, v, v2=3)
    with pytest.raises(ValueError, match="chunk_elements must be an int >= 1"):
        tensor_attention(q, k, v, chunk_elements=0)


@settings(max_examples=10, deadline=None)
@given(L=st.integers(1, 9), S=st.integers(1, 9), causal=st.booleans())
def test_random_shapes(L, S, causal):
    q, k, v = qkv(B=1, Hq=2, Hkv=1, L=L, S=S, D=3, Dv=2, seed=L * 10 + S)
    p = al.Causal() if causal else None
    with torch.no_grad():
        torch.testing.assert_close(tensor_attention(q, k, v, pattern=p, chunk_elements=50),
                                   tensor_attention_reference(q, k, v, pattern=p), rtol=1e-9, atol=1e-12)
