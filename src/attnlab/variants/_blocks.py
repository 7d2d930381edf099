"""Query blocks over a pattern's block layout, for variants that are not a softmax and so
cannot use the tiled backend's online softmax, but whose rows are plain sums over keys
(sigmoid attention).

:func:`query_blocks` cuts the query tokens into the tiles of :class:`~attnlab.Tiling` and,
for each query tile, lists the key tokens of the key tiles the pattern's
:meth:`~attnlab.Pattern.block_layout` touches (the union over batch and heads), and whether
the elementwise mask is needed there (some touched tile not fully visible). Consecutive
query tiles that touch the same key tiles are merged up to a working-set budget. Nothing
here evaluates the L x S pairs: the cost is the number of tile pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends.tiled_plan import default_tiles, tile_count_guard
from ..geometry import Geometry
from ..patterns.base import Pattern
from ..patterns.layout import Tiling

DEFAULT_BLOCK_ELEMENTS = 1 << 21


@dataclass
class QueryBlock:
    """Flat query tokens ``q_idx (Tq,)``, the key tokens they may see ``kv_idx (span,)``,
    and whether the pattern's mask must be applied inside the block."""

    q_idx: torch.Tensor
    kv_idx: torch.Tensor
    needs_mask: bool


def query_blocks(pattern: Pattern, g: Geometry, budget: int = DEFAULT_BLOCK_ELEMENTS) -> list[QueryBlock]:
    """The blocks covering every query exactly once (see the module docstring). ``budget``
    bounds ``B * Hq * Tq * span`` of a merged block (a single tile may exceed it)."""
    q_tile, kv_tile = default_tiles(pattern, g)
    tiling = Tiling(g, tuple(q_tile), tuple(kv_tile))
    tile_count_guard(tiling)
    layout = pattern.block_layout(tiling)
    any_ = layout.any.reshape(-1, tiling.num_q_tiles, tiling.num_kv_tiles).any(0)
    full = (layout.full & layout.any).reshape(-1, tiling.num_q_tiles, tiling.num_kv_tiles).all(0)
    # a tile pair some (b, h) touches but not every one sees fully needs the mask
    partial = (any_ & ~full).any(1).tolist()
    q_index, kv_index = tiling.q_token_index, tiling.kv_token_index
    per_row = g.batch * g.q_heads
    blocks: list[QueryBlock] = []
    cur_rows: list[int] = []
    cur_key = None

    def flush():
        if not cur_rows:
            return
        qi = q_index[cur_rows].reshape(-1)
        qi = qi[qi >= 0]
        tiles = any_[cur_rows[0]].nonzero().flatten()
        ki = kv_index[tiles].reshape(-1)
        ki = ki[ki >= 0]
        blocks.append(QueryBlock(qi, ki, any(partial[r] for r in cur_rows)))

    rows_any = any_.tolist()
    for r in range(tiling.num_q_tiles):
        key = rows_any[r]
        span = sum(key) * tiling.kv_tile_size
        size = per_row * (len(cur_rows) + 1) * tiling.q_tile_size * span
        if cur_rows and key == cur_key and size <= budget:
            cur_rows.append(r)
            continue
        flush()
        cur_rows, cur_key = [r], key
    flush()
    return blocks
