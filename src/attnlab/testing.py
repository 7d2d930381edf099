"""Helpers for testing patterns and backends (used by attnlab's own tests; public so that
users who write a Pattern can check it the same way)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .geometry import Geometry, index_grid
from .patterns.base import Pattern
from .patterns.layout import Tiling


def make_geometry(
    q_shape: tuple[int, ...],
    kv_shape: tuple[int, ...] | None = None,
    *,
    batch: int = 1,
    q_heads: int = 1,
    kv_heads: int | None = None,
    head_dim: int = 8,
    value_dim: int | None = None,
    device: str | torch.device = "cpu",
) -> Geometry:
    """A :class:`Geometry` without tensors, for pattern tests."""
    return Geometry(
        batch=batch,
        q_heads=q_heads,
        kv_heads=kv_heads or q_heads,
        q_shape=tuple(q_shape),
        kv_shape=tuple(kv_shape or q_shape),
        head_dim=head_dim,
        value_dim=value_dim or head_dim,
        device=torch.device(device),
    )


def random_qkv(B: int = 2, Hq: int = 4, Hkv: int = 2, L: int = 90, S: int | None = None, D: int = 8,
               Dv: int | None = None, *, dtype: torch.dtype = torch.float64, seed: int = 0,
               grad: bool = False) -> list[torch.Tensor]:
    """Seeded standard-normal ``q (B, Hq, L, D)``, ``k (B, Hkv, S, D)``, ``v (B, Hkv, S, Dv)``
    (``S = L``, ``Dv = D`` by default), leaves that require grad when ``grad``."""
    g = torch.Generator().manual_seed(seed)
    S = L if S is None else S
    shapes = ((B, Hq, L, D), (B, Hkv, S, D), (B, Hkv, S, D if Dv is None else Dv))
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_(grad) for s in shapes]


def dense_mask(pattern: Pattern, geometry: Geometry) -> torch.Tensor:
    """The pattern's elementwise mask over all token pairs, shape ``(B, Hq, L, S)``
    (flat token indices). For tests on small problems only."""
    m = pattern.mask(*index_grid(geometry), geometry)
    return torch.broadcast_to(m, (geometry.batch, geometry.q_heads, geometry.q_len, geometry.kv_len))


def exact_tile_layout(mask: torch.Tensor, tiling: Tiling) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile-level (any, full) derived from a dense ``(B, H, L, S)`` mask by brute force.

    Padding positions count as visible for ``full`` and invisible for ``any``.
    """
    qi = tiling.q_token_index
    ki = tiling.kv_token_index
    B, H = mask.shape[:2]
    m = mask[:, :, qi.clamp(min=0)][:, :, :, :, ki.clamp(min=0)]  # (B,H,nQ,tq,nK,tk)
    ok = (qi >= 0)[:, :, None, None] & (ki >= 0)[None, None]
    any_ = (m & ok).any(5).any(3)
    full = (m | ~ok).all(5).all(3)
    return any_, full


def check_pattern_layout(
    pattern: Pattern,
    geometry: Geometry,
    q_tile: tuple[int, ...] | int,
    kv_tile: tuple[int, ...] | int,
    *,
    exact: bool = False,
) -> None:
    """Assert that ``pattern.block_layout`` is consistent with ``pattern.mask``.

    ``any`` must cover every tile pair that has a visible token pair and ``full`` must only
    mark tile pairs whose token pairs are all visible (and whose key tile is complete is not
    required: padding is treated as visible). With ``exact=True`` both must match the
    brute-force layout exactly.
    """
    nd = geometry.ndim
    q_tile = (q_tile,) * nd if isinstance(q_tile, int) else tuple(q_tile)
    kv_tile = (kv_tile,) * nd if isinstance(kv_tile, int) else tuple(kv_tile)
    tiling = Tiling(geometry, q_tile, kv_tile)
    layout = pattern.block_layout(tiling)
    want_any, want_full = exact_tile_layout(dense_mask(pattern, geometry), tiling)
    got_any = torch.broadcast_to(layout.any, want_any.shape)
    got_full = torch.broadcast_to(layout.full, want_full.shape)
    missing = want_any & ~got_any
    assert not missing.any(), (
        f"{pattern!r}: block_layout misses {int(missing.sum())} touched tile pairs "
        f"(first at {missing.nonzero()[0].tolist()}) for {tiling}"
    )
    wrong_full = got_full & ~want_full
    assert not wrong_full.any(), (
        f"{pattern!r}: block_layout marks {int(wrong_full.sum())} tile pairs full that are not "
        f"(first at {wrong_full.nonzero()[0].tolist()}) for {tiling}"
    )
    if exact:
        assert torch.equal(got_any, want_any), f"{pattern!r}: any over-approximates for {tiling}"
        assert torch.equal(got_full, want_full), f"{pattern!r}: full under-approximates for {tiling}"


def neighbor_set(pattern: Pattern, geometry: Geometry, query: tuple[int, ...] | int) -> set:
    """The set of key coordinates (tuples, or ints for one axis) visible to one query."""
    coords = (query,) if isinstance(query, int) else tuple(query)
    flat = 0
    for c, s in zip(coords, geometry.q_shape):
        flat = flat * s + c
    m = dense_mask(pattern, geometry)[0, 0, flat]
    out = set()
    for j in m.nonzero().flatten().tolist():
        c = []
        for s in reversed(geometry.kv_shape):
            c.append(j % s)
            j //= s
        c = tuple(reversed(c))
        out.add(c[0] if geometry.ndim == 1 and isinstance(query, int) else c)
    return out


def density(pattern: Pattern, geometry: Geometry) -> float:
    """Fraction of visible (batch, head, query, key) pairs, counted in chunks of query rows
    (about 16M pairs at a time), so long problems need no ``L x S`` mask."""
    b, h, q_idx, kv_idx = index_grid(geometry)
    g = geometry
    step = max(1, (1 << 24) // max(1, g.batch * g.q_heads * g.kv_len))
    visible = 0
    for start in range(0, g.q_len, step):
        rows = q_idx[:, :, start:start + step]
        m = pattern.mask(b, h, rows, kv_idx, g)
        visible += int(torch.broadcast_to(m, (g.batch, g.q_heads, rows.shape[2], g.kv_len)).sum())
    total = g.batch * g.q_heads * g.q_len * g.kv_len
    return visible / total if total else 0.0


def rel_error(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """``max|a - b| / max(max|b|, floor)`` in float64 (a larger ``floor`` keeps references
    that are exactly zero, e.g. gradients with one visible key per row, from dividing by ~0)."""
    a = a.double()
    b = b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item() if b.numel() else 0.0


class MaxNumel(TorchDispatchMode):
    """Records ``max_numel``, the element count of the largest tensor any aten op produces
    inside the ``with`` block: tests assert that a fast path never forms an ``L x S`` tensor."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


__all__ = [
    "MaxNumel",
    "make_geometry",
    "dense_mask",
    "exact_tile_layout",
    "check_pattern_layout",
    "neighbor_set",
    "density",
    "rel_error",
]
