"""Problem geometry: the sizes an attention call is about, checked once at the boundary.

Layout (SDPA's): ``q`` is ``(B, Hq, *L, D)``, ``k`` is ``(B, Hkv, *S, D)`` and ``v`` is
``(B, Hkv, *S, Dv)``. ``*L`` and ``*S`` are one token axis for sequences, two or three for
images, video or spectrograms; they must have the same number of axes. ``Hq`` is a
multiple of ``Hkv`` (grouped-query / multi-query attention). Patterns and score mods see
tokens by their *flat* row-major index over ``*L`` / ``*S``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Geometry:
    """Sizes of one attention problem (no data)."""

    batch: int
    q_heads: int
    kv_heads: int
    q_shape: tuple[int, ...]
    kv_shape: tuple[int, ...]
    head_dim: int
    value_dim: int
    device: torch.device

    @property
    def ndim(self) -> int:
        """Number of token axes."""
        return len(self.q_shape)

    @property
    def q_len(self) -> int:
        return math.prod(self.q_shape)

    @property
    def kv_len(self) -> int:
        return math.prod(self.kv_shape)

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.q_heads // self.kv_heads

    @property
    def causal_offset(self) -> int:
        """``S - L``: key j is causally visible to query i iff ``j <= i + S - L`` (bottom-right)."""
        return self.kv_len - self.q_len


def _check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {name}.dtype={x.dtype}"
        )
    if x.ndim < 4:
        raise ValueError(
            f"{name} must have shape (B, H, *tokens, D) with at least one token axis, "
            f"got {name}.shape={tuple(x.shape)}"
        )
    return x


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Geometry:
    """Validate ``q``, ``k``, ``v`` and return their :class:`Geometry`.

    Raises ``TypeError`` for non-tensors, non-floating dtypes and dtype mismatches, and
    ``ValueError`` for shape and device mismatches; every message names the argument and
    its value.
    """
    _check_tensor("q", q)
    _check_tensor("k", k)
    _check_tensor("v", v)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(
                f"q, k and v must share one dtype: got q.dtype={q.dtype} and {name}.dtype={x.dtype}"
            )
        if x.device != q.device:
            raise ValueError(
                f"q, k and v must be on one device: got q.device={q.device} and "
                f"{name}.device={x.device}"
            )
        if x.ndim != q.ndim:
            raise ValueError(
                f"q, k and v must have the same number of dimensions (B, H, *tokens, D): got "
                f"q.shape={tuple(q.shape)} and {name}.shape={tuple(x.shape)}"
            )
        if x.shape[0] != q.shape[0]:
            raise ValueError(
                f"batch sizes differ: q.shape[0]={q.shape[0]} but {name}.shape[0]={x.shape[0]}"
            )
    if v.shape[1] != k.shape[1]:
        raise ValueError(
            f"k and v must have the same number of heads: k.shape[1]={k.shape[1]}, "
            f"v.shape[1]={v.shape[1]}"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"the number of query heads must be a multiple of the number of key/value heads "
            f"(GQA/MQA): got q.shape[1]={q.shape[1]} and k.shape[1]={k.shape[1]}"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"q and k must have the same head dimension: q.shape[-1]={q.shape[-1]}, "
            f"k.shape[-1]={k.shape[-1]}"
        )
    if k.shape[2:-1] != v.shape[2:-1]:
        raise ValueError(
            f"k and v must have the same token axes: k.shape={tuple(k.shape)}, "
            f"v.shape={tuple(v.shape)}"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if any(s == 0 for s in x.shape):
            raise ValueError(f"{name} has an empty dimension: {name}.shape={tuple(x.shape)}")
    return Geometry(
        batch=q.shape[0],
        q_heads=q.shape[1],
        kv_heads=k.shape[1],
        q_shape=tuple(q.shape[2:-1]),
        kv_shape=tuple(k.shape[2:-1]),
        head_dim=q.shape[-1],
        value_dim=v.shape[-1],
        device=q.device,
    )


def check_scale(scale: object, head_dim: int) -> float:
    """Return the softmax scale: ``1/sqrt(D)`` when ``scale is None``."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got scale={scale}")
    return float(scale)


def index_grid(geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``b (B,1,1,1)``, ``h (1,Hq,1,1)``, ``q_idx (1,1,L,1)``, ``kv_idx (1,1,1,S)``: the
    broadcastable indices of every (batch, query head, query, key) of a problem, with flat
    token indices; what a pattern's ``mask`` and a score mod see over the dense problem."""
    dev = geometry.device
    return (
        torch.arange(geometry.batch, device=dev).view(-1, 1, 1, 1),
        torch.arange(geometry.q_heads, device=dev).view(1, -1, 1, 1),
        torch.arange(geometry.q_len, device=dev).view(1, 1, -1, 1),
        torch.arange(geometry.kv_len, device=dev).view(1, 1, 1, -1),
    )


def unravel(flat: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Row-major coordinates of flat token indices (one tensor per axis)."""
    coords = []
    rest = flat
    for size in reversed(shape[1:]):
        coords.append(rest % size)
        rest = rest // size
    coords.append(rest)
    return coords[::-1]
