"""``NormAttention``: TransNormer's normalised linear attention as a multi-head layer.

Qin, Han, Sun, Li, Kong, Barnes, Zhong, "The Devil in Linear Transformer", EMNLP 2022. See
:func:`attnlab.linear.transnormer.norm_attention`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from .._checks import check_int
from ..linear.forms import _as_decay
from ..linear.transnormer import _check_norm_args, norm_attention
from .._packed import PackedSelfAttention

__all__ = ["NormAttention"]


class NormAttention(PackedSelfAttention):
    """Self-attention ``o = g * Norm(phi(Q) (phi(K)^T V)) (+ b)`` per head, then ``out_proj``.

    ``Norm`` is RMSNorm or LayerNorm over each head's channels (no denominator, no ``1/sqrt``
    scaling); ``g`` is a learnable elementwise gain ``norm_weight (E,)`` (ones) and, for
    ``norm="layer"``, ``b`` a learnable bias ``norm_bias (E,)`` (zeros). Causal: the sum runs
    over ``j <= i``, weighted ``gamma_h^(i-j)`` with a decay.

    Args:
        embed_dim: model width ``E``, a multiple of ``num_heads``.
        num_heads: heads ``H``; head dim ``E // H``.
        causal: autoregressive (cumulative) form.
        decay: ``None``, a float in ``(0, 1]`` or a per-head tensor ``(H,)`` of such values
            (stored as the buffer ``decay``); needs ``causal=True``. TransNormerLLM's
            ``"tnl"`` schedule is not offered.
        norm: ``"rms"`` or ``"layer"``.
        bias: biases of ``in_proj (E -> 3E)`` and ``out_proj (E -> E)``.
        feature_map: ``phi`` for queries and keys (an ``nn.Module`` becomes a submodule);
            :class:`~attnlab.linear.feature_maps.EluPlusOne` when None.
        eps: the norm's epsilon, ``> 0``.
        chunk_size: chunk length of the causal chunked form.

    Shapes: ``x (B, L, E) -> (B, L, E)``.
    """

    decay: Optional[torch.Tensor]

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        causal: bool = False,
        decay: Any = None,
        norm: str = "rms",
        bias: bool = True,
        *,
        feature_map: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        eps: float = 1e-6,
        chunk_size: int = 64,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(embed_dim, num_heads, bias, device, dtype)
        self.feature_map = _check_norm_args(causal, norm, eps, feature_map)
        if decay is not None and not causal:
            raise ValueError(f"decay needs causal=True, got decay={decay!r} with causal=False")
        self.causal, self.norm, self.eps = causal, norm, float(eps)
        self.chunk_size = check_int("chunk_size", chunk_size, 1)
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        like = torch.empty(0, **fk)
        self.register_buffer("decay", _as_decay(decay, num_heads, like))
        self.norm_weight = nn.Parameter(torch.empty(embed_dim, **fk))
        norm_bias = nn.Parameter(torch.empty(embed_dim, **fk)) if norm == "layer" else None
        self.register_parameter("norm_bias", norm_bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform projection weights, zero biases, unit gain."""
        self.reset_projections()
        nn.init.ones_(self.norm_weight)
        if self.norm_bias is not None:
            nn.init.zeros_(self.norm_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, L, E)`` -> ``(B, L, E)``."""
        q, k, v = self.heads(x)
        out = norm_attention(
            q, k, v, causal=self.causal, decay=self.decay, feature_map=self.feature_map,
            norm=self.norm, eps=self.eps, chunk_size=self.chunk_size,
        )
        out = self.merge(out) * self.norm_weight
        if self.norm_bias is not None:
            out = out + self.norm_bias
        return self.out_proj(out)

    def extra_repr(self) -> str:
        decay = None if self.decay is None else [round(float(d), 6) for d in self.decay]
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, causal={self.causal}, "
            f"decay={decay}, norm={self.norm!r}, eps={self.eps}, chunk_size={self.chunk_size}, "
            f"bias={self.in_proj.bias is not None}"
        )
