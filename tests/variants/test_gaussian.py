"""GAAM: the log-space softmax fast path against the product-of-densities reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnlab.variants import gaussian_adaptive_attention, gaussian_adaptive_attention_reference, gaussian_adaptive_weights
from variant_checks import check_close


def _inputs(B=2, H=3, N=17, D=5, G=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, N, D, generator=g, dtype=torch.float64).requires_grad_()
    m = (0.5 * torch.randn(H, G, generator=g, dtype=torch.float64)).requires_grad_()
    c = (0.5 + torch.rand(H, G, generator=g, dtype=torch.float64)).requires_grad_()
    return x, m, c


@pytest.mark.parametrize("axis", ["tokens", "features"])
@pytest.mark.parametrize("G", [1, 3])
def test_matches_reference(axis, G):
    x, m, c = _inputs(G=G)
    check_close(gaussian_adaptive_attention(x, m, c, axis=axis), gaussian_adaptive_attention_reference(x, m, c, axis=axis),
                (x, m, c), msg=f"{axis} G={G}")


def test_weights_are_distributions_and_peak_at_the_shifted_mean():
    x, m, c = _inputs(N=40)
    w = gaussian_adaptive_weights(x, m, c)
    torch.testing.assert_close(w.sum(2), torch.ones_like(w.sum(2)))
    x1 = torch.linspace(-2, 2, 41, dtype=torch.float64).view(1, 1, 41, 1)  # mean 0
    sigma = x1.std(2, correction=0)
    w1 = gaussian_adaptive_weights(x1, torch.tensor([[0.5]], dtype=torch.float64) * sigma.view(1, 1),
                                   torch.ones(1, 1, dtype=torch.float64))
    assert abs(x1.flatten()[w1.flatten().argmax()].item() - 0.5 * sigma.item()) < 0.1


def test_fast_path_survives_where_the_densities_underflow():
    x, m, _ = _inputs()
    tiny = torch.full((3, 2), 0.02, dtype=torch.float64)  # exp(-y^2 / 0.0008) underflows
    with torch.no_grad():
        ref = gaussian_adaptive_attention_reference(x, m + 3.0, tiny)
        out = gaussian_adaptive_attention(x, m + 3.0, tiny)
    assert not torch.isfinite(ref).all()  # 0 / 0 in the literal formula
    assert torch.isfinite(out).all()


def test_bad_inputs():
    x, m, c = _inputs()
    with pytest.raises(ValueError, match=r"x must have shape \(B, H, N, D\)"):
        gaussian_adaptive_attention(x[0], m, c)
    with pytest.raises(ValueError, match=r"mean_offset must have shape \(H=3, G >= 1\)"):
        gaussian_adaptive_attention(x, m[:2], c)
    with pytest.raises(ValueError, match="scale must be positive"):
        gaussian_adaptive_attention(x, m, -c)
    with pytest.raises(ValueError, match="axis must be one of"):
        gaussian_adaptive_attention(x, m, c, axis="heads")
    with pytest.raises(ValueError, match="differ"):
        gaussian_adaptive_attention(x, m, c[:, :1])
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        gaussian_adaptive_attention(x.long(), m, c)


@settings(max_examples=15, deadline=None)
@given(N=st.integers(2, 30), D=st.integers(1, 6), G=st.integers(1, 3))
def test_random_shapes(N, D, G):
    """The fast path is finite everywhere and equals the literal formula wherever that one does
    not underflow to 0 / 0 (tiny variances, e.g. two nearly equal tokens, make it do so)."""
    x, m, c = _inputs(B=1, H=2, N=N, D=D, G=G, seed=N * D + G)
    with torch.no_grad():
        out = gaussian_adaptive_attention(x, m, c)
        ref = gaussian_adaptive_attention_reference(x, m, c)
    assert torch.isfinite(out).all()
    ok = torch.isfinite(ref)
    torch.testing.assert_close(out[ok], ref[ok], rtol=1e-9, atol=1e-12)
