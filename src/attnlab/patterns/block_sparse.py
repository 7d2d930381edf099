"""Block-sparse attention from an explicit block layout.

References: "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs" (2024) and
"MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression" (2024),
which both produce (per head) block layouts; PAROAttention's layouts apply after its
token reordering.
"""

from __future__ import annotations

import math

import torch

from ..geometry import Geometry
from .base import Pattern
from .layout import BlockLayout, Tiling
from .._checks import check_int


def block_pair(block_size: int | tuple[int, int]) -> tuple[int, int]:
    """``(block_q, block_kv)`` from an int or a pair, each checked to be a positive int."""
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise ValueError(
                f"block_size must be an int or a (block_q, block_kv) pair, got "
                f"block_size={block_size!r}"
            )
        return check_int("block_size[0]", block_size[0], 1), check_int("block_size[1]", block_size[1], 1)
    bq = check_int("block_size", block_size, 1)
    return bq, bq


class BlockSparse(Pattern):
    """Query ``i`` sees key ``j`` iff ``layout[b, h, i // block_q, j // block_kv]``.

    ``layout`` is a bool tensor of shape ``(nQb, nKb)`` or ``(B or 1, Hq or 1, nQb, nKb)``
    with ``nQb = ceil(L / block_q)`` and ``nKb = ceil(S / block_kv)``; ``block_size`` is an
    int or ``(block_q, block_kv)``, in flat token indices (blocks are absolute, not aligned
    with ``S - L``). Size-1 batch/head axes broadcast, and the mask and block layout depend
    on ``b`` / ``h`` only where the layout has that axis.

    Tile layout: each tile pair covers a rectangle of blocks (from the tiles' flat bounds);
    2-D prefix sums of the layout count its visible blocks: ``any`` iff the count is > 0,
    ``full`` iff every block in the rectangle is visible. Exact for 1-D tiles.
    """

    def __init__(self, layout: torch.Tensor, block_size: int | tuple[int, int]) -> None:
        if not isinstance(layout, torch.Tensor):
            raise TypeError(f"layout must be a bool torch.Tensor, got {type(layout).__name__}")
        if layout.dtype != torch.bool:
            raise TypeError(f"layout must be a bool tensor, got layout.dtype={layout.dtype}")
        if layout.ndim not in (2, 4):
            raise ValueError(
                f"layout must have shape (nQb, nKb) or (B, H, nQb, nKb), got "
                f"layout.shape={tuple(layout.shape)}"
            )
        self.block_q, self.block_kv = block_pair(block_size)
        self.layout_shape = tuple(layout.shape)  # as given, for messages
        self.layout = (layout[None, None] if layout.ndim == 2 else layout).detach()
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The layout on ``device`` and its 2-D inclusive prefix sums, zero-padded in front:
        ``prefix[..., r, c]`` counts visible blocks in rows ``< r`` and columns ``< c``."""
        if device not in self._cache:
            lay = self.layout.to(device)
            csum = lay.to(torch.int64).cumsum(-1).cumsum(-2)
            prefix = torch.nn.functional.pad(csum, (1, 0, 1, 0))
            self._cache[device] = (lay, prefix)
        return self._cache[device]

    def preferred_tile(self, geometry: Geometry):
        """Tiles equal to the blocks (when they are at least 16 tokens): a kept block is then one
        whole tile, which the tiled and block-flash backends compute without a mask."""
        if min(self.block_q, self.block_kv) >= 16:
            return (self.block_q,), (self.block_kv,)
        return None

    def validate(self, geometry: Geometry) -> None:
        super().validate(geometry)
        want = (
            math.ceil(geometry.q_len / self.block_q),
            math.ceil(geometry.kv_len / self.block_kv),
        )
        bl, hl = self.layout.shape[:2]
        if tuple(self.layout.shape[-2:]) != want:
            raise ValueError(
                f"layout must have block shape (ceil(L/block_q), ceil(S/block_kv)) = {want} for "
                f"L={geometry.q_len}, S={geometry.kv_len}, block_size=({self.block_q}, "
                f"{self.block_kv}); got layout.shape={self.layout_shape}"
            )
        if bl not in (1, geometry.batch) or hl not in (1, geometry.q_heads):
            raise ValueError(
                f"layout batch/head axes must be 1 or (B, Hq) = ({geometry.batch}, "
                f"{geometry.q_heads}), got layout.shape={self.layout_shape}"
            )

    def mask(
        self,
        b: torch.Tensor,
        h: torch.Tensor,
        q_idx: torch.Tensor,
        kv_idx: torch.Tensor,
        geometry: Geometry,
    ) -> torch.Tensor:
        lay, _ = self._on(q_idx.device)
        bi = b if lay.shape[0] > 1 else 0
        hi = h if lay.shape[1] > 1 else 0
        return lay[bi, hi, q_idx // self.block_q, kv_idx // self.block_kv]

    def block_layout(self, tiling: Tiling) -> BlockLayout:
        _, prefix = self._on(tiling.device)
        q_lo, q_hi, _ = tiling.q_flat_bounds
        kv_lo, kv_hi, _ = tiling.kv_flat_bounds
        r0, r1 = (q_lo // self.block_q)[:, None], (q_hi // self.block_q + 1)[:, None]
        c0, c1 = (kv_lo // self.block_kv)[None, :], (kv_hi // self.block_kv + 1)[None, :]
        count = prefix[:, :, r1, c1] - prefix[:, :, r0, c1]
        count = count - prefix[:, :, r1, c0] + prefix[:, :, r0, c0]
        area = (r1 - r0) * (c1 - c0)
        return BlockLayout(count > 0, count == area)

    def may_have_empty_rows(self, geometry: Geometry) -> bool:
        # every key block is non-empty, so a query sees a key iff its block row has one
        return not bool(self.layout.any(-1).all())

    def __repr__(self) -> str:
        density = self.layout.float().mean().item() if self.layout.numel() else 0.0
        return (
            f"BlockSparse(layout.shape={self.layout_shape}, block_size=({self.block_q}, "
            f"{self.block_kv}), density={density:.3f})"
        )
