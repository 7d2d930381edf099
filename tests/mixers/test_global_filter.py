"""GFNet global filter against its dense-DFT reference, circular shift/convolution, errors."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.mixers import global_filter, global_filter_reference, global_filter_weight_shape

TOL = dict(rtol=1e-10, atol=1e-10)
TOKENS = [(7,), (13,), (33,), (8,), (5, 6), (4, 7), (3, 4, 5)]


def _weight(tokens, C, real, gen):
    shape = global_filter_weight_shape(tokens, C)
    if real:
        return torch.randn(*shape, 2, generator=gen, dtype=torch.float64)
    return torch.randn(shape, generator=gen, dtype=torch.complex128)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("real", [True, False])
def test_matches_reference_outputs_and_grads(tokens, real):
    gen = torch.Generator().manual_seed(2)
    B, C = 2, 3
    x = torch.randn(B, *tokens, C, generator=gen, dtype=torch.float64, requires_grad=True)
    w = _weight(tokens, C, real, gen).requires_grad_(True)
    cot = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    out, ref = global_filter(x, w), global_filter_reference(x, w)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, ref, **TOL)
    grads = torch.autograd.grad(out, (x, w), cot)
    grads_ref = torch.autograd.grad(ref, (x, w), cot)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **TOL)


def _phase_ramp(tokens, shifts, C):
    """``W[k] = exp(-2j pi sum_i k_i s_i / n_i)`` on the rfft half grid: a circular shift."""
    freq = global_filter_weight_shape(tokens, C)[:-1]
    phase = torch.zeros(freq, dtype=torch.float64)
    for axis, (n, s) in enumerate(zip(tokens, shifts)):
        k = torch.arange(freq[axis], dtype=torch.float64)
        view = [1] * len(freq)
        view[axis] = -1
        phase = phase + (k * s / n).view(view)
    return torch.exp(-2j * math.pi * phase)[..., None].expand(*freq, C)


@pytest.mark.parametrize("fn", [global_filter, global_filter_reference])
@pytest.mark.parametrize("tokens, shifts", [((7,), (2,)), ((8,), (3,)), ((5, 6), (1, 4))])
def test_phase_ramp_is_a_circular_shift(fn, tokens, shifts):
    # with ortho on both transforms the scalings cancel, and a linear phase shifts the signal
    x = torch.randn(2, *tokens, 3, dtype=torch.float64)
    out = fn(x, _phase_ramp(tokens, shifts, 3))
    expected = torch.roll(x, shifts, dims=tuple(range(1, len(tokens) + 1)))
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("fn", [global_filter, global_filter_reference])
@pytest.mark.parametrize("L", [7, 10])
def test_dft_of_a_real_kernel_is_circular_convolution(fn, L):
    # W = sum_m h[m] exp(-2j pi k m / L) (unnormalised): y[n] = sum_m h[m] x[(n - m) mod L]
    C = 3
    x = torch.randn(2, L, C, dtype=torch.float64)
    h = torch.randn(L, C, dtype=torch.float64)
    k = torch.arange(L // 2 + 1, dtype=torch.float64)[:, None]
    m = torch.arange(L, dtype=torch.float64)[None, :]
    w = torch.exp(-2j * math.pi * k * m / L) @ h.to(torch.complex128)
    expected = torch.zeros_like(x)
    for n in range(L):
        for j in range(L):
            expected[:, n] += h[j] * x[:, (n - j) % L]
    torch.testing.assert_close(fn(x, w), expected, **TOL)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_sanity(dtype, tol):
    x = torch.randn(2, 5, 6, 8)
    w = torch.randn(5, 4, 8, 2)
    out = global_filter(x.to(dtype), w.to(dtype))
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()
    ref = global_filter_reference(x.to(dtype).double(), w.to(dtype).double())
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("fn", [global_filter, global_filter_reference])
def test_bad_inputs(fn):
    x = torch.randn(2, 8, 5)
    with pytest.raises(ValueError, match=r"weight.shape=\(8, 5\), expected \(5, 5\) \(complex\)"):
        fn(x, torch.randn(8, 5, dtype=torch.complex64))
    msg = r"weight.shape=\(5, 5\), expected \(5, 5, 2\) \(real, imag\)"
    with pytest.raises(ValueError, match=msg):
        fn(x, torch.randn(5, 5))
    with pytest.raises(ValueError, match=r"weight.shape=\(5, 4, 2\), expected \(5, 5, 2\)"):
        fn(x, torch.randn(5, 4, 2))
    with pytest.raises(ValueError, match=r"weight.shape=\(5, 5, 2\), expected \(4, 4, 5, 2\)"):
        fn(torch.randn(1, 4, 6, 5), torch.randn(5, 5, 2))
    with pytest.raises(TypeError, match=r"weight=list, expected a complex torch.Tensor"):
        fn(x, [[1.0]])
    with pytest.raises(TypeError, match=r"weight.dtype=torch.int64"):
        fn(x, torch.ones(5, 5, 2, dtype=torch.long))
    with pytest.raises(TypeError, match=r"x=ndarray, expected a torch.Tensor"):
        fn(x.numpy(), torch.randn(5, 5, 2))
    with pytest.raises(ValueError, match=r"x.shape=\(8, 5\), expected \(B, \*tokens, C\)"):
        fn(torch.randn(8, 5), torch.randn(5, 5, 2))
