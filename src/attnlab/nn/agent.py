"""``AgentAttention``: multi-head self-attention through pooled agent tokens.

Han, Ye, Han, Pan, Wan, Song, Huang, "Agent Attention: On the Integration of Softmax and Linear
Attention", ECCV 2024. See :func:`attnlab.linear.agent.agent_attention`.
"""

from __future__ import annotations

import torch

from .._checks import check_int
from ..linear.agent import agent_attention
from .._packed import PackedSelfAttention

__all__ = ["AgentAttention"]


class AgentAttention(PackedSelfAttention):
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
        super().__init__(embed_dim, num_heads, bias, device, dtype)
        self.num_agents = check_int("num_agents", num_agents, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform projection weights, zero biases."""
        self.reset_projections()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, L, E)`` -> ``(B, L, E)`` (``num_agents <= L``)."""
        q, k, v = self.heads(x)
        return self.out_proj(self.merge(agent_attention(q, k, v, num_agents=self.num_agents)))

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_agents={self.num_agents}, bias={self.in_proj.bias is not None}"
        )
