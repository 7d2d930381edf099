"""Attention sinks and global tokens: a few leading tokens that are always visible.

References: "Efficient Streaming Language Models with Attention Sinks" (2024) for sinks
(use as ``SlidingWindow(left=w) | Sinks(4)``); Longformer / BigBird-style global tokens
and "Combiner: Full Attention Transformer with Sparse Computation Cost" (2021).
"""

from __future__ import annotations

import torch

from ..geometry import Geometry
from ._axes import broadcast_mask
from .base import Pattern
from .layout import BlockLayout, Tiling
from .._checks import check_int


class Sinks(Pattern):
    """Key ``j`` is visible to every query iff ``j < num_sinks`` (flat key index).

    On its own it is the "sinks only" pattern; union it with a local pattern, e.g.
    ``SlidingWindow(left=1023) | Sinks(4)`` for StreamingLLM. The block layout is exact for
    every tiling (it only uses each key tile's smallest and largest flat index).
    """

    def __init__(self, num_sinks: int) -> None:
        self.num_sinks = check_int("num_sinks", num_sinks, 0)

    def mask(
        self,
        b: torch.Tensor,
        h: torch.Tensor,
        q_idx: torch.Tensor,
        kv_idx: torch.Tensor,
        geometry: Geometry,
    ) -> torch.Tensor:
        out = kv_idx < self.num_sinks
        return broadcast_mask(out, q_idx.shape)

    def block_layout(self, tiling: Tiling) -> BlockLayout:
        kv_lo, kv_hi, _ = tiling.kv_flat_bounds
        n_q = tiling.num_q_tiles
        any_ = (kv_lo < self.num_sinks)[None, :].expand(n_q, -1)
        full = (kv_hi < self.num_sinks)[None, :].expand(n_q, -1)
        return BlockLayout(any_.contiguous(), full.contiguous())

    def may_have_empty_rows(self, geometry: Geometry) -> bool:
        return self.num_sinks == 0

    def __repr__(self) -> str:
        return f"Sinks(num_sinks={self.num_sinks})"


class GlobalTokens(Pattern):
    """The first ``num_global`` positions are global: query ``i`` sees key ``j`` iff
    ``j < num_global`` (every query sees the global keys) or ``i + S - L < num_global``
    (global queries see every key).

    Query positions are bottom-right aligned with the keys (``S - L`` offset, as for
    ``Causal``), so for ``L == S`` the global queries are ``i < num_global``. Union it with a
    local pattern (``SlidingWindow(...) | GlobalTokens(n)``) for Longformer/BigBird-style
    attention. The block layout is exact for every tiling.
    """

    def __init__(self, num_global: int) -> None:
        self.num_global = check_int("num_global", num_global, 0)

    def mask(
        self,
        b: torch.Tensor,
        h: torch.Tensor,
        q_idx: torch.Tensor,
        kv_idx: torch.Tensor,
        geometry: Geometry,
    ) -> torch.Tensor:
        return (kv_idx < self.num_global) | (q_idx + geometry.causal_offset < self.num_global)

    def block_layout(self, tiling: Tiling) -> BlockLayout:
        off = tiling.geometry.causal_offset
        q_lo, q_hi, _ = tiling.q_flat_bounds
        kv_lo, kv_hi, _ = tiling.kv_flat_bounds
        n = self.num_global
        any_ = (kv_lo[None, :] < n) | (q_lo[:, None] + off < n)
        full = (kv_hi[None, :] < n) | (q_hi[:, None] + off < n)
        return BlockLayout(any_, full)

    def may_have_empty_rows(self, geometry: Geometry) -> bool:
        return self.num_global == 0

    def __repr__(self) -> str:
        return f"GlobalTokens(num_global={self.num_global})"
