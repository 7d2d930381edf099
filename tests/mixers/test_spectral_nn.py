"""attnlab.nn.spectral modules: shapes, references, gradients, state_dict, errors."""

from __future__ import annotations

import pytest
import torch

from attnlab.mixers import (
    adaptive_spectral_filter_reference,
    fnet_mixing_reference,
    global_filter_reference,
    spectformer_block_reference,
)
from attnlab.nn.spectral import FFTNetMixer, FNetMixer, GlobalFilter, SpectFormerBlock

TOL = dict(rtol=1e-10, atol=1e-10)


def _check_grads(module, out, ref, x):
    """Output equal to ``ref``; grads of x and every parameter equal and nonzero."""
    torch.testing.assert_close(out, ref, **TOL)
    params = [x, *module.parameters()]
    cot = torch.randn(out.shape, dtype=out.dtype)
    grads = torch.autograd.grad(out, params, cot)
    grads_ref = torch.autograd.grad(ref, params, cot)
    for (name, _), g, g_ref in zip([("x", x), *module.named_parameters()], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **TOL, msg=lambda m: f"{name}: {m}")
        assert g.abs().max() > 0, f"no gradient reaches {name}"


def _roundtrip(make, x):
    torch.manual_seed(1)
    a = make()
    torch.manual_seed(2)
    b = make()
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- FNetMixer


def test_fnet_mixer():
    m = FNetMixer()
    assert list(m.parameters()) == [] and m.state_dict() == {}
    m.reset_parameters()
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    out = m(x)
    assert out.shape == x.shape
    _check_grads(m, out, fnet_mixing_reference(x), x)
    assert "FNetMixer(" in repr(m)
    with pytest.raises(TypeError, match=r"x=str"):
        m("x")


# --------------------------------------------------------------------------- GlobalFilter


@pytest.mark.parametrize("size, weight_shape", [(13, (7, 4, 2)), ((5, 6), (5, 4, 4, 2))])
def test_global_filter_module(size, weight_shape):
    m = GlobalFilter(4, size).double()
    assert tuple(m.complex_weight.shape) == weight_shape
    assert list(m.state_dict()) == ["complex_weight"]  # GFNet's name and layout
    tokens = (size,) if isinstance(size, int) else size
    x = torch.randn(2, *tokens, 4, dtype=torch.float64, requires_grad=True)
    out = m(x)
    assert out.shape == x.shape
    _check_grads(m, out, global_filter_reference(x, m.complex_weight), x)
    _roundtrip(lambda: GlobalFilter(4, size).double(), x.detach())
    assert f"dim=4, size={size}" in repr(m)


def test_global_filter_flattened_tokens_and_init():
    m = GlobalFilter(16, (6, 10))
    std = m.complex_weight.std().item()
    assert 0.017 < std < 0.023  # 6 * 6 * 16 * 2 samples of N(0, 0.02^2)
    x = torch.randn(2, 6, 10, 16)
    torch.testing.assert_close(m(x.reshape(2, 60, 16)), m(x).reshape(2, 60, 16))
    with torch.no_grad():
        m.complex_weight.zero_()
    m.reset_parameters()
    assert m.complex_weight.abs().max() > 0


def test_global_filter_bad_inputs():
    m = GlobalFilter(4, (5, 6))
    msg = r"x.shape=\(2, 6, 5, 4\), expected \(B, 5, 6, 4\) or \(B, 30, 4\)"
    with pytest.raises(ValueError, match=msg):
        m(torch.randn(2, 6, 5, 4))
    with pytest.raises(ValueError, match=r"x.shape=\(2, 5, 6, 3\), expected \(B, \*tokens, 4\)"):
        m(torch.randn(2, 5, 6, 3))
    msg = r"x.shape=\(2, 8, 4\), expected \(B, 7, 4\): .*size=\(7,\)"
    with pytest.raises(ValueError, match=msg):
        GlobalFilter(4, 7)(torch.randn(2, 8, 4))
    with pytest.raises(TypeError, match=r"x=list"):
        m([1.0])
    with pytest.raises(TypeError, match=r"dim must be an int >= 1, got dim='4'"):
        GlobalFilter("4", 7)
    with pytest.raises(ValueError, match=r"dim must be an int >= 1, got dim=0"):
        GlobalFilter(0, 7)
    for size in (0, (5, 0), (2, 3, 4), 1.5, (5, True)):
        with pytest.raises(ValueError, match=r"size=.*expected a positive int"):
            GlobalFilter(4, size)


# ---------------------------------------------------------------------------- FFTNetMixer


def test_fftnet_mixer():
    m = FFTNetMixer(4, 13, hidden=5).double()
    assert tuple(m.base_filter.shape) == (13, 4) and tuple(m.modrelu_bias.shape) == (4,)
    assert m.mlp[2].out_features == 13 * 4 and m.mlp[0].out_features == 5
    assert FFTNetMixer(4, 13).hidden == 4
    with torch.no_grad():
        m.modrelu_bias.fill_(-0.2)  # an active threshold for the comparison
    x = torch.randn(2, 13, 4, dtype=torch.float64, requires_grad=True)
    out = m(x)
    assert out.shape == x.shape
    ref = adaptive_spectral_filter_reference(x, m.base_filter, m.mlp, m.modrelu_bias)
    _check_grads(m, out, ref, x)
    _roundtrip(lambda: FFTNetMixer(4, 13, 5).double(), x.detach())
    m.reset_parameters()
    assert torch.equal(m.base_filter, torch.ones(13, 4, dtype=torch.float64))
    assert torch.equal(m.modrelu_bias, torch.zeros(4, dtype=torch.float64))
    assert "dim=4, seq_len=13, hidden=5" in repr(m)


def test_fftnet_mixer_bad_inputs():
    m = FFTNetMixer(4, 7)
    with pytest.raises(ValueError, match=r"x.shape=\(2, 8, 4\), expected \(B, 7, 4\)"):
        m(torch.randn(2, 8, 4))
    with pytest.raises(ValueError, match=r"x.shape=\(2, 7, 5\), expected \(B, \*tokens, 4\)"):
        m(torch.randn(2, 7, 5))
    with pytest.raises(ValueError, match=r"hidden must be an int >= 1, got hidden=0"):
        FFTNetMixer(4, 7, hidden=0)
    with pytest.raises(TypeError, match=r"seq_len must be an int >= 1, got seq_len=7.0"):
        FFTNetMixer(4, 7.0)


# ------------------------------------------------------------------------ SpectFormerBlock


@pytest.mark.parametrize("size", [7, (5, 6)])
def test_spectformer_block(size):
    m = SpectFormerBlock(4, size, mlp_ratio=2.0).double()
    assert m.mlp[0].out_features == 8
    tokens = (size,) if isinstance(size, int) else size
    x = torch.randn(2, *tokens, 4, dtype=torch.float64, requires_grad=True)
    out = m(x)
    assert out.shape == x.shape
    ref = spectformer_block_reference(x, m.filter.complex_weight, m.norm1, m.norm2, m.mlp)
    _check_grads(m, out, ref, x)
    _roundtrip(lambda: SpectFormerBlock(4, size, 2.0).double(), x.detach())
    assert f"dim=4, size={size}, mlp_ratio=2.0" in repr(m)


def test_spectformer_block_flattened_and_bad_inputs():
    m = SpectFormerBlock(4, (5, 6))
    x = torch.randn(2, 5, 6, 4)
    torch.testing.assert_close(m(x.reshape(2, 30, 4)), m(x).reshape(2, 30, 4))
    with pytest.raises(ValueError, match=r"x.shape=\(2, 5, 6, 3\), expected \(B, \*tokens, 4\)"):
        m(torch.randn(2, 5, 6, 3))
    with pytest.raises(ValueError, match=r"mlp_ratio=0.1, expected a positive float"):
        SpectFormerBlock(4, 7, mlp_ratio=0.1)
    with pytest.raises(TypeError, match=r"mlp_ratio='4', expected a positive float"):
        SpectFormerBlock(4, 7, mlp_ratio="4")


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: GlobalFilter(8, (5, 6)), (2, 5, 6, 8)),
        (lambda: FFTNetMixer(8, 13), (2, 13, 8)),
        (lambda: SpectFormerBlock(8, 13), (2, 13, 8)),
        (lambda: FNetMixer(), (2, 13, 8)),
    ],
)
def test_modules_in_bfloat16(make, shape):
    m = make()
    x = torch.randn(shape)
    ref = m.double()(x.double())
    m = m.to(torch.bfloat16)
    out = m(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() <= 5e-2 * ref.abs().max()
