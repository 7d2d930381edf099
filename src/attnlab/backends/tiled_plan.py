"""The plan of the tiled backend: which key tokens each query tile gathers, in what order.

Built once per call from a pattern's block layout; never touches L x S pairs. Rows of the
plan are the layout's (batch, head, query tile) triples, sorted by how many key tiles they
touch, and cut into chunks whose logits fit a working-set budget, so a causal or
document-masked problem computes almost no padding.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..geometry import Geometry
from ..patterns.base import Pattern
from ..patterns.layout import BlockLayout, Tiling

DEFAULT_CHUNK_ELEMENTS = 1 << 20
DEFAULT_MAX_TILE_PAIRS = 1 << 22


@dataclass
class Chunk:
    """Rows ``start:stop`` of the plan, their key-tile slots cut into groups of ``group``."""

    start: int
    stop: int
    num_slots: int
    group: int
    needs_mask: bool


@dataclass
class TiledPlan:
    geometry: Geometry
    tiling: Tiling
    pattern: Pattern
    fold_heads: bool  # layout shared by all heads: the GQA group is folded into the rows
    batch_in_rows: bool  # layout differs per batch element
    row_b: torch.Tensor  # (R,) batch index of each row (0 when shared)
    row_h: torch.Tensor  # (R,) query head of each row (0 when shared)
    row_qt: torch.Tensor  # (R,) query tile of each row
    kv_tiles: torch.Tensor  # (R, max_slots) key tiles of each row, -1 padding
    chunks: list[Chunk]

    @property
    def rows_per_tile(self) -> int:
        """Query rows in one plan row (the GQA group times the tile size when folded)."""
        g = self.geometry
        return (g.group_size if self.fold_heads else 1) * self.tiling.q_tile_size


def build_plan(
    pattern: Pattern,
    tiling: Tiling,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    layout: BlockLayout | None = None,
) -> TiledPlan:
    """Order the layout of ``pattern`` on ``tiling`` (computed here unless given: a part of
    it, e.g. only its partial tiles) into chunks; ``pattern`` still masks inside tiles."""
    g = tiling.geometry
    if layout is None:
        layout = pattern.block_layout(tiling)
    any_, full = layout.any, layout.full & tiling.kv_tile_complete
    Bb, Hb = any_.shape[0], any_.shape[1]
    if Bb not in (1, g.batch) or Hb not in (1, g.q_heads):
        raise ValueError(
            f"{pattern!r}.block_layout returned shape {tuple(any_.shape)}; expected "
            f"(1 or {g.batch}, 1 or {g.q_heads}, {tiling.num_q_tiles}, {tiling.num_kv_tiles})"
        )
    nq, nk = tiling.num_q_tiles, tiling.num_kv_tiles
    any_ = any_.reshape(Bb * Hb * nq, nk)
    full = torch.broadcast_to(full, (Bb, Hb, nq, nk)).reshape(Bb * Hb * nq, nk)
    counts = any_.sum(1)
    exact = (full & any_).sum(1) == counts
    order = torch.argsort(counts, descending=True, stable=True)
    counts = counts[order]
    exact = exact[order]
    max_slots = int(counts[0].item()) if counts.numel() else 0
    # key tiles touched by each row, in ascending order, -1 padded
    tile_ids = torch.arange(nk, device=any_.device)
    keyed = torch.where(any_[order], tile_ids, tile_ids + nk)
    kv_tiles = keyed.sort(1).values[:, :max_slots]
    kv_tiles = torch.where(kv_tiles < nk, kv_tiles, torch.full_like(kv_tiles, -1))
    rows = torch.arange(Bb * Hb * nq, device=any_.device)[order]
    row_b = rows // (Hb * nq)
    row_h = (rows // nq) % Hb
    row_qt = rows % nq

    fold = Hb == 1
    batch_in_rows = Bb != 1
    per_row = (
        (1 if batch_in_rows else g.batch)
        * (g.kv_heads if fold else 1)
        * (g.group_size if fold else 1)
        * tiling.q_tile_size
        * tiling.kv_tile_size
    )
    counts_l = counts.tolist()
    exact_l = exact.tolist()
    chunks: list[Chunk] = []
    start = 0
    R = len(counts_l)
    while start < R and counts_l[start] > 0:
        slots = counts_l[start]
        group = max(1, min(slots, chunk_elements // per_row))
        n_rows = max(1, chunk_elements // (per_row * group)) if group == slots else 1
        stop = min(R, start + n_rows)
        while stop > start + 1 and counts_l[stop - 1] == 0:
            stop -= 1
        needs_mask = not all(exact_l[start:stop]) or counts_l[stop - 1] != slots
        chunks.append(Chunk(start, stop, slots, group, needs_mask))
        start = stop
    return TiledPlan(
        geometry=g,
        tiling=tiling,
        pattern=pattern,
        fold_heads=fold,
        batch_in_rows=batch_in_rows,
        row_b=row_b,
        row_h=row_h,
        row_qt=row_qt,
        kv_tiles=kv_tiles,
        chunks=chunks,
    )


_CACHES: list[OrderedDict] = []  # every plan cache, for clear_plan_cache


def new_plan_cache() -> OrderedDict:
    """An empty plan cache for :func:`pattern_cached`, cleared by :func:`clear_plan_cache`."""
    cache: OrderedDict = OrderedDict()
    _CACHES.append(cache)
    return cache


_PLAN_CACHE: "OrderedDict[tuple, tuple[TiledPlan, list]]" = new_plan_cache()
PLAN_CACHE_SIZE = 8


def pattern_cached(cache: OrderedDict, pattern: Pattern, tiling: Tiling, extra: tuple, build, size: int = PLAN_CACHE_SIZE):
    """``build()``, reused across calls when ``pattern`` has a :meth:`~attnlab.Pattern.cache_key`:
    ``cache`` keeps the ``size`` most recently used entries, keyed by the pattern, the tiling and
    ``extra``."""
    key = pattern.cache_key()
    if key is None:
        return build()
    key = (key, tiling.geometry, tiling.q_tile, tiling.kv_tile) + extra
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    cache[key] = entry = build()
    while len(cache) > size:
        cache.popitem(last=False)
    return entry


def cached_plan(pattern: Pattern, tiling: Tiling, chunk_elements: int, dtype: torch.dtype, make_work):
    """``(plan, work)`` for this pattern and tiling, reused across calls when the pattern
    has a :meth:`~attnlab.Pattern.cache_key` (least-recently-used, ``PLAN_CACHE_SIZE``
    entries): a model whose layers share shapes and pattern builds its masks once."""
    def build():
        plan = build_plan(pattern, tiling, chunk_elements)
        return plan, make_work(plan, dtype)

    return pattern_cached(_PLAN_CACHE, pattern, tiling, (chunk_elements, dtype), build)


def clear_plan_cache() -> None:
    """Drop every cached plan (and the masks it holds): the tiled plans and every other cache
    made by :func:`new_plan_cache` (the block-flash split plans)."""
    for cache in _CACHES:
        cache.clear()


def default_tiles(pattern: Pattern, geometry: Geometry) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The pattern's preferred tiles, or: 64 query tokens per tile, as a box in N-d, and
    short key tiles (16 tokens in 1-D; in N-d one row segment, as short as the tile-pair
    grid allows, so a neighbourhood gathers few keys it does not need)."""
    pref = pattern.preferred_tile(geometry)
    if pref is not None:
        return tuple(pref[0]), tuple(pref[1])
    nd = geometry.ndim
    if nd == 1:
        return (64,), (16,)
    side = max(1, round(64 ** (1.0 / nd)))
    q_tile = tuple(min(side, s) for s in geometry.q_shape)
    n_q_tiles = math.prod(-(-s // t) for s, t in zip(geometry.q_shape, q_tile))
    last = 1
    while last < 16 and n_q_tiles * geometry.kv_len // last > DEFAULT_MAX_TILE_PAIRS:
        last *= 2
    return q_tile, tuple([1] * (nd - 1) + [last])


def tile_count_guard(tiling: Tiling, limit: int = 1 << 26) -> None:
    """Refuse tilings whose tile-pair grid would be unreasonably large."""
    n = tiling.num_q_tiles * tiling.num_kv_tiles
    if n > limit:
        raise ValueError(
            f"{tiling} has {n} tile pairs (> {limit}); pass larger tiles with "
            "options={'q_tile': ..., 'kv_tile': ...}"
        )


__all__ = ["TiledPlan", "Chunk", "build_plan", "cached_plan", "clear_plan_cache", "new_plan_cache", "default_tiles", "tile_count_guard"]
