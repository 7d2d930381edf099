"""Mamba's selective scan: loop reference == parallel scan == hidden attention matrix."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.linear.ssm import mamba_implicit_attention, selective_scan, selective_scan_reference
from attnlab.testing import MaxNumel

TOL = {"rtol": 1e-10, "atol": 1e-10}
BT, DM, N = 2, 3, 4


def _inputs(L, seed=0, requires_grad=False, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    f64 = {"generator": gen, "dtype": torch.float64}
    x = torch.randn(BT, DM, L, **f64)
    delta = torch.rand(BT, DM, L, **f64) * 0.9 + 0.05
    A = -(torch.rand(DM, N, **f64) * 2 + 0.1)
    B = torch.randn(BT, N, L, **f64)
    C = torch.randn(BT, N, L, **f64)
    D = torch.randn(DM, **f64)
    h0 = torch.randn(BT, DM, N, **f64)
    out = [t.to(dtype) for t in (x, delta, A, B, C, D, h0)]
    if requires_grad:
        for t in out:
            t.requires_grad_(True)
    return out


def _alpha_y(x, delta, A, B, C, D=None):
    y = (mamba_implicit_attention(delta, A, B, C) @ x[..., None]).squeeze(-1)
    return y if D is None else y + D[:, None] * x


LENGTHS = [1, 2, 7, 33, 64]


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("with_D", [False, True])
def test_loop_scan_and_alpha_agree(L, with_D):
    x, delta, A, B, C, D, _ = _inputs(L)
    D = D if with_D else None
    want = selective_scan_reference(x, delta, A, B, C, D)
    assert want.shape == (BT, DM, L)
    torch.testing.assert_close(selective_scan(x, delta, A, B, C, D), want, **TOL)
    torch.testing.assert_close(_alpha_y(x, delta, A, B, C, D), want, **TOL)


@pytest.mark.parametrize("L", [1, 9, 33])
def test_initial_and_final_state(L):
    x, delta, A, B, C, D, h0 = _inputs(L)
    y_ref, h_ref = selective_scan_reference(x, delta, A, B, C, D, h0, return_state=True)
    y, h = selective_scan(x, delta, A, B, C, D, h0, return_state=True)
    assert h.shape == (BT, DM, N)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(h, h_ref, **TOL)


def test_reference_loop_follows_the_recurrence():
    x, delta, A, B, C, D, h0 = _inputs(5)
    y = selective_scan_reference(x, delta, A, B, C, D, h0)
    for b in range(BT):
        for d in range(DM):
            h = h0[b, d].clone()
            for t in range(5):
                h = torch.exp(delta[b, d, t] * A[d]) * h + delta[b, d, t] * B[b, :, t] * x[b, d, t]
                want = C[b, :, t] @ h + D[d] * x[b, d, t]
                torch.testing.assert_close(y[b, d, t], want, **TOL)


def test_alpha_follows_the_paper_formula():
    L = 6
    _, delta, A, B, C, _, _ = _inputs(L)
    alpha = mamba_implicit_attention(delta, A, B, C)
    assert alpha.shape == (BT, DM, L, L)
    for b in range(BT):
        for d in range(DM):
            for i in range(L):
                for j in range(L):
                    if j > i:
                        assert alpha[b, d, i, j] == 0
                        continue
                    decay = torch.ones(N, dtype=torch.float64)
                    for s in range(j + 1, i + 1):
                        decay = decay * torch.exp(delta[b, d, s] * A[d])
                    want = C[b, :, i] @ (decay * delta[b, d, j] * B[b, :, j])
                    torch.testing.assert_close(alpha[b, d, i, j], want, **TOL)


@pytest.mark.parametrize("L", [1, 7, 20])
@pytest.mark.parametrize("with_D", [False, True])
def test_gradients_of_every_input(L, with_D):
    x, delta, A, B, C, D, h0 = _inputs(L, requires_grad=True)
    D = D if with_D else None
    leaves = [t for t in (x, delta, A, B, C, D, h0) if t is not None]
    g_y = torch.randn(BT, DM, L, dtype=torch.float64)
    g_h = torch.randn(BT, DM, N, dtype=torch.float64)

    def grads(fn):
        y, h = fn(x, delta, A, B, C, D, h0, return_state=True)
        return torch.autograd.grad((y * g_y).sum() + (h * g_h).sum(), leaves)

    for got, want in zip(grads(selective_scan), grads(selective_scan_reference), strict=True):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("with_D", [False, True])
def test_alpha_gradients_match_loop(with_D):
    x, delta, A, B, C, D, _ = _inputs(11, requires_grad=True)
    D = D if with_D else None
    leaves = [t for t in (x, delta, A, B, C, D) if t is not None]
    g_y = torch.randn(BT, DM, 11, dtype=torch.float64)
    a = torch.autograd.grad((_alpha_y(x, delta, A, B, C, D) * g_y).sum(), leaves)
    b = torch.autograd.grad((selective_scan_reference(x, delta, A, B, C, D) * g_y).sum(), leaves)
    for got, want in zip(a, b, strict=True):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("split", [1, 6, 16])
def test_state_carry_two_halves_equal_one_call(split):
    L = 23
    x, delta, A, B, C, D, h0 = _inputs(L)
    whole, h_whole = selective_scan(x, delta, A, B, C, D, h0, return_state=True)
    parts = [slice(0, split), slice(split, L)]
    y1, h1 = selective_scan(*(t[..., parts[0]] for t in (x, delta)), A,
                            *(t[..., parts[0]] for t in (B, C)), D, h0, return_state=True)
    y2, h2 = selective_scan(*(t[..., parts[1]] for t in (x, delta)), A,
                            *(t[..., parts[1]] for t in (B, C)), D, h1, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], dim=-1), whole, **TOL)
    torch.testing.assert_close(h2, h_whole, **TOL)
    torch.testing.assert_close(whole, selective_scan_reference(x, delta, A, B, C, D, h0), **TOL)


def test_strong_decay_is_stable():
    x, delta, A, B, C, D, h0 = _inputs(33, requires_grad=True)
    with torch.no_grad():
        A.mul_(500.0)  # delta * A down to ~ -1000: exp underflows to 0, never overflows
    y = selective_scan(x, delta, A, B, C, D, h0)
    torch.testing.assert_close(y, selective_scan_reference(x, delta, A, B, C, D, h0), **TOL)
    alpha = mamba_implicit_attention(delta, A, B, C)
    grads = torch.autograd.grad(y.sum() + alpha.sum(), (x, delta, A, B, C, D, h0))
    assert torch.isfinite(y).all() and torch.isfinite(alpha).all()
    assert all(torch.isfinite(g).all() for g in grads)


def test_zero_A_is_a_plain_cumulative_sum():
    x, delta, _, B, C, _, _ = _inputs(9)
    A = torch.zeros(DM, N, dtype=torch.float64)
    u = (delta * x)[..., None] * B.transpose(1, 2)[:, None]  # (Bt, Dm, L, N)
    want = (torch.cumsum(u, dim=2) * C.transpose(1, 2)[:, None]).sum(-1)
    torch.testing.assert_close(selective_scan(x, delta, A, B, C), want, **TOL)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_low_precision_sanity(dtype, tol):
    x, delta, A, B, C, D, h0 = _inputs(37)
    want = selective_scan_reference(x, delta, A, B, C, D, h0)
    low = [t.to(dtype) for t in (x, delta, A, B, C, D, h0)]
    y = selective_scan(*low)
    assert y.dtype == dtype and torch.isfinite(y).all()
    scale = want.abs().max().item()
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol * scale)
    alpha = mamba_implicit_attention(*low[1:5])
    assert alpha.dtype == dtype and torch.isfinite(alpha).all()


def test_mixed_dtypes_compute_in_the_widest():
    x, delta, A, B, C, D, _ = _inputs(10)
    want = selective_scan_reference(x, delta, A, B, C, D)
    y = selective_scan(x.float(), delta.float(), A, B.float(), C.float(), D.float())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)




def test_scan_never_materialises_L_by_L():
    L = 300
    x, delta, A, B, C, D, h0 = (t.float().requires_grad_(True) for t in _inputs(L))
    mode = MaxNumel()
    with mode:
        selective_scan(x, delta, A, B, C, D, h0).sum().backward()
    assert delta.grad is not None and A.grad is not None
    assert 0 < mode.max_numel <= BT * DM * L * N < L * L


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fn", [selective_scan, selective_scan_reference])
def test_bad_shapes(fn):
    x, delta, A, B, C, D, h0 = _inputs(7)
    with pytest.raises(ValueError, match=r"x must have shape \(Bt, Dm, L\).*x.shape=\(2, 3\)"):
        fn(x[..., 0], delta, A, B, C)
    with pytest.raises(ValueError, match=r"delta must have shape .*delta.shape=\(2, 3, 6\)"):
        fn(x, delta[..., :6], A, B, C)
    with pytest.raises(ValueError, match=r"A must have shape \(Dm, N\)=\(3, 4\)"):
        fn(x, delta, torch.cat([A, A]), B, C)
    with pytest.raises(ValueError, match=r"B must have shape \(Bt, N, L\)=\(2, 4, 7\)"):
        fn(x, delta, A, B[:, :3], C)
    with pytest.raises(ValueError, match=r"C must have shape \(Bt, N, L\)=\(2, 4, 7\)"):
        fn(x, delta, A, B, C[..., :5])
    with pytest.raises(ValueError, match=r"D must have shape \(Dm,\)=\(3,\)"):
        fn(x, delta, A, B, C, D[:2])
    with pytest.raises(ValueError, match=r"initial_state must have shape \(Bt, Dm, N\)"):
        fn(x, delta, A, B, C, D, h0[..., :3])
    with pytest.raises(TypeError, match="B must be a torch.Tensor"):
        fn(x, delta, A, None, C)
    with pytest.raises(TypeError, match="x must be a real floating-point tensor"):
        fn(x.long(), delta, A, B, C)
    with pytest.raises(TypeError, match="return_state must be a bool"):
        fn(x, delta, A, B, C, return_state="yes")
    with pytest.raises(ValueError, match="x has an empty dimension|delta has an empty dimension"):
        fn(x[..., :0], delta[..., :0], A, B[..., :0], C[..., :0])


@pytest.mark.parametrize("fn", [selective_scan, selective_scan_reference, "alpha"])
def test_bad_values(fn):
    x, delta, A, B, C, _, _ = _inputs(7)

    def call(delta, A):
        if fn == "alpha":
            return mamba_implicit_attention(delta, A, B, C)
        return fn(x, delta, A, B, C)

    bad_A = A.clone()
    bad_A[1, 2] = 0.5
    with pytest.raises(ValueError, match=r"A must be non-positive.*A=0.5"):
        call(delta, bad_A)
    for value in (0.0, -0.25, math.nan):
        bad_delta = delta.clone()
        bad_delta[0, 1, 3] = value
        with pytest.raises(ValueError, match=r"delta must be positive.*delta="):
            call(bad_delta, A)


def test_alpha_bad_shapes():
    _, delta, A, B, C, _, _ = _inputs(7)
    with pytest.raises(ValueError, match=r"A must have shape \(Dm, N\)"):
        mamba_implicit_attention(delta, A[None], B, C)
    with pytest.raises(ValueError, match=r"C must have shape \(Bt, N, L\)=\(2, 4, 7\)"):
        mamba_implicit_attention(delta, A, B, C[:1])
