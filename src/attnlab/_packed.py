"""The packed ``in_proj (E -> 3E)`` / ``out_proj (E -> E)`` self-attention shell shared by the
modules with packed projections (agent, flow and norm attention in :mod:`attnlab.nn`, the
softmax variants in :mod:`attnlab.variants`). It lives outside both packages so that each can
import it without importing the other."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._checks import check_bool, check_int


class PackedSelfAttention(nn.Module):
    """``in_proj`` (q, k, v stacked) and ``out_proj``, Xavier-uniform weights, zero biases;
    :meth:`heads` splits ``x (B, L, E)`` into ``(B, H, L, E // H)`` q, k, v and :meth:`merge`
    joins heads back into ``(B, L, E)``."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        check_int("embed_dim", embed_dim, 1)
        check_int("num_heads", num_heads, 1)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim!r}, expected a multiple of num_heads={num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=check_bool("bias", bias), **fk)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)

    def reset_projections(self) -> None:
        for lin in (self.in_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def check_input(self, x: object) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x={type(x).__name__}, expected a torch.Tensor")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x.shape={tuple(x.shape)}, expected (B, L, {self.embed_dim})")
        return x

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, _ = self.check_input(x).shape
        q, k, v = self.in_proj(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        B, _, L, _ = out.shape
        return out.transpose(1, 2).reshape(B, L, self.embed_dim)

    def _base_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"bias={self.in_proj.bias is not None}")
