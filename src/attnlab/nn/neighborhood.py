"""Neighborhood attention layers on 1-, 2- and 3-D token grids (NATTEN-style modules).

Papers: "Neighborhood Attention Transformer" (Hassani et al., CVPR 2023) and "Dilated
Neighborhood Attention Transformer" (Hassani & Shi, 2022); ``stride`` from "Generalized
Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light" (2025).
The pattern's semantics (window shifted inward at borders, dilation groups, stride groups,
per-axis causality) are those of :class:`attnlab.Neighborhood`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..api import attention
from ..geometry import unravel
from ..patterns.neighborhood import Neighborhood
from ..scores.base import ScoreContext, ScoreMod
from .multihead import check_bool, check_dropout, check_heads

PerAxis = Any  # an int (every axis) or a tuple with one entry per axis


def _per_axis(name: str, value: object, ndim: int, kind: type = int) -> tuple:
    """``value`` as a tuple of ``ndim`` entries of type ``kind``."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim
    ok = len(values) == ndim and all(
        isinstance(x, kind) and (kind is bool or not isinstance(x, bool)) for x in values
    )
    if not ok:
        raise TypeError(f"{name}={value!r}, expected a {kind.__name__} or {ndim} {kind.__name__}s")
    return values


class NeighborhoodRelativeBias(ScoreMod):
    """NAT's relative positional bias: ``logits += rpb[h, (y_1 - x_1) // d_1 + k_1 - 1, ...]``.

    ``rpb`` is a ``(num_heads, 2 k_1 - 1, ..., 2 k_n - 1)`` table (NATTEN's ``rpb``): one
    learned scalar per head and per relative offset, in dilated units, inside the
    neighborhood. Offsets are clamped to the table, which matters only for pairs outside
    the neighborhood (masked anyway). Query and key coordinates come from the geometry's
    token grid.
    """

    def __init__(self, rpb: nn.Parameter, kernel_size: tuple[int, ...], dilation: tuple[int, ...]):
        super().__init__()
        self.rpb, self.kernel_size, self.dilation = rpb, kernel_size, dilation

    def modify(self, score: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        shape = ctx.geometry.q_shape
        idx = [ctx.h]
        coords = zip(unravel(ctx.q_idx, shape), unravel(ctx.kv_idx, shape))
        for (x, y), k, d in zip(coords, self.kernel_size, self.dilation):
            rel = torch.div(y - x, d, rounding_mode="floor")
            idx.append((rel + k - 1).clamp(0, 2 * k - 2))
        return score + self.rpb[tuple(idx)].to(score.dtype)

    def extra_repr(self) -> str:
        return f"rpb={tuple(self.rpb.shape)}"


class NeighborhoodAttention(nn.Module):
    """Multi-head neighborhood self-attention over a ``(B, *spatial, C)`` channels-last grid.

    ``qkv`` projection (``Linear(C, 3C)``, features ordered ``(3, heads, head_dim)`` as in
    NATTEN's modules, so their ``qkv``/``proj`` weights load), :func:`attnlab.attention`
    with :class:`attnlab.Neighborhood`, output projection ``proj``. Every query attends to
    ``prod(kernel_size)`` keys (fewer when causal); each spatial axis must hold at least
    ``kernel_size * dilation`` tokens (no padding is added; the pattern's ``ValueError`` says
    which axis is too short).

    Args:
        embed_dim: channels ``C``, a multiple of ``num_heads``.
        num_heads: attention heads; ``head_dim = C // num_heads``.
        kernel_size, dilation, stride, is_causal: the neighborhood, an int / bool for every
            axis or a tuple with one entry per axis.
        qkv_bias, proj_bias: biases of the two projections.
        rel_pos_bias: add NAT's learned relative positional bias, the parameter ``rpb``
            ``(num_heads, 2 k_1 - 1, ...)`` (as in NAT and NATTEN's earlier modules;
            truncated normal, std 0.02), applied by :class:`NeighborhoodRelativeBias`.
        qk_scale: logit scale, ``head_dim ** -0.5`` when None.
        proj_drop: dropout on the output.
        ndim: number of spatial axes (1, 2 or 3); fixed by the ``1d``/``2d``/``3d`` subclasses.
        backend: passed to :func:`attnlab.attention`.

    Shapes: ``x`` ``(B, *spatial, C)`` with ``ndim`` spatial axes -> ``(B, *spatial, C)``.
    """

    fixed_ndim: int | None = None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kernel_size: PerAxis,
        dilation: PerAxis = 1,
        stride: PerAxis = 1,
        is_causal: PerAxis = False,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        rel_pos_bias: bool = False,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        *,
        ndim: int | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if self.fixed_ndim is not None:
            if ndim not in (None, self.fixed_ndim):
                raise ValueError(
                    f"ndim={ndim!r}, expected {self.fixed_ndim} or None for {type(self).__name__}"
                )
            ndim = self.fixed_ndim
        if ndim not in (1, 2, 3):
            raise ValueError(f"ndim={ndim!r}, expected 1, 2 or 3 spatial axes")
        check_heads(embed_dim, num_heads, backend)
        if qk_scale is not None:
            if isinstance(qk_scale, bool) or not isinstance(qk_scale, (int, float)):
                raise TypeError(f"qk_scale={qk_scale!r}, expected a float or None")
            if not (math.isfinite(qk_scale) and qk_scale > 0):
                raise ValueError(f"qk_scale={qk_scale!r}, expected a finite float > 0")
        self.embed_dim, self.num_heads, self.ndim = embed_dim, num_heads, ndim
        self.head_dim = embed_dim // num_heads
        self.kernel_size = _per_axis("kernel_size", kernel_size, ndim)
        self.dilation = _per_axis("dilation", dilation, ndim)
        self.stride = _per_axis("stride", stride, ndim)
        self.is_causal = _per_axis("is_causal", is_causal, ndim, bool)
        self.pattern = Neighborhood(self.kernel_size, self.dilation, self.stride, self.is_causal)
        self.scale = self.head_dim**-0.5 if qk_scale is None else float(qk_scale)
        self.backend = backend
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=check_bool("qkv_bias", qkv_bias), **fk)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=check_bool("proj_bias", proj_bias), **fk)
        self.proj_drop = nn.Dropout(check_dropout("proj_drop", proj_drop))
        rpb = None
        if check_bool("rel_pos_bias", rel_pos_bias):
            table = (num_heads, *(2 * k - 1 for k in self.kernel_size))
            rpb = nn.Parameter(torch.empty(table, **fk))
            nn.init.trunc_normal_(rpb, std=0.02, a=-2.0, b=2.0)
        self.register_parameter("rpb", rpb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, *spatial, C)`` -> ``(B, *spatial, C)``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x={type(x).__name__}, expected a torch.Tensor")
        if x.dim() != self.ndim + 2 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"x.shape={tuple(x.shape)}, expected (B, {', '.join(['*'] * self.ndim)}, "
                f"{self.embed_dim}): {self.ndim} spatial axes, channels last"
            )
        B, spatial, H, D = x.shape[0], x.shape[1:-1], self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(B, *spatial, 3, H, D)
        qkv = qkv.permute(self.ndim + 1, 0, self.ndim + 2, *range(1, self.ndim + 1), self.ndim + 3)
        bias = None
        if self.rpb is not None:
            bias = NeighborhoodRelativeBias(self.rpb, self.kernel_size, self.dilation)
        q, k, v = qkv.unbind(0)
        out = attention(q, k, v, self.pattern, bias, scale=self.scale, backend=self.backend)
        out = out.permute(0, *range(2, self.ndim + 2), 1, self.ndim + 2).reshape(*x.shape)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, ndim={self.ndim}, "
            f"pattern={self.pattern!r}, rel_pos_bias={self.rpb is not None}, "
            f"scale={self.scale:.6g}, backend={self.backend!r}"
        )


class NeighborhoodAttention1d(NeighborhoodAttention):
    """:class:`NeighborhoodAttention` on sequences: ``x`` ``(B, L, C)``."""

    fixed_ndim = 1


class NeighborhoodAttention2d(NeighborhoodAttention):
    """:class:`NeighborhoodAttention` on images: ``x`` ``(B, X, Y, C)``."""

    fixed_ndim = 2


class NeighborhoodAttention3d(NeighborhoodAttention):
    """:class:`NeighborhoodAttention` on volumes / video: ``x`` ``(B, T, X, Y, C)``."""

    fixed_ndim = 3


__all__ = [
    "NeighborhoodAttention", "NeighborhoodAttention1d", "NeighborhoodAttention2d",
    "NeighborhoodAttention3d", "NeighborhoodRelativeBias",
]
