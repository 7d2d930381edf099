"""Differentiable all-gathers with bounded waits: :func:`unshard`, and the gather of the
small per-rank states of :func:`attnlab.distributed.ring_linear_attention`."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ._group import GroupInfo, resolve_group, wait
from .sharding import assemble, check_layout


class _AllGather(torch.autograd.Function):
    """``(W, *x.shape)``: every rank's ``x``. Backward: the gradient of this rank's slot
    summed over all ranks (each rank's result may feed its own loss)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, info: GroupInfo, what: str):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(info.world_size)]
        wait(dist.all_gather(parts, x, group=info.group, async_op=True), info, what)
        ctx.info, ctx.what = info, what
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        info = ctx.info
        wait(dist.all_reduce(grad, group=info.group, async_op=True), info, f"gradients of {ctx.what}")
        return grad[info.rank], None, None


def all_gather_stack(x: torch.Tensor, info: GroupInfo, what: str) -> torch.Tensor:
    return _AllGather.apply(x, info, what)


def unshard(
    x: torch.Tensor,
    *,
    layout: str = "contiguous",
    dim: int = 2,
    seq_len: int | None = None,
    group: Any = None,
    timeout: Any = None,
) -> torch.Tensor:
    """The whole-sequence tensor from every rank's shard ``x`` (the inverse of
    :func:`attnlab.distributed.shard`), on every rank; ``seq_len`` drops end padding.

    Differentiable: the gradient reaching a shard is the sum over ranks of the gradients of
    its part of their gathered copies. Every rank must pass shards of one shape.
    """
    layout = check_layout(layout)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    info = resolve_group(group, timeout, "unshard")
    stacked = all_gather_stack(x, info, "the other ranks' shards in unshard")
    return assemble(list(stacked.unbind(0)), layout, dim, seq_len)


__all__ = ["unshard", "all_gather_stack"]
