"""Tiled-backend paths that the catalog sweep reaches only incidentally: the plan cache,
whole-tile gathers, and dq assigned (not accumulated) when every row is visited once."""

import pytest
import torch

import attnlab as al
from attnlab.backends import tiled_plan
from attnlab.backends.registry import TiledBackend
from attnlab.backends.tiled import ChunkIndex, contiguous_kv_tiles
from attnlab.patterns.layout import Tiling
from attnlab.testing import make_geometry, rel_error


def _grads(q, k, v, pattern, score_mod, backend, options=None):
    out, lse = al.attention(q, k, v, pattern, score_mod, backend=backend, options=options, return_lse=True)
    g = torch.Generator().manual_seed(1)
    go = torch.randn(out.shape, generator=g, dtype=out.dtype)
    params = list(score_mod.parameters()) if score_mod is not None else []
    grads = torch.autograd.grad((out * go).sum(), [q, k, v, *params])
    return out, lse, grads


@pytest.fixture(autouse=True)
def _fresh_cache():
    tiled_plan.clear_plan_cache()
    yield
    tiled_plan.clear_plan_cache()


def test_plan_cache_reuses_plans_for_equal_patterns_only():
    q = torch.randn(1, 2, 96, 8)
    al.attention(q, q, q, al.SlidingWindow(left=7), backend="tiled")
    assert len(tiled_plan._PLAN_CACHE) == 1
    (plan, _), = tiled_plan._PLAN_CACHE.values()
    al.attention(q, q, q, al.SlidingWindow(left=7), backend="tiled")  # a new, equal pattern
    assert len(tiled_plan._PLAN_CACHE) == 1
    assert next(iter(tiled_plan._PLAN_CACHE.values()))[0] is plan
    al.attention(q, q, q, al.SlidingWindow(left=8), backend="tiled")
    assert len(tiled_plan._PLAN_CACHE) == 2
    al.attention(q, q, q, al.Document(torch.arange(96) // 40), backend="tiled")  # holds a tensor
    assert len(tiled_plan._PLAN_CACHE) == 2
    tiled_plan.clear_plan_cache()
    assert not tiled_plan._PLAN_CACHE


def test_clear_plan_cache_also_drops_block_flash_split_plans():
    from attnlab.backends import split_plan

    q = torch.randn(1, 2, 128, 8)
    al.attention(q, q, q, al.SlidingWindow(left=7), backend="block_flash")
    assert len(split_plan._SPLIT_CACHE) == 1
    tiled_plan.clear_plan_cache()
    assert not split_plan._SPLIT_CACHE


def test_plan_cache_is_bounded():
    q = torch.randn(1, 1, 40, 4)
    for left in range(tiled_plan.PLAN_CACHE_SIZE + 3):
        al.attention(q, q, q, al.SlidingWindow(left=left), backend="tiled")
    assert len(tiled_plan._PLAN_CACHE) == tiled_plan.PLAN_CACHE_SIZE


def test_cached_plan_gives_the_same_result_as_a_fresh_one():
    q, k, v = (torch.randn(2, 4, 130, 8, dtype=torch.float64) for _ in range(3))
    pattern = al.SlidingWindow(left=20) | al.Sinks(3)
    first = al.attention(q, k, v, pattern, backend="tiled")
    second = al.attention(q, k, v, pattern, backend="tiled")
    assert torch.equal(first, second)
    ref = al.attention(q, k, v, pattern, backend="reference")
    assert rel_error(second, ref) < 1e-12


@pytest.mark.parametrize(
    "shape,kv_tile,contiguous",
    [((128,), (16,), True), ((130,), (16,), False), ((8, 12), (1, 4), True), ((8, 12), (2, 4), False)],
    ids=["1d-divides", "1d-padded", "2d-row-runs", "2d-boxes"],
)
def test_whole_tile_and_token_gathers_agree_with_reference(shape, kv_tile, contiguous):
    g = make_geometry(shape)
    tiling = Tiling(g, tuple(min(4, s) for s in shape), kv_tile)
    assert contiguous_kv_tiles(tiling) is contiguous
    q, k, v = (torch.randn(1, 4, *shape, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pattern = al.Neighborhood(kernel_size=tuple(3 for _ in shape))
    opts = {"q_tile": tiling.q_tile, "kv_tile": kv_tile}
    got = _grads(q, k, v, pattern, None, "tiled", opts)
    want = _grads(q, k, v, pattern, None, "reference")
    assert rel_error(got[0], want[0]) < 1e-12
    for a, b in zip(got[2], want[2]):
        assert rel_error(a, b) < 1e-10


def test_chunk_index_uses_tile_gather_only_for_contiguous_tiles():
    q = torch.randn(1, 2, 128, 8)
    problem = al.api._problem(q, q, q, al.SlidingWindow(left=9), None, None, False, {"q_tile": 16, "kv_tile": 16})
    plan = tiled_plan.build_plan(problem.pattern, TiledBackend().tiling(problem))
    ci = ChunkIndex(plan, plan.chunks[0], 0, plan.chunks[0].num_slots)
    assert ci.tile_gather is not None and ci.tile_gather.shape[-1] * 16 == ci.span


@pytest.mark.parametrize("split", [False, True], ids=["whole-rows", "split-rows"])
def test_query_dependent_score_mod_gradients_with_and_without_split_rows(split):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mod = al.RelativeEmbedding(16, max_distance=9, causal=True).double()
    opts = {"q_tile": 16, "kv_tile": 8}
    if split:
        opts["chunk_elements"] = 64  # rows split into slot groups: dq is accumulated
    got = _grads(q, k, v, al.Causal(), mod, "tiled", opts)
    want = _grads(q, k, v, al.Causal(), mod, "reference")
    assert rel_error(got[0], want[0]) < 1e-12
    for a, b in zip(got[2], want[2]):
        assert rel_error(a, b) < 1e-10


def test_keys_and_values_sliced_from_one_tensor():
    """k and v as slices of one wider tensor along the feature axis (not contiguous rows)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64)
    kv = torch.randn(2, 4, 9, 14, generator=g, dtype=torch.float64)
    k, v = kv[..., :8], kv[..., 8:]
    for pattern in (None, al.Causal(), al.SlidingWindow(3)):
        torch.testing.assert_close(al.attention(q, k, v, pattern, backend="tiled"),
                                   al.attention(q, k, v, pattern, backend="reference"))
