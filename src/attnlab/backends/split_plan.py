"""The plan of the block-flash backend: a pattern's tile layout split into whole and partial tiles.

Whole tiles (every pair visible, no padding) need no mask. attnlab's native kernel reads
every query tile's list of tiles at once (:mod:`~attnlab.backends.native_plan`), partial
tiles included when key tiles are aligned in memory. For PyTorch's fused CPU flash kernel,
each query tile's whole key tiles are gathered into one contiguous run, query tiles grouped
by how many whole tiles they have (one kernel call per group and memory chunk). The partial
tiles, where the pattern's elementwise mask decides, then form an ordinary
:class:`~attnlab.backends.tiled_plan.TiledPlan` run by the tiled backend's masked GEMMs.
Built from the layout alone, in time proportional to the number of tile pairs; the parts a
kernel does not need are not built.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..patterns.base import Pattern
from ..patterns.layout import BlockLayout, Tiling
from .tiled_plan import TiledPlan, build_plan, new_plan_cache, pattern_cached

DEFAULT_GATHER_ELEMENTS = 1 << 23


@dataclass
class WholeTileCall:
    """One flash-kernel call: ``rows`` index the query tiles ``q_t.view(-1, M, D)``, and
    ``kv_index`` the rows of ``k_flat.view(-1, unit * D)`` that make up their keys, ``(n, c * Tk / unit)``."""

    rows: torch.Tensor
    kv_index: torch.Tensor


@dataclass
class SplitPlan:
    """The whole/partial split of one layout. The counts are computed at once; the
    PyTorch-kernel calls and the partial tiles' tiled plan are built on first use (the
    native kernel reads :attr:`native_lists` instead)."""

    tiling: Tiling
    fold_heads: bool
    unit: int  # key tokens per gathered row: a whole tile when tiles are aligned in memory, else 1
    aligned: bool  # 1-D, S a multiple of the key tile: key tile j holds tokens [j * Tk, (j + 1) * Tk)
    pattern: Pattern
    layout: BlockLayout
    chunk_elements: int
    gather_elements: int
    whole_pairs: int  # tile pairs computed by the flash kernel
    partial_pairs: int
    partial_work: dict = field(default_factory=dict)  # dtype -> the partial plan's work list, built once
    native_lists: object = None  # NativeLists of the native kernel, built on first use

    @cached_property
    def calls(self) -> list[WholeTileCall]:
        return _whole_tile_calls(self)

    @cached_property
    def partial(self) -> TiledPlan | None:
        """The partial tiles, masked by the pattern; None when there are none."""
        if not self.partial_pairs:
            return None
        partial = self.layout.any & ~whole_tiles(self.layout, self.tiling)
        return build_plan(self.pattern, self.tiling, self.chunk_elements,
                          BlockLayout(partial, torch.zeros_like(partial)))


def whole_tiles(layout: BlockLayout, tiling: Tiling) -> torch.Tensor:
    """``(Bb, Hb, nQt, nKt)``: the tile pairs that are touched, fully visible and unpadded."""
    return layout.any & layout.full & tiling.kv_tile_complete


def build_split_plan(pattern: Pattern, tiling: Tiling, layout: BlockLayout, chunk_elements: int,
                     gather_elements: int = DEFAULT_GATHER_ELEMENTS) -> SplitPlan:
    """Split ``layout`` (``pattern`` on ``tiling``) into flash-kernel calls over whole tiles and
    a tiled plan over the rest; each call gathers at most about ``gather_elements`` key and
    value elements."""
    g = tiling.geometry
    whole = whole_tiles(layout, tiling)
    Bb, Hb, nq, nk = layout.any.shape
    fold = Hb == 1
    hx = g.kv_heads if fold else g.q_heads
    reps = (g.batch // Bb) * (hx // Hb)
    aligned = g.ndim == 1 and g.kv_len % tiling.kv_tile_size == 0
    n_whole, n_touched = int(whole.sum()), int(layout.any.sum())
    return SplitPlan(tiling, fold, tiling.kv_tile_size if aligned else 1, aligned, pattern, layout, chunk_elements,
                     gather_elements, n_whole * reps, (n_touched - n_whole) * reps)


def _whole_tile_calls(plan: SplitPlan) -> list[WholeTileCall]:
    """PyTorch-kernel calls: query tiles grouped by how many whole tiles they have, each call
    gathering at most about ``gather_elements`` key and value elements."""
    tiling, g = plan.tiling, plan.tiling.geometry
    whole = whole_tiles(plan.layout, tiling)
    nq, nk = whole.shape[-2:]
    hx = g.kv_heads if plan.fold_heads else g.q_heads
    whole_rows = torch.broadcast_to(whole, (g.batch, hx, nq, nk)).reshape(-1, nk)
    # key-tile row of (b, hx, tile) in the kv heads' flat tile numbering
    b = torch.arange(g.batch, device=whole.device).view(-1, 1)
    h = torch.arange(hx, device=whole.device).view(1, -1)
    hkv = h if plan.fold_heads else h // g.group_size
    head_base = ((b * g.kv_heads + hkv) * nk).repeat_interleave(nq, dim=1).reshape(-1)
    Tk = tiling.kv_tile_size
    M = (g.group_size if plan.fold_heads else 1) * tiling.q_tile_size
    per_row = M * (g.head_dim + g.value_dim)
    counts = whole_rows.sum(1)
    calls = []
    for c in torch.unique(counts).tolist():
        if c == 0:
            continue
        rows = torch.nonzero(counts == c).view(-1)
        tiles = torch.nonzero(whole_rows[rows])[:, 1].view(-1, c) + head_base[rows, None]
        kv_index = tiles if plan.aligned else _token_rows(tiles, tiling, nk)
        n = max(1, plan.gather_elements // (c * Tk * (g.head_dim + g.value_dim) + per_row))
        for lo in range(0, rows.numel(), n):
            calls.append(WholeTileCall(rows[lo:lo + n], kv_index[lo:lo + n]))
    return calls


def _token_rows(tiles: torch.Tensor, tiling: Tiling, nk: int) -> torch.Tensor:
    """Flat key-token rows ``(n, c * Tk)`` of the tiles numbered ``head * nk + tile``."""
    S = tiling.geometry.kv_len
    head, tile = tiles // nk, tiles % nk
    tok = tiling.kv_token_index[tile]  # (n, c, Tk); whole tiles hold no padding
    return (head[..., None] * S + tok).reshape(tiles.shape[0], -1)


_SPLIT_CACHE: "OrderedDict[tuple, SplitPlan]" = new_plan_cache()


def cached_split_plan(pattern: Pattern, tiling: Tiling, chunk_elements: int, gather_elements: int) -> SplitPlan:
    """:func:`build_split_plan`, reused across calls for patterns with a
    :meth:`~attnlab.Pattern.cache_key` (least-recently-used, as the tiled plans)."""
    return pattern_cached(_SPLIT_CACHE, pattern, tiling, (chunk_elements, gather_elements),
                          lambda: build_split_plan(pattern, tiling, pattern.block_layout(tiling),
                                                   chunk_elements, gather_elements))


__all__ = ["cached_split_plan", "SplitPlan", "WholeTileCall", "build_split_plan", "whole_tiles", "DEFAULT_GATHER_ELEMENTS"]
