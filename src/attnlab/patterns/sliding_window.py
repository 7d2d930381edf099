"""Sliding-window (local) attention over flat token indices, optionally dilated.

References: "Longformer: The Long-Document Transformer" (2020) for sliding windows;
dilated 1-D windows as in "All-In-One Metrical And Functional Structure Analysis With
Neighborhood Attention on Demixed Audio" (2023).
"""

from __future__ import annotations

import torch

from ..geometry import Geometry
from .base import Pattern
from .layout import BlockLayout, Tiling
from .._checks import check_int




def first_multiple_at_least(lo: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """Smallest multiple of ``step`` (> 0) that is ``>= lo`` (elementwise, floor semantics)."""
    return -torch.div(-lo, step, rounding_mode="floor") * step


class SlidingWindow(Pattern):
    """Key ``j`` is visible to query ``i`` iff, with ``d = j - (i + S - L)``,
    ``-left <= d <= right`` and ``d % dilation == 0``.

    ``i`` and ``j`` are flat token indices; ``S - L`` is the bottom-right alignment offset
    (as for :class:`~attnlab.patterns.base.Causal`), so ``SlidingWindow(left=w)`` is the causal
    window of the last ``w + 1`` keys. The window shrinks at the sequence edges (it is not
    shifted inward, unlike neighborhood attention). ``dilation > 1`` keeps every
    ``dilation``-th key of the window, all in the query's own residue class.

    Block layout: the offsets ``d`` over a tile pair lie in ``[kv_lo - q_hi - off,
    kv_hi - q_lo - off]``; for 1-D tiles that is exactly the set, so the layout is exact.
    """

    def __init__(self, left: int, right: int = 0, dilation: int = 1) -> None:
        self.left = check_int("left", left, 0)
        self.right = check_int("right", right, 0)
        self.dilation = check_int("dilation", dilation, 1)

    def mask(
        self,
        b: torch.Tensor,
        h: torch.Tensor,
        q_idx: torch.Tensor,
        kv_idx: torch.Tensor,
        geometry: Geometry,
    ) -> torch.Tensor:
        d = kv_idx - (q_idx + geometry.causal_offset)
        out = (d >= -self.left) & (d <= self.right)
        if self.dilation > 1:
            out = out & (torch.remainder(d, self.dilation) == 0)
        return out

    def block_layout(self, tiling: Tiling) -> BlockLayout:
        off = tiling.geometry.causal_offset
        q_lo, q_hi, _ = tiling.q_flat_bounds
        kv_lo, kv_hi, _ = tiling.kv_flat_bounds
        d_min = kv_lo[None, :] - (q_hi[:, None] + off)
        d_max = kv_hi[None, :] - (q_lo[:, None] + off)
        lo = d_min.clamp(min=-self.left)
        hi = d_max.clamp(max=self.right)
        any_ = first_multiple_at_least(lo, self.dilation) <= hi
        inside = (d_min >= -self.left) & (d_max <= self.right)
        if self.dilation == 1:
            full = inside
        else:
            full = inside & (d_min == d_max) & (torch.remainder(d_min, self.dilation) == 0)
        return BlockLayout(any_, full)

    def may_have_empty_rows(self, geometry: Geometry) -> bool:
        # d = 0 (key i + S - L) is always in the window; it exists unless L > S.
        return geometry.q_len > geometry.kv_len

    def __repr__(self) -> str:
        return f"SlidingWindow(left={self.left}, right={self.right}, dilation={self.dilation})"
