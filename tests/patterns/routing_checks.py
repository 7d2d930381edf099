"""Checks shared by the test_routing_*.py files (not a test module itself)."""

from __future__ import annotations

import torch

import attnlab as al
from attnlab.geometry import check_qkv
from attnlab.patterns import has_content, resolve_pattern
from attnlab.testing import check_pattern_layout

TOL = {"rtol": 1e-9, "atol": 1e-10}


def assert_exact_over_selection(pattern, q, k, v, score_mod=None, options=None):
    """``attention(pattern)`` on the tiled backend equals the dense reference over the *same*
    selected set (``resolve_pattern``), outputs and gradients; returns the resolved pattern."""
    static = resolve_pattern(pattern, q, k)
    assert not has_content(static)
    out = al.attention(q, k, v, pattern=pattern, score_mod=score_mod, backend="tiled", options=options)
    ref = al.attention(q, k, v, pattern=static, score_mod=score_mod, backend="reference")
    assert ref.abs().sum() > 0
    torch.testing.assert_close(out, ref, **TOL)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    got = torch.autograd.grad((out * go).sum(), (q, k, v))
    want = torch.autograd.grad((ref * go).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    return static


def assert_layout_agrees(static, q, k, tiles, exact=False):
    """The resolved pattern's mask and block layout agree on every tiling in ``tiles``."""
    g = check_qkv(q, k, k)
    for q_tile, kv_tile in tiles:
        check_pattern_layout(static, g, q_tile, kv_tile, exact=exact)


def perturbed_after(t, *tensors, seed=5, scale=3.0):
    """Copies of ``tensors`` whose tokens ``t:`` (axis 2) are replaced by fresh random values."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in tensors:
        y = x.detach().clone()
        y[:, :, t:] = scale * torch.randn(y[:, :, t:].shape, generator=gen, dtype=y.dtype)
        out.append(y)
    return out
