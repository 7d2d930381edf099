"""A packed ``in_proj (E -> 3E)`` / ``out_proj (E -> E)`` self-attention shell shared by the
linear-attention modules with packed projections (agent, flow, norm attention)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .multihead import check_bool, check_heads


class PackedSelfAttention(nn.Module):
    """``in_proj`` (q, k, v stacked), ``out_proj``, Xavier-uniform weights and zero biases;
    :meth:`heads` splits ``x (B, L, E)`` into ``(B, H, L, E // H)`` q, k, v and :meth:`merge`
    joins ``(B, H, L, D)`` heads back into ``(B, L, E)``."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool, device=None, dtype=None) -> None:
        super().__init__()
        check_heads(embed_dim, num_heads, "auto")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=check_bool("bias", bias), **fk)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)

    def reset_projections(self) -> None:
        """Xavier-uniform projection weights, zero biases."""
        for lin in (self.in_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x={type(x).__name__}, expected a torch.Tensor")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x.shape={tuple(x.shape)}, expected (B, L, {self.embed_dim})")
        B, L, _ = x.shape
        q, k, v = self.in_proj(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        B, _, L, _ = out.shape
        return out.transpose(1, 2).reshape(B, L, self.embed_dim)
