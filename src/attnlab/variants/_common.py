"""Helpers shared by the softmax variants: argument checks, GQA expansion, dense masks, query
chunks run under activation checkpointing, and the size guard of the dense references."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

from ..backends.reference import compute_dtype_for, safe_softmax_lse
from ..geometry import Geometry, check_qkv, check_scale, index_grid
from ..patterns.base import Pattern, as_pattern

__all__ = [
    "DEFAULT_MAX_ELEMENTS", "check_positive_int", "check_qkv", "check_scale", "compute_dtype_for",
    "safe_softmax_lse", "flat", "expand_heads", "static_pattern", "dense_mask", "size_guard",
    "row_chunks", "maybe_checkpoint", "check_param", "unflat",
]

DEFAULT_MAX_ELEMENTS = 1 << 27


def check_positive_int(name: str, value: object) -> int:
    """``value`` if it is an int >= 1 (not a bool), else TypeError/ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {name}={value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")
    return value


def flat(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, *T, E)`` -> ``(B, H, prod(T), E)`` (row-major token order)."""
    return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])


def unflat(x: torch.Tensor, g: Geometry) -> torch.Tensor:
    """``(B, H, L, E)`` -> ``(B, H, *q_shape, E)``."""
    return x.reshape(x.shape[0], x.shape[1], *g.q_shape, x.shape[-1])


def expand_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """Repeat each key/value head ``group`` times (GQA -> one head per query head)."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def static_pattern(pattern: object, g: Geometry) -> Pattern:
    """``pattern`` as a validated :class:`~attnlab.Pattern` (None -> Full)."""
    p = as_pattern(pattern)
    p.validate(g)
    return p


def dense_mask(pattern: Pattern, g: Geometry) -> torch.Tensor:
    """The pattern's mask over all flat token pairs, broadcastable to ``(B, Hq, L, S)``."""
    return pattern.mask(*index_grid(g), g)


def size_guard(what: str, n: int, limit: int, detail: str) -> None:
    """Refuse to materialise more than ``limit`` elements, naming the size and the limit."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"max_elements must be a positive int, got max_elements={limit!r}")
    if n > limit:
        raise ValueError(
            f"{what} would materialise {detail} = {n} elements, above its guard "
            f"max_elements={limit}; use the fast path or raise max_elements"
        )


def row_chunks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive chunks of ``chunk`` rows covering ``range(n)``."""
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def maybe_checkpoint(fn: Callable, *args):
    """``fn(*args)``, under non-reentrant activation checkpointing when autograd records:
    only the chunk's inputs are kept and the chunk is recomputed in backward, so a loop
    over query chunks holds one chunk's intermediates at a time."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def check_param(name: str, x: object, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A floating tensor of exactly ``shape`` on ``like``'s device, cast to ``like``'s dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {name}.dtype={x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {name}.shape={tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but q is on {like.device}")
    return x.to(like.dtype)
