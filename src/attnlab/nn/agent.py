"""``AgentAttention``: multi-head self-attention through pooled agent tokens.

Han, Ye, Han, Pan, Wan, Song, Huang, "Agent Attention: On the Integration of Softmax and Linear
Attention", ECCV 2024. See :func:`attnlab.linear.agent.agent_attention`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._checks import check_int
from ..linear.agent import agent_attention
from .multihead import check_bool, check_heads

__all__ = ["AgentAttention"]


class AgentAttention(nn.Module):
    """Self-attention ``softmax(s Q A^T) softmax(s A K^T) V`` per head, with ``num_agents``
    agents ``A = adaptive_avg_pool(Q)`` over the sequence (``s = 1/sqrt(E / num_heads)``).

    Args:
        embed_dim: model width ``E``, a multiple of ``num_heads``.
        num_heads: heads ``H``; head dim ``E // H``.
        num_agents: agent tokens per head, an int ``>= 1`` and ``<= L`` at call time.
        bias: biases of ``in_proj (E -> 3E)`` and ``out_proj (E -> E)``.

    Shapes: ``x (B, L, E) -> (B, L, E)``; non-causal. Parameters: ``in_proj`` (q, k, v
    stacked) and ``out_proj``, ``torch.nn.Linear`` initialised as by :meth:`reset_parameters`.
    The paper's agent bias and depthwise-convolution branch are not included.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_agents: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_heads(embed_dim, num_heads, "auto")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.num_agents = check_int("num_agents", num_agents, 1)
        self.head_dim = embed_dim // num_heads
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
        """``x`` ``(B, L, E)`` -> ``(B, L, E)`` (``num_agents <= L``)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x={type(x).__name__}, expected a torch.Tensor")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x.shape={tuple(x.shape)}, expected (B, L, {self.embed_dim})")
        B, L, _ = x.shape
        qkv = self.in_proj(x).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = agent_attention(q, k, v, num_agents=self.num_agents)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_agents={self.num_agents}, bias={self.in_proj.bias is not None}"
        )
