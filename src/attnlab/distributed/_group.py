"""The process group a call runs on, bounded waits, and agreement checks across ranks."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


class PeerFailure(RuntimeError):
    """A transfer with another rank failed or timed out: that rank has most likely died, hung,
    or is not making the same call with the same arguments."""


@dataclass(frozen=True)
class GroupInfo:
    group: object
    rank: int
    world_size: int
    backend: str
    timeout: datetime.timedelta | None

    def global_rank(self, group_rank: int) -> int:
        """The default-group rank of ``group_rank`` (what point-to-point operations address)."""
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def comm_device(self, like: torch.device) -> torch.device:
        """Where small control tensors live: the GPU for NCCL, else the CPU."""
        return like if self.backend == "nccl" else torch.device("cpu")


def resolve_group(group: object, timeout: object, who: str) -> GroupInfo:
    """The rank, size and backend of ``group`` (None: the default group), and ``timeout`` (a
    number of seconds, a ``timedelta`` or None) as a ``timedelta``. ``ValueError`` when
    ``torch.distributed`` is not initialised."""
    if not dist.is_available():
        raise ValueError(f"{who} needs torch.distributed, which this PyTorch build lacks")
    if not dist.is_initialized():
        raise ValueError(
            f"{who} needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group('gloo' or 'nccl', ...) first (e.g. under "
            f"torchrun); got group={group!r} with no default group"
        )
    if timeout is None:
        td = None
    elif isinstance(timeout, datetime.timedelta):
        td = timeout
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
        td = datetime.timedelta(seconds=float(timeout))
    else:
        raise ValueError(f"timeout={timeout!r}, expected seconds > 0, a datetime.timedelta or None")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{who}: this process (global rank {dist.get_rank()}) is not in group={group!r}")
    return GroupInfo(group, rank, dist.get_world_size(group), str(dist.get_backend(group)), td)


def wait(work, info: GroupInfo, what: str) -> None:
    """``work.wait`` bounded by the call's timeout (else the process group's); a failure
    becomes :class:`PeerFailure` naming this rank and what it was waiting for."""
    try:
        if info.timeout is None:
            work.wait()
        elif work.wait(info.timeout) is False:
            raise TimeoutError(f"not done after {info.timeout.total_seconds():g} s")
    except Exception as e:  # gloo/NCCL raise RuntimeError subclasses with transport details
        limit = f"{info.timeout.total_seconds():g} s" if info.timeout else "the process-group timeout"
        raise PeerFailure(
            f"rank {info.rank} of {info.world_size} failed while waiting for {what} (bounded by "
            f"{limit}): {type(e).__name__}: {e}. Another rank has most likely failed, hung or "
            "called with different arguments; see its log."
        ) from e


def all_gather_ints(values: list[int], info: GroupInfo, device: torch.device, what: str) -> torch.Tensor:
    """``(world_size, len(values))``: every rank's ``values`` (one bounded collective)."""
    mine = torch.tensor(values, dtype=torch.int64, device=info.comm_device(device))
    out = [torch.empty_like(mine) for _ in range(info.world_size)]
    work = dist.all_gather(out, mine, group=info.group, async_op=True)
    wait(work, info, what)
    return torch.stack(out).cpu()


def check_agree(fields: dict[str, int], info: GroupInfo, device: torch.device, who: str) -> None:
    """``ValueError`` naming the first field in which the ranks differ, with every rank's value."""
    names = list(fields)
    table = all_gather_ints([int(fields[n]) for n in names], info, device,
                            f"the other ranks' arguments to {who}")
    for i, name in enumerate(names):
        col = table[:, i]
        if bool((col != col[0]).any()):
            per_rank = ", ".join(f"rank {r}: {int(v)}" for r, v in enumerate(col))
            raise ValueError(
                f"{who}: {name} must be the same on every rank of the group, got {per_rank}"
            )


__all__ = ["PeerFailure", "GroupInfo", "resolve_group", "wait", "check_agree", "all_gather_ints"]
