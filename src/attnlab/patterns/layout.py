"""Tilings of the token grid and the block layouts that patterns report on them.

A :class:`Tiling` cuts the query token grid ``*L`` into boxes of ``q_tile`` tokens and the
key grid ``*S`` into boxes of ``kv_tile`` (the last box on an axis may stick out past the
end: those positions are padding). Tiles are numbered row-major over the tile grid, and
tokens row-major inside a tile.

A :class:`BlockLayout` says, for every (query tile, key tile) pair, whether *any* pair of
tokens in them may be visible (``any``) and whether *all* are (``full``); the same split as
FlexAttention's ``BlockMask``. ``any`` may over-approximate and ``full`` may
under-approximate: the elementwise mask decides inside partial tiles. Patterns compute it
analytically from tile bounds, in time proportional to the number of tile pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from ..geometry import Geometry


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Tiling:
    """Box tiles over the query and key token grids of a :class:`Geometry`."""

    def __init__(self, geometry: Geometry, q_tile: tuple[int, ...], kv_tile: tuple[int, ...]):
        nd = geometry.ndim
        if len(q_tile) != nd or len(kv_tile) != nd:
            raise ValueError(
                f"tile shapes must have one entry per token axis ({nd}): "
                f"got q_tile={q_tile}, kv_tile={kv_tile}"
            )
        if any(t < 1 for t in q_tile + kv_tile):
            raise ValueError(f"tile sizes must be positive: q_tile={q_tile}, kv_tile={kv_tile}")
        self.geometry = geometry
        self.q_tile = tuple(min(t, s) for t, s in zip(q_tile, geometry.q_shape))
        self.kv_tile = tuple(min(t, s) for t, s in zip(kv_tile, geometry.kv_shape))
        self.q_grid = tuple(_ceil_div(s, t) for s, t in zip(geometry.q_shape, self.q_tile))
        self.kv_grid = tuple(_ceil_div(s, t) for s, t in zip(geometry.kv_shape, self.kv_tile))

    @property
    def device(self) -> torch.device:
        return self.geometry.device

    @property
    def num_q_tiles(self) -> int:
        return math.prod(self.q_grid)

    @property
    def num_kv_tiles(self) -> int:
        return math.prod(self.kv_grid)

    @property
    def q_tile_size(self) -> int:
        return math.prod(self.q_tile)

    @property
    def kv_tile_size(self) -> int:
        return math.prod(self.kv_tile)

    def __repr__(self) -> str:
        return (
            f"Tiling(q_shape={self.geometry.q_shape}, kv_shape={self.geometry.kv_shape}, "
            f"q_tile={self.q_tile}, kv_tile={self.kv_tile})"
        )

    # -- token <-> tile maps -------------------------------------------------------------
    def _token_index(self, shape, tile, grid) -> torch.Tensor:
        """(num_tiles, tile_size) flat token index, -1 where the tile sticks out."""
        dev = self.device
        flat = None
        valid = None
        for ax, (s, t, g) in enumerate(zip(shape, tile, grid)):
            coord = (torch.arange(g, device=dev)[:, None] * t + torch.arange(t, device=dev)).reshape(
                g, t
            )
            ok = coord < s
            # place this axis' tile index and in-tile offset in the right broadcast slots
            view_shape = [1] * (2 * len(shape))
            view_shape[ax] = g
            view_shape[len(shape) + ax] = t
            coord = coord.reshape(view_shape)
            ok = ok.reshape(view_shape)
            flat = coord if flat is None else flat * s + coord
            valid = ok if valid is None else valid & ok
        n_tiles = math.prod(grid)
        flat = flat.reshape(n_tiles, -1)
        valid = valid.reshape(n_tiles, -1)
        return torch.where(valid, flat, torch.full_like(flat, -1))

    @cached_property
    def q_token_index(self) -> torch.Tensor:
        """``(num_q_tiles, q_tile_size)``: flat query index of each tile slot, -1 for padding."""
        g = self.geometry
        return self._token_index(g.q_shape, self.q_tile, self.q_grid)

    @cached_property
    def kv_token_index(self) -> torch.Tensor:
        """``(num_kv_tiles, kv_tile_size)``: flat key index of each tile slot, -1 for padding."""
        g = self.geometry
        return self._token_index(g.kv_shape, self.kv_tile, self.kv_grid)

    # -- tile bounds ---------------------------------------------------------------------
    def _flat_bounds(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        valid = index >= 0
        big = torch.iinfo(index.dtype).max
        lo = torch.where(valid, index, torch.full_like(index, big)).amin(1)
        hi = index.amax(1)
        return lo, hi, valid.sum(1)

    @cached_property
    def q_flat_bounds(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per query tile: smallest and largest flat token index, and number of real tokens."""
        return self._flat_bounds(self.q_token_index)

    @cached_property
    def kv_flat_bounds(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per key tile: smallest and largest flat token index, and number of real tokens."""
        return self._flat_bounds(self.kv_token_index)

    @cached_property
    def kv_tile_complete(self) -> torch.Tensor:
        """``(num_kv_tiles,)``: True where a key tile has no padding."""
        return self.kv_flat_bounds[2] == self.kv_tile_size

    def axis_tiles(self, axis: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and stop coordinates (clipped to the axis) of the tiles along one axis."""
        g = self.geometry
        if side == "q":
            size, tile, grid = g.q_shape[axis], self.q_tile[axis], self.q_grid[axis]
        else:
            size, tile, grid = g.kv_shape[axis], self.kv_tile[axis], self.kv_grid[axis]
        start = torch.arange(grid, device=self.device) * tile
        return start, torch.clamp(start + tile, max=size)


@dataclass
class BlockLayout:
    """Which (query tile, key tile) pairs a pattern touches.

    ``any`` and ``full`` are boolean tensors of shape ``(Bb, Hb, num_q_tiles, num_kv_tiles)``
    with ``Bb`` in ``{1, B}`` and ``Hb`` in ``{1, Hq}`` (size 1 broadcasts over batch or heads).
    ``full`` implies ``any``.
    """

    any: torch.Tensor
    full: torch.Tensor

    def __post_init__(self) -> None:
        if self.any.ndim == 2:
            self.any = self.any[None, None]
        if self.full.ndim == 2:
            self.full = self.full[None, None]
        self.full = self.full & self.any

    def __or__(self, other: "BlockLayout") -> "BlockLayout":
        return BlockLayout(self.any | other.any, self.full | other.full)

    def __and__(self, other: "BlockLayout") -> "BlockLayout":
        return BlockLayout(self.any & other.any, self.full & other.full)

    def sparsity(self) -> float:
        """Fraction of tile pairs skipped entirely (averaged over batch and heads)."""
        return 1.0 - self.any.float().mean().item()

    def __repr__(self) -> str:
        return (
            f"BlockLayout(shape={tuple(self.any.shape)}, touched={self.any.float().mean().item():.3f}, "
            f"full={self.full.float().mean().item():.3f})"
        )


def dense_layout(tiling: Tiling, full: bool = True) -> BlockLayout:
    """Every tile pair touched (and fully visible when ``full``)."""
    shape = (1, 1, tiling.num_q_tiles, tiling.num_kv_tiles)
    ones = torch.ones(shape, dtype=torch.bool, device=tiling.device)
    return BlockLayout(ones, ones if full else torch.zeros_like(ones))


def interval_layout(
    tiling: Tiling, axis: int, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile-pair layout along one axis for a rule "query coordinate i sees key coordinates
    ``lo[i] <= j < hi[i]``" (``lo``/``hi`` of length ``q_shape[axis]``).

    Returns ``(any, full)`` of shape ``(q_grid[axis], kv_grid[axis])``. Cost: one pass over
    the axis plus one over the tile pairs of the axis (difference arrays, no L x S work).
    """
    g = tiling.geometry
    n_q = g.q_shape[axis]
    tq, tk = tiling.q_tile[axis], tiling.kv_tile[axis]
    gq, gk = tiling.q_grid[axis], tiling.kv_grid[axis]
    dev = tiling.device
    qt = torch.arange(n_q, device=dev) // tq
    lo = lo.to(dev).clamp(min=0, max=g.kv_shape[axis])
    hi = hi.to(dev).clamp(min=0, max=g.kv_shape[axis])
    nonempty = hi > lo

    def ranges_to_counts(first: torch.Tensor, last_excl: torch.Tensor, keep: torch.Tensor):
        diff = torch.zeros(gq, gk + 1, dtype=torch.int32, device=dev)
        first = first.clamp(0, gk)
        last_excl = last_excl.clamp(0, gk)
        keep = keep & (last_excl > first)
        ones = keep.to(torch.int32)
        diff.index_put_((qt, first), ones, accumulate=True)
        diff.index_put_((qt, last_excl), -ones, accumulate=True)
        return diff.cumsum(1)[:, :gk]

    any_count = ranges_to_counts(lo // tk, (hi - 1) // tk + 1, nonempty)
    # key tile t is inside [lo, hi) iff lo <= t*tk and (t+1)*tk <= hi
    full_count = ranges_to_counts(-(-lo // tk), hi // tk, nonempty)
    q_start, q_stop = tiling.axis_tiles(axis, "q")
    n_in_tile = (q_stop - q_start)[:, None]
    return any_count > 0, full_count == n_in_tile


def combine_axes(tiling: Tiling, per_axis: list[tuple[torch.Tensor, torch.Tensor]]) -> BlockLayout:
    """N-d layout of a product rule (visible iff visible along every axis)."""
    nd = len(per_axis)

    def outer(parts: list[torch.Tensor]) -> torch.Tensor:
        out = None
        for ax, p in enumerate(parts):
            shape = [1] * (2 * nd)
            shape[ax] = p.shape[0]
            shape[nd + ax] = p.shape[1]
            p = p.reshape(shape)
            out = p if out is None else out & p
        return out.reshape(tiling.num_q_tiles, tiling.num_kv_tiles)

    return BlockLayout(outer([a for a, _ in per_axis]), outer([f for _, f in per_axis]))
