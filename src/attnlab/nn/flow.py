"""``FlowAttention``: multi-head self-attention with Flowformer's Flow-Attention.

Wu, Wu, Xu, Wang, Long, "Flowformer: Linearizing Transformers with Conservation Flows",
ICML 2022. See :func:`attnlab.linear.flow.flow_attention`.
"""

from __future__ import annotations

import torch

from ..linear.flow import _check_eps, flow_attention
from .._packed import PackedSelfAttention

__all__ = ["FlowAttention"]


class FlowAttention(PackedSelfAttention):
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
        super().__init__(embed_dim, num_heads, bias, device, dtype)
        self.eps = _check_eps(eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform projection weights, zero biases."""
        self.reset_projections()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, L, E)`` -> ``(B, L, E)``."""
        q, k, v = self.heads(x)
        return self.out_proj(self.merge(flow_attention(q, k, v, eps=self.eps)))

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, eps={self.eps}, "
            f"bias={self.in_proj.bias is not None}"
        )
