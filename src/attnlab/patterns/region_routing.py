"""Bi-level region routing (BiFormer) on 1-, 2- and 3-D token grids.

Zhu, Wang, Ke, Zhang, Lau, "BiFormer: Vision Transformer with Bi-Level Routing Attention",
CVPR 2023. The token grid is cut into non-overlapping regions (windows) of shape ``region``;
region-level queries and keys are the means of the queries / keys in each region; the region
affinity ``A = scale * Q_r K_r^T`` keeps, for every query region, its ``top_k`` key regions;
every token then attends to all tokens of the kept regions (BiFormer gathers their keys and
values and runs dense attention; here the gathered set is the pattern, and the tiled backend
runs it with tiles equal to the regions).

The routing is a discrete choice made without autograd: no gradient flows through which
regions are kept; gradients flow through the exact attention over their tokens. BiFormer's
local context enhancement (a depth-wise convolution on ``v`` added to the output) is not part
of the attention and is not included.
"""

from __future__ import annotations

import math

import torch

from .._checks import check_int
from ..geometry import Geometry, unravel
from ._axes import normalize_per_axis
from .base import Pattern
from .content import ContentPattern, SelectionContext
from .layout import BlockLayout, Tiling


def _region_tuple(region) -> tuple[int, ...]:
    if isinstance(region, (tuple, list)):
        if not 1 <= len(region) <= 3:
            raise ValueError(f"region must have 1, 2 or 3 entries (one per token axis), got region={tuple(region)!r}")
        r = normalize_per_axis("region", region, len(region))
    else:
        r = normalize_per_axis("region", region, 1)
    for i, v in enumerate(r):
        check_int(f"region[{i}]", v, 1)
    return tuple(r)


def _grid(shape: tuple[int, ...], region: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(-(-s // r) for s, r in zip(shape, region))


class RegionMask(Pattern):
    """Query ``x`` sees key ``y`` iff ``keep[b, h, region(x), region(y)]``.

    Regions are the boxes ``region`` of the token grid (the last one along an axis may be
    shorter), numbered row-major over the region grid; ``keep`` is a bool tensor ``(Bb, Hb,
    nRq, nRk)`` (``Bb`` in ``{1, B}``, ``Hb`` in ``{1, Hq}``). Defined on ``len(region)`` token
    axes.

    Block layout: each tile covers a box of regions; a tile pair is touched iff some covered
    region pair is kept and full iff all are (exact). With tiles equal to the regions
    (:meth:`preferred_tile`) the layout is ``keep`` itself.
    """

    def __init__(self, keep: torch.Tensor, region):
        self.region = _region_tuple(region)
        self.ndim = len(self.region)
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.ndim != 4:
            raise TypeError(f"keep must be a bool tensor (B or 1, H or 1, nRq, nRk), got "
                            f"{getattr(keep, 'dtype', type(keep).__name__)} {tuple(getattr(keep, 'shape', ()))}")
        self.keep = keep.detach()

    def validate(self, geometry: Geometry) -> None:
        super().validate(geometry)
        want = (math.prod(_grid(geometry.q_shape, self.region)), math.prod(_grid(geometry.kv_shape, self.region)))
        Bb, Hb = self.keep.shape[:2]
        if tuple(self.keep.shape[2:]) != want or Bb not in (1, geometry.batch) or Hb not in (1, geometry.q_heads):
            raise ValueError(f"keep must have shape (1 or B={geometry.batch}, 1 or Hq={geometry.q_heads}, "
                             f"{want[0]}, {want[1]}) for region={self.region} on q tokens {geometry.q_shape} "
                             f"and kv tokens {geometry.kv_shape}; got {tuple(self.keep.shape)}")

    def region_of(self, flat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Row-major region id of flat token indices on a grid of ``shape``."""
        rid = None
        for c, r, n in zip(unravel(flat, shape), self.region, _grid(shape, self.region)):
            rid = c // r if rid is None else rid * n + c // r
        return rid

    def mask(self, b, h, q_idx, kv_idx, geometry):
        keep = self.keep.to(q_idx.device)
        bi = b if keep.shape[0] > 1 else 0
        hi = h if keep.shape[1] > 1 else 0
        return keep[bi, hi, self.region_of(q_idx, geometry.q_shape), self.region_of(kv_idx, geometry.kv_shape)]

    def _tile_regions(self, tiling: Tiling, side: str) -> torch.Tensor:
        """``(num_tiles, M)``: the regions each tile overlaps (repeated to a common ``M``)."""
        g = tiling.geometry
        grid = _grid(g.q_shape if side == "q" else g.kv_shape, self.region)
        ids = None
        for ax, r in enumerate(self.region):
            start, stop = tiling.axis_tiles(ax, side)
            r0, r1 = start // r, (stop - 1) // r
            m = int((r1 - r0).max()) + 1
            lst = torch.minimum(r0[:, None] + torch.arange(m, device=start.device), r1[:, None])
            if ids is None:
                ids = lst
            else:
                T, M = ids.shape
                ids = (ids[:, None, :, None] * grid[ax] + lst[None, :, None, :]).reshape(T * lst.shape[0], M * m)
        return ids

    def block_layout(self, tiling: Tiling) -> BlockLayout:
        keep = self.keep.to(tiling.device)
        qr = self._tile_regions(tiling, "q")
        kr = self._tile_regions(tiling, "kv")
        if qr.shape[1] == 1 and kr.shape[1] == 1:
            sel = keep[:, :, qr[:, 0]][:, :, :, kr[:, 0]]
            return BlockLayout(sel, sel)
        sel = keep[:, :, qr][:, :, :, :, kr]  # (Bb, Hb, nQ, Mq, nK, Mk)
        return BlockLayout(sel.any(5).any(3), sel.all(5).all(3))

    def preferred_tile(self, geometry):
        return self.region, self.region

    def may_have_empty_rows(self, geometry):
        return not bool(self.keep.any(-1).all())

    def __repr__(self):
        density = self.keep.float().mean().item() if self.keep.numel() else 0.0
        return f"RegionMask(region={self.region}, keep.shape={tuple(self.keep.shape)}, density={density:.3f})"


class RegionRouting(ContentPattern):
    """BiFormer's bi-level routing attention: every query region keeps its ``top_k`` key regions
    by region affinity, and its tokens attend to every token of those regions.

    Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", 2023.

    Selection (without autograd), per batch element and query head (keys through their kv head):
    ``Q_r`` / ``K_r`` = mean of the queries / keys of each region; ``A = scale * Q_r K_r^T``
    ``(nRq, nRk)``; each row keeps its ``top_k`` largest entries.
    Inside an intersection only key regions holding a pair visible under the static parts
    compete; with ``local=True`` (self-attention) a query region always keeps its own region
    (counted in ``top_k``), which makes ``RegionRouting(r, k, local=True) & Causal()`` causal in
    1-D: the only partly visible region of a query region is its own, and every other candidate
    region lies entirely in its past. ``top_k`` equal to the number of key regions is the
    enclosing pattern exactly (dense attention on its own). The selection ignores the score mod.

    Args:
        region: region shape, an int (1-D) or a tuple with one entry per token axis (1, 2 or 3;
            the pattern is defined on that many axes); it must divide the query and key grids.
        top_k: key regions per query region, ``1 <= top_k <= number of key regions``.
        local: always keep the query's own region (requires equal query and key grids).

    Resolves to a :class:`RegionMask`, whose preferred tiles are the regions.
    """

    def __init__(self, region, top_k: int, *, local: bool = False):
        self.region = _region_tuple(region)
        self.ndim = len(self.region)
        self.top_k = check_int("top_k", top_k, 1)
        if not isinstance(local, bool):
            raise TypeError(f"local must be a bool, got local={local!r}")
        self.local = local

    def validate(self, geometry: Geometry) -> None:
        super().validate(geometry)
        for side, shape in (("q", geometry.q_shape), ("kv", geometry.kv_shape)):
            for ax, (n, r) in enumerate(zip(shape, self.region)):
                if n % r:
                    raise ValueError(f"region={self.region} does not divide the {side} token grid {shape}: axis {ax} "
                                     f"has {n} tokens, not a multiple of {r}")
        n_kv = math.prod(_grid(geometry.kv_shape, self.region))
        if self.top_k > n_kv:
            raise ValueError(f"top_k={self.top_k} is larger than the number of key regions {n_kv} "
                             f"(grid {_grid(geometry.kv_shape, self.region)})")
        if self.local and geometry.q_shape != geometry.kv_shape:
            raise ValueError(f"local=True needs equal query and key grids, got {geometry.q_shape} and "
                             f"{geometry.kv_shape}")

    def pooled(self, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Region means of ``x (B, H, N, D)`` on a grid of ``shape``: ``(B, H, nR, D)``."""
        B, H, _, D = x.shape
        split = []
        for n, r in zip(shape, self.region):
            split += [n // r, r]
        x = x.reshape(B, H, *split, D)
        nd = len(shape)
        return x.mean(dim=tuple(3 + 2 * a for a in range(nd))).reshape(B, H, -1, D)

    def select(self, ctx: SelectionContext) -> RegionMask:
        g = ctx.geometry
        compute = torch.promote_types(ctx.q.dtype, torch.float32)
        pq = self.pooled(ctx.q.to(compute), g.q_shape)
        pk = self.pooled(ctx.k_per_query_head.to(compute), g.kv_shape)
        scores = ctx.scale * (pq @ pk.transpose(-1, -2))  # (B, Hq, nRq, nRk)
        if ctx.within is None:
            cand = torch.ones_like(scores, dtype=torch.bool)
        else:
            cand = ctx.within.block_layout(Tiling(g, self.region, self.region)).any.expand(scores.shape)
        scores = scores.masked_fill(~cand, float("-inf"))
        if self.local:
            own = torch.eye(scores.shape[-2], scores.shape[-1], dtype=torch.bool, device=scores.device)
            scores = scores.masked_fill(own & cand, float("inf"))
        chosen = scores.topk(self.top_k, dim=-1).indices
        keep = torch.zeros_like(cand).scatter_(-1, chosen, True)
        return RegionMask(keep & cand, self.region)

    def preferred_tile(self, geometry):
        return self.region, self.region

    def __repr__(self):
        return f"RegionRouting(region={self.region}, top_k={self.top_k}, local={self.local})"


__all__ = ["RegionMask", "RegionRouting"]
