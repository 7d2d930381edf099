"""FNet mixing against its dense-DFT reference, hand-derived spectra, dtypes, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.mixers import fnet_mixing, fnet_mixing_reference

SHAPES = [(2, 7, 5), (1, 13, 4), (2, 33, 3), (2, 8, 6), (2, 5, 6, 3), (1, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_outputs_and_grads(shape):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(shape, generator=gen, dtype=torch.float64)
    out, ref = fnet_mixing(x), fnet_mixing_reference(x)
    assert out.shape == x.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    (g,) = torch.autograd.grad(out, x, cot)
    (g_ref,) = torch.autograd.grad(ref, x, cot)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fn", [fnet_mixing, fnet_mixing_reference])
def test_constant_input_is_a_single_dc_token(fn):
    # sum_{t,c} a exp(-2j pi (k t / L + j c / C)) = a L C if k = j = 0, else 0
    B, L, C, a = 2, 7, 5, 1.5
    out = fn(torch.full((B, L, C), a, dtype=torch.float64))
    expected = torch.zeros(B, L, C, dtype=torch.float64)
    expected[:, 0, 0] = a * L * C
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fn", [fnet_mixing, fnet_mixing_reference])
def test_delta_maps_to_all_ones(fn):
    # the DFT of a unit impulse at the origin is 1 at every frequency
    x = torch.zeros(1, 5, 6, 3, dtype=torch.float64)
    x[0, 0, 0, 0] = 1.0
    torch.testing.assert_close(fn(x), torch.ones_like(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("fn", [fnet_mixing, fnet_mixing_reference])
def test_cosine_on_one_channel(fn):
    # x[t, 0] = cos(2 pi m t / L), other channels 0: the hidden DFT copies x[t, 0] to every
    # hidden frequency; the sequence DFT of the cosine is L / 2 at k = m and k = L - m
    L, C, m = 13, 4, 3
    t = torch.arange(L, dtype=torch.float64)
    x = torch.zeros(1, L, C, dtype=torch.float64)
    x[0, :, 0] = torch.cos(2 * math.pi * m * t / L)
    expected = torch.zeros_like(x)
    expected[0, [m, L - m], :] = L / 2
    torch.testing.assert_close(fn(x), expected, rtol=0, atol=1e-11)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_low_precision_sanity(dtype, tol):
    x = torch.randn(2, 13, 8).to(dtype)
    out = fnet_mixing(x)
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()
    ref = fnet_mixing_reference(x.double())
    scale = ref.abs().max()
    assert (out.double() - ref).abs().max() <= tol * scale


@pytest.mark.parametrize("fn", [fnet_mixing, fnet_mixing_reference])
def test_bad_inputs(fn):
    with pytest.raises(TypeError, match=r"x=list, expected a torch.Tensor"):
        fn([[1.0]])
    with pytest.raises(TypeError, match=r"x.dtype=torch.int64, expected a real floating"):
        fn(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"x.dtype=torch.complex64"):
        fn(torch.ones(2, 3, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"x.shape=\(3, 4\), expected \(B, \*tokens, C\)"):
        fn(torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"x.shape=\(2, 0, 4\), expected non-empty"):
        fn(torch.ones(2, 0, 4))
