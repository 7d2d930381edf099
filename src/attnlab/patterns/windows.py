"""Non-overlapping, grid and halo windows on 1-, 2- and 3-D token grids.

All three are products over axes of a per-axis rule, defined for self-attention over one
token grid (query and key token shapes must be equal; otherwise ``validate`` raises
``ValueError``). Each size argument is an ``int`` (every axis; ``ndim`` is ``None``) or a
tuple with one entry per token axis.
"""

from __future__ import annotations

import torch

from ..geometry import Geometry
from ._axes import AxisProduct, PerAxis, check_positive, normalize_per_axis


class Blocked(AxisProduct):
    """Non-overlapping window (block) attention.

    Query ``x`` and key ``y`` interact iff they lie in the same block on every axis::

        x // block == y // block          (per axis)

    The last block of an axis is shorter when ``block`` does not divide the axis length.
    This is the block attention of "MaxViT: Multi-Axis Vision Transformer" (Tu et al.,
    2022), the spatial window attention of "DaViT: Dual Attention Vision Transformers"
    (Ding et al., 2022) and the (unshifted) window attention of Swin.
    Validation: ``1 <= block <= axis length``; q and k/v token shapes equal.
    """

    _args = ("block",)

    def __init__(self, block: PerAxis) -> None:
        super().__init__(block=block)
        check_positive("block", normalize_per_axis("block", block, self.ndim or 1))

    def _axis_range(
        self, x: torch.Tensor, n: int, values: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        (b,) = values
        lo = (x // b) * b
        return lo, torch.clamp(lo + b, max=n), 1

    def _check_axis(self, ax: int, n: int, values: tuple[int, ...], geometry: Geometry) -> None:
        (b,) = values
        if b > n:
            raise ValueError(
                f"block={b} is larger than token axis {ax} of length {n} (q token shape "
                f"{geometry.q_shape}); expected block <= {n}"
            )


class Grid(AxisProduct):
    """Grid ("dilated global") attention of "MaxViT: Multi-Axis Vision Transformer" (Tu et
    al., 2022).

    An axis of length ``n`` is split into ``n // grid_size`` interleaved groups of
    ``grid_size`` tokens each, spaced ``n // grid_size`` apart (MaxViT's G x G grid); query
    ``x`` and key ``y`` interact iff they are in the same group on every axis::

        p = n // grid_size;  x % p == y % p          (per axis)

    ``grid_size == n`` is full attention along the axis, ``grid_size == 1`` only the token
    itself. Validation: ``1 <= grid_size``, ``n % grid_size == 0``; q and k/v token shapes
    equal.
    """

    _args = ("grid_size",)

    def __init__(self, grid_size: PerAxis) -> None:
        super().__init__(grid_size=grid_size)
        check_positive("grid_size", normalize_per_axis("grid_size", grid_size, self.ndim or 1))

    def _axis_range(
        self, x: torch.Tensor, n: int, values: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        (gs,) = values
        p = n // gs
        lo = x % p
        return lo, lo + (gs - 1) * p + 1, p

    def _check_axis(self, ax: int, n: int, values: tuple[int, ...], geometry: Geometry) -> None:
        (gs,) = values
        if n % gs != 0:
            raise ValueError(
                f"grid_size={gs} must divide token axis {ax} of length {n} (q token shape "
                f"{geometry.q_shape}); expected a divisor of {n}"
            )


class Halo(AxisProduct):
    """Blocked local attention with halos, from "Scaling Local Self-Attention for Parameter
    Efficient Visual Backbones" (HaloNets; Vaswani et al., 2021).

    Queries in a block of ``block`` tokens attend to the keys of the same block extended by
    ``halo`` tokens on each side, clipped at the borders (HaloNets pad with zeros there;
    here the padding keys simply do not exist, so border queries see fewer keys)::

        start = (x // block) * block;  start - halo <= y < start + block + halo   (per axis)

    ``halo == 0`` is :class:`Blocked`. Validation: ``1 <= block <= axis length``,
    ``halo >= 0``; q and k/v token shapes equal.
    """

    _args = ("block", "halo")

    def __init__(self, block: PerAxis, halo: PerAxis) -> None:
        super().__init__(block=block, halo=halo)
        check_positive("block", normalize_per_axis("block", block, self.ndim or 1))
        check_positive("halo", normalize_per_axis("halo", halo, self.ndim or 1), minimum=0)

    def _axis_range(
        self, x: torch.Tensor, n: int, values: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        b, halo = values
        start = (x // b) * b
        return torch.clamp(start - halo, min=0), torch.clamp(start + b + halo, max=n), 1

    def _check_axis(self, ax: int, n: int, values: tuple[int, ...], geometry: Geometry) -> None:
        b, _ = values
        if b > n:
            raise ValueError(
                f"block={b} is larger than token axis {ax} of length {n} (q token shape "
                f"{geometry.q_shape}); expected block <= {n}"
            )


__all__ = ["Blocked", "Grid", "Halo"]
