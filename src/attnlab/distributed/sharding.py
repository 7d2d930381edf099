"""How a sequence is cut into per-rank shards, and helpers to shard and unshard tensors.

The sequence (padded, if asked, to a multiple of the number of chunks) is cut into equal
chunks:

- ``"contiguous"``: ``W`` chunks, rank ``r`` holds chunk ``r``;
- ``"zigzag"``: ``2W`` chunks, rank ``r`` holds chunks ``r`` and ``2W - 1 - r`` (one early,
  one late), concatenated in that order. Under a causal mask every rank then does the same
  work, where contiguous shards leave rank ``W - 1`` with about ``2W - 1`` times the work of
  rank 0.

The local tensor of a rank is its chunks concatenated along the token axis; every function
that needs global positions derives them from ``(rank, world_size, layout)`` with
:func:`chunk_ranges`.
"""

from __future__ import annotations

import torch

from .._checks import check_bool, check_int

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: object) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}, expected one of {LAYOUTS}")
    return layout  # type: ignore[return-value]


def num_chunks(world_size: int, layout: str) -> int:
    """How many equal chunks the sequence is cut into: ``W`` or ``2W``."""
    return world_size * (2 if check_layout(layout) == "zigzag" else 1)


def rank_chunks(rank: int, world_size: int, layout: str) -> tuple[int, ...]:
    """The global chunk numbers rank ``rank`` holds, in the order of its local tensor."""
    if check_layout(layout) == "zigzag":
        return (rank, 2 * world_size - 1 - rank)
    return (rank,)


def chunk_owner(chunk: int, world_size: int, layout: str) -> int:
    if check_layout(layout) == "zigzag":
        return chunk if chunk < world_size else 2 * world_size - 1 - chunk
    return chunk


def chunk_ranges(rank: int, world_size: int, layout: str, local_len: int) -> list[tuple[int, int]]:
    """``[(global_start, local_start), ...]`` of rank ``rank``'s chunks, each
    ``local_len // len(chunks)`` tokens long."""
    chunks = rank_chunks(rank, world_size, layout)
    c = local_len // len(chunks)
    return [(ch * c, i * c) for i, ch in enumerate(chunks)]


def padded_length(length: int, world_size: int, layout: str) -> int:
    """The smallest multiple of the number of chunks that is ``>= length``."""
    m = num_chunks(world_size, layout)
    return -(-length // m) * m


def _check_divisible(length: int, world_size: int, layout: str, name: str) -> None:
    m = num_chunks(world_size, layout)
    if length % m:
        raise ValueError(
            f"{name}={length} is not divisible by {m} (world_size={world_size}, layout={layout!r} "
            f"cuts the sequence into {m} equal chunks); pass pad=True to shard() to pad it to "
            f"{padded_length(length, world_size, layout)} tokens (padding never changes the "
            "results), or choose a length that divides"
        )


def _check_dim(x: object, dim: object, name: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim={dim!r} is not an axis of {name}.shape={tuple(x.shape)}")
    return dim % x.ndim


def shard(
    x: torch.Tensor,
    *,
    layout: str = "contiguous",
    dim: int = 2,
    pad: bool = False,
    group: object = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> torch.Tensor:
    """Rank ``rank``'s shard of the whole-sequence tensor ``x`` along ``dim`` (2 for the
    ``(B, H, L, D)`` layout, 1 for ``(B, L, E)`` activations).

    With ``pad=True`` a length that does not divide into the chunks is zero-padded at the end
    first; pass the true length as ``seq_len`` to :func:`attnlab.distributed.ring_attention`
    (padded positions are then invisible and return 0) and to :func:`unshard`. Otherwise such
    a length raises ``ValueError``. ``rank`` and ``world_size`` default to this process's in
    ``group`` (None: the default group); given both, no process group is needed.
    """
    dim = _check_dim(x, dim, "x")
    if rank is None or world_size is None:
        from ._group import resolve_group

        info = resolve_group(group, None, "shard")
        rank = info.rank if rank is None else rank
        world_size = info.world_size if world_size is None else world_size
    check_int("world_size", world_size, 1)
    check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank={rank} must be < world_size={world_size}")
    check_bool("pad", pad)
    length = x.shape[dim]
    if pad:
        extra = padded_length(length, world_size, layout) - length
        if extra:
            shape = list(x.shape)
            shape[dim] = extra
            x = torch.cat([x, x.new_zeros(shape)], dim)
    else:
        _check_divisible(length, world_size, layout, f"x.shape[{dim}]")
    c = x.shape[dim] // num_chunks(world_size, layout)
    parts = [x.narrow(dim, ch * c, c) for ch in rank_chunks(rank, world_size, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def gather_order(world_size: int, layout: str) -> list[tuple[int, int]]:
    """For each global chunk in order, ``(rank, position among that rank's chunks)``."""
    out = []
    for ch in range(num_chunks(world_size, layout)):
        owner = chunk_owner(ch, world_size, layout)
        out.append((owner, rank_chunks(owner, world_size, layout).index(ch)))
    return out


def assemble(shards: list[torch.Tensor], layout: str, dim: int = 2, seq_len: int | None = None):
    """The whole-sequence tensor from every rank's shard (in rank order); the inverse of
    :func:`shard`. ``seq_len`` drops the padding at the end."""
    world_size = len(shards)
    dim = _check_dim(shards[0], dim, "shards[0]")
    per = len(rank_chunks(0, world_size, layout))
    pieces = [s.chunk(per, dim) for s in shards]
    out = torch.cat([pieces[r][i] for r, i in gather_order(world_size, layout)], dim)
    if seq_len is not None:
        check_int("seq_len", seq_len, 1)
        if seq_len > out.shape[dim]:
            raise ValueError(f"seq_len={seq_len} exceeds the gathered length {out.shape[dim]}")
        out = out.narrow(dim, 0, seq_len)
    return out


__all__ = ["LAYOUTS", "shard", "assemble", "chunk_ranges", "rank_chunks", "num_chunks", "padded_length"]
