"""T5 relative position bias: a learned scalar per (distance bucket, head).

Reference: "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (Raffel et al., 2020).

Query head ``h`` adds to its logit for (query ``i``, key ``j``)::

    logits[b, h, i, j] += table[bucket(j - (i + S - L)), h]

with bottom-right alignment (``S - L = geometry.causal_offset``) and T5's bucketing
(:func:`relative_position_bucket`). Distances are between *flat* (row-major) token indices.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..geometry import Geometry
from .base import ScoreContext, ScoreMod, init_table_
from .._checks import check_int as _check_int




def _check_bucket_args(bidirectional: bool, num_buckets: int, max_distance: int) -> None:
    if not isinstance(bidirectional, bool):
        raise TypeError(f"bidirectional must be a bool, got {type(bidirectional).__name__}")
    _check_int("num_buckets", num_buckets, 4 if bidirectional else 2)
    if bidirectional and num_buckets % 2:
        raise ValueError(
            f"num_buckets must be even when bidirectional=True (half per direction), got "
            f"num_buckets={num_buckets}"
        )
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    _check_int("max_distance", max_distance, 1)
    if max_distance <= max_exact:
        raise ValueError(
            f"max_distance must exceed the number of exact buckets per direction ({max_exact}), "
            f"got max_distance={max_distance}"
        )


def relative_position_bucket(
    relative_position: torch.Tensor,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> torch.Tensor:
    """T5's bucket (int64, in ``[0, num_buckets)``) of ``relative_position = j - i``.

    With ``bidirectional``, half of the buckets are for ``j - i <= 0`` and half (offset by
    ``num_buckets // 2``) for ``j - i > 0``, on ``n = |j - i|``; otherwise all buckets are
    for ``n = max(i - j, 0)`` (keys after the query share bucket 0). With ``N`` buckets per
    direction and ``E = N // 2``: ``n < E`` has its own bucket ``n``; larger ``n`` goes to
    ``min(E + floor(log(n / E) / log(max_distance / E) * (N - E)), N - 1)``: log-spaced up
    to ``max_distance``, one bucket beyond. The logarithm is taken in float32, as in the
    original implementation, so pretrained T5 tables see the same buckets.
    """
    if not isinstance(relative_position, torch.Tensor) or relative_position.is_floating_point():
        raise TypeError(
            "relative_position must be an integer tensor, got "
            f"{getattr(relative_position, 'dtype', type(relative_position).__name__)}"
        )
    _check_bucket_args(bidirectional, num_buckets, max_distance)
    rel = relative_position.long()
    if bidirectional:
        num_buckets //= 2
        offset = (rel > 0).long() * num_buckets
        n = rel.abs()
    else:
        offset = torch.zeros_like(rel)
        n = (-rel).clamp(min=0)
    max_exact = num_buckets // 2
    # clamp below at max_exact: same value where it is used, and no log(0)
    ratio = n.clamp(min=max_exact).float() / max_exact
    large = max_exact + (
        torch.log(ratio) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return offset + torch.where(n < max_exact, n, large)


class RelativeBias(ScoreMod):
    """T5 relative position bias: ``logits += table[bucket(j - (i + S - L)), h]``.

    Args:
        num_heads: number of query heads ``Hq``.
        num_buckets: number of distance buckets (T5: 32).
        max_distance: distance beyond which all distances share the last bucket (T5: 128).
        bidirectional: separate buckets for keys before and after the query (T5's encoder);
            ``False`` for causal use (T5's decoder).
        init_std: the table ``nn.Parameter`` of shape ``(num_buckets, num_heads)`` is
            initialised from ``normal(0, init_std)`` (``0.0`` gives zeros: plain attention
            at initialisation).

    See "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
    Transformer" (2020) and :func:`relative_position_bucket`.
    """

    def __init__(
        self,
        num_heads: int,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.num_heads = _check_int("num_heads", num_heads, 1)
        _check_bucket_args(bidirectional, num_buckets, max_distance)
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)):
            raise TypeError(f"init_std must be a float, got {type(init_std).__name__}")
        if not (math.isfinite(init_std) and init_std >= 0):
            raise ValueError(f"init_std must be finite and >= 0, got init_std={init_std}")
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.init_std = float(init_std)
        self.table = nn.Parameter(torch.empty(num_buckets, num_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw the table from ``normal(0, init_std)`` (zeros when ``init_std == 0``)."""
        init_table_(self.table, self.init_std)

    def validate(self, geometry: Geometry) -> None:
        if self.num_heads != geometry.q_heads:
            raise ValueError(
                f"RelativeBias was built with num_heads={self.num_heads} but the query has "
                f"{geometry.q_heads} heads; num_heads must equal the number of query heads"
            )

    def modify(self, score: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        rel = ctx.kv_idx - (ctx.q_idx + ctx.geometry.causal_offset)
        bucket = relative_position_bucket(
            rel, self.bidirectional, self.num_buckets, self.max_distance
        )
        bias = self.table[bucket, ctx.h]
        return score + bias.to(score.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_buckets={self.num_buckets}, "
            f"max_distance={self.max_distance}, bidirectional={self.bidirectional}"
        )
