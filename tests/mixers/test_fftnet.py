"""FFTNet's adaptive spectral filter and modReLU against the dense-DFT reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attnlab.mixers import adaptive_spectral_filter, adaptive_spectral_filter_reference, mod_relu

TOL = dict(rtol=1e-10, atol=1e-10)


def _mlp(C, L, hidden=6, seed=3, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(C, hidden), nn.GELU(), nn.Linear(hidden, L * C)).to(dtype)


# ----------------------------------------------------------------------------- modReLU


@pytest.mark.parametrize(
    "b, expected",
    [(-1.0, 2.4 + 3.2j), (-6.0, 0.0), (1.0, 3.6 + 4.8j), (0.0, 3.0 + 4.0j)],
)
def test_mod_relu_by_hand(b, expected):
    # |3 + 4i| = 5: modReLU = max(5 + b, 0) * (3 + 4i) / 5
    out = mod_relu(torch.tensor([3.0 + 4.0j], dtype=torch.complex128), b)
    torch.testing.assert_close(out, torch.tensor([expected], dtype=torch.complex128))


def test_mod_relu_at_zero_is_zero_with_finite_grads():
    z = torch.tensor([0, 0, 1 + 1j, 0, -2j], dtype=torch.complex128, requires_grad=True)
    b = torch.tensor([0.5, -0.5, 0.1, 0.0, -0.3], dtype=torch.float64, requires_grad=True)
    out = mod_relu(z, b)
    assert out[[0, 1, 3]].abs().max() == 0
    loss = (out.real * torch.arange(1.0, 6.0) + out.imag * torch.arange(2.0, 7.0)).sum()
    gz, gb = torch.autograd.grad(loss, (z, b))
    assert torch.isfinite(torch.view_as_real(gz)).all() and torch.isfinite(gb).all()
    # away from zero the bias gradient is d(ReLU(|z| + b))/db * <cot, z / |z|>
    expected = torch.tensor((3 + 4) / 2**0.5, dtype=torch.float64)
    torch.testing.assert_close(gb[2], expected)


def test_mod_relu_bad_input():
    with pytest.raises(TypeError, match=r"z.dtype=torch.float32, expected a complex dtype"):
        mod_relu(torch.ones(3), 0.0)
    with pytest.raises(TypeError, match=r"z=list"):
        mod_relu([1j], 0.0)


# ---------------------------------------------------------------------- adaptive filter


@pytest.mark.parametrize("L", [7, 13, 33, 8])
@pytest.mark.parametrize("use_mlp", [True, False])
@pytest.mark.parametrize("complex_base", [False, True])
def test_matches_reference_outputs_and_grads(L, use_mlp, complex_base):
    gen = torch.Generator().manual_seed(L)
    B, C = 2, 4
    x = torch.randn(B, L, C, generator=gen, dtype=torch.float64, requires_grad=True)
    dtype = torch.complex128 if complex_base else torch.float64
    base = (1 + 0.5 * torch.randn(L, C, generator=gen, dtype=dtype)).requires_grad_(True)
    # biases around the typical magnitude so modReLU zeroes a good share of the entries
    bias = (-0.6 + 0.3 * torch.randn(C, generator=gen, dtype=torch.float64)).requires_grad_(True)
    mlp = _mlp(C, L) if use_mlp else None
    params = [x, base, bias] + (list(mlp.parameters()) if use_mlp else [])
    cot = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    out = adaptive_spectral_filter(x, base, mlp, bias)
    ref = adaptive_spectral_filter_reference(x, base, mlp, bias)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert (out != 0).any()
    torch.testing.assert_close(out, ref, **TOL)
    grads = torch.autograd.grad(out, params, cot)
    grads_ref = torch.autograd.grad(ref, params, cot)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **TOL)


@pytest.mark.parametrize("fn", [adaptive_spectral_filter, adaptive_spectral_filter_reference])
def test_identity_zero_and_shift_by_hand(fn):
    B, L, C = 2, 7, 3
    x = torch.randn(B, L, C, dtype=torch.float64)
    ones, zero = torch.ones(L, C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    # W = 1, b = 0: modReLU is the identity and the unitary FFT round trip returns x
    torch.testing.assert_close(fn(x, ones, None, zero), x, **TOL)
    # |X| <= sum |x| / sqrt(L) everywhere: a bias below -that zeroes every frequency
    big = torch.full((C,), -x.abs().sum().item(), dtype=torch.float64)
    assert fn(x, ones, None, big).abs().max() == 0
    # W[k] = exp(-2j pi k s / L) with b = 0: a circular shift by s tokens
    k = torch.arange(L, dtype=torch.float64)[:, None].expand(L, C)
    ramp = torch.exp(-2j * math.pi * k * 2 / L)
    torch.testing.assert_close(fn(x, ramp, None, zero), torch.roll(x, 2, dims=1), **TOL)
    # a constant modulation from the MLP adds to the base filter: 1 + 1 = 2 -> y = 2 x
    mlp = lambda c: torch.ones(B, L, C, dtype=c.dtype)  # noqa: E731
    torch.testing.assert_close(fn(x, ones, mlp, zero), 2 * x, **TOL)


def test_zero_input_has_finite_grads():
    B, L, C = 2, 7, 3
    x = torch.zeros(B, L, C, dtype=torch.float64, requires_grad=True)
    base = torch.ones(L, C, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([0.5, 0.0, -0.5], dtype=torch.float64, requires_grad=True)
    mlp = _mlp(C, L)
    params = [x, base, bias, *mlp.parameters()]
    for fn in (adaptive_spectral_filter, adaptive_spectral_filter_reference):
        out = fn(x, base, mlp, bias)
        assert out.abs().max() == 0
        grads = torch.autograd.grad(out, params, torch.randn(B, L, C, dtype=torch.float64))
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_low_precision_sanity(dtype, tol):
    B, L, C = 2, 13, 8
    x = torch.randn(B, L, C).to(dtype)
    base = (1 + 0.5 * torch.randn(L, C)).to(dtype)
    bias = torch.full((C,), -0.3).to(dtype)
    mlp = _mlp(C, L, dtype=dtype)
    out = adaptive_spectral_filter(x, base, mlp, bias)
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()
    mlp64 = _mlp(C, L)
    mlp64.load_state_dict({k: v.double() for k, v in mlp.state_dict().items()})
    ref = adaptive_spectral_filter_reference(x.double(), base.double(), mlp64, bias.double())
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("fn", [adaptive_spectral_filter, adaptive_spectral_filter_reference])
def test_bad_inputs(fn):
    B, L, C = 2, 7, 4
    x, base, bias = torch.randn(B, L, C), torch.ones(L, C), torch.zeros(C)
    msg = r"base_filter.shape=\(6, 4\), expected \(L, C\) = \(7, 4\)"
    with pytest.raises(ValueError, match=msg):
        fn(x, torch.ones(6, 4), None, bias)
    with pytest.raises(TypeError, match=r"base_filter=float"):
        fn(x, 1.0, None, bias)
    with pytest.raises(TypeError, match=r"mlp=int, expected a callable"):
        fn(x, base, 3, bias)
    msg = r"mlp\(context\).shape=\(2, 4\).*expected \(B, L \* C\) = \(2, 28\)"
    with pytest.raises(ValueError, match=msg):
        fn(x, base, lambda c: c, bias)
    with pytest.raises(TypeError, match=r"mlp\(context\) returned list"):
        fn(x, base, lambda c: [c], bias)
    with pytest.raises(ValueError, match=r"bias.shape=\(3,\), expected \(4,\) or \(\)"):
        fn(x, base, None, torch.zeros(3))
    with pytest.raises(TypeError, match=r"bias=float, expected a real floating-point"):
        fn(x, base, None, 0.0)
    with pytest.raises(ValueError, match=r"x.shape=\(2, 7, 2, 4\), expected \(B, L, C\)"):
        fn(torch.randn(2, 7, 2, 4), base, None, bias)
    with pytest.raises(TypeError, match=r"x=NoneType"):
        fn(None, base, None, bias)
