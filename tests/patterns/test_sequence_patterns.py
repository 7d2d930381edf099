"""SlidingWindow, Strided, Sinks and GlobalTokens: mask values, block layouts, validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.patterns.base import Causal, Full, Union
from attnlab.patterns.layout import Tiling
from attnlab.patterns.sinks import GlobalTokens, Sinks
from attnlab.patterns.sliding_window import SlidingWindow
from attnlab.patterns.strided import Strided
from attnlab.geometry import index_grid
from attnlab.testing import check_pattern_layout, dense_mask, make_geometry, neighbor_set

TILES_1D = [(1, 1), (3, 4), (5, 2), (7, 7), (16, 3), (64, 64)]
SIZES = [(13, 13), (10, 17), (17, 10), (1, 9)]
GRIDS = [((4, 5), (4, 5)), ((3, 5), (4, 6)), ((5, 4), (2, 3))]
TILES_2D = [((2, 2), (3, 2)), ((1, 3), (2, 2)), ((3, 3), (1, 1))]




def check_everywhere(pattern, exact_1d: bool, exact_nd: bool = False, batch=2, heads=4):
    for L, S in SIZES:
        g = make_geometry((L,), (S,), batch=batch, q_heads=heads)
        for tq, tk in TILES_1D:
            check_pattern_layout(pattern, g, tq, tk, exact=exact_1d)
    for qs, ks in GRIDS:
        g = make_geometry(qs, ks, batch=batch, q_heads=heads)
        for tq, tk in TILES_2D:
            check_pattern_layout(pattern, g, tq, tk, exact=exact_nd)


def check_empty_rows_claim(pattern, g):
    if not pattern.may_have_empty_rows(g):
        assert dense_mask(pattern, g).any(-1).all(), f"{pattern!r} claims no empty rows for {g}"


# -- SlidingWindow ---------------------------------------------------------------------------
def test_sliding_window_values():
    g = make_geometry((6,))
    p = SlidingWindow(left=2, right=1)
    assert neighbor_set(p, g, 0) == {0, 1}
    assert neighbor_set(p, g, 3) == {1, 2, 3, 4}
    assert neighbor_set(p, g, 5) == {3, 4, 5}
    assert neighbor_set(SlidingWindow(4, 2, dilation=2), make_geometry((10,)), 5) == {1, 3, 5, 7}
    assert neighbor_set(SlidingWindow(4, 2, dilation=2), make_geometry((10,)), 0) == {0, 2}


def test_sliding_window_cross_is_bottom_right_aligned():
    g = make_geometry((3,), (6,))  # offset 3
    assert neighbor_set(SlidingWindow(1), g, 0) == {2, 3}
    assert neighbor_set(SlidingWindow(1), g, 2) == {4, 5}
    g = make_geometry((6,), (3,))  # offset -3
    p = SlidingWindow(1)
    assert neighbor_set(p, g, 0) == set()
    assert neighbor_set(p, g, 3) == {0}
    assert neighbor_set(p, g, 5) == {1, 2}
    assert p.may_have_empty_rows(g)


def test_sliding_window_causal_window_equals_causal_and_band():
    g = make_geometry((12,), (15,))
    band = dense_mask(SlidingWindow(4), g)
    q = torch.arange(12).view(-1, 1) + 3
    k = torch.arange(15).view(1, -1)
    assert torch.equal(band[0, 0], (k <= q) & (k >= q - 4))
    assert torch.equal(dense_mask(SlidingWindow(100, 100), g), dense_mask(Full(), g))


@pytest.mark.parametrize(
    "p", [SlidingWindow(0), SlidingWindow(3), SlidingWindow(2, 5), SlidingWindow(4, 3, dilation=2),
          SlidingWindow(6, 6, dilation=3), SlidingWindow(0, 9, dilation=4)],
)
def test_sliding_window_layout(p):
    check_everywhere(p, exact_1d=True)
    for L, S in SIZES:
        check_empty_rows_claim(p, make_geometry((L,), (S,)))


def test_sliding_window_layout_is_sparse_and_broadcast():
    g = make_geometry((64,), batch=3, q_heads=2)
    lay = SlidingWindow(7).block_layout(Tiling(g, (8,), (8,)))
    assert lay.any.shape == (1, 1, 8, 8)
    assert lay.any.sum() == 8 + 7  # diagonal and first sub-diagonal tiles
    assert lay.full.sum() == 0  # an 8-wide causal window never covers a whole 8x8 tile
    m = SlidingWindow(7).mask(*index_grid(g), g)
    assert m.shape == (1, 1, 64, 64) and m.dtype == torch.bool


# -- Strided -------------------------------------------------------------------------------
def test_strided_relative_values():
    g = make_geometry((8,))
    assert neighbor_set(Strided(3), g, 7) == {1, 4, 7}
    assert neighbor_set(Strided(3), g, 2) == {2, 5}
    assert neighbor_set(Strided(3) & Causal(), g, 2) == {2}
    assert neighbor_set(Strided(3), make_geometry((2,), (5,)), 0) == {0, 3}
    assert neighbor_set(Strided(1), g, 4) == set(range(8))


def test_strided_shard_values_and_head_dependence():
    g = make_geometry((3,), (5,), q_heads=4)
    p = Strided(2, mode="shard")
    m = p.mask(*index_grid(g), g)
    assert m.shape == (1, 4, 3, 5)  # depends on the head, not on the batch
    seen = [set(m[0, h, 0].nonzero().flatten().tolist()) for h in range(4)]
    assert seen == [{0, 2, 4}, {1, 3}, {0, 2, 4}, {1, 3}]
    assert seen[0] | seen[1] == set(range(5))  # the union over stride heads covers the context
    assert (m == m[:, :, :1]).all()  # the same for every query
    lay = p.block_layout(Tiling(g, (2,), (2,)))
    assert lay.any.shape == (1, 4, 2, 3) and lay.full.shape == (1, 4, 2, 3)


@pytest.mark.parametrize(
    "p", [Strided(1), Strided(2), Strided(3), Strided(5), Strided(1, "shard"), Strided(2, "shard"),
          Strided(3, "shard")],
)
def test_strided_layout(p):
    check_everywhere(p, exact_1d=True)
    for L, S in SIZES:
        check_empty_rows_claim(p, make_geometry((L,), (S,), q_heads=4))


def test_strided_empty_rows():
    assert Strided(4).may_have_empty_rows(make_geometry((5,), (3,)))
    assert not Strided(3).may_have_empty_rows(make_geometry((5,), (3,)))
    g = make_geometry((3,), (2,))  # aligned query positions -1, 0, 1
    m = dense_mask(Strided(4), g)[0, 0]
    assert m.tolist() == [[False, False], [True, False], [False, True]]
    assert Strided(4).may_have_empty_rows(g)


# -- Sinks / GlobalTokens -----------------------------------------------------------------
def test_sinks_values_and_union():
    g = make_geometry((5,))
    assert all(neighbor_set(Sinks(2), g, i) == {0, 1} for i in range(5))
    assert neighbor_set(SlidingWindow(1) | Sinks(2), g, 4) == {0, 1, 3, 4}
    assert neighbor_set(Sinks(0), g, 3) == set()
    assert Sinks(0).may_have_empty_rows(g) and not Sinks(1).may_have_empty_rows(g)
    m = Sinks(2).mask(*index_grid(make_geometry((5,), batch=2, q_heads=3)), g)
    assert m.shape == (1, 1, 5, 5)


def test_global_tokens_values():
    g = make_geometry((5,))
    p = GlobalTokens(2)
    assert neighbor_set(p, g, 0) == set(range(5))
    assert neighbor_set(p, g, 1) == set(range(5))
    assert neighbor_set(p, g, 3) == {0, 1}
    assert neighbor_set(p, make_geometry((2,), (5,)), 0) == {0, 1}  # aligned position 3
    g = make_geometry((5,), (3,))  # aligned positions -2..2
    assert [neighbor_set(p, g, i) for i in (0, 3, 4)] == [{0, 1, 2}, {0, 1, 2}, {0, 1}]
    assert neighbor_set(SlidingWindow(1) | GlobalTokens(1), make_geometry((6,)), 4) == {0, 3, 4}


@pytest.mark.parametrize("p", [Sinks(0), Sinks(1), Sinks(4), GlobalTokens(0), GlobalTokens(3)])
def test_sinks_global_layout_exact_for_every_tiling(p):
    check_everywhere(p, exact_1d=True, exact_nd=True)
    for L, S in SIZES:
        check_empty_rows_claim(p, make_geometry((L,), (S,)))


# -- compositions -------------------------------------------------------------------------
COMPOSITIONS = [
    SlidingWindow(3) | Sinks(2),
    Strided(3) & Causal(),
    (SlidingWindow(2) | Strided(4)) & Causal(),
    SlidingWindow(2, 2) | GlobalTokens(1),
    Strided(2, "shard") & SlidingWindow(5, 1),
    Strided(3, "shard") | Sinks(1),
    SlidingWindow(6, 0, dilation=2) & Causal() | Sinks(1),
]


@pytest.mark.parametrize("p", COMPOSITIONS, ids=repr)
def test_compositions(p):
    check_everywhere(p, exact_1d=False)
    g = make_geometry((9,), (11,), batch=2, q_heads=4)
    masks = [dense_mask(q, g) for q in p.parts]
    want = masks[0]
    for m in masks[1:]:
        want = (want | m) if isinstance(p, Union) else (want & m)
    assert torch.equal(dense_mask(p, g), want)


def test_shard_composition_layout_is_per_head():
    g = make_geometry((16,), q_heads=4)
    lay = (Strided(2, "shard") & SlidingWindow(3)).block_layout(Tiling(g, (1,), (1,)))
    assert lay.any.shape == (1, 4, 16, 16)


# -- validation -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: SlidingWindow(-1), ValueError, r"left=-1"),
        (lambda: SlidingWindow(1, right=-2), ValueError, r"right=-2"),
        (lambda: SlidingWindow(1, dilation=0), ValueError, r"dilation=0"),
        (lambda: SlidingWindow(1.5), TypeError, r"left=1\.5"),
        (lambda: SlidingWindow(True), TypeError, r"left=True"),
        (lambda: Strided(0), ValueError, r"stride=0"),
        (lambda: Strided("2"), TypeError, r"stride='2'"),
        (lambda: Strided(2, mode="heads"), ValueError, r"mode='heads'"),
        (lambda: Sinks(-1), ValueError, r"num_sinks=-1"),
        (lambda: GlobalTokens(-3), ValueError, r"num_global=-3"),
        (lambda: GlobalTokens(None), TypeError, r"num_global=None"),
    ],
)
def test_validation_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_reprs():
    assert repr(SlidingWindow(3, 1, 2)) == "SlidingWindow(left=3, right=1, dilation=2)"
    assert repr(Strided(4, "shard")) == "Strided(stride=4, mode='shard')"
    assert repr(Sinks(4)) == "Sinks(num_sinks=4)"
    assert repr(GlobalTokens(2)) == "GlobalTokens(num_global=2)"
    want = "SlidingWindow(left=3, right=0, dilation=1) | Sinks(num_sinks=4)"
    assert repr(SlidingWindow(3) | Sinks(4)) == want


# -- random configurations ------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    L=st.integers(1, 24), S=st.integers(1, 24), tq=st.integers(1, 9), tk=st.integers(1, 9),
    left=st.integers(0, 8), right=st.integers(0, 8), dilation=st.integers(1, 4),
)
def test_sliding_window_random(L, S, tq, tk, left, right, dilation):
    p = SlidingWindow(left, right, dilation)
    g = make_geometry((L,), (S,))
    check_pattern_layout(p, g, tq, tk, exact=True)
    check_empty_rows_claim(p, g)
    i, j = torch.meshgrid(torch.arange(L), torch.arange(S), indexing="ij")
    d = j - i - (S - L)
    assert torch.equal(dense_mask(p, g)[0, 0], (d >= -left) & (d <= right) & (d % dilation == 0))


@settings(max_examples=40, deadline=None)
@given(
    L=st.integers(1, 24), S=st.integers(1, 24), tq=st.integers(1, 9), tk=st.integers(1, 9),
    stride=st.integers(1, 6), shard=st.booleans(), heads=st.integers(1, 5),
)
def test_strided_random(L, S, tq, tk, stride, shard, heads):
    p = Strided(stride, "shard" if shard else "relative")
    g = make_geometry((L,), (S,), q_heads=heads)
    check_pattern_layout(p, g, tq, tk, exact=True)
    check_empty_rows_claim(p, g)


@settings(max_examples=40, deadline=None)
@given(
    X=st.integers(1, 6), Y=st.integers(1, 6), X2=st.integers(1, 6), Y2=st.integers(1, 6),
    tile=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    n=st.integers(0, 12), w=st.integers(0, 6), s=st.integers(1, 4),
)
def test_random_2d_grids(X, Y, X2, Y2, tile, n, w, s):
    g = make_geometry((X, Y), (X2, Y2), q_heads=2)
    tq, tk = tile[:2], tile[2:]
    for p in (Sinks(n), GlobalTokens(n)):
        check_pattern_layout(p, g, tq, tk, exact=True)
    for p in (SlidingWindow(w, w // 2, 1 + w % 3), Strided(s), Strided(s, "shard"),
              SlidingWindow(w) | Sinks(n) | Strided(s, "shard")):
        check_pattern_layout(p, g, tq, tk)


def test_layout_scales_without_dense_work():
    g = make_geometry((1 << 20,), batch=2, q_heads=8)
    t = Tiling(g, (4096,), (4096,))
    patterns = (
        SlidingWindow(8191, 0, 3), Strided(7), Strided(8, "shard"), Sinks(4) | GlobalTokens(3)
    )
    for p in patterns:
        lay = p.block_layout(t)
        assert lay.any.shape[-2:] == (256, 256)
    lay = SlidingWindow(4095).block_layout(t)
    assert int(lay.any.sum()) == 256 + 255 and int(lay.full.sum()) == 0
