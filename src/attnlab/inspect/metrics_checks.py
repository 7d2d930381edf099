"""Argument checks shared by the attention metrics (:mod:`attnlab.inspect.metrics`).

A *map* is a tensor of attention probabilities ``(..., H, L, S)``: ``H`` heads, ``L``
queries, ``S`` keys, every row a probability distribution over the keys (sums to 1), or all
zeros for a query that sees no key (attnlab's convention for empty rows). A *summary* is the
dict a summarised :class:`attnlab.inspect.AttentionRecord` holds (``entropy``, ``distance``,
``max_prob``, ``visible_keys`` ``(B, H, L)``; ``key_mass`` ``(B, H, S)``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["check_probs", "check_query_mask", "check_summary", "row_weights", "query_mean", "is_summary"]

_ROW_ATOL = {torch.float64: 1e-6, torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype})"
    return type(x).__name__


def check_probs(probs: object, name: str = "probs", *, min_dims: int = 3) -> torch.Tensor:
    """``probs`` as a floating tensor ``(..., H, L, S)`` whose rows sum to 1 or 0, else
    ``TypeError`` (not a floating tensor) or ``ValueError`` (rank, NaN, negative entries or
    rows that are neither distributions nor empty; the tolerance is 1e-6 in float64, 1e-3 in
    float32). Returns ``probs`` unchanged."""
    if not isinstance(probs, torch.Tensor):
        raise TypeError(f"{name}={_describe(probs)}, expected a torch.Tensor of probabilities (..., H, L, S)")
    if not probs.is_floating_point():
        raise TypeError(f"{name}.dtype={probs.dtype}, expected a floating dtype (probabilities)")
    if probs.ndim < min_dims:
        raise ValueError(f"{name} has shape {tuple(probs.shape)} (rank {probs.ndim}), expected rank >= "
                         f"{min_dims}: (..., H, L, S) probabilities")
    if probs.numel() == 0:
        return probs
    if bool(torch.isnan(probs).any()):
        raise ValueError(f"{name} contains NaN, expected probabilities")
    atol = _ROW_ATOL.get(probs.dtype, 1e-3)
    low = float(probs.min())
    if low < -atol:
        raise ValueError(f"{name} has a negative entry {low:.3g}, expected probabilities >= 0")
    sums = probs.sum(-1)
    bad = ((sums - 1).abs() > atol * max(1, probs.shape[-1] ** 0.5)) & (sums.abs() > atol)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} row {idx} sums to {float(sums[idx]):.6g}, expected every row (last axis) to "
                         "sum to 1 (or 0 for a query that sees no key)")
    return probs


def check_query_mask(query_mask: object, batch_shape: torch.Size, name: str = "query_mask") -> torch.Tensor | None:
    """``query_mask`` (None, or bool broadcastable to ``batch_shape`` = ``(..., H, L)``) as a
    bool tensor of that shape, else ``TypeError`` / ``ValueError``."""
    if query_mask is None:
        return None
    if not isinstance(query_mask, torch.Tensor) or query_mask.dtype != torch.bool:
        raise TypeError(f"{name}={_describe(query_mask)}, expected None or a bool tensor broadcastable to "
                        f"{tuple(batch_shape)} (..., H, L): True for the queries to average over")
    try:
        return torch.broadcast_to(query_mask, batch_shape)
    except RuntimeError:
        raise ValueError(f"{name} has shape {tuple(query_mask.shape)}, expected a shape broadcastable to "
                         f"{tuple(batch_shape)} (..., H, L)") from None


def row_weights(row_mass: torch.Tensor, query_mask: torch.Tensor | None) -> torch.Tensor:
    """``(..., H, L)`` weights of the queries in a per-head mean: 1 for a query that sees a key
    (``row_mass > 0.5``) and is selected by ``query_mask``, else 0."""
    w = (row_mass > 0.5).to(row_mass.dtype)
    return w if query_mask is None else w * query_mask.to(w.dtype)


def query_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over the last axis ``(..., H, L) -> (..., H)``; 0 where no query counts."""
    n = weights.sum(-1)
    return (values * weights).sum(-1) / n.clamp_min(1)


def is_summary(x: object) -> bool:
    """Whether ``x`` is a summary dict (module docstring) rather than a map."""
    return isinstance(x, Mapping)


def check_summary(summary: Mapping, keys: tuple[str, ...], name: str = "summary") -> None:
    """``ValueError`` unless ``summary`` has tensors under every name in ``keys``."""
    missing = [k for k in keys if not isinstance(summary.get(k), torch.Tensor)]
    if missing:
        raise ValueError(f"{name} lacks {missing} (has {sorted(summary)}), expected the summary dict of a "
                         "summarised AttentionRecord")
