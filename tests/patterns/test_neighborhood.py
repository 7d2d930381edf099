"""Neighborhood attention: hand-computed neighbourhoods, layouts, validation, NATTEN."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from attnlab.patterns.base import Causal, Pattern
from attnlab.patterns.layout import Tiling
from attnlab.patterns.neighborhood import Neighborhood
from attnlab.testing import check_pattern_layout, dense_mask, make_geometry, neighbor_set

NA = Neighborhood


def _prod(*axes: list[int]) -> set[tuple[int, ...]]:
    return set(itertools.product(*axes))


# (pattern, token shape, query, expected visible keys), worked out by hand from the rule in
# the Neighborhood docstring (NATTEN semantics).
HAND = [
    # 1-D, odd kernel: window shifts inward at both borders
    (NA(3), (7,), 0, {0, 1, 2}),
    (NA(3), (7,), 3, {2, 3, 4}),
    (NA(3), (7,), 6, {4, 5, 6}),
    # 1-D, even kernel: k//2 keys before the query, k//2 - 1 after
    (NA(4), (8,), 0, {0, 1, 2, 3}),
    (NA(4), (8,), 4, {2, 3, 4, 5}),
    (NA(4), (8,), 5, {3, 4, 5, 6}),
    (NA(4), (8,), 7, {4, 5, 6, 7}),
    # dilation 3 on length 10: groups {0,3,6,9}, {1,4,7}, {2,5,8}
    (NA(3, dilation=3), (10,), 0, {0, 3, 6}),
    (NA(3, dilation=3), (10,), 3, {0, 3, 6}),
    (NA(3, dilation=3), (10,), 6, {3, 6, 9}),
    (NA(3, dilation=3), (10,), 9, {3, 6, 9}),
    (NA(3, dilation=3), (10,), 4, {1, 4, 7}),
    (NA(3, dilation=3), (10,), 8, {2, 5, 8}),
    # stride 2: queries {0,1},{2,3},... share the window of the right-centre query
    (NA(3, stride=2), (9,), 0, {0, 1, 2}),
    (NA(3, stride=2), (9,), 1, {0, 1, 2}),
    (NA(3, stride=2), (9,), 2, {2, 3, 4}),
    (NA(3, stride=2), (9,), 3, {2, 3, 4}),
    (NA(3, stride=2), (9,), 5, {4, 5, 6}),
    (NA(3, stride=2), (9,), 8, {6, 7, 8}),  # leader clipped to 8
    # stride 3, kernel 5: leaders 1, 4, 7, 9
    (NA(5, stride=3), (10,), 2, {0, 1, 2, 3, 4}),
    (NA(5, stride=3), (10,), 3, {2, 3, 4, 5, 6}),
    (NA(5, stride=3), (10,), 8, {5, 6, 7, 8, 9}),
    (NA(5, stride=3), (10,), 9, {5, 6, 7, 8, 9}),
    # causal: the kernel_size keys ending at the query
    (NA(3, is_causal=True), (8,), 0, {0}),
    (NA(3, is_causal=True), (8,), 1, {0, 1}),
    (NA(3, is_causal=True), (8,), 5, {3, 4, 5}),
    # causal + stride: window starts at leader - k + 1 (leader = last of the group), ends at
    # the query
    (NA(3, stride=2, is_causal=True), (8,), 0, {0}),
    (NA(3, stride=2, is_causal=True), (8,), 1, {0, 1}),
    (NA(3, stride=2, is_causal=True), (8,), 2, {1, 2}),
    (NA(3, stride=2, is_causal=True), (8,), 3, {1, 2, 3}),
    (NA(3, stride=2, is_causal=True), (8,), 4, {3, 4}),
    (NA(3, stride=2, is_causal=True), (8,), 7, {5, 6, 7}),
    (NA(3, stride=2, is_causal=True), (7,), 6, {4, 5, 6}),
    # causal + dilation 2 + stride 2 on length 11: groups {0,2,..,10} and {1,3,..,9}
    (NA(2, dilation=2, stride=2, is_causal=True), (11,), 1, {1}),
    (NA(2, dilation=2, stride=2, is_causal=True), (11,), 4, {4}),
    (NA(2, dilation=2, stride=2, is_causal=True), (11,), 6, {4, 6}),
    (NA(2, dilation=2, stride=2, is_causal=True), (11,), 8, {8}),
    (NA(2, dilation=2, stride=2, is_causal=True), (11,), 9, {7, 9}),
    # 2-D
    (NA((3, 3)), (5, 6), (0, 0), _prod([0, 1, 2], [0, 1, 2])),
    (NA((3, 3)), (5, 6), (2, 3), {(1, 2), (1, 3), (1, 4), (2, 2), (2, 3), (2, 4),
                                   (3, 2), (3, 3), (3, 4)}),
    (NA((3, 3)), (5, 6), (4, 5), {(2, 3), (2, 4), (2, 5), (3, 3), (3, 4), (3, 5),
                                   (4, 3), (4, 4), (4, 5)}),
    # 2-D, causal along rows only
    (NA((3, 3), is_causal=(True, False)), (5, 6), (0, 3), {(0, 2), (0, 3), (0, 4)}),
    (NA((3, 3), is_causal=(True, False)), (5, 6), (1, 0),
     {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)}),
    (NA((3, 3), is_causal=(True, False)), (5, 6), (4, 5), _prod([2, 3, 4], [3, 4, 5])),
    # 2-D, causal along columns only
    (NA((3, 3), is_causal=(False, True)), (5, 6), (0, 1),
     {(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)}),
    # 2-D, dilation 2 on rows (length 5: groups {0,2,4}, {1,3}), even kernel on rows
    (NA((2, 3), dilation=(2, 1)), (5, 4), (3, 0),
     {(1, 0), (1, 1), (1, 2), (3, 0), (3, 1), (3, 2)}),
    (NA((2, 3), dilation=(2, 1)), (5, 4), (4, 3),
     {(2, 1), (2, 2), (2, 3), (4, 1), (4, 2), (4, 3)}),
    # 2-D, stride 2 on both axes
    (NA((3, 3), stride=(2, 2)), (6, 6), (5, 2), _prod([3, 4, 5], [2, 3, 4])),
    (NA((3, 3), stride=2), (6, 6), (1, 1), _prod([0, 1, 2], [0, 1, 2])),
    # 3-D: causal time axis, stride 3 on axis 1, dilation 2 on axis 2 (length 7: groups
    # {0,2,4,6}, {1,3,5})
    (NA((2, 3, 3), dilation=(1, 1, 2), stride=(1, 3, 1), is_causal=(True, False, False)),
     (3, 6, 7), (2, 2, 4),
     {(1, 0, 2), (1, 0, 4), (1, 0, 6), (1, 1, 2), (1, 1, 4), (1, 1, 6),
      (1, 2, 2), (1, 2, 4), (1, 2, 6), (2, 0, 2), (2, 0, 4), (2, 0, 6),
      (2, 1, 2), (2, 1, 4), (2, 1, 6), (2, 2, 2), (2, 2, 4), (2, 2, 6)}),
    (NA((2, 3, 3), dilation=(1, 1, 2), stride=(1, 3, 1), is_causal=(True, False, False)),
     (3, 6, 7), (0, 3, 1),
     {(0, 3, 1), (0, 3, 3), (0, 3, 5), (0, 4, 1), (0, 4, 3), (0, 4, 5),
      (0, 5, 1), (0, 5, 3), (0, 5, 5)}),
    (NA(2), (3, 3, 3), (2, 2, 2), _prod([1, 2], [1, 2], [1, 2])),
]


@pytest.mark.parametrize("pattern, shape, query, expected", HAND, ids=lambda v: repr(v))
def test_hand_computed_neighbors(pattern: Pattern, shape, query, expected) -> None:
    g = make_geometry(shape)
    pattern.validate(g)
    assert neighbor_set(pattern, g, query) == expected


CONFIGS = [
    (NA(3), (11,)),
    (NA(4, dilation=2), (11,)),
    (NA(3, stride=2, is_causal=True), (13,)),
    (NA(5, dilation=2, stride=3), (12,)),
    (NA((3, 2)), (7, 5)),
    (NA((3, 3), dilation=(2, 1), is_causal=(False, True)), (7, 6)),
    (NA((2, 4), stride=(2, 3), is_causal=(True, False)), (5, 9)),
    (NA((2, 3, 2), dilation=(1, 2, 1), stride=(1, 2, 2)), (3, 7, 4)),
    (NA(2, is_causal=True), (4, 3, 5)),
]
TILES_1D = [(1, 1), (2, 1), (3, 4), (4, 3), (5, 2), (16, 16), (7, 1)]
TILES_2D = [(1, 1), (2, (1, 2)), (3, 2), ((2, 3), (3, 2)), (4, 5), ((1, 4), 2), (8, 8)]
TILES_3D = [(1, 1), (2, (1, 1, 2)), (3, 2), ((1, 2, 3), (3, 2, 1)), ((2, 4, 1), (1, 3, 4)), (8, 8)]
TILES = {1: TILES_1D, 2: TILES_2D, 3: TILES_3D}


@pytest.mark.parametrize("pattern, shape", CONFIGS, ids=lambda v: repr(v))
def test_layout_matches_mask(pattern: Neighborhood, shape) -> None:
    g = make_geometry(shape)
    exact = all(d == 1 for d in ([pattern.dilation] if isinstance(pattern.dilation, int)
                                  else pattern.dilation))
    for q_tile, kv_tile in TILES[len(shape)]:
        check_pattern_layout(pattern, g, q_tile, kv_tile, exact=exact)


@st.composite
def configs(draw, max_len: int = 12, min_k: int = 1):
    nd = draw(st.integers(1, 3))
    shape, ks, dil, strd, causal = [], [], [], [], []
    for _ in range(nd):
        n = draw(st.integers(min_k, max_len if nd < 3 else 6))
        k = draw(st.integers(min_k, n))
        d = draw(st.integers(1, n // k))
        shape.append(n)
        ks.append(k)
        dil.append(d)
        strd.append(draw(st.integers(1, k)))
        causal.append(draw(st.booleans()))
    return tuple(shape), NA(tuple(ks), tuple(dil), tuple(strd), tuple(causal))


@settings(max_examples=40, deadline=None)
@given(cfg=configs(), data=st.data())
def test_layout_random(cfg, data) -> None:
    shape, pattern = cfg
    nd = len(shape)
    tile = st.tuples(*[st.integers(1, 6)] * nd)
    q_tile, kv_tile = data.draw(tile), data.draw(tile)
    exact = all(d == 1 for d in pattern.dilation)
    check_pattern_layout(pattern, make_geometry(shape), q_tile, kv_tile, exact=exact)


def _row_counts(pattern: Pattern, shape) -> torch.Tensor:
    return dense_mask(pattern, make_geometry(shape))[0, 0].sum(1)


@settings(max_examples=40, deadline=None)
@given(cfg=configs())
def test_each_query_sees_prod_kernel_size_keys(cfg) -> None:
    shape, pattern = cfg
    counts = _row_counts(pattern, shape)
    if not any(pattern.is_causal):
        assert (counts == math.prod(pattern.kernel_size)).all()
    else:
        assert (counts >= 1).all() and (counts <= math.prod(pattern.kernel_size)).all()
    assert not pattern.may_have_empty_rows(make_geometry(shape))


def test_causal_sees_self_and_nothing_later() -> None:
    shape = (9, 7)
    p = NA((3, 2), dilation=(2, 1), stride=(3, 2), is_causal=True)
    m = dense_mask(p, make_geometry(shape))
    m = m[0, 0]
    assert m.diagonal().all()
    # causal on every axis implies causal on flat row-major indices
    assert not (m & ~Causal().mask(None, None, torch.arange(63)[:, None], torch.arange(63),
                                   make_geometry(shape))).any()


def test_int_arguments_apply_to_every_axis() -> None:
    p = NA(3, dilation=2, stride=2, is_causal=True)
    assert p.ndim is None
    for shape in [(9,), (7, 8), (6, 7, 6)]:
        g = make_geometry(shape)
        nd = len(shape)
        q = NA((3,) * nd, (2,) * nd, (2,) * nd, (True,) * nd)
        assert q.ndim == nd
        assert torch.equal(dense_mask(p, g), dense_mask(q, g))


def test_full_kernel_is_dense_and_repr() -> None:
    g = make_geometry((4, 5))
    assert dense_mask(NA((4, 5)), g).all()
    p = NA((7, 7), dilation=(2, 2))
    want = "Neighborhood(kernel_size=(7, 7), dilation=(2, 2), stride=1, is_causal=False)"
    assert repr(p) == want
    assert p.ndim == 2 and p.preferred_tile(make_geometry((16, 16))) is None


def test_mask_works_as_flex_mask_mod() -> None:
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    p = NA((3, 2), stride=(2, 1), is_causal=(False, True))
    g = make_geometry((8, 8))
    bm = fa.create_block_mask(p.as_mask_mod(g), None, None, g.q_len, g.kv_len, device="cpu",
                              BLOCK_SIZE=16)  # evaluates the mask_mod under vmap
    tiling = Tiling(g, (2, 8), (2, 8))  # 16-token tiles = flex's flat blocks
    assert torch.equal(p.block_layout(tiling).any[0, 0], bm.to_dense()[0, 0].bool())


@pytest.mark.parametrize(
    "kwargs, shape, match",
    [
        (dict(kernel_size=0), (5,), "kernel_size"),
        (dict(kernel_size=(3, -1)), (5, 5), "kernel_size"),
        (dict(kernel_size=6), (5,), "kernel_size=6"),
        (dict(kernel_size=(3, 6)), (5, 5), "kernel_size=6"),
        (dict(kernel_size=3, dilation=0), (5,), "dilation"),
        (dict(kernel_size=3, dilation=2), (5,), "dilation"),
        (dict(kernel_size=(2, 3), dilation=(1, 3)), (4, 8), "dilation"),
        (dict(kernel_size=3, stride=0), (5,), "stride"),
        (dict(kernel_size=3, stride=4), (5,), "stride"),
        (dict(kernel_size=(3, 3), stride=(1, 4)), (5, 5), "stride"),
        (dict(kernel_size=(3, 3), dilation=(1, 1, 1)), (5, 5), "dilation"),
        (dict(kernel_size=(3, 3), is_causal=(True,)), (5, 5), "is_causal"),
        (dict(kernel_size=(3, 3, 3, 3)), (5, 5), "kernel_size"),
        (dict(kernel_size=(3, 3)), (5, 5, 5), "2 token axes"),
        (dict(kernel_size=(3,)), (5, 5), "1 token axes"),
    ],
)
def test_validation_errors(kwargs, shape, match) -> None:
    with pytest.raises(ValueError, match=match):
        NA(**kwargs).validate(make_geometry(shape))


def test_validation_q_kv_shape_and_types() -> None:
    with pytest.raises(ValueError, match=r"q token shape \(6,\).*k/v token shape \(7,\)"):
        NA(3).validate(make_geometry((6,), (7,)))
    with pytest.raises(ValueError, match="kernel_size"):
        NA(3).block_layout(Tiling(make_geometry((2,)), (1,), (1,)))
    with pytest.raises(TypeError, match="is_causal"):
        NA(3, is_causal=1)
    with pytest.raises(TypeError, match="kernel_size"):
        NA(3.0)


# -- agreement with NATTEN ---------------------------------------------------------------


def _dense_attention(q, k, v, pattern: Pattern) -> torch.Tensor:
    """Softmax attention in float64 with the pattern's dense mask; heads-last layout
    ``[B, *spatial, H, D]`` in and out (NATTEN's)."""
    nd = q.dim() - 3
    B, *shape, H, D = q.shape
    g = make_geometry(tuple(shape), batch=B, q_heads=H, head_dim=D)
    m = dense_mask(pattern, g)
    qf, kf, vf = (t.double().flatten(1, nd).transpose(1, 2) for t in (q, k, v))  # B H L D
    logits = (qf @ kf.transpose(-1, -2)) * D**-0.5
    p = torch.softmax(logits.masked_fill(~m, float("-inf")), -1)
    return (p @ vf).transpose(1, 2).reshape(B, *shape, H, D)


NATTEN_CASES = [
    ((12,), dict(kernel_size=3)),
    ((13,), dict(kernel_size=4, dilation=3)),
    ((11,), dict(kernel_size=5, stride=2)),
    ((14,), dict(kernel_size=3, dilation=2, stride=3, is_causal=True)),
    ((10,), dict(kernel_size=4, stride=4, is_causal=True)),
    ((6, 7), dict(kernel_size=(3, 3))),
    ((7, 6), dict(kernel_size=(2, 3), dilation=(3, 2), stride=(2, 1))),
    ((6, 7), dict(kernel_size=(3, 3), dilation=(2, 1), stride=(1, 2), is_causal=(True, False))),
    ((5, 8), dict(kernel_size=(5, 2), stride=(3, 2), is_causal=(False, True))),
    ((4, 5, 6), dict(kernel_size=(2, 3, 3), dilation=(2, 1, 2), stride=(1, 2, 3))),
    ((5, 4, 7), dict(kernel_size=(3, 2, 3), is_causal=(True, False, True), stride=(2, 1, 3))),
    ((3, 6, 7), dict(kernel_size=(2, 3, 3), dilation=(1, 1, 2), stride=(1, 3, 1),
                     is_causal=(True, False, False))),
]


def _run_natten(shape, kwargs, seed: int = 0):
    natten = pytest.importorskip("natten")
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(shape)]
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, *shape, 2, 8, generator=gen) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = fn(q, k, v, **kwargs)
        except (NotImplementedError, RuntimeError) as e:  # no CPU backend for this case
            pytest.skip(f"NATTEN cannot run {kwargs} on {shape} on CPU: {e}")
    return q, k, v, out


@pytest.mark.natten
@pytest.mark.parametrize("shape, kwargs", NATTEN_CASES, ids=lambda v: repr(v))
def test_agrees_with_natten(shape, kwargs) -> None:
    q, k, v, out = _run_natten(shape, kwargs)
    want = _dense_attention(q, k, v, NA(**kwargs))
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.natten
@settings(max_examples=15, deadline=None)
@given(cfg=configs(max_len=9, min_k=2))  # NATTEN requires kernel_size > 1
def test_agrees_with_natten_random(cfg) -> None:
    shape, p = cfg
    kwargs = dict(kernel_size=p.kernel_size, dilation=p.dilation, stride=p.stride,
                  is_causal=p.is_causal)
    # 1-D with kernel_size == length is sent to NATTEN's FMHA, which has no causal CPU path
    assume(not (len(shape) == 1 and p.kernel_size[0] == shape[0] and p.is_causal[0]))
    q, k, v, out = _run_natten(shape, kwargs)
    torch.testing.assert_close(out.double(), _dense_attention(q, k, v, p), atol=2e-5, rtol=1e-4)
