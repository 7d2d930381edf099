"""Point-to-point transfers of one ring step, posted ahead of the compute that hides them,
and the counters a call can report."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._group import GroupInfo, wait

KV, GRAD = 0, 1  # message kinds: a key/value shard, a key/value gradient partial


@dataclass
class CommStats:
    """What a rank sent, received and waited for. Pass one as ``stats=`` to accumulate over calls.

    ``wait_seconds`` is the time blocked on transfers that compute did not hide;
    ``compute_seconds`` the time spent computing attention between them.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    wait_seconds: float = 0.0
    compute_seconds: float = 0.0
    steps: int = 0
    pairs_computed: int = 0
    calls: int = 0

    def merge(self, other: "CommStats") -> None:
        for name in ("bytes_sent", "bytes_received", "messages_sent", "messages_received",
                     "wait_seconds", "compute_seconds", "steps", "pairs_computed", "calls"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Pending:
    """The posted operations of one transfer batch and the buffers being received into."""

    def __init__(self, works, buffers: list[torch.Tensor], what: str, sent=()) -> None:
        self.works, self.buffers, self.what = works, buffers, what
        self.sent = sent  # kept alive until the sends complete

    def finish(self, info: GroupInfo, stats: CommStats | None) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        for w in self.works:
            wait(w, info, self.what)
        if stats is not None:
            stats.wait_seconds += time.perf_counter() - t0
        self.works, self.sent = [], ()
        return self.buffers


def post(
    info: GroupInfo,
    sends: list[tuple[list[torch.Tensor], int]],
    recvs: list[tuple[list[torch.Tensor], int]],
    kind: int,
    step: int,
    stats: CommStats | None,
    what: str,
) -> Pending:
    """Post ``isend`` of each tensor list to its group rank and ``irecv`` into each buffer list
    from its group rank, in one ``batch_isend_irecv``. Every rank posts a message with the
    same (kind, step) at the same point of its loop, so peers match even where tags are
    ignored (NCCL)."""
    ops = []
    tag = step * 2 + kind
    for tensors, peer in sends:
        for t in tensors:
            ops.append(dist.P2POp(dist.isend, t, info.global_rank(peer), info.group, tag))
            if stats is not None:
                stats.bytes_sent += _nbytes(t)
                stats.messages_sent += 1
    buffers = []
    for tensors, peer in recvs:
        for t in tensors:
            ops.append(dist.P2POp(dist.irecv, t, info.global_rank(peer), info.group, tag))
            buffers.append(t)
            if stats is not None:
                stats.bytes_received += _nbytes(t)
                stats.messages_received += 1
    works = dist.batch_isend_irecv(ops) if ops else []
    return Pending(works, buffers, what, sent=sends)


class Timer:
    """Adds the wall time of a ``with`` block to ``stats.compute_seconds`` (synchronising
    CUDA first so that the time is the kernels', not their launch)."""

    def __init__(self, stats: CommStats | None, device: torch.device) -> None:
        self.stats, self.cuda = stats, device.type == "cuda"

    def __enter__(self):
        if self.stats is not None:
            if self.cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.stats is not None:
            if self.cuda:
                torch.cuda.synchronize()
            self.stats.compute_seconds += time.perf_counter() - self.t0
        return False


__all__ = ["CommStats", "post", "Pending", "Timer", "KV", "GRAD"]
