"""Packed sequences (document masking) and prefix-LM attention.

Document masking confines attention to tokens of the same packed sequence (as in
FlexAttention's document mask); PrefixLM is the bidirectional-prefix, causal-suffix mask of
encoder-decoder-style language models trained as one decoder.
"""

from __future__ import annotations

import torch

from ..geometry import Geometry
from .base import Pattern
from .layout import BlockLayout, Tiling
from .._checks import check_int


def _is_int_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _check_ids(name: str, ids: object) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(ids).__name__}")
    if not _is_int_dtype(ids.dtype):
        raise TypeError(f"{name} must be an integer tensor, got {name}.dtype={ids.dtype}")
    if ids.ndim not in (1, 2):
        raise ValueError(
            f"{name} must have shape (L,) or (B, L), got {name}.shape={tuple(ids.shape)}"
        )
    ids = ids.detach().to(torch.int64)
    return ids[0] if ids.ndim == 2 and ids.shape[0] == 1 else ids


def _tile_min_max(ids: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile min and max id over its real tokens: (..., num_tiles) each."""
    valid = index >= 0
    vals = ids[..., index.clamp(min=0)]  # (..., n_tiles, tile_size)
    big = torch.iinfo(torch.int64).max
    lo = torch.where(valid, vals, torch.full_like(vals, big)).amin(-1)
    hi = torch.where(valid, vals, torch.full_like(vals, -big)).amax(-1)
    return lo, hi


def _as_layout(t: torch.Tensor) -> torch.Tensor:
    """(nQ, nK) -> (1, 1, nQ, nK); (B, nQ, nK) -> (B, 1, nQ, nK)."""
    return t[None, None] if t.ndim == 2 else t[:, None]


class Document(Pattern):
    """Query ``i`` sees key ``j`` iff ``ids[b, i] == kv_ids[b, j]`` (same packed sequence).

    ``ids`` is an integer tensor of shape ``(L,)`` or ``(B, L)`` over flat query indices;
    ``kv_ids`` likewise ``(S,)`` or ``(B, S)`` for keys and defaults to ``ids`` (it must be
    given when ``L != S``). A leading batch size of 1 broadcasts. Tensors move to the
    problem's device lazily (cached per device). The mask depends on ``b`` only when one
    of the id tensors has a batch axis.

    Block layout, from the smallest and largest id of each tile: ``any`` iff the id ranges
    of the two tiles overlap, ``full`` iff both tiles hold one single, equal id. For
    non-decreasing ids (the usual packing), self-attention and 1-D tiles this is exact.
    """

    def __init__(self, ids: torch.Tensor, kv_ids: torch.Tensor | None = None) -> None:
        self.ids = _check_ids("ids", ids)
        self.kv_ids = None if kv_ids is None else _check_ids("kv_ids", kv_ids)
        if self.kv_ids is not None and self.ids.ndim == 2 and self.kv_ids.ndim == 2:
            if self.ids.shape[0] != self.kv_ids.shape[0]:
                raise ValueError(
                    f"ids and kv_ids must have the same batch size: got "
                    f"ids.shape={tuple(self.ids.shape)}, kv_ids.shape={tuple(self.kv_ids.shape)}"
                )
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._cache:
            q = self.ids.to(device)
            kv = q if self.kv_ids is None else self.kv_ids.to(device)
            self._cache[device] = (q, kv)
        return self._cache[device]

    def validate(self, geometry: Geometry) -> None:
        super().validate(geometry)
        L, S, B = geometry.q_len, geometry.kv_len, geometry.batch
        if self.kv_ids is None and L != S:
            raise ValueError(
                f"kv_ids must be given when the query and key lengths differ: got kv_ids=None "
                f"with L={L}, S={S}; pass kv_ids of shape ({S},) or ({B}, {S})"
            )
        for name, t, n in (("ids", self.ids, L), ("kv_ids", self.kv_ids, S)):
            if t is None:
                continue
            ok = t.shape[-1] == n and (t.ndim == 1 or t.shape[0] == B)
            if not ok:
                raise ValueError(
                    f"{name} must have shape ({n},) or ({B}, {n}) for this problem "
                    f"(flat length {n}, batch {B}), got {name}.shape={tuple(t.shape)}"
                )

    def mask(
        self,
        b: torch.Tensor,
        h: torch.Tensor,
        q_idx: torch.Tensor,
        kv_idx: torch.Tensor,
        geometry: Geometry,
    ) -> torch.Tensor:
        q_ids, kv_ids = self._on(q_idx.device)
        q = q_ids[b, q_idx] if q_ids.ndim == 2 else q_ids[q_idx]
        k = kv_ids[b, kv_idx] if kv_ids.ndim == 2 else kv_ids[kv_idx]
        return q == k

    def block_layout(self, tiling: Tiling) -> BlockLayout:
        q_ids, kv_ids = self._on(tiling.device)
        q_lo, q_hi = _tile_min_max(q_ids, tiling.q_token_index)
        k_lo, k_hi = _tile_min_max(kv_ids, tiling.kv_token_index)
        q_lo, q_hi = q_lo[..., :, None], q_hi[..., :, None]
        k_lo, k_hi = k_lo[..., None, :], k_hi[..., None, :]
        any_ = (q_lo <= k_hi) & (k_lo <= q_hi)
        full = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
        return BlockLayout(_as_layout(any_), _as_layout(full))

    def may_have_empty_rows(self, geometry: Geometry) -> bool:
        if self.kv_ids is None:
            return False  # every query sees its own position
        q_ids, kv_ids = self._on(torch.device("cpu"))
        batch = max(t.shape[0] if t.ndim == 2 else 1 for t in (q_ids, kv_ids))
        for bi in range(batch):
            q = q_ids[bi] if q_ids.ndim == 2 else q_ids
            k = kv_ids[bi] if kv_ids.ndim == 2 else kv_ids
            if not torch.isin(q, k).all():
                return True
        return False

    def __repr__(self) -> str:
        kv = "" if self.kv_ids is None else f", kv_ids.shape={tuple(self.kv_ids.shape)}"
        return f"Document(ids.shape={tuple(self.ids.shape)}{kv})"


class PrefixLM(Pattern):
    """Query ``i`` sees key ``j`` iff ``j < prefix_len`` or ``j <= i + S - L``: the first
    ``prefix_len`` keys are visible to every query (bidirectional prefix), causal after.

    ``prefix_len`` is an ``int >= 0`` or an integer tensor of shape ``(B,)`` (one prefix per
    batch element; the mask and layout then depend on ``b``). The block layout is exact for
    every tiling (it uses only the tiles' smallest and largest flat indices).
    """

    def __init__(self, prefix_len: int | torch.Tensor) -> None:
        if isinstance(prefix_len, torch.Tensor):
            if not _is_int_dtype(prefix_len.dtype):
                raise TypeError(
                    f"prefix_len must be an int or an integer tensor of shape (B,), got "
                    f"prefix_len.dtype={prefix_len.dtype}"
                )
            if prefix_len.ndim != 1 or prefix_len.numel() == 0:
                raise ValueError(
                    f"prefix_len tensor must have shape (B,), got "
                    f"prefix_len.shape={tuple(prefix_len.shape)}"
                )
            if bool((prefix_len < 0).any()):
                raise ValueError(
                    f"prefix_len must be >= 0, got prefix_len={prefix_len.tolist()!r}"
                )
            self.prefix_len: int | torch.Tensor = prefix_len.detach().to(torch.int64)
        else:
            self.prefix_len = check_int("prefix_len", prefix_len, 0)
        self._cache: dict[torch.device, torch.Tensor] = {}

    def _prefix(self, device: torch.device) -> torch.Tensor | int:
        if isinstance(self.prefix_len, int):
            return self.prefix_len
        if device not in self._cache:
            self._cache[device] = self.prefix_len.to(device)
        return self._cache[device]

    def validate(self, geometry: Geometry) -> None:
        super().validate(geometry)
        p = self.prefix_len
        if isinstance(p, torch.Tensor) and p.shape[0] != geometry.batch:
            raise ValueError(
                f"prefix_len tensor must have shape (B,) = ({geometry.batch},), got "
                f"prefix_len.shape={tuple(p.shape)}"
            )

    def mask(
        self,
        b: torch.Tensor,
        h: torch.Tensor,
        q_idx: torch.Tensor,
        kv_idx: torch.Tensor,
        geometry: Geometry,
    ) -> torch.Tensor:
        p = self._prefix(kv_idx.device)
        limit = p[b] if isinstance(p, torch.Tensor) else p
        return (kv_idx < limit) | (kv_idx <= q_idx + geometry.causal_offset)

    def block_layout(self, tiling: Tiling) -> BlockLayout:
        off = tiling.geometry.causal_offset
        q_lo, q_hi, _ = tiling.q_flat_bounds
        kv_lo, kv_hi, _ = tiling.kv_flat_bounds
        p = self._prefix(tiling.device)
        if isinstance(p, torch.Tensor):
            p = p.view(-1, 1, 1, 1)
        any_ = (kv_lo[None, :] < p) | (kv_lo[None, :] <= q_hi[:, None] + off)
        full = (kv_hi[None, :] < p) | (kv_hi[None, :] <= q_lo[:, None] + off)
        return BlockLayout(any_, full)

    def may_have_empty_rows(self, geometry: Geometry) -> bool:
        if geometry.q_len <= geometry.kv_len:
            return False
        p = self.prefix_len
        return int(p.min()) == 0 if isinstance(p, torch.Tensor) else p == 0

    def __repr__(self) -> str:
        p = self.prefix_len
        return f"PrefixLM(prefix_len={p.tolist() if isinstance(p, torch.Tensor) else p!r})"
