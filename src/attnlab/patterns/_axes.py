"""Helpers shared by the per-axis (N-dimensional) window patterns.

- :func:`normalize_per_axis` turns an ``int`` (or ``bool``) or a per-axis tuple into one
  value per token axis, with errors that name the argument.
- :func:`common_ndim` finds the number of axes implied by the tuple-valued arguments.
- :func:`axis_layout` is the tile layout along one axis for a rule "query coordinate ``x``
  sees the key coordinates ``lo[x] <= y < hi[x]`` with ``y = lo[x] (mod period)``".
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from ..geometry import Geometry, unravel
from .base import Pattern
from .layout import BlockLayout, Tiling, combine_axes, interval_layout

PerAxis = Union[int, Sequence[int]]
PerAxisBool = Union[bool, Sequence[bool]]


def _check_scalar(name: str, v: object, kind: type) -> None:
    if kind is bool:
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool or a tuple of bools, got {v!r}")
    elif isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int or a tuple of ints, got {v!r}")


def normalize_per_axis(
    name: str, value: object, ndim: int, *, kind: type = int
) -> tuple:
    """``value`` as a tuple with one entry per token axis.

    An ``int`` (``bool`` when ``kind is bool``) applies to every axis; a tuple or list must
    have exactly ``ndim`` entries. Raises ``TypeError`` for wrong types and ``ValueError``
    for a wrong length, naming ``name``.
    """
    if isinstance(value, (tuple, list)):
        for v in value:
            _check_scalar(name, v, kind)
        if len(value) != ndim:
            raise ValueError(
                f"{name}={tuple(value)!r} has {len(value)} entries but the inputs have {ndim} "
                f"token axes; pass one entry per axis or a single {kind.__name__}"
            )
        return tuple(value)
    _check_scalar(name, value, kind)
    return (value,) * ndim


def common_ndim(**named: object) -> int | None:
    """Number of axes implied by the tuple-valued arguments (``None`` if all are scalars).

    Raises ``ValueError`` naming the arguments when tuples of different lengths are given.
    """
    lengths = {k: len(v) for k, v in named.items() if isinstance(v, (tuple, list))}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"{k}={tuple(named[k])!r}" for k in lengths)
        raise ValueError(f"per-axis arguments must have the same number of entries, got {desc}")
    for k, n in lengths.items():
        if n not in (1, 2, 3):
            raise ValueError(f"{k}={tuple(named[k])!r} must have 1, 2 or 3 entries (token axes)")
    return next(iter(lengths.values()), None)


def check_positive(name: str, values: tuple[int, ...], minimum: int = 1) -> None:
    """Raise ``ValueError`` naming ``name`` if an entry is below ``minimum``."""
    for ax, v in enumerate(values):
        if v < minimum:
            raise ValueError(
                f"{name} must be >= {minimum} on every axis, got {name}={v} on axis {ax}"
            )


def check_self_attention(pattern: object, geometry: Geometry) -> None:
    """Raise ``ValueError`` unless the query and key token grids have the same shape."""
    if geometry.q_shape != geometry.kv_shape:
        raise ValueError(
            f"{pattern!r} is defined for self-attention over one token grid: q token shape "
            f"{geometry.q_shape} must equal k/v token shape {geometry.kv_shape}"
        )


def _segment(values: torch.Tensor, tile: int, n_tiles: int, how: str) -> torch.Tensor:
    idx = torch.arange(values.shape[0], device=values.device) // tile
    out = torch.zeros(n_tiles, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, idx, values, how, include_self=False)


def axis_layout(
    tiling: Tiling, axis: int, lo: torch.Tensor, hi: torch.Tensor, period: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(any, full)`` of shape ``(q_grid[axis], kv_grid[axis])`` along one axis.

    Query coordinate ``x`` sees key coordinates ``y`` with ``lo[x] <= y < hi[x]`` and, when
    ``period > 1``, ``y = lo[x] (mod period)`` (``hi - 1`` must also be on that residue).

    ``any`` comes from :func:`interval_layout` on ``[lo, hi)``: exact when ``period == 1``,
    a superset otherwise (a key tile may meet the interval only on other residues).
    ``full`` is always exact (padding counts as visible, as in FlexAttention): with
    ``period == 1`` a tile pair is full iff ``max lo`` over the query tile is at most the key
    tile's first coordinate and ``min hi`` at least its end; with ``period > 1`` a query sees
    no two adjacent keys and no two adjacent queries share a residue, so a tile pair can only
    be full when both tiles hold one real coordinate and that pair is visible.
    Cost: O(axis length + tile pairs of the axis).
    """
    g = tiling.geometry
    dev = tiling.device
    lo = lo.to(dev)
    hi = hi.to(dev)
    any_, _ = interval_layout(tiling, axis, lo, hi)
    q_start, q_stop = tiling.axis_tiles(axis, "q")
    kv_start, kv_stop = tiling.axis_tiles(axis, "kv")
    if period == 1:
        gq = tiling.q_grid[axis]
        lo_max = _segment(lo, tiling.q_tile[axis], gq, "amax")
        hi_min = _segment(hi.clamp(max=g.kv_shape[axis]), tiling.q_tile[axis], gq, "amin")
        full = (lo_max[:, None] <= kv_start[None, :]) & (hi_min[:, None] >= kv_stop[None, :])
    else:
        x_lo = lo[q_start][:, None]
        x_hi = hi[q_start][:, None]
        y = kv_start[None, :]
        vis = (x_lo <= y) & (y < x_hi) & ((y - x_lo) % period == 0)
        single = ((q_stop - q_start) == 1)[:, None] & ((kv_stop - kv_start) == 1)[None, :]
        full = vis & single
    return any_, full & any_


class AxisProduct(Pattern):
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


def broadcast_mask(mask: torch.Tensor, *shapes: torch.Size) -> torch.Tensor:
    """``mask`` broadcast to the common shape of itself and ``shapes``; unchanged when it has
    that shape already (FlexAttention calls masks on 0-d indices, and Inductor's CPU lowering
    rejects an ``expand`` to ``()``)."""
    target = torch.broadcast_shapes(mask.shape, *shapes)
    return mask if mask.shape == target else torch.broadcast_to(mask, target)

