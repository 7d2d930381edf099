"""The :class:`Pattern` protocol: which (query, key) pairs interact.

A pattern has two views of the same set, which every test checks against each other:

- ``mask(b, h, q_idx, kv_idx, geometry)``: the elementwise definition. Arguments are
  integer tensors that broadcast against each other (flat row-major token indices for
  ``q_idx``/``kv_idx``); the result is a boolean tensor of their broadcast shape. It is
  the FlexAttention ``mask_mod`` with the problem geometry bound.
- ``block_layout(tiling)``: for every (query tile, key tile) pair, whether any or all of
  its token pairs are visible, computed analytically from tile bounds.

Patterns compose with ``|`` (union) and ``&`` (intersection). A plain callable
``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` is accepted wherever a pattern is
(:class:`MaskMod`), on the generic path that evaluates it over all token pairs to build
its layout.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch

from ..geometry import Geometry
from .layout import BlockLayout, Tiling, dense_layout

MaskModFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Pattern:
    """Base class of all sparsity patterns.

    Subclasses implement :meth:`mask` and :meth:`block_layout`, and may override
    :meth:`validate` (raise ``ValueError`` naming the argument when the pattern cannot
    apply to a geometry) and :attr:`ndim` (the number of token axes the pattern is
    defined on; ``None`` for patterns over flat token indices, which apply to any).
    """

    ndim: int | None = None

    def mask(
        self,
        b: torch.Tensor,
        h: torch.Tensor,
        q_idx: torch.Tensor,
        kv_idx: torch.Tensor,
        geometry: Geometry,
    ) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not define mask()")

    def block_layout(self, tiling: Tiling) -> BlockLayout:
        raise NotImplementedError(f"{type(self).__name__} does not define block_layout()")

    def validate(self, geometry: Geometry) -> None:
        """Raise ``ValueError`` if the pattern cannot be applied to ``geometry``."""
        if self.ndim is not None and self.ndim != geometry.ndim:
            raise ValueError(
                f"pattern {self!r} is defined on {self.ndim} token axes but the inputs have "
                f"{geometry.ndim} (q token shape {geometry.q_shape}); pass q of shape "
                f"(B, H, {', '.join(['*'] * self.ndim)}, D)"
            )

    def preferred_tile(self, geometry: Geometry) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """A (q_tile, kv_tile) that suits this pattern, or None for the backend's default."""
        return None

    def may_have_empty_rows(self, geometry: Geometry) -> bool:
        """Conservative: True unless the pattern guarantees every query sees a key."""
        return True

    def cache_key(self) -> tuple | None:
        """A hashable key equal for patterns that behave identically, or None.

        The default uses the class and the instance attributes when they are all plain
        values (numbers, strings, tuples, other patterns with keys); a pattern holding
        tensors or callables has no key, and backends then do not cache its plans."""
        items = []
        for name, value in sorted(vars(self).items()):
            key = _plain_key(value)
            if key is _NO_KEY:
                return None
            items.append((name, key))
        return (type(self), tuple(items))

    def as_mask_mod(self, geometry: Geometry) -> MaskModFn:
        """A FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx)`` with ``geometry`` bound."""

        def mask_mod(b, h, q_idx, kv_idx):
            return self.mask(b, h, q_idx, kv_idx, geometry)

        mask_mod.__name__ = repr(self)
        return mask_mod

    def __or__(self, other: object) -> "Pattern":
        return Union(self, as_pattern(other, "other"))

    def __ror__(self, other: object) -> "Pattern":
        return Union(as_pattern(other, "other"), self)

    def __and__(self, other: object) -> "Pattern":
        return Intersection(self, as_pattern(other, "other"))

    def __rand__(self, other: object) -> "Pattern":
        return Intersection(as_pattern(other, "other"), self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_NO_KEY = object()


def _plain_key(value: object) -> object:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        keys = tuple(_plain_key(v) for v in value)
        return _NO_KEY if any(k is _NO_KEY for k in keys) else keys
    if isinstance(value, Pattern):
        key = value.cache_key()
        return _NO_KEY if key is None else key
    return _NO_KEY


class Full(Pattern):
    """Every query sees every key (dense attention)."""

    def mask(self, b, h, q_idx, kv_idx, geometry):
        return torch.ones_like(q_idx >= kv_idx)

    def block_layout(self, tiling):
        return dense_layout(tiling, full=True)

    def may_have_empty_rows(self, geometry):
        return False


class Causal(Pattern):
    """Key ``j`` is visible to query ``i`` iff ``j <= i + S - L`` (bottom-right aligned, as
    in FlashAttention 2.1+; top-left for ``L == S`` is the same). Rows ``i < L - S`` see no
    key when ``L > S``; they return 0 with ``lse = -inf``. Indices are flat token indices.
    """

    def mask(self, b, h, q_idx, kv_idx, geometry):
        return kv_idx <= q_idx + geometry.causal_offset

    def block_layout(self, tiling):
        off = tiling.geometry.causal_offset
        q_lo, q_hi, _ = tiling.q_flat_bounds
        kv_lo, kv_hi, _ = tiling.kv_flat_bounds
        any_ = kv_lo[None, :] <= q_hi[:, None] + off
        full = kv_hi[None, :] <= q_lo[:, None] + off
        return BlockLayout(any_, full)

    def may_have_empty_rows(self, geometry):
        return geometry.q_len > geometry.kv_len


class _Composite(Pattern):
    """Patterns combined elementwise and tile by tile with one boolean operator."""

    _symbol = ""

    def __init__(self, *parts: Pattern):
        flat: list[Pattern] = []
        for p in parts:
            flat.extend(p.parts if type(p) is type(self) else [p])
        self.parts = tuple(flat)
        dims = {p.ndim for p in self.parts if p.ndim is not None}
        if len(dims) > 1:
            raise ValueError(f"cannot combine patterns defined on different numbers of axes: {self!r}")
        self.ndim = dims.pop() if dims else None

    @staticmethod
    def _op(a, b):
        raise NotImplementedError

    def mask(self, b, h, q_idx, kv_idx, geometry):
        out = self.parts[0].mask(b, h, q_idx, kv_idx, geometry)
        for p in self.parts[1:]:
            out = self._op(out, p.mask(b, h, q_idx, kv_idx, geometry))
        return out

    def block_layout(self, tiling):
        out = self.parts[0].block_layout(tiling)
        for p in self.parts[1:]:
            out = self._op(out, p.block_layout(tiling))
        return out

    def validate(self, geometry):
        for p in self.parts:
            p.validate(geometry)

    def preferred_tile(self, geometry):
        for p in self.parts:
            t = p.preferred_tile(geometry)
            if t is not None:
                return t
        return None

    def __repr__(self):
        sep = f" {self._symbol} "
        return sep.join(
            f"({p!r})" if isinstance(p, _Composite) and type(p) is not type(self) else repr(p)
            for p in self.parts
        )


class Union(_Composite):
    """Pairs visible in any of the parts (``a | b``)."""

    _symbol = "|"
    _op = staticmethod(operator.or_)

    def may_have_empty_rows(self, geometry):
        return all(p.may_have_empty_rows(geometry) for p in self.parts)


class Intersection(_Composite):
    """Pairs visible in every part (``a & b``)."""

    _symbol = "&"
    _op = staticmethod(operator.and_)


class MaskMod(Pattern):
    """A plain FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` used as a pattern.

    Indices are flat token indices. The block layout is found by evaluating the function
    over every token pair, a tile row at a time (time O(L * S), memory O(tiles)): the
    generic, slower path. Whether the function depends on the batch or head index is read
    from the broadcast shape of its result.
    """

    def __init__(self, fn: MaskModFn, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"mask_mod must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "mask_mod")

    def mask(self, b, h, q_idx, kv_idx, geometry):
        out = self.fn(b, h, q_idx, kv_idx)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
            raise TypeError(
                f"mask_mod {self.name!r} must return a boolean tensor, got "
                f"{getattr(out, 'dtype', type(out).__name__)}"
            )
        return out

    def block_layout(self, tiling):
        g = tiling.geometry
        dev = tiling.device
        b = torch.arange(g.batch, device=dev).view(-1, 1, 1, 1)
        h = torch.arange(g.q_heads, device=dev).view(1, -1, 1, 1)
        kv_index = tiling.kv_token_index  # (nK, tk)
        kv_flat = kv_index.clamp(min=0).reshape(1, 1, 1, -1)
        kv_ok = (kv_index >= 0).reshape(1, 1, 1, -1)
        q_index = tiling.q_token_index  # (nQ, tq)
        rows_any, rows_full = [], []
        n_kv, tk = kv_index.shape
        tq = q_index.shape[1]
        step = max(1, (1 << 22) // max(1, g.kv_len * tq))
        for start in range(0, tiling.num_q_tiles, step):
            qi = q_index[start : start + step]
            q_flat = qi.clamp(min=0).reshape(1, 1, -1, 1)
            q_ok = (qi >= 0).reshape(1, 1, -1, 1)
            m = self.mask(b, h, q_flat, kv_flat, g)
            m = torch.broadcast_to(m, torch.broadcast_shapes(m.shape, (1, 1, q_flat.shape[2], kv_flat.shape[3])))
            bb, hh = m.shape[0], m.shape[1]
            m5 = m.reshape(bb, hh, qi.shape[0], tq, n_kv, tk)
            ok = (q_ok & kv_ok).reshape(1, 1, qi.shape[0], tq, n_kv, tk)
            rows_any.append((m5 & ok).any(5).any(3))
            rows_full.append((m5 | ~ok).all(5).all(3))
        bb = max(r.shape[0] for r in rows_any)
        hh = max(r.shape[1] for r in rows_any)
        any_ = torch.cat([r.expand(bb, hh, -1, -1) for r in rows_any], 2)
        full = torch.cat([r.expand(bb, hh, -1, -1) for r in rows_full], 2)
        return BlockLayout(any_, full)

    def __repr__(self):
        return f"MaskMod({self.name})"


def as_pattern(pattern: object, name: str = "pattern") -> Pattern:
    """Turn ``None`` (Full), a :class:`Pattern` or a plain mask_mod callable into a Pattern."""
    if pattern is None:
        return Full()
    if isinstance(pattern, Pattern):
        return pattern
    if callable(pattern):
        return MaskMod(pattern)
    raise TypeError(
        f"{name} must be an attnlab Pattern, a mask_mod(b, h, q_idx, kv_idx) callable or None, "
        f"got {type(pattern).__name__}"
    )
