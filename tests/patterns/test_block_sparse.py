"""BlockSparse: mask values, prefix-sum block layouts, broadcasting, validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.patterns.base import Causal
from attnlab.patterns.block_sparse import BlockSparse
from attnlab.patterns.layout import Tiling
from attnlab.patterns.sinks import Sinks
from attnlab.patterns.sliding_window import SlidingWindow
from attnlab.geometry import index_grid
from attnlab.testing import check_pattern_layout, dense_mask, make_geometry, neighbor_set

TILES_1D = [(1, 1), (3, 4), (5, 2), (7, 7), (16, 3)]
TILES_2D = [((2, 2), (3, 2)), ((1, 3), (2, 2)), ((3, 3), (1, 1))]




def _ones(*shape: int) -> torch.Tensor:
    return torch.ones(shape, dtype=torch.bool)


def _random_layout(shape, seed, p=0.5):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) < p


def test_values():
    g = make_geometry((4,))
    p = BlockSparse(torch.tensor([[True, False], [False, True]]), 2)
    p.validate(g)
    assert neighbor_set(p, g, 0) == {0, 1}
    assert neighbor_set(p, g, 3) == {2, 3}
    g = make_geometry((2,), (6,))
    p = BlockSparse(torch.tensor([[True, False], [False, True]]), (1, 3))
    p.validate(g)
    assert neighbor_set(p, g, 0) == {0, 1, 2}
    assert neighbor_set(p, g, 1) == {3, 4, 5}
    g = make_geometry((5,), (5,))  # partial last blocks: ceil(5 / 2) = 3
    p = BlockSparse(torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=torch.bool), [2, 2])
    p.validate(g)
    assert neighbor_set(p, g, 4) == {0, 1}
    assert neighbor_set(p, g, 1) == {4}


def test_per_head_and_batch_broadcast():
    g = make_geometry((6,), batch=2, q_heads=3)
    lay = torch.zeros(1, 3, 3, 3, dtype=torch.bool)
    lay[0, 0, :, 0] = True
    lay[0, 1] = torch.eye(3, dtype=torch.bool)
    lay[0, 2] = True
    p = BlockSparse(lay, 2)
    p.validate(g)
    m = p.mask(*index_grid(g), g)
    assert m.shape == (1, 3, 6, 6)
    assert m[0, 0, 5].nonzero().flatten().tolist() == [0, 1]
    assert m[0, 1, 5].nonzero().flatten().tolist() == [4, 5]
    assert m[0, 2].all()
    bl = p.block_layout(Tiling(g, (2,), (2,)))
    assert bl.any.shape == (1, 3, 3, 3)
    assert torch.equal(bl.any, lay) and torch.equal(bl.full, lay)  # tiles == blocks
    p2 = BlockSparse(_random_layout((2, 1, 3, 3), 0), 2)
    p2.validate(g)
    assert p2.mask(*index_grid(g), g).shape == (2, 1, 6, 6)
    assert p2.block_layout(Tiling(g, (4,), (1,))).any.shape == (2, 1, 2, 6)
    p3 = BlockSparse(_random_layout((3, 3), 1), 2)
    assert p3.mask(*index_grid(g), g).shape == (1, 1, 6, 6)


def test_layout_counts_rectangles():
    # a 4x4 block layout seen through tiles of 2x2 blocks
    lay = torch.tensor(
        [[1, 1, 0, 0], [1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool
    )
    g = make_geometry((8,))
    bl = BlockSparse(lay, 2).block_layout(Tiling(g, (4,), (4,)))
    assert bl.any[0, 0].tolist() == [[True, True], [True, False]]
    assert bl.full[0, 0].tolist() == [[True, False], [False, False]]


@pytest.mark.parametrize(
    "shape, block, L, S",
    [((3, 5), 4, 11, 17), ((1, 3, 4, 5), (3, 4), 11, 17), ((2, 1, 5, 2), (3, 9), 13, 10),
     ((2, 3, 2, 2), 7, 13, 13), ((4, 4), (1, 1), 4, 4)],
)
def test_layout_exact_1d_and_valid_2d(shape, block, L, S):
    for seed in range(3):
        p = BlockSparse(_random_layout(shape, seed), block)
        g = make_geometry((L,), (S,), batch=2, q_heads=3)
        p.validate(g)
        for tq, tk in TILES_1D:
            check_pattern_layout(p, g, tq, tk, exact=True)
        if not p.may_have_empty_rows(g):
            assert dense_mask(p, g).any(-1).all()


def test_layout_2d_grids():
    g = make_geometry((4, 5), (3, 6), batch=2, q_heads=3)
    for seed in range(3):
        bq, bk = 3, 4
        lay = _random_layout((1, 3, math.ceil(20 / bq), math.ceil(18 / bk)), seed)
        p = BlockSparse(lay, (bq, bk))
        p.validate(g)
        for tq, tk in TILES_2D:
            check_pattern_layout(p, g, tq, tk)


def test_empty_rows():
    g = make_geometry((4,))
    assert BlockSparse(torch.tensor([[True, False], [False, False]]), 2).may_have_empty_rows(g)
    assert not BlockSparse(torch.tensor([[True, False], [False, True]]), 2).may_have_empty_rows(g)


def test_compositions():
    g = make_geometry((12,), (12,), batch=2, q_heads=2)
    lay = _random_layout((2, 2, 3, 3), 5)
    for p in (BlockSparse(lay, 4) & Causal(), BlockSparse(lay, 4) | Sinks(2),
              BlockSparse(lay, 4) | SlidingWindow(1) & Causal()):
        for tq, tk in TILES_1D:
            check_pattern_layout(p, g, tq, tk)
    bl = (BlockSparse(lay, 4) & Causal()).block_layout(Tiling(g, (4,), (4,)))
    assert bl.any.shape == (2, 2, 3, 3)
    assert not bl.any[..., 0, 1:].any()  # causal removes the blocks above the diagonal


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: BlockSparse([[True]], 2), TypeError, r"layout must be a bool torch\.Tensor"),
        (lambda: BlockSparse(torch.ones(2, 2), 2), TypeError, r"layout\.dtype=torch\.float32"),
        (lambda: BlockSparse(_ones(2, 2, 2), 2), ValueError, r"layout\.shape=\(2, 2, 2\)"),
        (lambda: BlockSparse(_ones(2, 2), 0), ValueError, r"block_size=0"),
        (lambda: BlockSparse(_ones(2, 2), (2, 0)), ValueError, r"block_size\[1\]=0"),
        (lambda: BlockSparse(_ones(2, 2), (1, 2, 3)), ValueError, r"block_size=\(1, 2, 3\)"),
        (lambda: BlockSparse(_ones(2, 2), 2.0), TypeError, r"block_size=2\.0"),
    ],
)
def test_constructor_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_validate_errors():
    g = make_geometry((10,), (7,), batch=2, q_heads=3)
    msg = r"layout must have block shape .* = \(4, 2\).*layout\.shape=\(3, 2\)"
    with pytest.raises(ValueError, match=msg):
        BlockSparse(torch.ones(3, 2, dtype=torch.bool), (3, 4)).validate(g)
    with pytest.raises(ValueError, match=r"layout batch/head .*layout\.shape=\(1, 2, 4, 2\)"):
        BlockSparse(torch.ones(1, 2, 4, 2, dtype=torch.bool), (3, 4)).validate(g)
    BlockSparse(torch.ones(2, 3, 4, 2, dtype=torch.bool), (3, 4)).validate(g)


def test_repr():
    r = repr(BlockSparse(torch.tensor([[True, False], [False, False]]), (2, 3)))
    assert r == "BlockSparse(layout.shape=(2, 2), block_size=(2, 3), density=0.250)"


@settings(max_examples=40, deadline=None)
@given(
    L=st.integers(1, 24), S=st.integers(1, 24), bq=st.integers(1, 6), bk=st.integers(1, 6),
    tq=st.integers(1, 9), tk=st.integers(1, 9), heads=st.sampled_from([1, 3]),
    density=st.floats(0.0, 1.0), seed=st.integers(0, 1000),
)
def test_random(L, S, bq, bk, tq, tk, heads, density, seed):
    shape = (1, heads, math.ceil(L / bq), math.ceil(S / bk))
    p = BlockSparse(_random_layout(shape, seed, density), (bq, bk))
    g = make_geometry((L,), (S,), q_heads=3)
    p.validate(g)
    check_pattern_layout(p, g, tq, tk, exact=True)
    i, j = torch.meshgrid(torch.arange(L), torch.arange(S), indexing="ij")
    want = p.layout[0, :, i // bq, j // bk]
    assert torch.equal(dense_mask(p, g)[0], torch.broadcast_to(want, (3, L, S)))


def test_layout_scales_without_dense_work():
    n = 1 << 20
    g = make_geometry((n,), q_heads=2)
    lay = _random_layout((1, 2, n // 1024, n // 1024), 0, 0.05)
    bl = BlockSparse(lay, 1024).block_layout(Tiling(g, (4096,), (4096,)))
    assert bl.any.shape == (1, 2, 256, 256)
    want = lay.view(1, 2, 256, 4, 256, 4).any(5).any(3)
    assert torch.equal(bl.any, want)
