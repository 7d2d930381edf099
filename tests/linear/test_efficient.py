"""Efficient Attention (Shen et al., 2021) against its dense L x S reference."""

from __future__ import annotations

import pytest
import torch

from attnlab.linear.efficient import efficient_attention, efficient_attention_reference
from attnlab.testing import MaxNumel

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def _rand(*shape, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _qkv(Hq, Hkv, L, S, D=6, Dv=5, B=2, seed=0):
    L, S = (L,) if isinstance(L, int) else L, (S,) if isinstance(S, int) else S
    q = _rand(B, Hq, *L, D, seed=seed).requires_grad_()
    k = _rand(B, Hkv, *S, D, seed=seed + 1).requires_grad_()
    v = _rand(B, Hkv, *S, Dv, seed=seed + 2).requires_grad_()
    return q, k, v


@pytest.mark.parametrize(
    "Hq,Hkv,L,S",
    [(3, 3, 13, 13), (4, 2, 13, 7), (4, 1, 1, 9), (2, 2, (3, 5), (4, 3)),
     (4, 2, (2, 3, 3), (3, 1, 2))],
)
def test_matches_reference_outputs_and_gradients(Hq, Hkv, L, S):
    q, k, v = _qkv(Hq, Hkv, L, S)
    out = efficient_attention(q, k, v)
    ref = efficient_attention_reference(q, k, v)
    assert out.shape == (2, Hq, *((L,) if isinstance(L, int) else L), 5)
    torch.testing.assert_close(out, ref, **TOL)
    go = _rand(*out.shape, seed=9)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go),
                    torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, **TOL)


def test_implied_matrix_rows_sum_to_one():
    """With ``v = I_S`` (one value channel per key) the output *is* the implied matrix
    ``softmax_D(Q) softmax_S(K)^T``: non-negative with unit row sums (convex combinations)."""
    B, Hq, Hkv, L, S = 2, 4, 2, 11, 7
    q = _rand(B, Hq, L, 5, seed=0) * 3
    k = _rand(B, Hkv, S, 5, seed=1) * 3
    eye = torch.eye(S, dtype=F64).expand(B, Hkv, S, S)
    m = efficient_attention(q, k, eye)
    assert m.shape == (B, Hq, L, S)
    assert bool((m >= 0).all())
    torch.testing.assert_close(m.sum(-1), torch.ones(B, Hq, L, dtype=F64), **TOL)
    # hence every output channel stays within the range of its value column
    v = _rand(B, Hkv, S, 3, seed=2)
    out = efficient_attention(q, k, v).view(B, Hkv, Hq // Hkv, L, 3)
    assert bool((out <= v.amax(-2)[:, :, None, None] + 1e-12).all())
    assert bool((out >= v.amin(-2)[:, :, None, None] - 1e-12).all())


def test_matches_hand_written_formula():
    """One head written out with explicit softmaxes (no attnlab code)."""
    q, k, v = _rand(1, 1, 4, 3, seed=0), _rand(1, 1, 6, 3, seed=1), _rand(1, 1, 6, 2, seed=2)
    rq = torch.exp(q[0, 0]) / torch.exp(q[0, 0]).sum(1, keepdim=True)
    rk = torch.exp(k[0, 0]) / torch.exp(k[0, 0]).sum(0, keepdim=True)
    expected = rq @ (rk.T @ v[0, 0])
    torch.testing.assert_close(efficient_attention(q, k, v)[0, 0], expected, **TOL)


def test_gqa_equals_repeated_kv_heads():
    q, k, v = _qkv(6, 2, 9, 5)
    rep = efficient_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    torch.testing.assert_close(efficient_attention(q, k, v), rep, **TOL)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_close_to_float64(dtype, tol):
    q, k, v = (t.detach() for t in _qkv(4, 2, 17, 17))
    ref = efficient_attention(q, k, v)
    out = efficient_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.to(F64), ref, rtol=tol, atol=tol)




def test_fast_path_never_forms_L_by_S():
    L = S = 1024
    q, k, v = (torch.randn(1, 1, n, 8, requires_grad=True) for n in (L, S, S))
    mode = MaxNumel()
    with mode:
        efficient_attention(q, k, v).sum().backward()
    assert k.grad is not None and 0 < mode.max_numel < L * S / 64
    mode = MaxNumel()
    with mode:  # the mode does see an L x S tensor when one is made
        efficient_attention_reference(q, k, v)
    assert mode.max_numel >= L * S


def test_bad_inputs_name_the_argument():
    q, k, v = (t.detach() for t in _qkv(4, 2, 5, 5))
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        efficient_attention(q.tolist(), k, v)
    with pytest.raises(ValueError, match="k.shape"):
        efficient_attention(q, k[..., :3], v)
    with pytest.raises(ValueError, match=r"q.shape\[1\]=4 and k.shape\[1\]=3"):
        efficient_attention(q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1))
    with pytest.raises(TypeError, match="v.dtype"):
        efficient_attention(q, k, v.float())
    with pytest.raises(TypeError, match="q must be a floating-point tensor"):
        efficient_attention(q.long(), k.long(), v.long())
