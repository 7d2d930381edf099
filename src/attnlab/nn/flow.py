"""``FlowAttention``: multi-head self-attention with Flowformer's Flow-Attention.

Wu, Wu, Xu, Wang, Long, "Flowformer: Linearizing Transformers with Conservation Flows",
ICML 2022. See :func:`attnlab.linear.flow.flow_attention`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..linear.flow import _check_eps, flow_attention
from .multihead import check_bool, check_heads

__all__ = ["FlowAttention"]


class FlowAttention(nn.Module):
    """Self-attention with Flow-Attention per head (``phi = sigmoid``, source competition and
    sink allocation by flow conservation; linear in ``L``, non-causal).

    Args:
        embed_dim: model width ``E``, a multiple of ``num_heads``.
        num_heads: heads ``H``; head dim ``E // H``.
        bias: biases of ``in_proj (E -> 3E)`` and ``out_proj (E -> E)``.
        eps: added to the flows that are divided by (see
            :func:`~attnlab.linear.flow.flow_attention`), a float ``>= 0``.

    Shapes: ``x (B, L, E) -> (B, L, E)``. Parameters: ``in_proj`` (q, k, v stacked) and
    ``out_proj``, ``torch.nn.Linear`` initialised as by :meth:`reset_parameters`.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        bias: bool = True,
        *,
        eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_heads(embed_dim, num_heads, "auto")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.eps = _check_eps(eps)
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=check_bool("bias", bias), **fk)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform projection weights, zero biases."""
        for lin in (self.in_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, L, E)`` -> ``(B, L, E)``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x={type(x).__name__}, expected a torch.Tensor")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x.shape={tuple(x.shape)}, expected (B, L, {self.embed_dim})")
        B, L, _ = x.shape
        qkv = self.in_proj(x).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = flow_attention(q, k, v, eps=self.eps)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, eps={self.eps}, "
            f"bias={self.in_proj.bias is not None}"
        )
