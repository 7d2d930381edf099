"""Which key/value shards each rank needs, and the steps of the ring that move them.

The visibility of one chunk of queries to one chunk of keys is read from the pattern's block
layout on a tiling whose tiles are the chunks (analytic for structured patterns: O(chunks^2),
never O(L * S)); a plain mask_mod is assumed to see every chunk. Every rank computes the same
schedule from the same arguments, so sends and receives always match and a shard nobody
needs is never sent nor waited for.

Step ``s`` of the ring moves shards ``s`` ranks forward: rank ``r`` receives the shard of rank
``(r - s) mod W`` and sends its own to ``(r + s) mod W``, directly from the owner, so a skipped
shard costs nothing anywhere. When every shard is needed this moves exactly what a ring that
forwards shards neighbour to neighbour moves (``W - 1`` shards per rank); steps that no rank
needs are left out, so a sliding window over many ranks only talks to neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..geometry import Geometry
from ..patterns.base import Pattern
from ..patterns.layout import Tiling
from .local_pattern import contains_mask_mod
from .sharding import num_chunks, rank_chunks


def chunk_visibility(pattern: Pattern, geometry: Geometry, world_size: int, layout: str,
                     q_chunk: int, kv_chunk: int) -> torch.Tensor:
    """``(m, m)`` bool on the CPU: may query chunk ``a`` see key chunk ``b`` (``m`` chunks of
    ``q_chunk`` / ``kv_chunk`` tokens; chunks wholly past the true lengths see nothing)."""
    m = num_chunks(world_size, layout)
    if contains_mask_mod(pattern):
        vis = torch.zeros(m, m, dtype=torch.bool)
        nq = -(-geometry.q_len // q_chunk)
        nk = -(-geometry.kv_len // kv_chunk)
        vis[:nq, :nk] = True
        return vis
    tiling = Tiling(geometry, (q_chunk,), (kv_chunk,))
    any_ = pattern.block_layout(tiling).any.detach().to("cpu")
    any_ = any_.reshape(-1, tiling.num_q_tiles, tiling.num_kv_tiles).any(0)
    vis = torch.zeros(m, m, dtype=torch.bool)
    vis[: any_.shape[0], : any_.shape[1]] = any_
    return vis


@dataclass(frozen=True)
class RingSchedule:
    """The ring of one call: ``vis`` from :func:`chunk_visibility`, ``world_size``, ``layout``."""

    vis: torch.Tensor
    world_size: int
    layout: str

    @cached_property
    def needs(self) -> list[list[list[tuple[int, int]]]]:
        """``needs[r][j]``: the (local query chunk, local key chunk) pairs rank ``r`` computes
        with the shard of rank ``j`` (empty: rank ``r`` does not need that shard)."""
        W = self.world_size
        out = []
        for r in range(W):
            row = []
            for j in range(W):
                pairs = [
                    (ia, ib)
                    for ia, a in enumerate(rank_chunks(r, W, self.layout))
                    for ib, b in enumerate(rank_chunks(j, W, self.layout))
                    if bool(self.vis[a, b])
                ]
                row.append(pairs)
            out.append(row)
        return out

    @cached_property
    def steps(self) -> tuple[int, ...]:
        """The shifts ``s`` (0 = a rank's own shard) that at least one rank needs, ascending."""
        W = self.world_size
        return tuple(s for s in range(W) if any(self.needs[r][(r - s) % W] for r in range(W)))

    def source(self, rank: int, step: int) -> int | None:
        """The rank whose shard ``rank`` works on at ``step``, or None if it needs none."""
        j = (rank - step) % self.world_size
        return j if self.needs[rank][j] else None

    def destination(self, rank: int, step: int) -> int | None:
        """The rank that ``rank`` sends its own shard to at ``step`` (None: nobody needs it)."""
        d = (rank + step) % self.world_size
        return d if step and self.needs[d][rank] else None

    def shards_sent(self, rank: int) -> int:
        return sum(self.destination(rank, s) is not None for s in self.steps)

    def shards_received(self, rank: int) -> int:
        return sum(s != 0 and self.source(rank, s) is not None for s in self.steps)

    def pairs_computed(self, rank: int) -> int:
        return sum(len(p) for p in self.needs[rank])

    def fingerprint(self) -> int:
        """An integer equal on ranks that hold the same visibility (checked across ranks)."""
        flat = self.vis.reshape(-1).to(torch.int64)
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.int64) * 1_000_003 % 998_244_353
        return int((flat * weights).sum()) * 64 + flat.numel() % 64


__all__ = ["RingSchedule", "chunk_visibility"]
