"""Non-overlapping, grid and halo windows on 1-, 2- and 3-D token grids.

All three are products over axes of a per-axis rule, defined for self-attention over one
token grid (query and key token shapes must be equal; otherwise ``validate`` raises
``ValueError``). Each size argument is an ``int`` (every axis; ``ndim`` is ``None``) or a
tuple with one entry per token axis.
"""

from __future__ import annotations

import torch

from ..geometry import Geometry, unravel
from ._axes import (
    PerAxis,
    axis_layout,
    check_positive,
    check_self_attention,
    common_ndim,
    normalize_per_axis,
)
from .base import Pattern
from .layout import BlockLayout, Tiling, combine_axes


class _AxisProduct(Pattern):
    """A pattern that is visible iff a per-axis rule holds on every axis.

    Subclasses implement :meth:`_axis_range` (the key interval and period seen by query
    coordinates ``x`` along one axis) and :meth:`_check_axis`.
    """

    _args: tuple[str, ...] = ()

    def __init__(self, **args: PerAxis) -> None:
        self.ndim = common_ndim(**args)
        for name, value in args.items():
            normalize_per_axis(name, value, self.ndim or 1)
            setattr(self, name, tuple(value) if isinstance(value, list) else value)

    def _axis_values(self, ndim: int) -> list[tuple[int, ...]]:
        per_arg = [normalize_per_axis(a, getattr(self, a), ndim) for a in self._args]
        return list(zip(*per_arg))

    def _axis_range(
        self, x: torch.Tensor, n: int, values: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        raise NotImplementedError

    def _check_axis(self, ax: int, n: int, values: tuple[int, ...], geometry: Geometry) -> None:
        raise NotImplementedError

    def validate(self, geometry: Geometry) -> None:
        super().validate(geometry)
        check_self_attention(self, geometry)
        for ax, (n, vals) in enumerate(zip(geometry.q_shape, self._axis_values(geometry.ndim))):
            self._check_axis(ax, n, vals, geometry)

    def mask(
        self,
        b: torch.Tensor,
        h: torch.Tensor,
        q_idx: torch.Tensor,
        kv_idx: torch.Tensor,
        geometry: Geometry,
    ) -> torch.Tensor:
        qc = unravel(q_idx, geometry.q_shape)
        kc = unravel(kv_idx, geometry.kv_shape)
        out: torch.Tensor | None = None
        for x, y, n, vals in zip(qc, kc, geometry.q_shape, self._axis_values(geometry.ndim)):
            lo, hi, period = self._axis_range(x, n, vals)
            m = (y >= lo) & (y < hi)
            if period > 1:
                m = m & ((y - lo) % period == 0)
            out = m if out is None else out & m
        return out

    def block_layout(self, tiling: Tiling) -> BlockLayout:
        g = tiling.geometry
        self.validate(g)
        per_axis = []
        for ax, (n, vals) in enumerate(zip(g.q_shape, self._axis_values(g.ndim))):
            x = torch.arange(n, device=tiling.device)
            lo, hi, period = self._axis_range(x, n, vals)
            per_axis.append(axis_layout(tiling, ax, lo, hi, period))
        return combine_axes(tiling, per_axis)

    def preferred_tile(self, geometry: Geometry) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        return None

    def may_have_empty_rows(self, geometry: Geometry) -> bool:
        return False  # every query sees at least itself

    def __repr__(self) -> str:
        args = ", ".join(f"{a}={getattr(self, a)!r}" for a in self._args)
        return f"{type(self).__name__}({args})"


class Blocked(_AxisProduct):
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


class Grid(_AxisProduct):
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


class Halo(_AxisProduct):
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
