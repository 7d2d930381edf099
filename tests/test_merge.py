"""``merge_attentions``: partial attentions over disjoint key ranges merge into attention over
all keys, exactly, also for rows that saw no key in some or all parts, and differentiably."""

from __future__ import annotations

import pytest
import torch

import attnlab as al
from attnlab.testing import rel_error


def make_qkv(B, Hq, Hkv, L, S, D, Dv, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    return rnd(B, Hq, L, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, Dv)


def global_mask_mod(mask: torch.Tensor, offset: int = 0):
    """A mask_mod reading an explicit (L, S) mask, keys shifted by ``offset``."""

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[q_idx, kv_idx + offset]

    return mask_mod


def split_and_merge(q, k, v, bounds, mask=None):
    """Reference attention on each key range ``[bounds[i], bounds[i+1])``, then merged."""
    outs, lses = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        pattern = None if mask is None else global_mask_mod(mask, lo)
        o, l = al.attention(q, k[:, :, lo:hi], v[:, :, lo:hi], pattern, return_lse=True,
                            backend="reference")
        outs.append(o)
        lses.append(l)
    return al.merge_attentions(outs, lses), lses


SPLITS = {
    "2-parts": [0, 17, 40],
    "3-parts": [0, 1, 25, 40],
    "4-parts-uneven": [0, 9, 10, 33, 40],
}


def causal_mask(L, S):
    i, j = torch.arange(L).view(-1, 1), torch.arange(S).view(1, -1)
    return j <= i + S - L


def banded_mask(L, S):
    """Rows whose keys all lie in one part, rows that see nothing, and rows across parts."""
    i, j = torch.arange(L).view(-1, 1), torch.arange(S).view(1, -1)
    m = (j - 2 * i).abs() <= 3
    m[5] = False  # an empty row
    m[7] = j[0] >= 36  # a row that sees only the last part
    return m


MASKS = {"full": None, "causal-L>S": "causal", "banded-with-empty": "banded"}


@pytest.mark.parametrize("mask_kind", list(MASKS.values()), ids=list(MASKS))
@pytest.mark.parametrize("bounds", list(SPLITS.values()), ids=list(SPLITS))
def test_merge_equals_attention_over_all_keys(bounds, mask_kind):
    L, S = 48 if mask_kind == "causal" else 20, 40
    q, k, v = make_qkv(2, 4, 2, L, S, 8, 5)
    mask = {None: None, "causal": causal_mask(L, S), "banded": banded_mask(L, S)}[mask_kind]
    (out, lse), part_lses = split_and_merge(q, k, v, bounds, mask)
    pattern = None if mask is None else global_mask_mod(mask)
    ref, ref_lse = al.attention(q, k, v, pattern, return_lse=True, backend="reference")
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float64
    assert rel_error(out, ref) <= 1e-12
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert not torch.isnan(lse).any() and not torch.isnan(out).any()
    assert rel_error(lse[~empty], ref_lse[~empty]) <= 1e-12
    assert (out[empty] == 0).all()
    if mask_kind is not None:  # some part really had empty rows while the whole row did not
        some_part_empty = torch.stack([torch.isneginf(l) for l in part_lses]).any(0)
        assert (some_part_empty & ~empty).any()

    # gradients through the merge equal those of attention over all keys
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(out.shape, generator=g, dtype=out.dtype)
    dlse = torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    got = torch.autograd.grad([out, lse], (q, k, v), [dout, dlse])
    want = torch.autograd.grad([ref, ref_lse], (q, k, v), [dout, dlse])
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        assert rel_error(a, b) <= 1e-12


def test_merge_single_part_is_identity():
    q, k, v = make_qkv(1, 2, 2, 6, 9, 4, 4)
    o, l = al.attention(q, k, v, al.Causal(), return_lse=True, backend="reference")
    mo, ml = al.merge_attentions([o], [l])
    torch.testing.assert_close(mo, o, rtol=0, atol=1e-15)
    torch.testing.assert_close(ml, l, rtol=0, atol=1e-15)


def test_merge_all_parts_empty_gives_zero_and_neg_inf():
    o = torch.randn(1, 2, 3, 4)  # whatever a part returns for empty rows is ignored
    l = torch.full((1, 2, 3), float("-inf"))
    out, lse = al.merge_attentions([o, o.clone()], [l, l.clone()])
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_merge_empty_part_has_zero_weight_and_zero_gradient():
    o1 = torch.randn(1, 1, 4, 3, requires_grad=True)
    l1 = torch.randn(1, 1, 4, requires_grad=True)
    o2 = torch.randn(1, 1, 4, 3, requires_grad=True)
    l2 = torch.full((1, 1, 4), float("-inf"), requires_grad=True)
    out, lse = al.merge_attentions([o1, o2], [l1, l2])
    torch.testing.assert_close(out, o1.detach())
    torch.testing.assert_close(lse, l1.detach())
    out.sum().backward()
    assert (o2.grad == 0).all() and torch.isfinite(l2.grad).all() and (l2.grad == 0).all()


def test_merge_tiled_parts_float32_and_half():
    """Parts from the tiled backend in float32; half outputs keep their dtype."""
    q, k, v = make_qkv(1, 4, 1, 30, 50, 8, 8, dtype=torch.float32)
    parts = [al.attention(q, k[:, :, a:b], v[:, :, a:b], return_lse=True, backend="tiled")
             for a, b in [(0, 20), (20, 50)]]
    out, lse = al.merge_attentions([p[0] for p in parts], [p[1] for p in parts])
    ref, ref_lse = al.attention(q, k, v, return_lse=True, backend="reference")
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert rel_error(out, ref) <= 1e-5 and rel_error(lse, ref_lse) <= 1e-5
    out_h, lse_h = al.merge_attentions([p[0].half() for p in parts], [p[1] for p in parts])
    assert out_h.dtype == torch.float16 and lse_h.dtype == torch.float32
    assert rel_error(out_h, ref) <= 2e-3


BAD = {
    "no-parts": (lambda o, l: al.merge_attentions([], []), ValueError, r"at least one"),
    "count-mismatch": (lambda o, l: al.merge_attentions([o, o], [l]), ValueError,
                       r"len\(outputs\)=2, len\(lses\)=1"),
    "output-shape": (lambda o, l: al.merge_attentions([o, o[:, :, :3]], [l, l[:, :, :3]]),
                     ValueError, r"outputs\[1\]\.shape=\(1, 2, 3, 5\)"),
    "output-dv": (lambda o, l: al.merge_attentions([o, o[..., :2]], [l, l]), ValueError,
                  r"outputs\[1\]\.shape=\(1, 2, 4, 2\)"),
    "lse-shape": (lambda o, l: al.merge_attentions([o, o], [l, l[..., :3]]), ValueError,
                  r"lses\[1\]\.shape=\(1, 2, 3\)"),
    "lse-with-feature-axis": (lambda o, l: al.merge_attentions([o], [o]),
                              ValueError, r"lses\[0\]"),
    "not-tensors": (lambda o, l: al.merge_attentions([o, "x"], [l, l]),
                    TypeError, r"outputs\[1\]"),
}


@pytest.mark.parametrize("call,exc,match", list(BAD.values()), ids=list(BAD))
def test_merge_bad_inputs(call, exc, match):
    o, l = torch.randn(1, 2, 4, 5), torch.randn(1, 2, 4)
    with pytest.raises(exc, match=match):
        call(o, l)
