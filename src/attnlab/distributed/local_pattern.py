"""A pattern and a score mod restricted to one (query range, key range) pair of a sharded
sequence, evaluated at the global token positions.

Patterns and score mods are defined on global flat token indices of the whole problem (its
geometry: ``L``, ``S``, the causal offset ``S - L``, document ids of length ``L``, ...). A
rank computes (its query chunk) x (one key/value chunk) with local indices ``0..n-1``;
:class:`ShardPattern` adds the chunks' offsets before asking the global pattern, and masks
positions past the true sequence end (padding added by :func:`attnlab.distributed.shard`).

Block layouts stay analytic: the local tiling is presented to the global pattern as a
:class:`ShiftedTiling` (the same tiles, their token indices shifted to global positions) for
the patterns whose layout reads only tile bounds and token indices. Other patterns (plain
mask_mods, neighbourhoods, ...) get their layout by evaluating the shifted mask over the
chunk pair's token pairs, which costs about as much as the chunk pair's attention itself.
"""

from __future__ import annotations

from functools import cached_property

import torch

from ..geometry import Geometry
from ..patterns.base import Causal, Full, Intersection, MaskMod, Pattern, Union
from ..patterns.block_sparse import BlockSparse
from ..patterns.document import Document, PrefixLM
from ..patterns.layout import BlockLayout, Tiling
from ..patterns.radial import Radial
from ..patterns.sinks import GlobalTokens, Sinks
from ..patterns.sliding_window import SlidingWindow
from ..patterns.strided import Strided
from ..scores.base import ScoreContext, ScoreMod

# Patterns whose block_layout uses only tile bounds / token indices of the tiling it is given
# (never the whole token axis), so a tiling of a sub-range gives that sub-range's layout.
_SHIFT_SAFE = (Full, Causal, SlidingWindow, Document, PrefixLM, Sinks, GlobalTokens, BlockSparse,
               Strided, Radial)


def shift_safe(pattern: Pattern) -> bool:
    """True if ``pattern`` (and every part of a union / intersection) computes its block
    layout from tile bounds alone, so :class:`ShiftedTiling` gives it analytically."""
    if isinstance(pattern, (Union, Intersection)):
        return all(shift_safe(p) for p in pattern.parts)
    return type(pattern) in _SHIFT_SAFE


def contains_mask_mod(pattern: Pattern) -> bool:
    """True if a plain mask_mod (whose layout means evaluating every token pair) is part of it."""
    if isinstance(pattern, (Union, Intersection)):
        return any(contains_mask_mod(p) for p in pattern.parts)
    return isinstance(pattern, MaskMod)


def _shift(index: torch.Tensor, start: int, limit: int) -> torch.Tensor:
    """Local token index -> global (``-1`` stays padding, and so does anything ``>= limit``)."""
    g = index + start
    return torch.where((index >= 0) & (g < limit), g, torch.full_like(index, -1))


class ShiftedTiling(Tiling):
    """The tiles of a ``local`` tiling of one chunk pair, seen in the ``geometry`` of the whole
    problem: query token ``t`` of the chunk is global token ``q_start + t`` (and likewise for
    keys); tokens past the true ends ``geometry.q_len`` / ``kv_len`` count as padding."""

    # Tiling.__init__ is not called: the tile shapes and grids are the local tiling's.

    def __init__(self, local: Tiling, geometry: Geometry, q_start: int, kv_start: int) -> None:
        self.geometry = geometry
        self.local = local
        self.q_start, self.kv_start = q_start, kv_start
        self.q_tile, self.kv_tile = local.q_tile, local.kv_tile
        self.q_grid, self.kv_grid = local.q_grid, local.kv_grid

    @cached_property
    def q_token_index(self) -> torch.Tensor:
        return _shift(self.local.q_token_index, self.q_start, self.geometry.q_len)

    @cached_property
    def kv_token_index(self) -> torch.Tensor:
        return _shift(self.local.kv_token_index, self.kv_start, self.geometry.kv_len)

    def axis_tiles(self, axis: int, side: str):
        raise TypeError("ShiftedTiling has no whole-axis view; only shift-safe patterns may use it")

    def __repr__(self) -> str:
        return f"ShiftedTiling({self.local!r}, q_start={self.q_start}, kv_start={self.kv_start})"


class ShardPattern(Pattern):
    """``pattern`` (defined on ``geometry``, the whole problem) on the chunk pair whose local
    query ``i`` is global ``q_start + i`` and local key ``j`` global ``kv_start + j``. Padding
    past the true ends (global queries ``>= geometry.q_len``, keys ``>= geometry.kv_len``) sees
    and is seen by nothing, so padded rows return 0 and pass no gradient."""

    def __init__(self, pattern: Pattern, geometry: Geometry, q_start: int, kv_start: int) -> None:
        self.pattern = pattern
        self.geometry = geometry
        self.q_start, self.kv_start = q_start, kv_start

    def mask(self, b, h, q_idx, kv_idx, geometry):
        g = self.geometry
        qg, kg = q_idx + self.q_start, kv_idx + self.kv_start
        inside = (qg < g.q_len) & (kg < g.kv_len)
        inner = self.pattern.mask(b, h, qg.clamp(max=g.q_len - 1), kg.clamp(max=g.kv_len - 1), g)
        return inner & inside

    def block_layout(self, tiling: Tiling) -> BlockLayout:
        shifted = ShiftedTiling(tiling, self.geometry, self.q_start, self.kv_start)
        if shift_safe(self.pattern):
            layout = self.pattern.block_layout(shifted)
        else:
            layout = MaskMod(self._global_mask, name=repr(self)).block_layout(shifted)
        q_complete = shifted.q_flat_bounds[2] == shifted.q_tile_size
        full = layout.full & shifted.kv_tile_complete & q_complete[:, None]
        return BlockLayout(layout.any, full)

    def _global_mask(self, b, h, q_idx, kv_idx):
        return self.pattern.mask(b, h, q_idx, kv_idx, self.geometry)

    def validate(self, geometry: Geometry) -> None:
        """The global pattern was validated on the whole problem; nothing to check per chunk."""

    def preferred_tile(self, geometry: Geometry):
        return None

    def cache_key(self) -> tuple | None:
        key = self.pattern.cache_key()
        if key is None:
            return None
        return (ShardPattern, key, self.geometry, self.q_start, self.kv_start)

    def __repr__(self) -> str:
        return f"ShardPattern({self.pattern!r}, q_start={self.q_start}, kv_start={self.kv_start})"


class ShardScoreMod(ScoreMod):
    """``score_mod`` of the whole problem on one chunk pair: indices shifted to global."""

    def __init__(self, score_mod: ScoreMod, geometry: Geometry, q_start: int, kv_start: int) -> None:
        super().__init__()
        self.inner = score_mod
        self.geometry = geometry
        self.q_start, self.kv_start = q_start, kv_start
        self.needs_query = score_mod.needs_query

    def modify(self, score, ctx):
        g = self.geometry
        shifted = ScoreContext(ctx.b, ctx.h, (ctx.q_idx + self.q_start).clamp(max=g.q_len - 1),
                               (ctx.kv_idx + self.kv_start).clamp(max=g.kv_len - 1), g, ctx.query)
        return self.inner.modify(score, shifted)

    def differentiable_tensors(self) -> list[torch.Tensor]:
        return self.inner.differentiable_tensors()


__all__ = ["ShardPattern", "ShardScoreMod", "ShiftedTiling", "shift_safe", "contains_mask_mod"]
