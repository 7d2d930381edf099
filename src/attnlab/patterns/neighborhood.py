"""Neighborhood attention (NATTEN semantics) on 1-, 2- and 3-D token grids."""

from __future__ import annotations

import torch

from ..geometry import Geometry
from ._axes import AxisProduct, PerAxis, PerAxisBool, check_positive, common_ndim, normalize_per_axis


def axis_window(
    x: torch.Tensor, n: int, kernel_size: int, dilation: int, stride: int, is_causal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighborhood of query coordinates ``x`` along one axis of length ``n``.

    Returns ``(group, start, stop)``: the query's dilation group ``x % dilation`` and the
    half-open window ``[start, stop)`` in *dilation-group* coordinates (``y // dilation``).
    Key ``y`` is visible iff ``y % dilation == group`` and ``start <= y // dilation < stop``.
    """
    k, d, s = kernel_size, dilation, stride
    group = x % d
    xd = x // d
    n_g = (n - group + d - 1) // d  # length of the query's dilation group
    base = (xd // s) * s  # first query of the stride group
    if is_causal:
        leader = torch.minimum(base + (s - 1), n_g - 1)
        start = torch.clamp(leader - (k - 1), min=0)
        stop = xd + 1
    else:
        leader = torch.minimum(base + s // 2, n_g - 1)
        start = torch.minimum(torch.clamp(leader - k // 2, min=0), n_g - k)
        stop = start + k
    return group, start, stop


class Neighborhood(AxisProduct):
    """Neighborhood attention: each query sees a ``kernel_size`` window of keys per axis.

    Papers: "Neighborhood Attention Transformer" (Hassani et al., CVPR 2023), "Dilated
    Neighborhood Attention Transformer" (Hassani & Shi, 2022), "Faster Neighborhood
    Attention: Reducing the O(n^2) Cost of Self Attention at the Threadblock Level"
    (Hassani et al., NeurIPS 2024), "Generalized Neighborhood Attention: Multi-dimensional
    Sparse Attention at the Speed of Light" (Hassani et al., 2025, which adds ``stride``).
    Semantics follow NATTEN (its reference kernel mask ``get_win_start``/``get_win_end``
    and its Flex mask) exactly. The rule is a product over axes; along an axis of length
    ``n`` with ``k = kernel_size``, ``d = dilation``, ``s = stride``, for query ``x`` and key
    ``y``::

        g   = x % d;  xd = x // d;  n_g = ceil((n - g) / d)   # group and its length
        if not is_causal:
            leader = min((xd // s) * s + s // 2, n_g - 1)      # centre of the stride group
            start  = clamp(leader - k // 2, 0, n_g - k)        # window shifts in at borders
            stop   = start + k
        else:
            leader = min((xd // s) * s + s - 1, n_g - 1)       # last query of the group
            start  = max(leader - k + 1, 0)
            stop   = xd + 1                                    # never past the query
        visible iff y % d == g and start <= y // d < stop

    So without causality every query sees exactly ``prod(kernel_size)`` keys: the window
    keeps its size and shifts inward at the borders; ``dilation`` splits an axis into ``d``
    interleaved groups (which have different lengths when ``d`` does not divide ``n``);
    queries in one stride group of ``s`` share the window of their leader (the centre query,
    the right one of the two for even ``s``; the last query when causal, clipped to the
    group's end). For even ``k`` the window has ``k // 2`` keys before the centre and
    ``k // 2 - 1`` after it. Causal queries see at most ``k`` keys ending at themselves.

    Arguments are an ``int`` (every axis; :attr:`ndim` is ``None`` and the pattern applies
    to 1-, 2- or 3-D inputs) or a tuple with one entry per token axis (``is_causal``: a
    bool or a tuple of bools). Query and key token grids must have the same shape.

    The block layout is analytic (per axis, then a product); it is exact for
    ``dilation == 1`` and, with dilation, ``any`` is a superset (the window's span) while
    ``full`` stays exact.
    """

    def __init__(
        self,
        kernel_size: PerAxis,
        dilation: PerAxis = 1,
        stride: PerAxis = 1,
        is_causal: PerAxisBool = False,
    ) -> None:
        self.ndim = common_ndim(
            kernel_size=kernel_size, dilation=dilation, stride=stride, is_causal=is_causal
        )
        n = self.ndim or 1
        ks = normalize_per_axis("kernel_size", kernel_size, n)
        dil = normalize_per_axis("dilation", dilation, n)
        st = normalize_per_axis("stride", stride, n)
        normalize_per_axis("is_causal", is_causal, n, kind=bool)
        check_positive("kernel_size", ks)
        check_positive("dilation", dil)
        check_positive("stride", st)
        for ax, (k, s) in enumerate(zip(ks, st)):
            if s > k:
                raise ValueError(
                    f"stride must not exceed kernel_size: got stride={s} > kernel_size={k} "
                    f"on axis {ax}"
                )
        self.kernel_size = tuple(kernel_size) if isinstance(kernel_size, list) else kernel_size
        self.dilation = tuple(dilation) if isinstance(dilation, list) else dilation
        self.stride = tuple(stride) if isinstance(stride, list) else stride
        self.is_causal = tuple(is_causal) if isinstance(is_causal, list) else is_causal

    def _axis_values(self, ndim: int) -> list[tuple[int, int, int, bool]]:
        ks = normalize_per_axis("kernel_size", self.kernel_size, ndim)
        dil = normalize_per_axis("dilation", self.dilation, ndim)
        st = normalize_per_axis("stride", self.stride, ndim)
        ca = normalize_per_axis("is_causal", self.is_causal, ndim, kind=bool)
        return list(zip(ks, dil, st, ca))

    def _axis_range(self, x: torch.Tensor, n: int, values: tuple[int, int, int, bool]):
        # the window [start, stop) in dilation-group coordinates, as key coordinates
        # lo, lo + d, ..., hi - 1 (see axis_window)
        k, d, s, c = values
        group, start, stop = axis_window(x, n, k, d, s, c)
        return start * d + group, (stop - 1) * d + group + 1, d

    def _check_axis(self, ax: int, n: int, values: tuple[int, int, int, bool], geometry: Geometry) -> None:
        k, d, _, _ = values
        if k > n:
            raise ValueError(
                f"kernel_size={k} is larger than token axis {ax} of length {n} "
                f"(q token shape {geometry.q_shape}); expected kernel_size <= {n}"
            )
        if k * d > n:
            raise ValueError(
                f"dilation * kernel_size = {d} * {k} = {d * k} is larger than token axis "
                f"{ax} of length {n} (q token shape {geometry.q_shape}); expected "
                f"dilation <= {n // k} for kernel_size={k}"
            )

    _args = ("kernel_size", "dilation", "stride", "is_causal")
    # may_have_empty_rows (False) comes from AxisProduct: every query sees itself, as causal
    # windows end at the query and a window starts at most at its stride leader.


__all__ = ["Neighborhood", "axis_window"]
