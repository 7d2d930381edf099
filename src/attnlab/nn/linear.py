"""Linear-attention layers on :func:`attnlab.linear_attention`.

- :class:`LinearAttention`: multi-head linear attention with any feature map.
- :class:`Retention`: RetNet's multi-scale retention (per-head decay, group norm, swish gate).
- :class:`GatedLinearAttention`: GLA's data-dependent per-feature gates with an output gate.

All take ``x (B, L, embed_dim)`` (batch first) and return the same shape; ``forward(x, state=None,
return_state=False)`` carries a :class:`~attnlab.linear.forms.LinearAttentionState` between calls
for causal layers (chunked prefill, then one token at a time for decoding: O(1) per token).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from ..linear.api import linear_attention
from ..linear.decays import retnet_decay
from ..linear.forms import LinearAttentionState
from .multihead import check_bool, check_heads


class _Projections(nn.Module):
    """q/k/v/out projections of ``embed_dim`` split into heads (``num_kv_heads`` for k, v)."""

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int], bias: bool,
                 device=None, dtype=None):
        super().__init__()
        check_heads(embed_dim, num_heads, "auto")
        check_bool("bias", bias)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads, 1)
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        self.head_dim = embed_dim // num_heads
        kv_dim = self.head_dim * self.num_kv_heads
        fk = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **fk)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)

    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            lin.reset_parameters()

    def _check_x(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, L, embed_dim={self.embed_dim}), got x.shape={tuple(x.shape)}")

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self._check_x(x)
        B, L, _ = x.shape

        def split(t: Tensor, h: int) -> Tensor:
            return t.view(B, L, h, self.head_dim).transpose(1, 2)

        return (split(self.q_proj(x), self.num_heads), split(self.k_proj(x), self.num_kv_heads),
                split(self.v_proj(x), self.num_kv_heads))

    @staticmethod
    def merge(o: Tensor) -> Tensor:
        B, H, L, D = o.shape
        return o.transpose(1, 2).reshape(B, L, H * D)


def _result(out: Tensor, state: Any, return_state: bool):
    return (out, state) if return_state else out


class LinearAttention(_Projections):
    """Multi-head linear attention ("Transformers are RNNs: Fast Autoregressive Transformers with
    Linear Attention", 2020): ``out_proj(linear_attention(q_proj(x), k_proj(x), v_proj(x)))``.

    Args:
        embed_dim, num_heads: model width and heads (``embed_dim`` a multiple of ``num_heads``).
        feature_map: as for :func:`attnlab.linear_attention` (default ``"elu+1"``); a module
            (e.g. :class:`~attnlab.linear.Hedgehog`) is registered, so learnable maps train.
        causal, normalize, decay, chunk_size: as for :func:`attnlab.linear_attention`.
        num_kv_heads: grouped-query attention (default ``num_heads``).
        bias: biases of the projections.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, feature_map: Any = None, causal: bool = False,
                 normalize: bool = True, decay: Any = None, chunk_size: int = 64,
                 num_kv_heads: Optional[int] = None, bias: bool = True, device=None, dtype=None):
        super().__init__(embed_dim, num_heads, num_kv_heads, bias, device, dtype)
        self.causal = check_bool("causal", causal)
        self.normalize = check_bool("normalize", normalize)
        self.chunk_size = check_int("chunk_size", chunk_size, 1)
        self.feature_map = feature_map
        if isinstance(decay, torch.Tensor):
            self.register_buffer("decay", decay.detach().clone())
        else:
            self.decay = decay

    def forward(self, x: Tensor, state: Optional[LinearAttentionState] = None, return_state: bool = False):
        q, k, v = self.heads(x)
        out, new_state = linear_attention(
            q, k, v, feature_map=self.feature_map, causal=self.causal, decay=self.decay,
            normalize=self.normalize, chunk_size=self.chunk_size, initial_state=state, return_state=True)
        return _result(self.out_proj(self.merge(out)), new_state, return_state)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"causal={self.causal}, normalize={self.normalize}, chunk_size={self.chunk_size}")


class _HeadNorm(nn.Module):
    """Layer norm over each head's ``D`` features (GroupNorm with one group per head, per token)."""

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_heads, head_dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, o: Tensor) -> Tensor:  # (B, H, L, D)
        o = F.layer_norm(o, o.shape[-1:], eps=self.eps)
        return o * self.weight[:, None] + self.bias[:, None]


class Retention(_Projections):
    """RetNet's multi-scale retention ("Retentive Network: A Successor to Transformer for Large
    Language Models", 2023): causal, unnormalised linear attention with identity features,
    keys scaled by ``head_dim ** -0.5`` and a per-head decay (default
    :func:`~attnlab.linear.retnet_decay`), then a per-head group norm, a swish output gate and
    the output projection: ``out_proj(swish(g_proj(x)) * GroupNorm(Retention(x)))``.

    The paper's xPos rotation of ``q``/``k`` is not applied (apply a rotary embedding to the
    inputs if you need it); everything else follows the paper's equations. ``decay``: a float
    or ``(num_heads,)`` tensor in ``(0, 1]``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, decay: Any = None, chunk_size: int = 64,
                 bias: bool = False, device=None, dtype=None):
        super().__init__(embed_dim, num_heads, None, bias, device, dtype)
        self.chunk_size = check_int("chunk_size", chunk_size, 1)
        d = retnet_decay(num_heads) if decay is None else torch.as_tensor(decay, dtype=torch.float64)
        if d.numel() not in (1, num_heads) or not bool(((d > 0) & (d <= 1)).all()):
            raise ValueError(f"decay must be a float or a (num_heads,)=({num_heads},) tensor in (0, 1], got {decay!r}")
        self.register_buffer("decay", d.expand(num_heads).clone())
        self.g_proj = nn.Linear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)
        self.group_norm = _HeadNorm(num_heads, self.head_dim, device=device, dtype=dtype)

    def forward(self, x: Tensor, state: Optional[LinearAttentionState] = None, return_state: bool = False):
        q, k, v = self.heads(x)
        o, new_state = linear_attention(
            q, k, v, feature_map="identity", causal=True, decay=self.decay, normalize=False,
            scale=self.head_dim ** -0.5, chunk_size=self.chunk_size, initial_state=state, return_state=True)
        y = self.merge(self.group_norm(o))
        return _result(self.out_proj(F.silu(self.g_proj(x)) * y), new_state, return_state)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, chunk_size={self.chunk_size}"


class GatedLinearAttention(_Projections):
    """Gated linear attention ("Gated Linear Attention Transformers with Hardware-Efficient
    Training", 2024): causal, unnormalised, identity features, ``q`` scaled by
    ``head_dim ** -0.5``, with a per-token, per-key-feature forget gate
    ``alpha_t = sigmoid(x_t W1 W2 + b) ** (1 / gate_logit_normalizer)`` (a rank
    ``gate_low_rank`` factorisation) in ``S_t = alpha_t * S_{t-1} + k_t v_t^T``, then a per-head
    layer norm and a swish output gate: ``out_proj(swish(r_proj(x)) * LN(o))``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, gate_low_rank: int = 16,
                 gate_logit_normalizer: float = 16.0, chunk_size: int = 64, bias: bool = False,
                 device=None, dtype=None):
        super().__init__(embed_dim, num_heads, None, bias, device, dtype)
        self.chunk_size = check_int("chunk_size", chunk_size, 1)
        self.gate_low_rank = check_int("gate_low_rank", gate_low_rank, 1)
        if isinstance(gate_logit_normalizer, bool) or not isinstance(gate_logit_normalizer, (int, float)) \
                or gate_logit_normalizer <= 0:
            raise ValueError(f"gate_logit_normalizer must be a positive number, got {gate_logit_normalizer!r}")
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        fk = dict(device=device, dtype=dtype)
        self.gate_down = nn.Linear(embed_dim, gate_low_rank, bias=False, **fk)
        self.gate_up = nn.Linear(gate_low_rank, embed_dim, bias=True, **fk)
        self.r_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.head_norm = _HeadNorm(num_heads, self.head_dim, **fk)

    def gates(self, x: Tensor) -> Tensor:
        """``alpha (B, H, L, head_dim)`` in ``(0, 1]``."""
        B, L, _ = x.shape
        log_a = F.logsigmoid(self.gate_up(self.gate_down(x))) / self.gate_logit_normalizer
        return torch.exp(log_a).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, state: Optional[LinearAttentionState] = None, return_state: bool = False):
        q, k, v = self.heads(x)
        alpha = self.gates(x).clamp_min(torch.finfo(torch.float32).tiny)
        o, new_state = linear_attention(
            q, k, v, feature_map="identity", causal=True, gate=alpha, normalize=False,
            scale=self.head_dim ** -0.5, chunk_size=self.chunk_size, initial_state=state, return_state=True)
        y = self.merge(self.head_norm(o))
        return _result(self.out_proj(F.silu(self.r_proj(x)) * y), new_state, return_state)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, gate_low_rank={self.gate_low_rank}, "
                f"chunk_size={self.chunk_size}")
