"""A static pattern that lists, per query, the keys it sees: what per-query selections return."""

from __future__ import annotations

import torch

from .._checks import check_int
from ..geometry import Geometry
from .base import Pattern
from .layout import BlockLayout, Tiling


class KeySet(Pattern):
    """Query ``i`` (flat index) sees exactly the keys ``indices[b, h, i, :]``; ``-1`` entries are
    unused slots, so rows may list different numbers of keys (or none). With ``block > 1`` the
    entries are key *blocks*: query ``i`` sees key ``j`` iff ``j // block`` is listed.

    ``indices`` is an integer tensor ``(Bb, Hb, L, n)`` with ``Bb`` in ``{1, B}`` and ``Hb`` in
    ``{1, Hq}``, each row's keys distinct. The mask is a membership test by binary search in the
    sorted rows (``O(log(L n))`` per pair, no ``L x S`` table); the block layout marks every
    tile pair that holds a listed (query, key) pair, in ``O(L n)``. Tiles are never reported
    fully visible, so the mask decides inside every touched tile.
    """

    def __init__(self, indices: torch.Tensor, block: int = 1):
        if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64):
            got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise TypeError(f"indices must be an int32/int64 tensor, got {got}")
        if indices.ndim != 4:
            raise ValueError(f"indices must have shape (B or 1, H or 1, L, n), got "
                             f"indices.shape={tuple(indices.shape)}")
        self.indices = indices.long()
        self.block = check_int("block", block, 1)
        self._sorted: dict[int, torch.Tensor] = {}

    def validate(self, geometry: Geometry) -> None:
        super().validate(geometry)
        Bb, Hb, L, _ = self.indices.shape
        if L != geometry.q_len or Bb not in (1, geometry.batch) or Hb not in (1, geometry.q_heads):
            raise ValueError(
                f"indices must have shape (1 or B={geometry.batch}, 1 or Hq={geometry.q_heads}, "
                f"L={geometry.q_len}, n), got indices.shape={tuple(self.indices.shape)}")
        n_keys = -(-geometry.kv_len // self.block)
        if self.indices.numel() and int(self.indices.max()) >= n_keys:
            what = "S" if self.block == 1 else f"ceil(S / block) (S={geometry.kv_len}, block={self.block})"
            raise ValueError(f"indices must be < {what} = {n_keys}, got max {int(self.indices.max())}")

    def _flat_sorted(self, kv_len: int, device: torch.device) -> torch.Tensor:
        """All rows concatenated, row ``r`` holding ``r * (S + 1) + key`` (unused slots become
        the sentinel key ``S``), so one sorted 1-D tensor serves every membership test."""
        if kv_len not in self._sorted:
            idx = self.indices.to(device)
            idx = torch.where(idx < 0, torch.full_like(idx, kv_len), idx).sort(-1).values
            rows = torch.arange(idx.shape[0] * idx.shape[1] * idx.shape[2], device=device)
            self._sorted[kv_len] = (idx.reshape(rows.numel(), -1) + rows[:, None] * (kv_len + 1)).reshape(-1)
        return self._sorted[kv_len]

    def mask(self, b, h, q_idx, kv_idx, geometry):
        S = -(-geometry.kv_len // self.block)
        kv_idx = kv_idx // self.block if self.block > 1 else kv_idx
        flat = self._flat_sorted(S, q_idx.device)
        Bb, Hb, L, _ = self.indices.shape
        bb = b if Bb > 1 else torch.zeros_like(b)
        hh = h if Hb > 1 else torch.zeros_like(h)
        row = (bb * Hb + hh) * L + q_idx
        value = row * (S + 1) + kv_idx
        if flat.numel() == 0:
            return torch.zeros(value.shape, dtype=torch.bool, device=value.device)
        pos = torch.searchsorted(flat, value.reshape(-1)).clamp(max=flat.numel() - 1)
        return (flat[pos] == value.reshape(-1)).reshape(value.shape)

    def block_layout(self, tiling: Tiling) -> BlockLayout:
        dev = tiling.device
        g = tiling.geometry
        q_tile_of = _tile_of(tiling.q_token_index, g.q_len)
        kv_tile_of = _tile_of(tiling.kv_token_index, g.kv_len)
        idx = self.indices.to(dev)
        Bb, Hb, L, n = idx.shape
        nq, nk = tiling.num_q_tiles, tiling.num_kv_tiles
        if self.block > 1:  # every key tile that holds a key of a listed block
            step = tiling.kv_tile[-1] if g.ndim == 1 else 1
            offsets = torch.tensor(sorted({*range(0, self.block, step), self.block - 1}), device=dev)
            keys = (idx.clamp(min=0)[..., None] * self.block + offsets).clamp(max=g.kv_len - 1)
            idx = torch.where(idx[..., None] >= 0, keys, -1).reshape(Bb, Hb, L, -1)
        used = idx >= 0
        cell = q_tile_of.view(1, 1, L, 1) * nk + kv_tile_of[idx.clamp(min=0)]
        cell = cell + (torch.arange(Bb * Hb, device=dev).view(Bb, Hb, 1, 1) * (nq * nk))
        any_ = torch.zeros(Bb * Hb * nq * nk, dtype=torch.bool, device=dev)
        any_[cell[used]] = True
        any_ = any_.view(Bb, Hb, nq, nk)
        return BlockLayout(any_, torch.zeros_like(any_))

    def may_have_empty_rows(self, geometry):
        return bool((self.indices < 0).all(-1).any())

    def __repr__(self):
        used = (self.indices >= 0).sum(-1).float()
        mean = used.mean().item() if used.numel() else 0.0
        what = "keys" if self.block == 1 else f"blocks of {self.block}"
        return f"KeySet(shape={tuple(self.indices.shape)}, {what} per query={mean:.1f})"


def _tile_of(token_index: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """``(n_tokens,)``: the tile holding each flat token, from a tiling's token index."""
    out = torch.empty(n_tokens, dtype=torch.long, device=token_index.device)
    tiles = torch.arange(token_index.shape[0], device=token_index.device)[:, None].expand_as(token_index)
    ok = token_index >= 0
    out[token_index[ok]] = tiles[ok]
    return out
