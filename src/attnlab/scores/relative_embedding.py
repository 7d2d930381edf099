"""Music Transformer relative attention: learned query-dependent relative embeddings.

References: "Music Transformer: Generating Music with Long-Term Structure" (Huang et al.,
2018), building on "Self-Attention with Relative Position Representations" (Shaw, Uszkoreit
and Vaswani, 2018).

The paper computes ``softmax((Q K^T + S_rel) / sqrt(D))`` with ``S_rel[i, j] = q_i . E_r``,
``r = j - i``. The score given to a score mod is already ``scale * q_i . k_j``, so this mod
adds the scaled relative term::

    logits[b, h, i, j] += scale * q_i . E[clip(j - (i + S - L))]

with ``q_i`` the *unscaled* query row (``ctx.query``), bottom-right alignment
(``S - L = geometry.causal_offset``) and ``scale`` the softmax scale of the attention call
(``1/sqrt(D)`` by default, as in the paper; pass ``scale=`` if the call uses another).
Distances are between *flat* (row-major) token indices.

Memory is linear in the embedding count: ``qE = q @ E^T`` has shape
``score.shape[:-1] + (R,)`` and the relative term is gathered from it along its last axis
with the (clipped) relative index, broadcast to the score's shape. This is the paper's
"skewing" without its padding/reshape trick, O(L * R + L * S) memory, never the
O(L * S * D) tensor of gathered embeddings of Shaw et al.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..geometry import Geometry
from .base import ScoreContext, ScoreMod, init_table_
from .._checks import check_int as _check_int




def _check_float(name: str, value: object, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ValueError(
            f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {name}={value}"
        )
    return float(value)


class RelativeEmbedding(ScoreMod):
    """``logits += scale * q_i . E[clip(j - (i + S - L), -max_distance, hi)]``.

    ``hi = 0`` when ``causal`` (the table has ``max_distance + 1`` rows for ``r = -max_distance
    .. 0``; keys after the query, which a causal pattern masks, use the ``r = 0`` row) and
    ``hi = max_distance`` otherwise (``2 * max_distance + 1`` rows). Row ``k`` of the table
    holds ``r = k - max_distance``.

    Args:
        head_dim: ``D`` of the queries.
        max_distance: distances beyond it share the embedding of ``+-max_distance``.
        num_heads: ``None`` for one table shared by all heads (the ``table`` parameter has
            shape ``(R, D)``), or the number of query heads for one table per head
            (shape ``(num_heads, R, D)``).
        causal: only non-positive distances have their own embedding.
        scale: the attention call's softmax scale; ``1/sqrt(head_dim)`` when ``None``.
        init_std: the table is drawn from ``normal(0, init_std)`` (``0.0`` gives zeros).

    See "Music Transformer: Generating Music with Long-Term Structure" (2018).
    """

    needs_query = True

    def __init__(
        self,
        head_dim: int,
        max_distance: int,
        num_heads: int | None = None,
        causal: bool = True,
        scale: float | None = None,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.head_dim = _check_int("head_dim", head_dim, 1)
        self.max_distance = _check_int("max_distance", max_distance, 1)
        self.num_heads = None if num_heads is None else _check_int("num_heads", num_heads, 1)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        self.causal = causal
        if scale is None:
            self.scale = 1.0 / math.sqrt(head_dim)
        else:
            self.scale = _check_float("scale", scale, positive=True)
        self.init_std = _check_float("init_std", init_std, positive=False)
        rows = max_distance + 1 if causal else 2 * max_distance + 1
        shape = (rows, head_dim) if num_heads is None else (num_heads, rows, head_dim)
        self.table = nn.Parameter(torch.empty(shape))
        self.reset_parameters()

    @property
    def num_embeddings(self) -> int:
        """``R``: the number of relative distances with their own embedding."""
        return self.table.shape[-2]

    def reset_parameters(self) -> None:
        """Re-draw the table from ``normal(0, init_std)`` (zeros when ``init_std == 0``)."""
        init_table_(self.table, self.init_std)

    def validate(self, geometry: Geometry) -> None:
        if self.head_dim != geometry.head_dim:
            raise ValueError(
                f"RelativeEmbedding was built with head_dim={self.head_dim} but the query has "
                f"head dimension {geometry.head_dim}; head_dim must equal D"
            )
        if self.num_heads is not None and self.num_heads != geometry.q_heads:
            raise ValueError(
                f"RelativeEmbedding was built with num_heads={self.num_heads} but the query has "
                f"{geometry.q_heads} heads; num_heads must equal the number of query heads "
                "(or be None for a shared table)"
            )

    def modify(self, score: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        query = ctx.query
        if query is None:
            raise ValueError("RelativeEmbedding needs ctx.query (needs_query=True), got None")
        if query.shape[-1] != self.head_dim:
            raise ValueError(
                f"ctx.query has head dimension {query.shape[-1]}, expected head_dim="
                f"{self.head_dim}"
            )
        table = self.table.to(query.dtype)
        if self.num_heads is None:
            qe = query @ table.transpose(-1, -2)  # (..., R)
        else:
            h = ctx.h
            h = h.reshape((1,) * (score.ndim - h.ndim) + tuple(h.shape))
            hq = h[..., 0]  # the head does not vary along the key axis
            # einsum keeps size-1 axes of table[hq] unexpanded: O(H * R * D) for a head index
            # of shape (1, H, 1), never O(L * R * D)
            qe = torch.einsum("...d,...rd->...r", query, table[hq])
        rows = qe.shape[-1]
        qe = qe.expand(*score.shape[:-1], rows)
        rel = ctx.kv_idx - (ctx.q_idx + ctx.geometry.causal_offset)
        hi = 0 if self.causal else self.max_distance
        idx = (rel.clamp(-self.max_distance, hi) + self.max_distance).expand(score.shape)
        rel_logits = torch.gather(qe, -1, idx)
        return score + (self.scale * rel_logits).to(score.dtype)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, max_distance={self.max_distance}, "
            f"num_heads={self.num_heads}, causal={self.causal}, scale={self.scale:.6g}"
        )
