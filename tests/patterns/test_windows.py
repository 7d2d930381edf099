"""Blocked, Grid and Halo windows: hand-computed neighbourhoods, layouts, validation."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.patterns.base import Pattern
from attnlab.patterns.neighborhood import Neighborhood
from attnlab.patterns.windows import Blocked, Grid, Halo
from attnlab.testing import check_pattern_layout, dense_mask, make_geometry, neighbor_set


def _prod(*axes: list[int]) -> set[tuple[int, ...]]:
    return set(itertools.product(*axes))


HAND = [
    # Blocked: same block on every axis; the last block is short when block does not divide
    (Blocked(3), (7,), 4, {3, 4, 5}),
    (Blocked(3), (7,), 6, {6}),
    (Blocked(3), (7,), 0, {0, 1, 2}),
    (Blocked((2, 3)), (5, 7), (4, 6), {(4, 6)}),
    (Blocked((2, 3)), (5, 7), (1, 4), {(0, 3), (0, 4), (0, 5), (1, 3), (1, 4), (1, 5)}),
    (Blocked((1, 2, 2)), (2, 3, 4), (1, 2, 1), {(1, 2, 0), (1, 2, 1)}),
    # Grid: period p = n // grid_size, same residue mod p
    (Grid(2), (6,), 1, {1, 4}),
    (Grid(2), (6,), 5, {2, 5}),
    (Grid(3), (6,), 4, {0, 2, 4}),
    (Grid(6), (6,), 3, {0, 1, 2, 3, 4, 5}),
    (Grid(1), (6,), 3, {3}),
    (Grid((2, 3)), (4, 6), (1, 3), {(1, 1), (1, 3), (1, 5), (3, 1), (3, 3), (3, 5)}),
    (Grid((2, 2, 1)), (4, 2, 3), (2, 1, 0), {(0, 0, 0), (0, 1, 0), (2, 0, 0), (2, 1, 0)}),
    # Halo: own block extended by halo on each side, clipped at the borders
    (Halo(2, 1), (7,), 0, {0, 1, 2}),
    (Halo(2, 1), (7,), 3, {1, 2, 3, 4}),
    (Halo(2, 1), (7,), 6, {5, 6}),
    (Halo(3, 2), (8,), 4, {1, 2, 3, 4, 5, 6, 7}),
    (Halo((2, 3), (1, 0)), (5, 6), (4, 4), {(3, 3), (3, 4), (3, 5), (4, 3), (4, 4), (4, 5)}),
    (Halo((2, 2), 1), (6, 6), (2, 3), _prod([1, 2, 3, 4], [1, 2, 3, 4])),
    (Halo(2, (0, 1, 0)), (2, 4, 2), (0, 0, 1), {(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1),
                                                (0, 2, 0), (0, 2, 1), (1, 0, 0), (1, 0, 1),
                                                (1, 1, 0), (1, 1, 1), (1, 2, 0), (1, 2, 1)}),
]


@pytest.mark.parametrize("pattern, shape, query, expected", HAND, ids=lambda v: repr(v))
def test_hand_computed_neighbors(pattern: Pattern, shape, query, expected) -> None:
    g = make_geometry(shape)
    pattern.validate(g)
    assert neighbor_set(pattern, g, query) == expected


CONFIGS = [
    (Blocked(4), (10,), True),
    (Blocked((2, 3)), (5, 7), True),
    (Blocked((3, 1, 2)), (4, 3, 5), True),
    (Grid(3), (12,), False),
    (Grid((2, 3)), (6, 9), False),
    (Grid((1, 2, 4)), (3, 4, 8), False),
    (Grid((5, 2)), (5, 6), False),
    (Halo(3, 2), (11,), True),
    (Halo((2, 4), (1, 0)), (7, 9), True),
    (Halo((2, 2, 3), (1, 0, 2)), (4, 5, 7), True),
]
TILES = {
    1: [(1, 1), (2, 1), (3, 4), (4, 3), (5, 2), (16, 16)],
    2: [(1, 1), (2, (1, 2)), (3, 2), ((2, 3), (3, 2)), (4, 5), ((1, 4), 2), (8, 8)],
    3: [(1, 1), (2, (1, 1, 2)), (3, 2), ((1, 2, 3), (3, 2, 1)), ((2, 4, 1), (1, 3, 4)), (8, 8)],
}


@pytest.mark.parametrize("pattern, shape, exact", CONFIGS, ids=lambda v: repr(v))
def test_layout_matches_mask(pattern: Pattern, shape, exact: bool) -> None:
    g = make_geometry(shape)
    for q_tile, kv_tile in TILES[len(shape)]:
        check_pattern_layout(pattern, g, q_tile, kv_tile, exact=exact)


@st.composite
def window_configs(draw):
    nd = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 12 if nd < 3 else 6)) for _ in range(nd))
    kind = draw(st.sampled_from(["blocked", "grid", "halo"]))
    if kind == "blocked":
        return shape, Blocked(tuple(draw(st.integers(1, n)) for n in shape)), True
    if kind == "halo":
        block = tuple(draw(st.integers(1, n)) for n in shape)
        halo = tuple(draw(st.integers(0, n)) for n in shape)
        return shape, Halo(block, halo), True
    divisors = [st.sampled_from([d for d in range(1, n + 1) if n % d == 0]) for n in shape]
    return shape, Grid(tuple(draw(d) for d in divisors)), False


@settings(max_examples=40, deadline=None)
@given(cfg=window_configs(), data=st.data())
def test_layout_random(cfg, data) -> None:
    shape, pattern, exact = cfg
    tile = st.tuples(*[st.integers(1, 6)] * len(shape))
    check_pattern_layout(pattern, make_geometry(shape), data.draw(tile), data.draw(tile),
                         exact=exact)


@settings(max_examples=40, deadline=None)
@given(cfg=window_configs())
def test_sees_self_symmetry_and_counts(cfg) -> None:
    shape, pattern, _ = cfg
    g = make_geometry(shape)
    m = dense_mask(pattern, g)[0, 0]
    if not isinstance(pattern, Halo):  # Halo is not symmetric: block + halo vs block
        assert torch.equal(m, m.T)
    assert m.diagonal().all()
    assert not pattern.may_have_empty_rows(g)
    if isinstance(pattern, Grid):  # every query sees exactly prod(grid_size) keys
        assert (m.sum(1) == torch.tensor(pattern.grid_size).prod()).all()
    if isinstance(pattern, Blocked):  # an equivalence relation: rows are equal or disjoint
        mm = m.float() @ m.float().T
        assert ((mm == 0) | (mm == m.sum(1).float()[:, None])).all()


def test_relations_between_patterns() -> None:
    g = make_geometry((6, 9))
    # Halo with halo 0 is Blocked
    assert torch.equal(dense_mask(Halo((2, 3), 0), g), dense_mask(Blocked((2, 3)), g))
    # Blocked with block == grid_size ... and Grid of the full axis is full attention
    assert dense_mask(Grid((6, 9)), g).all()
    assert dense_mask(Blocked((6, 9)), g).all()
    # Grid(n // b) and Blocked(b) are MaxViT's two complementary partitions: they share
    # exactly the query itself when b divides n
    both = dense_mask(Grid((3, 3)), g) & dense_mask(Blocked((2, 3)), g)
    assert torch.equal(both[0, 0], torch.eye(54, dtype=torch.bool))
    # a halo of kernel-sized blocks contains the neighbourhood of every query in the block
    n = make_geometry((12,))
    assert not (dense_mask(Neighborhood(3), n) & ~dense_mask(Halo(3, 1), n)).any()


def test_int_arguments_apply_to_every_axis_and_repr() -> None:
    for shape in [(8,), (6, 8), (4, 4, 8)]:
        g = make_geometry(shape)
        nd = len(shape)
        assert torch.equal(dense_mask(Blocked(2), g), dense_mask(Blocked((2,) * nd), g))
        assert torch.equal(dense_mask(Grid(2), g), dense_mask(Grid((2,) * nd), g))
        assert torch.equal(dense_mask(Halo(2, 1), g), dense_mask(Halo((2,) * nd, (1,) * nd), g))
    assert Blocked(2).ndim is None and Grid((2, 2)).ndim == 2 and Halo(2, (1, 1, 1)).ndim == 3
    assert repr(Blocked((7, 7))) == "Blocked(block=(7, 7))"
    assert repr(Grid(7)) == "Grid(grid_size=7)"
    assert repr(Halo(8, 3)) == "Halo(block=8, halo=3)"
    assert Blocked(4).preferred_tile(make_geometry((8,))) is None


@pytest.mark.parametrize(
    "make, shape, match",
    [
        (lambda: Blocked(0), (5,), "block"),
        (lambda: Blocked((2, -1)), (5, 5), "block"),
        (lambda: Blocked(6), (5,), "block=6"),
        (lambda: Blocked((2, 2)), (5, 5, 5), "2 token axes"),
        (lambda: Grid(0), (6,), "grid_size"),
        (lambda: Grid(4), (6,), "grid_size=4 must divide"),
        (lambda: Grid((2, 5)), (4, 6), "grid_size=5"),
        (lambda: Grid(7), (6,), "grid_size=7"),
        (lambda: Halo(0, 1), (5,), "block"),
        (lambda: Halo(2, -1), (5,), "halo"),
        (lambda: Halo(8, 1), (5,), "block=8"),
        (lambda: Halo((2, 2), (1, 1, 1)), (5, 5), "block=.*halo="),
        (lambda: Halo((2, 2, 2, 2), 1), (5, 5), "block"),
    ],
)
def test_validation_errors(make, shape, match) -> None:
    with pytest.raises(ValueError, match=match):
        make().validate(make_geometry(shape))


@pytest.mark.parametrize("pattern", [Blocked(2), Grid(2), Halo(2, 1)], ids=repr)
def test_q_kv_shapes_must_match(pattern: Pattern) -> None:
    with pytest.raises(ValueError, match=r"q token shape \(4, 4\).*k/v token shape \(4, 6\)"):
        pattern.validate(make_geometry((4, 4), (4, 6)))


def test_type_errors() -> None:
    with pytest.raises(TypeError, match="block"):
        Blocked(2.5)
    with pytest.raises(TypeError, match="grid_size"):
        Grid(True)
    with pytest.raises(TypeError, match="halo"):
        Halo(2, (1, "1"))
