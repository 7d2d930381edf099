"""Radial attention: mask values against hand-written sets and a plain-Python definition,
band structure, block layouts (exact for frame-aligned 1-D tiles), validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.patterns.base import Causal
from attnlab.patterns.layout import Tiling
from attnlab.patterns.radial import Radial, pow2_floor
from attnlab.patterns.sinks import Sinks
from attnlab.testing import check_pattern_layout, dense_mask, make_geometry, neighbor_set


def python_radial(i: int, j: int, L: int, S: int, frame: int, window: int) -> bool:
    """The documented definition, in plain integer arithmetic."""
    qi = i + S - L
    dt = abs(qi // frame - j // frame)
    ds = abs(qi % frame - j % frame)
    p = 1
    while 2 * p <= max(dt, 1):
        p *= 2
    if p <= window and ds * p < window:
        return True
    return ds == 0 and dt % -(-p // window) == 0


def test_pow2_floor_exact_for_large_values():
    xs, want = [], []
    for k in range(0, 62):
        for x, w in ((1 << k, 1 << k), ((1 << (k + 1)) - 1, 1 << k), ((1 << k) + 1, 1 << k)):
            if x >= 1 and not (k == 0 and x == 2):
                xs.append(x)
                want.append(w)
    xs.append(0)
    want.append(1)
    assert pow2_floor(torch.tensor(xs)).tolist() == want


def test_values_hand_written():
    g = make_geometry((16,))
    assert neighbor_set(Radial(2), g, 0) == {0, 1, 2, 3, 4, 6, 8, 12}
    # frame 4, window 2: dt<=1 -> |ds|<=1; dt in [2,4) -> ds=0; dt in [4,8) -> ds=0, dt even
    g = make_geometry((24,))
    assert neighbor_set(Radial(4, window=2), g, 5) == {0, 1, 2, 4, 5, 6, 8, 9, 10, 13, 17, 21}
    # cross attention: the 4 queries are aligned with the last frame of 12 keys
    g = make_geometry((4,), (12,))
    assert neighbor_set(Radial(4, window=2), g, 1) == {1, 4, 5, 6, 8, 9, 10}


def test_pairs_per_frame_pair_halve_with_band():
    f, frames = 8, 40
    g = make_geometry((f * frames,))
    m = dense_mask(Radial(f), g)[0, 0].view(frames, f, frames, f)
    counts = [int(m[0, :, dt].sum()) for dt in range(frames)]
    want = []
    for dt in range(frames):
        if dt <= 1:
            want.append(64)
        elif dt < 4:
            want.append(44)  # |ds| < 4 on an 8 x 8 frame pair
        elif dt < 8:
            want.append(22)  # |ds| < 2
        elif dt < 16:
            want.append(8)  # the diagonal, every frame
        elif dt < 32:
            want.append(8 if dt % 2 == 0 else 0)
        else:
            want.append(8 if dt % 4 == 0 else 0)
    assert counts == want
    assert torch.equal(m.flatten(0, 1).flatten(1), m.flatten(0, 1).flatten(1).T)  # symmetric


@pytest.mark.parametrize(
    "frame, window, L, S",
    [(4, None, 32, 32), (6, 2, 36, 36), (6, 1, 12, 36), (3, 5, 36, 18), (2, None, 40, 40),
     (8, 3, 64, 64)],
)
def test_layout_exact_for_frame_aligned_tiles(frame, window, L, S):
    p = Radial(frame, window)
    g = make_geometry((L,), (S,))
    tiles = [t for t in range(1, frame + 1) if frame % t == 0]
    for tq in tiles:
        for tk in tiles:
            check_pattern_layout(p, g, tq, tk, exact=True)


@pytest.mark.parametrize("p", [Radial(4), Radial(5, 2), Radial(3, 1), Radial(6, 9)], ids=repr)
def test_layout_valid_for_any_tiling(p):
    for L, S in [(30, 30), (17, 29), (29, 17)]:
        g = make_geometry((L,), (S,))
        for tq, tk in [(1, 1), (3, 4), (5, 2), (7, 7), (16, 3), (64, 64)]:
            check_pattern_layout(p, g, tq, tk)
        if not p.may_have_empty_rows(g):
            assert dense_mask(p, g).any(-1).all()
    for qs, ks, tiles in [
        ((6, 4), (6, 4), [((2, 2), (3, 2)), ((1, 4), (2, 4)), ((3, 3), (1, 1))]),
        ((3, 2, 3), (4, 2, 3), [((1, 2, 2), (2, 1, 3)), ((2, 2, 3), (1, 2, 3))]),
    ]:
        g = make_geometry(qs, ks)
        for tq, tk in tiles:
            check_pattern_layout(p, g, tq, tk)


def test_layout_is_sparse_for_long_videos():
    f, frames = 16, 64
    g = make_geometry((f * frames,), batch=2, q_heads=3)
    lay = Radial(f).block_layout(Tiling(g, (f,), (f,)))
    assert lay.any.shape == (1, 1, frames, frames)
    # dt < 32: a band at least one token wide; dt >= 32: the diagonal on every other frame
    row = lay.any[0, 0, 0].nonzero().flatten().tolist()
    assert row == list(range(32)) + list(range(32, 64, 2))
    assert lay.full[0, 0, 0].nonzero().flatten().tolist() == [0, 1]
    narrow = Radial(f, window=2).block_layout(Tiling(g, (f,), (f,)))
    row = narrow.any[0, 0, 0].nonzero().flatten().tolist()
    assert row == [0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48]  # two frames per band
    assert narrow.any.float().mean() < 0.3 < lay.any.float().mean()


def test_compositions():
    g = make_geometry((24,), (24,))
    for p in (Radial(4) | Sinks(4), Radial(4, 2) & Causal(), Radial(6, 3) | Radial(2)):
        for tq, tk in [(1, 1), (4, 4), (3, 5), (8, 2)]:
            check_pattern_layout(p, g, tq, tk)
    m = dense_mask(Radial(4, 1) | Sinks(4), g)[0, 0]
    assert m[:, :4].all()
    want = dense_mask(Radial(4), g) & dense_mask(Causal(), g)
    assert torch.equal(dense_mask(Radial(4) & Causal(), g), want)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: Radial(0), ValueError, r"frame_size=0"),
        (lambda: Radial(4, window=0), ValueError, r"window=0"),
        (lambda: Radial(4.0), TypeError, r"frame_size=4\.0"),
        (lambda: Radial(4, window="2"), TypeError, r"window='2'"),
    ],
)
def test_validation_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_repr_and_empty_rows():
    assert repr(Radial(16)) == "Radial(frame_size=16, window=16)"
    assert repr(Radial(16, 4)) == "Radial(frame_size=16, window=4)"
    assert not Radial(4).may_have_empty_rows(make_geometry((8,), (12,)))
    assert Radial(4).may_have_empty_rows(make_geometry((12,), (8,)))


@settings(max_examples=40, deadline=None)
@given(
    L=st.integers(1, 20), S=st.integers(1, 20), frame=st.integers(1, 6), window=st.integers(1, 8),
    tq=st.integers(1, 8), tk=st.integers(1, 8),
)
def test_random(L, S, frame, window, tq, tk):
    p = Radial(frame, window)
    g = make_geometry((L,), (S,))
    m = dense_mask(p, g)[0, 0]
    want = torch.tensor(
        [[python_radial(i, j, L, S, frame, window) for j in range(S)] for i in range(L)]
    ).view(L, S)
    assert torch.equal(m, want)
    check_pattern_layout(p, g, tq, tk)
    if not p.may_have_empty_rows(g):
        assert m.any(-1).all()
