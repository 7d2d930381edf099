"""HiLo: fast path vs dense reference on 1-, 2- and 3-D grids with partial windows and GQA,
degenerate windows equal to plain attention, locality of the Hi heads, errors, the module."""

from __future__ import annotations

import pytest
import torch

import attnlab as al
from attnlab.hybrids import HiLoAttention, hilo_attention, hilo_attention_reference
from attnlab.hybrids.hilo import window_mean
from hybrid_checks import F64, assert_matches_reference, module_matches_reference, randn

CASES = [  # token shape, window, Hq, Hkv, lo_heads
    ((7, 9), (2, 3), 4, 2, 2),  # windows do not divide the grid
    ((8, 8), 2, 4, 4, 1),
    ((10,), 3, 2, 2, 1),
    ((3, 4, 5), (2, 2, 2), 4, 2, 2),
    ((5, 6), 2, 4, 2, 0),  # Hi only
    ((5, 6), 2, 4, 2, 4),  # Lo only
]


def _qkv(shape, Hq, Hkv, seed=0):
    g = torch.Generator().manual_seed(seed)
    return randn(2, Hq, *shape, 8, gen=g), randn(2, Hkv, *shape, 8, gen=g), randn(2, Hkv, *shape, 5, gen=g)


@pytest.mark.parametrize("shape,window,Hq,Hkv,lo", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_fast_matches_reference(shape, window, Hq, Hkv, lo):
    q, k, v = _qkv(shape, Hq, Hkv)
    kw = dict(window=window, lo_heads=lo)
    assert_matches_reference(lambda: hilo_attention(q, k, v, **kw), lambda: hilo_attention_reference(q, k, v, **kw),
                             [q, k, v], "qkv")


def test_window_mean_of_partial_windows():
    x = torch.arange(7.0, dtype=F64).view(1, 1, 7, 1)
    assert window_mean(x, (3,)).flatten().tolist() == [1.0, 4.0, 6.0]
    x = torch.arange(12.0, dtype=F64).view(1, 1, 3, 4, 1)
    assert window_mean(x, (2, 3)).flatten().tolist() == [(0 + 1 + 2 + 4 + 5 + 6) / 6, (3 + 7) / 2, 9.0, 11.0]


def test_one_window_is_full_attention_on_hi_heads_and_window_one_on_lo_heads():
    q, k, v = _qkv((5, 6), 4, 2)
    out = hilo_attention(q, k, v, window=(5, 6), lo_heads=2)
    full = al.attention(q[:, :2], k[:, :1], v[:, :1], backend="reference")
    torch.testing.assert_close(out[:, :2], full, rtol=1e-9, atol=1e-11)
    # one pooled key: the Lo heads return the mean value everywhere
    mean_v = v[:, 1:].mean((2, 3), keepdim=True).expand(2, 2, 5, 6, 5)
    torch.testing.assert_close(out[:, 2:], mean_v, rtol=1e-9, atol=1e-11)
    out1 = hilo_attention(q, k, v, window=1, lo_heads=2)
    lo_full = al.attention(q[:, 2:].flatten(2, 3), k[:, 1:].flatten(2, 3), v[:, 1:].flatten(2, 3), backend="reference")
    torch.testing.assert_close(out1[:, 2:].flatten(2, 3), lo_full, rtol=1e-9, atol=1e-11)


def test_hi_heads_only_see_their_window():
    q, k, v = _qkv((6, 6), 2, 2)
    with torch.no_grad():
        base = hilo_attention(q, k, v, window=3, lo_heads=1)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, 3:] += 1.0  # every window in the lower half
        v2[:, :, 3:] += 1.0
        pert = hilo_attention(q, k2, v2, window=3, lo_heads=1)
    torch.testing.assert_close(pert[:, :1, :3], base[:, :1, :3], rtol=0, atol=1e-12)  # Hi head, upper half
    assert (pert[:, 1:, :3] - base[:, 1:, :3]).abs().max() > 1e-3  # the Lo head sees the pooled lower half


def test_bad_inputs():
    q, k, v = _qkv((4, 6), 4, 2)
    with pytest.raises(ValueError, match=r"window\[1\]=7 is larger than token axis 1 of length 6"):
        hilo_attention(q, k, v, window=(2, 7), lo_heads=2)
    with pytest.raises(TypeError, match=r"window must be an int or a tuple of 2 ints"):
        hilo_attention(q, k, v, window=(2, 2, 2), lo_heads=2)
    with pytest.raises(ValueError, match=r"lo_heads=1 must be a multiple of the GQA group size Hq / Hkv = 2"):
        hilo_attention(q, k, v, window=2, lo_heads=1)
    with pytest.raises(ValueError, match=r"lo_heads=6 is larger than the number of query heads Hq=4"):
        hilo_attention(q, k, v, window=2, lo_heads=6)
    with pytest.raises(ValueError, match=r"self-attention: q and k must have the same token shape"):
        hilo_attention(q, k[:, :, :2], v[:, :, :2], window=2, lo_heads=2)
    m = HiLoAttention(16, 4)
    with pytest.raises(ValueError, match=r"hw=\(3, 3\) has 9 tokens but x.shape\[1\]=12"):
        m(torch.randn(1, 12, 16), (3, 3))
    with pytest.raises(TypeError, match=r"hw must be a pair of positive ints"):
        m(torch.randn(1, 12, 16))
    with pytest.raises(ValueError, match=r"alpha must be a float in \[0, 1\], got alpha=1.5"):
        HiLoAttention(16, 4, alpha=1.5)


@pytest.mark.parametrize("window,alpha", [(2, 0.5), ((2, 3), 0.25), (3, 1.0), (2, 0.0)])
def test_module_matches_reference(window, alpha):
    torch.manual_seed(0)
    m = HiLoAttention(16, 4, window=window, alpha=alpha, qkv_bias=True)
    assert m.lo_heads == int(4 * alpha) and m.hi_heads == 4 - int(4 * alpha)
    module_matches_reference(m, torch.randn(2, 5, 7, 16))


def test_module_layouts_agree_and_window_one_is_global():
    torch.manual_seed(0)
    m = HiLoAttention(16, 4, window=2).double()
    x = torch.randn(2, 5, 7, 16, dtype=F64)
    torch.testing.assert_close(m(x.reshape(2, 35, 16), (5, 7)), m(x).reshape(2, 35, 16), rtol=0, atol=0)
    assert HiLoAttention(16, 4, window=1).lo_heads == 4  # as in LITv2: plain multi-head attention
