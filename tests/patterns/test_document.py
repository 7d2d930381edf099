"""Document (packed sequences) and PrefixLM: mask values, block layouts, validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.patterns.base import Causal
from attnlab.patterns.document import Document, PrefixLM
from attnlab.patterns.layout import Tiling
from attnlab.patterns.sinks import Sinks
from attnlab.patterns.sliding_window import SlidingWindow
from attnlab.geometry import index_grid
from attnlab.testing import check_pattern_layout, dense_mask, make_geometry, neighbor_set

TILES_1D = [(1, 1), (3, 4), (5, 2), (7, 7), (16, 3)]
TILES_2D = [((2, 2), (3, 2)), ((1, 3), (2, 2)), ((3, 3), (1, 1))]




def _z(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.long)


def _sorted_ids(n: int, docs: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, docs, (n,), generator=gen).sort().values


# -- Document -------------------------------------------------------------------------------
def test_document_values():
    g = make_geometry((6,))
    p = Document(torch.tensor([0, 0, 1, 1, 1, 2]))
    assert neighbor_set(p, g, 0) == {0, 1}
    assert neighbor_set(p, g, 2) == {2, 3, 4}
    assert neighbor_set(p, g, 5) == {5}
    assert neighbor_set(p & Causal(), g, 3) == {2, 3}
    assert not p.may_have_empty_rows(g)


def test_document_batched_and_cross():
    g = make_geometry((4,), batch=2, q_heads=3)
    p = Document(torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]]))
    m = p.mask(*index_grid(g), g)
    assert m.shape == (2, 1, 4, 4)  # depends on the batch, not the head
    assert m[0, 0, 1].nonzero().flatten().tolist() == [0, 1]
    assert m[1, 0, 1].nonzero().flatten().tolist() == [1, 2, 3]
    g = make_geometry((2,), (5,))
    p = Document(torch.tensor([0, 1], dtype=torch.int32), kv_ids=torch.tensor([0, 0, 1, 1, 1]))
    p.validate(g)
    assert neighbor_set(p, g, 0) == {0, 1} and neighbor_set(p, g, 1) == {2, 3, 4}
    assert p.mask(*index_grid(g), g).shape == (1, 1, 2, 5)
    assert not p.may_have_empty_rows(g)
    assert Document(torch.tensor([0, 3]), torch.tensor([0, 0, 1])).may_have_empty_rows(g)


def test_document_batch_of_one_broadcasts():
    g = make_geometry((4,), batch=3)
    p = Document(torch.tensor([[0, 0, 1, 1]], dtype=torch.uint8))
    p.validate(g)
    assert p.mask(*index_grid(g), g).shape == (1, 1, 4, 4)


@pytest.mark.parametrize("seed", range(4))
def test_document_layout_exact_for_sorted_ids(seed):
    for n in (13, 20):
        ids = _sorted_ids(n, 5, seed)
        g = make_geometry((n,), batch=2, q_heads=2)
        for tq, tk in TILES_1D:
            check_pattern_layout(Document(ids), g, tq, tk, exact=True)
        batched = torch.stack([ids, _sorted_ids(n, 3, seed + 10)])
        for tq, tk in TILES_1D:
            check_pattern_layout(Document(batched), g, tq, tk, exact=True)


def test_document_layout_unsorted_cross_and_2d():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, (2, 11), generator=gen)
    kv = torch.randint(0, 4, (17,), generator=gen)
    g = make_geometry((11,), (17,), batch=2)
    for tq, tk in TILES_1D:
        check_pattern_layout(Document(ids, kv), g, tq, tk)
    g = make_geometry((4, 5), (3, 6), batch=2)
    q_ids = torch.randint(0, 3, (2, 20), generator=gen)
    p = Document(q_ids, torch.randint(0, 3, (18,), generator=gen))
    for tq, tk in TILES_2D:
        check_pattern_layout(p, g, tq, tk)
    lay = p.block_layout(Tiling(g, (2, 2), (3, 2)))
    assert lay.any.shape == (2, 1, 6, 3)


def test_document_layout_full_blocks():
    ids = torch.tensor([0] * 8 + [1] * 8)
    lay = Document(ids).block_layout(Tiling(make_geometry((16,)), (4,), (4,)))
    block = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]).bool()
    assert torch.equal(lay.any[0, 0], block) and torch.equal(lay.full[0, 0], block)


# -- PrefixLM -------------------------------------------------------------------------------
def test_prefix_lm_values():
    g = make_geometry((6,))
    p = PrefixLM(3)
    assert neighbor_set(p, g, 0) == {0, 1, 2}
    assert neighbor_set(p, g, 4) == {0, 1, 2, 3, 4}
    assert neighbor_set(PrefixLM(0), g, 2) == {0, 1, 2}  # plain causal
    assert neighbor_set(p, make_geometry((2,), (6,)), 0) == {0, 1, 2, 3, 4}  # aligned position 4
    g = make_geometry((4,), batch=2, q_heads=3)
    p = PrefixLM(torch.tensor([1, 4]))
    m = p.mask(*index_grid(g), g)
    assert m.shape == (2, 1, 4, 4)
    assert m[0, 0, 0].nonzero().flatten().tolist() == [0]
    assert m[1, 0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3]


def test_prefix_lm_empty_rows():
    assert not PrefixLM(0).may_have_empty_rows(make_geometry((4,)))
    assert PrefixLM(0).may_have_empty_rows(make_geometry((5,), (3,)))
    assert not PrefixLM(1).may_have_empty_rows(make_geometry((5,), (3,)))
    assert PrefixLM(torch.tensor([2, 0])).may_have_empty_rows(make_geometry((5,), (3,), batch=2))


@pytest.mark.parametrize("prefix", [0, 1, 5, 40, torch.tensor([0, 3]), torch.tensor([7, 2])])
def test_prefix_lm_layout_exact_for_every_tiling(prefix):
    p = PrefixLM(prefix)
    for L, S in [(13, 13), (10, 17), (17, 10)]:
        g = make_geometry((L,), (S,), batch=2)
        for tq, tk in TILES_1D:
            check_pattern_layout(p, g, tq, tk, exact=True)
    g = make_geometry((4, 5), (3, 6), batch=2)
    for tq, tk in TILES_2D:
        check_pattern_layout(p, g, tq, tk, exact=True)
    lay = p.block_layout(Tiling(g, (2, 2), (2, 2)))
    assert lay.any.shape[:2] == ((2, 1) if isinstance(prefix, torch.Tensor) else (1, 1))


# -- compositions ---------------------------------------------------------------------------
def test_compositions():
    ids = torch.tensor(
        [[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3]]
    )
    g = make_geometry((12,), batch=2, q_heads=2)
    patterns = [
        Document(ids) & Causal(),
        Document(ids) & SlidingWindow(2),
        Document(ids[0]) | Sinks(1),
        PrefixLM(torch.tensor([2, 5])) & Document(ids),
        PrefixLM(3) | SlidingWindow(0, 2),
    ]
    for p in patterns:
        for tq, tk in TILES_1D:
            check_pattern_layout(p, g, tq, tk)
    m = dense_mask(Document(ids) & Causal(), g)
    assert m[1, 0, 5].nonzero().flatten().tolist() == [1, 2, 3, 4, 5]
    lay = (Document(ids) & Causal()).block_layout(Tiling(g, (4,), (4,)))
    assert lay.any.shape == (2, 1, 3, 3)


# -- validation -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: Document([0, 1]), TypeError, r"ids must be an integer torch\.Tensor"),
        (lambda: Document(torch.tensor([0.0, 1.0])), TypeError, r"ids\.dtype=torch\.float32"),
        (lambda: Document(torch.tensor([True])), TypeError, r"ids\.dtype=torch\.bool"),
        (lambda: Document(_z(1, 2, 3)), ValueError, r"ids\.shape=\(1, 2, 3\)"),
        (lambda: Document(_z(3), torch.zeros(3)), TypeError, r"kv_ids\.dtype"),
        (lambda: Document(_z(2, 3), _z(3, 4)), ValueError, r"same batch size"),
        (lambda: PrefixLM(-1), ValueError, r"prefix_len=-1"),
        (lambda: PrefixLM(2.0), TypeError, r"prefix_len=2\.0"),
        (lambda: PrefixLM(torch.tensor([1.0])), TypeError, r"prefix_len\.dtype"),
        (lambda: PrefixLM(torch.tensor([[1]])), ValueError, r"prefix_len\.shape=\(1, 1\)"),
        (lambda: PrefixLM(torch.tensor([1, -2])), ValueError, r"prefix_len=\[1, -2\]"),
    ],
)
def test_constructor_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize(
    "pattern, geometry, match",
    [
        (Document(_z(5)), make_geometry((6,)), r"ids must have shape \(6,\) or \(1, 6\).*\(5,\)"),
        (Document(_z(3, 4)), make_geometry((4,), batch=2), r"ids\.shape=\(3, 4\)"),
        (Document(_z(4)), make_geometry((4,), (6,)), r"kv_ids=None"),
        (Document(_z(4), _z(5)), make_geometry((4,), (6,)), r"kv_ids must .*kv_ids\.shape=\(5,\)"),
        (PrefixLM(torch.tensor([1, 2, 3])), make_geometry((4,), batch=2), r"prefix_len\.shape"),
    ],
)
def test_validate_errors(pattern, geometry, match):
    with pytest.raises(ValueError, match=match):
        pattern.validate(geometry)


def test_reprs():
    assert repr(PrefixLM(3)) == "PrefixLM(prefix_len=3)"
    assert repr(PrefixLM(torch.tensor([1, 2]))) == "PrefixLM(prefix_len=[1, 2])"
    assert repr(Document(torch.zeros(2, 5, dtype=torch.long))) == "Document(ids.shape=(2, 5))"
    r = repr(Document(torch.zeros(4, dtype=torch.long), torch.zeros(6, dtype=torch.long)))
    assert r == "Document(ids.shape=(4,), kv_ids.shape=(6,))"


# -- random configurations ------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    L=st.integers(1, 20), S=st.integers(1, 20), tq=st.integers(1, 8), tk=st.integers(1, 8),
    docs=st.integers(1, 5), seed=st.integers(0, 10_000), batched=st.booleans(),
)
def test_document_random(L, S, tq, tk, docs, seed, batched):
    gen = torch.Generator().manual_seed(seed)
    shape_q, shape_k = ((2, L), (2, S)) if batched else ((L,), (S,))
    ids = torch.randint(0, docs, shape_q, generator=gen)
    kv = torch.randint(0, docs, shape_k, generator=gen)
    g = make_geometry((L,), (S,), batch=2)
    p = Document(ids, kv)
    p.validate(g)
    check_pattern_layout(p, g, tq, tk)
    i, j = torch.meshgrid(torch.arange(L), torch.arange(S), indexing="ij")
    want = ids[..., i] == kv[..., j]
    assert torch.equal(dense_mask(p, g)[:, 0], torch.broadcast_to(want, (2, L, S)))
    if not p.may_have_empty_rows(g):
        assert dense_mask(p, g).any(-1).all()
    sorted_ids = ids.sort(-1).values
    if L == S:
        check_pattern_layout(Document(sorted_ids), g, tq, tk, exact=True)


@settings(max_examples=40, deadline=None)
@given(
    L=st.integers(1, 20), S=st.integers(1, 20), tq=st.integers(1, 8), tk=st.integers(1, 8),
    prefix=st.one_of(st.integers(0, 25), st.tuples(st.integers(0, 25), st.integers(0, 25))),
)
def test_prefix_lm_random(L, S, tq, tk, prefix):
    p = PrefixLM(torch.tensor(prefix) if isinstance(prefix, tuple) else prefix)
    g = make_geometry((L,), (S,), batch=2)
    p.validate(g)
    check_pattern_layout(p, g, tq, tk, exact=True)
    if not p.may_have_empty_rows(g):
        assert dense_mask(p, g).any(-1).all()


def test_layout_scales_without_dense_work():
    n = 1 << 20
    ids = torch.arange(n) // 5000
    g = make_geometry((n,), batch=2, q_heads=4)
    t = Tiling(g, (4096,), (4096,))
    lay = Document(ids).block_layout(t)
    assert lay.any.shape == (1, 1, 256, 256)
    assert lay.any.sum() < 4 * 256  # a document of 5000 tokens spans at most 3 tiles
    lay = PrefixLM(torch.tensor([10_000, 0])).block_layout(t)
    assert lay.any.shape == (2, 1, 256, 256)
