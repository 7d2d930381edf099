"""Context broadcasting (CB): add the uniform-attention output, the token mean, to every token.

"Scratching Visual Transformer's Back with Uniform Attention" (Hyeon-Woo et al., 2023). Parameter free ("1 line in your model code").

Semantics, for tokens ``x (B, N, C)`` (tokens along ``dim``)::

    CB(x)_t = x_t + scale * (1/N) sum_{t'} x_t'          (scale = 1: the paper's CB)

which is ``x + U x`` with ``U`` the uniform attention matrix (every weight ``1/N``); a
learnable per-channel ``scale`` is an option of the module. :func:`uniform_attention` is the
uniform-attention term in attnlab's layout, over any pattern: query ``i`` averages the
values it may see, ``o_i = (1/|P(i)|) sum_{j in P(i)} v_j`` (0 for a row with no key); the
dense case is a mean, the causal one a prefix mean (bottom-right aligned), and any other
pattern is :func:`attnlab.attention` with all logits 0.
"""

from __future__ import annotations

from typing import Any

import torch

from ..api import attention
from ..patterns.base import Causal, Full
from ._common import (
    DEFAULT_MAX_ELEMENTS, check_qkv, compute_dtype_for, dense_mask, expand_heads, size_guard,
    static_pattern,
)

__all__ = ["context_broadcasting", "context_broadcasting_reference", "uniform_attention",
           "uniform_attention_reference"]


def _check_x(x, dim):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim={dim!r} is not an axis of x.shape={tuple(x.shape)}")
    if x.shape[dim] == 0:
        raise ValueError(f"x has no tokens along dim={dim}: x.shape={tuple(x.shape)}")


def context_broadcasting(x: torch.Tensor, dim: int = 1, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``x + scale * mean(x, dim)`` (``x (B, N, C)`` with tokens on ``dim=1`` by default;
    ``scale`` a float or a tensor broadcasting against the mean, e.g. ``(C,)``)."""
    _check_x(x, dim)
    return x + scale * x.mean(dim, keepdim=True)


def context_broadcasting_reference(x: torch.Tensor, dim: int = 1, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``x + scale * U x`` with the explicit ``N x N`` uniform attention matrix ``U = 1/N``."""
    _check_x(x, dim)
    xt = x.movedim(dim, -2)
    n = xt.shape[-2]
    U = torch.full((n, n), 1.0 / n, dtype=x.dtype, device=x.device)
    return x + scale * (U @ xt).movedim(-2, dim)


def uniform_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Any = None,
    *,
    backend: str = "auto",
    options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Uniform attention over a pattern (module docstring): ``(B, Hq, *L, Dv)``. ``q`` and
    ``k`` give only the shapes; no gradient reaches them."""
    g = check_qkv(q, k, v)
    pattern = static_pattern(pattern, g)
    B, Hq, L, S, Dv = g.batch, g.q_heads, g.q_len, g.kv_len, g.value_dim
    if type(pattern) is Full:
        mean = expand_heads(v.reshape(B, g.kv_heads, S, Dv).mean(2, keepdim=True), g.group_size)
        return mean.expand(B, Hq, L, Dv).reshape(B, Hq, *g.q_shape, Dv)
    if type(pattern) is Causal:
        cdt = compute_dtype_for(v.dtype)
        vf = v.reshape(B, g.kv_heads, S, Dv).to(cdt)
        csum = torch.cat([vf.new_zeros(B, g.kv_heads, 1, Dv), vf.cumsum(2)], 2)  # csum[n] = sum_{j<n}
        last = torch.arange(L, device=v.device) + g.causal_offset  # key j visible iff j <= last
        count = (last + 1).clamp(min=0, max=S)
        out = csum[:, :, count] / count.clamp(min=1).to(cdt).view(1, 1, -1, 1)
        return expand_heads(out, g.group_size).to(v.dtype).reshape(B, Hq, *g.q_shape, Dv)
    return attention(torch.zeros_like(q), torch.zeros_like(k), v, pattern, backend=backend, options=options)


def uniform_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Any = None,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Dense: the pattern's mask, each row divided by its count, ``@ v``."""
    g = check_qkv(q, k, v)
    pattern = static_pattern(pattern, g)
    size_guard("uniform_attention_reference", g.batch * g.q_heads * g.q_len * g.kv_len, max_elements,
               "B*Hq*L*S")
    cdt = compute_dtype_for(v.dtype)
    m = torch.broadcast_to(dense_mask(pattern, g), (g.batch, g.q_heads, g.q_len, g.kv_len)).to(cdt)
    U = m / m.sum(-1, keepdim=True).clamp(min=1)
    vf = expand_heads(v.reshape(g.batch, g.kv_heads, g.kv_len, g.value_dim).to(cdt), g.group_size)
    return (U @ vf).to(v.dtype).reshape(g.batch, g.q_heads, *g.q_shape, g.value_dim)
