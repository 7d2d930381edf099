"""``RelativeSelfAttention``: the Music Transformer's causal relative self-attention layer.

Paper: "Music Transformer: Generating Music with Long-Term Structure" (Huang et al., 2018),
building on "Self-Attention with Relative Position Representations" (Shaw et al., 2018).
Each head computes::

    softmax((Q K^T + S_rel) / sqrt(D_h)) V,   S_rel[i, j] = q_i . E[clip(j - i, -max_distance, 0)]

over the keys ``j <= i``, with ``E`` a learned table of relative embeddings per layer,
evaluated by :class:`attnlab.RelativeEmbedding`: the relative term costs ``O(L * R)``
memory (``R = max_distance + 1`` distances), never the ``O(L^2 D)`` tensor of gathered
embeddings (the paper's memory result, without its pad-and-reshape "skewing" trick).

Heads: the abstract in ``papers/`` does not say whether heads share ``E``. The paper's
description of relative attention (Section 3) gives ``E^r`` the shape ``(H, L, D_h)``,
"learned separately for each head", and Tensor2Tensor, its reference code, defaults to
``heads_share_relative_embedding=False``. So each head has its own table by default;
``shared_heads=True`` gives one table for all heads, as in Shaw et al. (2018).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..api import attention
from ..patterns.base import Causal
from ..scores.relative_embedding import RelativeEmbedding
from .multihead import check_bool, check_dropout, check_heads, check_int, dropout_attention


class RelativeSelfAttention(nn.Module):
    """Causal multi-head self-attention with learned relative position embeddings.

    Args:
        embed_dim: model width ``E``, a multiple of ``num_heads``.
        num_heads: attention heads ``H``; ``D_h = E // H``.
        max_distance: distances ``j - i < -max_distance`` share the embedding of
            ``-max_distance`` (the table has ``max_distance + 1`` rows per head).
        dropout: dropout on the attention probabilities in training mode; then the layer
            falls back to the materialised reference computation (``L x L`` per head).
        bias: biases of the input projection ``in_proj (E -> 3E)`` and of ``out_proj``.
        shared_heads: one ``(max_distance + 1, D_h)`` table for all heads instead of one
            per head (``(H, max_distance + 1, D_h)``, the paper's choice).
        backend: passed to :func:`attnlab.attention`.

    The table is ``self.relative.table`` (a :class:`attnlab.RelativeEmbedding`, initialised
    from ``normal(0, 0.02)``). Shapes: ``x`` ``(B, L, E)`` -> ``(B, L, E)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        max_distance: int,
        dropout: float = 0.0,
        bias: bool = True,
        *,
        shared_heads: bool = False,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_heads(embed_dim, num_heads, backend)
        check_int("max_distance", max_distance, 1)
        self.embed_dim, self.num_heads, self.max_distance = embed_dim, num_heads, max_distance
        self.head_dim = embed_dim // num_heads
        self.dropout = check_dropout("dropout", dropout)
        self.shared_heads = check_bool("shared_heads", shared_heads)
        self.backend = backend
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=check_bool("bias", bias), **fk)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        heads = None if self.shared_heads else num_heads
        self.relative = RelativeEmbedding(self.head_dim, max_distance, heads, causal=True).to(**fk)
        self.pattern = Causal()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, L, E)`` -> ``(B, L, E)``; position ``t`` sees positions ``<= t`` only."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x={type(x).__name__}, expected a torch.Tensor")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x.shape={tuple(x.shape)}, expected (B, L, {self.embed_dim})")
        B, L, _ = x.shape
        qkv = self.in_proj(x).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        if self.training and self.dropout > 0:
            out, _ = dropout_attention(q, k, v, self.pattern, self.relative, self.dropout)
        else:
            out = attention(q, k, v, self.pattern, self.relative, backend=self.backend)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"max_distance={self.max_distance}, dropout={self.dropout}, "
            f"shared_heads={self.shared_heads}, pattern={self.pattern!r}, backend={self.backend!r}"
        )


__all__ = ["RelativeSelfAttention"]
