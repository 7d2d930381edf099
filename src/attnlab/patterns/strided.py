"""Strided attention: the Sparse Transformer strided head and S2-Attention head shards.

References: "Generating Long Sequences with Sparse Transformers" (2019) for the strided
head; "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads" (2024) for
heterogeneous per-head context shards.
"""

from __future__ import annotations

import torch

from ..geometry import Geometry
from ._axes import broadcast_mask
from .base import Pattern
from .layout import BlockLayout, Tiling
from .._checks import check_int
from .sliding_window import first_multiple_at_least

_MODES = ("relative", "shard")


class Strided(Pattern):
    """Strided attention over flat token indices ``i`` (query) and ``j`` (key).

    - ``mode="relative"`` (Sparse Transformer strided head): ``j`` is visible to ``i`` iff
      ``(i + S - L - j) % stride == 0``, i.e. every ``stride``-th key counted from the
      query's bottom-right aligned position, in both directions. Combine with
      ``Causal()`` (``&``) for the autoregressive head and with a ``SlidingWindow`` (``|``)
      for the local head of the factorised pattern.
    - ``mode="shard"`` (S2-Attention): query head ``h`` sees key ``j`` iff
      ``j % stride == h % stride``: head ``h`` reads the ``h % stride``-th shard of the
      context, so ``stride`` consecutive heads together cover every key. The mask and the
      block layout depend on the head (layout tensors of shape ``(1, Hq, nQ, nK)``).

    Block layout: from the tile's flat bounds, the set of ``i - j`` (or of ``j``) is an
    interval for 1-D tiles, so the layout is exact there; for N-d box tiles it is a valid
    over-approximation (``any``) / under-approximation (``full``).
    """

    def __init__(self, stride: int, mode: str = "relative") -> None:
        self.stride = check_int("stride", stride, 1)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got mode={mode!r}")
        self.mode = mode

    def mask(
        self,
        b: torch.Tensor,
        h: torch.Tensor,
        q_idx: torch.Tensor,
        kv_idx: torch.Tensor,
        geometry: Geometry,
    ) -> torch.Tensor:
        if self.mode == "relative":
            d = q_idx + geometry.causal_offset - kv_idx
            return torch.remainder(d, self.stride) == 0
        h = torch.as_tensor(h, device=kv_idx.device)
        out = torch.remainder(kv_idx, self.stride) == torch.remainder(h, self.stride)
        return broadcast_mask(out, q_idx.shape)

    def block_layout(self, tiling: Tiling) -> BlockLayout:
        kv_lo, kv_hi, _ = tiling.kv_flat_bounds
        s = self.stride
        if self.mode == "relative":
            off = tiling.geometry.causal_offset
            q_lo, q_hi, _ = tiling.q_flat_bounds
            d_min = q_lo[:, None] + off - kv_hi[None, :]
            d_max = q_hi[:, None] + off - kv_lo[None, :]
            any_ = first_multiple_at_least(d_min, s) <= d_max
            full = (d_min == d_max) & (torch.remainder(d_min, s) == 0) if s > 1 else any_
            return BlockLayout(any_, full)
        g = tiling.geometry
        heads = torch.arange(g.q_heads, device=tiling.device).view(-1, 1)  # (Hq, 1)
        residue = torch.remainder(heads, s)
        lo = kv_lo.view(1, -1)
        # first key j >= kv_lo with j % s == residue
        first = lo + torch.remainder(residue - lo, s)
        any_ = first <= kv_hi.view(1, -1)  # (Hq, nK)
        if s == 1:
            full = any_
        else:
            full = any_ & (kv_lo == kv_hi).view(1, -1)
        shape = (1, g.q_heads, tiling.num_q_tiles, tiling.num_kv_tiles)
        any_ = any_[None, :, None, :].expand(shape).contiguous()
        full = full[None, :, None, :].expand(shape).contiguous()
        return BlockLayout(any_, full)

    def may_have_empty_rows(self, geometry: Geometry) -> bool:
        # every residue class mod stride has a key iff S >= stride
        return geometry.kv_len < self.stride

    def __repr__(self) -> str:
        return f"Strided(stride={self.stride}, mode={self.mode!r})"
