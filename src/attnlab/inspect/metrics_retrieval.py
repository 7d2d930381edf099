"""The retrieval-head score of "Retrieval Head Mechanistically Explains Long-Context
Factuality" (Wu et al., 2024).

A retrieval head copies: while the model reproduces a span of its context (the "needle"),
the head's highest attention at each copy step lands on the context token being copied. The
paper scores head ``h`` as the fraction of the needle's tokens it copies this way. Here a
copy task is described by ``targets (..., L)``: for query ``i``, the key position holding the
token that query ``i`` produces by copying, or -1 when query ``i`` is not a copy step.
:func:`copy_targets` builds ``targets`` for the usual layout (a source span and, later, its
copy, the model predicting the next token).
"""

from __future__ import annotations

import torch

from .metrics_checks import check_probs, query_mean, row_weights

__all__ = ["retrieval_score", "copy_targets"]


def copy_targets(length: int, source: int, copy: int, span: int, *, predict_next: bool = True) -> torch.Tensor:
    """``targets (length,)`` int64 for a sequence whose tokens ``copy .. copy + span - 1``
    repeat the tokens ``source .. source + span - 1``.

    With ``predict_next=True`` (a causal language model) query ``t`` produces token ``t + 1``,
    so the queries ``copy - 1 .. copy + span - 2`` copy from ``source .. source + span - 1``;
    with False query ``t`` itself is the copy of ``source + t - copy``. Every other query is -1.
    """
    for name, value in (("length", length), ("source", source), ("copy", copy), ("span", span)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r}, expected an int >= 0")
    if source + span > copy or copy + span > length or span == 0:
        raise ValueError(f"source={source}, copy={copy}, span={span}, length={length}: expected span >= 1, the "
                         "source before the copy (source + span <= copy) and the copy inside the sequence")
    if predict_next and copy == 0:
        raise ValueError("copy=0 with predict_next=True: no query precedes the first copied token")
    t = torch.full((length,), -1, dtype=torch.int64)
    first = copy - 1 if predict_next else copy
    t[first:first + span] = torch.arange(source, source + span)
    return t


def retrieval_score(probs: torch.Tensor, targets: torch.Tensor, *, top_k: int = 1) -> torch.Tensor:
    """Per-head retrieval score ``(..., H)``: the fraction of copy steps (queries with
    ``targets >= 0``) at which the head's ``top_k`` most-attended keys include the target
    key (``top_k=1``: the paper's arg-max criterion; ties go to the earlier key).

    Args:
        probs: ``(..., H, L, S)`` attention maps.
        targets: int ``(..., L)`` or ``(L,)`` (broadcast over heads): the key each query
            copies, -1 for queries that are not copy steps (:func:`copy_targets`).
        top_k: how many of the highest-attention keys may hold the target.

    Returns:
        ``(..., H)`` in ``[0, 1]``; 0 for a head with no copy step that sees a key.
    """
    probs = check_probs(probs)
    S = probs.shape[-1]
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets={type(targets).__name__}, expected an int64 tensor (..., L) of key positions "
                        "(-1: not a copy step)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= S:
        raise ValueError(f"top_k={top_k!r}, expected an int in [1, S={S}]")
    if bool((targets >= S).any()) or bool((targets < -1).any()):
        raise ValueError(f"targets holds {int(targets.min())}..{int(targets.max())}, expected key positions in "
                         f"[0, S={S}) or -1")
    t = targets.unsqueeze(-2)  # (..., 1, L): broadcast over heads
    try:
        t = torch.broadcast_to(t, probs.shape[:-1]).to(probs.device)
    except RuntimeError:
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected (..., L) matching probs "
                         f"{tuple(probs.shape)} without the head axis") from None
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices[..., :top_k]
    hit = (order == t.clamp_min(0)[..., None]).any(-1).to(probs.dtype)
    w = row_weights(probs.sum(-1), (t >= 0))
    return query_mean(hit, w)
