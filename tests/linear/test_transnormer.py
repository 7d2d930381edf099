"""TransNormer's NormAttention and DiagAttention (Qin et al., 2022) against their references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnlab as al
from attnlab.linear.feature_maps import PerformerRandomFeatures, ReLU
from attnlab.linear.transnormer import (
    diag_attention,
    diag_attention_reference,
    norm_attention,
    norm_attention_reference,
)
from attnlab.testing import MaxNumel

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def _rand(*shape, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _qkv(Hq, Hkv, L, D=6, Dv=5, B=2, seed=0):
    q = _rand(B, Hq, L, D, seed=seed).requires_grad_()
    k = _rand(B, Hkv, L, D, seed=seed + 1).requires_grad_()
    v = _rand(B, Hkv, L, Dv, seed=seed + 2).requires_grad_()
    return q, k, v


def _same_with_grads(fast, ref, inputs, **kwargs):
    out, expected = fast(*inputs, **kwargs), ref(*inputs, **kwargs)
    torch.testing.assert_close(out, expected, **TOL)
    go = _rand(*out.shape, seed=9)
    for a, b in zip(torch.autograd.grad(out, inputs, go),
                    torch.autograd.grad(expected, inputs, go)):
        torch.testing.assert_close(a, b, **TOL)
    return out


HEAD_DECAY = torch.tensor([0.5, 0.9, 0.99, 1.0], dtype=F64)


# --------------------------------------------------------------------------- NormAttention


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize(
    "causal,decay,Hq,Hkv,L,chunk",
    [
        (False, None, 3, 3, 13, 64),
        (True, None, 4, 2, 37, 8),
        (True, 0.9, 4, 1, 19, 5),
        (True, HEAD_DECAY, 4, 2, 23, 64),
    ],
)
def test_norm_attention_matches_reference(norm, causal, decay, Hq, Hkv, L, chunk):
    out = _same_with_grads(
        norm_attention, norm_attention_reference, _qkv(Hq, Hkv, L),
        causal=causal, decay=decay, norm=norm, chunk_size=chunk,
    )
    assert out.shape == (2, Hq, L, 5)


@pytest.mark.parametrize("phi", [ReLU(), PerformerRandomFeatures(6, 10, seed=3)])
def test_norm_attention_other_feature_maps(phi):
    _same_with_grads(norm_attention, norm_attention_reference, _qkv(2, 1, 11),
                     causal=True, feature_map=phi, chunk_size=4)


def test_norm_attention_written_out():
    """One head, plain loops: RMSNorm / LayerNorm of sum_{j<=i} g^(i-j) (phi(q_i).phi(k_j)) v_j."""
    L, g, eps = 5, 0.8, 1e-6
    q, k, v = (t.detach() for t in _qkv(1, 1, L, D=3, Dv=4, B=1))
    phi = lambda x: torch.where(x > 0, x + 1, torch.exp(x))  # elu + 1
    x = torch.stack([
        sum(g ** (i - j) * (phi(q[0, 0, i]) @ phi(k[0, 0, j])) * v[0, 0, j] for j in range(i + 1))
        for i in range(L)
    ])
    rms = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps)
    c = x - x.mean(-1, keepdim=True)
    layer = c / torch.sqrt((c ** 2).mean(-1, keepdim=True) + eps)
    torch.testing.assert_close(norm_attention(q, k, v, causal=True, decay=g)[0, 0], rms, **TOL)
    torch.testing.assert_close(
        norm_attention(q, k, v, causal=True, decay=g, norm="layer")[0, 0], layer, **TOL
    )


def test_norm_attention_causal_vs_non_causal():
    q, k, v = (t.detach() for t in _qkv(2, 2, 12))
    full = norm_attention(q, k, v)
    causal = norm_attention(q, k, v, causal=True, chunk_size=5)
    # the last query sees every key in both
    torch.testing.assert_close(causal[:, :, -1], full[:, :, -1], **TOL)
    assert (causal[:, :, :-1] - full[:, :, :-1]).abs().max() > 1e-2
    # causal outputs ignore later tokens; non-causal ones do not
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 7:] += 1.0
    v2[:, :, 7:] -= 2.0
    torch.testing.assert_close(
        norm_attention(q, k2, v2, causal=True, chunk_size=5)[:, :, :7], causal[:, :, :7], **TOL
    )
    assert (norm_attention(q, k2, v2)[:, :, :7] - full[:, :, :7]).abs().max() > 1e-2


def test_norm_attention_decay():
    q, k, v = (t.detach() for t in _qkv(4, 2, 10))
    plain = norm_attention(q, k, v, causal=True)
    torch.testing.assert_close(norm_attention(q, k, v, causal=True, decay=1.0), plain, **TOL)
    # a per-head decay is the scalar decay of that head
    per_head = norm_attention(q, k, v, causal=True, decay=HEAD_DECAY)
    for h, g in enumerate(HEAD_DECAY.tolist()):
        one = norm_attention(q, k, v, causal=True, decay=g)
        torch.testing.assert_close(per_head[:, h], one[:, h], **TOL)
    assert (per_head[:, 0] - plain[:, 0]).abs().max() > 1e-2
    # a vanishing decay keeps only j = i: Norm(c v_i) with c = phi(q_i).phi(k_i) > 0
    tiny = norm_attention(q, k, v, causal=True, decay=1e-12)
    vr = v.repeat_interleave(2, 1)
    torch.testing.assert_close(tiny, vr / vr.pow(2).mean(-1, keepdim=True).sqrt(),
                               rtol=1e-4, atol=1e-4)


def test_norm_attention_output_is_normalised():
    q, k, v = (t.detach() for t in _qkv(2, 2, 9))
    rms = norm_attention(q, k, v, causal=True)
    torch.testing.assert_close(rms.pow(2).mean(-1), torch.ones(2, 2, 9, dtype=F64),
                               rtol=1e-5, atol=1e-5)
    layer = norm_attention(q, k, v, norm="layer")
    torch.testing.assert_close(layer.mean(-1), torch.zeros(2, 2, 9, dtype=F64), **TOL)
    torch.testing.assert_close(layer.var(-1, unbiased=False), torch.ones(2, 2, 9, dtype=F64),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_norm_attention_low_precision(dtype, tol):
    q, k, v = (t.detach() for t in _qkv(4, 2, 21))
    for causal in (False, True):
        ref = norm_attention(q, k, v, causal=causal, chunk_size=8)
        out = norm_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, chunk_size=8)
        assert out.dtype == dtype and bool(torch.isfinite(out).all())
        torch.testing.assert_close(out.to(F64), ref, rtol=tol, atol=tol)




@pytest.mark.parametrize("causal", [False, True])
def test_norm_attention_never_forms_L_by_L(causal):
    L = 512
    q, k, v = (torch.randn(1, 1, L, 8, requires_grad=True) for _ in range(3))
    mode = MaxNumel()
    with mode:
        norm_attention(q, k, v, causal=causal, chunk_size=32).sum().backward()
    assert k.grad is not None and 0 < mode.max_numel < L * L / 8


def test_norm_attention_bad_inputs():
    q, k, v = (t.detach() for t in _qkv(4, 2, 6))
    with pytest.raises(ValueError, match="norm must be one of .*norm='batch'"):
        norm_attention(q, k, v, norm="batch")
    with pytest.raises(ValueError, match="eps must be a finite float > 0, got eps=0"):
        norm_attention(q, k, v, eps=0)
    with pytest.raises(ValueError, match="decay"):
        norm_attention(q, k, v, decay=0.9)
    with pytest.raises(ValueError, match="decay must lie in"):
        norm_attention(q, k, v, causal=True, decay=1.5)
    with pytest.raises(ValueError, match="decay must be broadcastable"):
        norm_attention(q, k, v, causal=True, decay=torch.full((3,), 0.9))
    with pytest.raises(TypeError, match="causal must be a bool, got causal=1"):
        norm_attention(q, k, v, causal=1)
    with pytest.raises(TypeError, match="feature_map must be a callable"):
        norm_attention(q, k, v, feature_map=3)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1, got chunk_size=0"):
        norm_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="L == S"):
        norm_attention(q, k[:, :, :4], v[:, :, :4])
    with pytest.raises(ValueError, match="one token axis"):
        norm_attention(q[:, :, None], k[:, :, None], v[:, :, None])


# --------------------------------------------------------------------------- DiagAttention


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hq,Hkv,L,block", [(3, 3, 16, 4), (4, 2, 37, 8), (4, 1, 13, 5)])
def test_diag_attention_matches_reference(causal, Hq, Hkv, L, block):
    out = _same_with_grads(diag_attention, diag_attention_reference, _qkv(Hq, Hkv, L),
                           block_size=block, causal=causal)
    assert out.shape == (2, Hq, L, 5)


def _sdpa(q, k, v, causal):
    G = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=causal
    )


@pytest.mark.parametrize("causal", [False, True])
def test_diag_attention_blocks_are_independent_softmax_attention(causal):
    """L = 37, block 8: blocks [0, 8), ..., [32, 37) (the last one 5 tokens), each plain
    softmax attention on its own slice."""
    q, k, v = (t.detach() for t in _qkv(4, 2, 37))
    out = diag_attention(q, k, v, block_size=8, causal=causal)
    for lo in range(0, 37, 8):
        hi = min(lo + 8, 37)
        expected = _sdpa(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], causal)
        torch.testing.assert_close(out[:, :, lo:hi], expected, **TOL)


def test_blocked_pattern_with_a_short_last_block():
    q, k, v = (t.detach() for t in _qkv(1, 1, 37, B=1))
    w = al.attention_weights(q, k, v, al.Blocked(8))[0, 0]
    i = torch.arange(37)
    assert torch.equal(w > 0, (i[:, None] // 8) == (i[None, :] // 8))
    assert int((w[36] > 0).sum()) == 5


@pytest.mark.parametrize("causal", [False, True])
def test_diag_attention_block_one_returns_v(causal):
    q, k, v = (t.detach() for t in _qkv(4, 2, 11))
    out = diag_attention(q, k, v, block_size=1, causal=causal)
    torch.testing.assert_close(out, v.repeat_interleave(2, 1), **TOL)


@pytest.mark.parametrize("block", [13, 14, 100])
@pytest.mark.parametrize("causal", [False, True])
def test_diag_attention_large_block_is_full_attention(block, causal):
    q, k, v = (t.detach() for t in _qkv(4, 2, 13))
    out = diag_attention(q, k, v, block_size=block, causal=causal)
    torch.testing.assert_close(out, _sdpa(q, k, v, causal), **TOL)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_diag_attention_low_precision(dtype, tol):
    q, k, v = (t.detach() for t in _qkv(4, 2, 21))
    ref = diag_attention(q, k, v, block_size=6, causal=True)
    out = diag_attention(q.to(dtype), k.to(dtype), v.to(dtype), block_size=6, causal=True)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.to(F64), ref, rtol=tol, atol=tol)


def test_diag_attention_bad_inputs():
    q, k, v = (t.detach() for t in _qkv(4, 2, 6))
    with pytest.raises(ValueError, match="block_size must be an int >= 1, got block_size=0"):
        diag_attention(q, k, v, block_size=0)
    with pytest.raises(TypeError, match="block_size must be an int"):
        diag_attention(q, k, v, block_size=2.0)
    with pytest.raises(TypeError, match="causal must be a bool"):
        diag_attention(q, k, v, block_size=2, causal="yes")
    with pytest.raises(ValueError, match="L == S"):
        diag_attention(q, k[:, :, :4], v[:, :, :4], block_size=2)
    with pytest.raises(ValueError, match="one token axis"):
        diag_attention(q[:, :, None], k[:, :, None], v[:, :, None], block_size=2)
    with pytest.raises(ValueError, match="k.shape"):
        diag_attention(q, k[..., :3], v, block_size=2)
