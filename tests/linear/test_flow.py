"""Flow-Attention (Flowformer, Wu et al., 2022) against its dense L x S reference."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.linear.flow import flow_attention, flow_attention_reference
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


@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.5, 3])
@pytest.mark.parametrize(
    "Hq,Hkv,L,S", [(3, 3, 13, 13), (4, 2, 13, 7), (4, 1, 5, 19), (2, 1, (3, 5), (2, 3))]
)
def test_matches_reference_outputs_and_gradients(Hq, Hkv, L, S, eps):
    q, k, v = _qkv(Hq, Hkv, L, S)
    out = flow_attention(q, k, v, eps=eps)
    ref = flow_attention_reference(q, k, v, eps=eps)
    assert out.shape == (2, Hq, *((L,) if isinstance(L, int) else L), 5)
    torch.testing.assert_close(out, ref, **TOL)
    go = _rand(*out.shape, seed=9)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go),
                    torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, **TOL)


def test_eps_is_used():
    q, k, v = (t.detach() for t in _qkv(2, 2, 6, 4))
    a, b = flow_attention(q, k, v, eps=0.0), flow_attention(q, k, v, eps=1.0)
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(flow_attention(q, k, v), a, rtol=1e-4, atol=1e-5)


def test_single_token_is_sigmoid_one_times_value():
    """L = S = 1: I = O = phi(q).phi(k), I^ = 1, w = 1, so o = sigmoid(1) * v (eps = 0)."""
    q, k, v = _rand(3, 2, 1, 4, seed=0), _rand(3, 2, 1, 4, seed=1), _rand(3, 2, 1, 5, seed=2)
    expected = v / (1 + math.exp(-1))
    torch.testing.assert_close(flow_attention(q, k, v, eps=0.0), expected, **TOL)


def test_one_head_written_out():
    """Every step of the flow network for one head as plain loops (no attnlab code)."""
    L, S, D = 4, 3, 2
    q, k, v = _rand(1, 1, L, D, seed=3), _rand(1, 1, S, D, seed=4), _rand(1, 1, S, 2, seed=5)
    eps = 0.1
    pq, pk = torch.sigmoid(q[0, 0]), torch.sigmoid(k[0, 0])
    cap = [[float(pq[i] @ pk[j]) for j in range(S)] for i in range(L)]
    inc = [sum(cap[i]) for i in range(L)]
    outg = [sum(cap[i][j] for i in range(L)) for j in range(S)]
    inc_hat = [sum(cap[i][j] / (outg[j] + eps) for j in range(S)) for i in range(L)]
    out_hat = [sum(cap[i][j] / (inc[i] + eps) for i in range(L)) for j in range(S)]
    z = sum(math.exp(o) for o in out_hat)
    w = [S * math.exp(o) / z for o in out_hat]
    expected = torch.zeros(L, 2, dtype=F64)
    for i in range(L):
        r = 1 / (1 + math.exp(-inc_hat[i] * L / S))
        for j in range(S):
            expected[i] += r * cap[i][j] / (inc[i] + eps) * w[j] * v[0, 0, j]
    torch.testing.assert_close(flow_attention(q, k, v, eps=eps)[0, 0], expected, **TOL)


def test_gqa_equals_repeated_kv_heads():
    q, k, v = (t.detach() for t in _qkv(6, 2, 9, 5))
    rep = flow_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    torch.testing.assert_close(flow_attention(q, k, v), rep, **TOL)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_low_precision_close_to_float64(dtype, tol):
    q, k, v = (t.detach() for t in _qkv(4, 2, 17, 11))
    ref = flow_attention(q, k, v)
    out = flow_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.to(F64), ref, rtol=tol, atol=tol)




def test_fast_path_never_forms_L_by_S():
    L, S = 512, 384
    q, k, v = (torch.randn(1, 1, n, 8, requires_grad=True) for n in (L, S, S))
    mode = MaxNumel()
    with mode:
        flow_attention(q, k, v).sum().backward()
    assert k.grad is not None and 0 < mode.max_numel < L * S / 16
    mode = MaxNumel()
    with mode:
        flow_attention_reference(q, k, v)
    assert mode.max_numel >= L * S


def test_bad_inputs_name_the_argument():
    q, k, v = (t.detach() for t in _qkv(4, 2, 5, 5))
    with pytest.raises(ValueError, match="eps must be a finite float >= 0, got eps=-1"):
        flow_attention(q, k, v, eps=-1.0)
    with pytest.raises(ValueError, match="eps=nan"):
        flow_attention(q, k, v, eps=float("nan"))
    with pytest.raises(TypeError, match="eps must be a float"):
        flow_attention(q, k, v, eps="small")
    with pytest.raises(TypeError, match="eps"):
        flow_attention(q, k, v, eps=True)
    with pytest.raises(ValueError, match="k.shape"):
        flow_attention(q, k[..., :2], v)
    with pytest.raises(ValueError, match="k and v must have the same token axes"):
        flow_attention(q, k, v[:, :, :3])
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        flow_attention(q, k, None)
