"""Reversed attention (DependencyViT): each child token distributes itself over its parents
and *sends* its value to them, instead of each query gathering from its keys.

"Visual Dependency Transformers: Dependency Tree Emerges from Reversed Attention" (Ding et al.,
2023).

Semantics, in attnlab's layout (output rows are the receivers/parents ``i``, key/value tokens
the senders/children ``j``), with ``s_ij = scale * q_i . k_j`` and ``M`` the pattern's mask::

    A_ij = exp(s_ij) / sum_{i' : M_i'j} exp(s_i'j)     for M_ij, else 0
           (normalised over the queries of each column: child j's distribution over parents)
    o_i  = sum_j A_ij v_j

so every key column sums to 1 (or 0 if no query sees it) while rows do not; a query no key
reaches returns 0. DependencyViT's message controller (a learned per-token gate on what a
child sends) is ``v_j -> m_j v_j`` and lives in the module.

Fast path (:func:`reversed_attention`), two :func:`attnlab.attention` calls that inherit every
static pattern and backend, linear memory on the tiled backend:

1. the column log-normalisers ``c_j = logsumexp_{i : M_ij} s_ij`` are the log-sum-exp of the
   transposed problem (keys as queries, the pattern transposed: :class:`Transposed`);
2. ``o_i = sum_j exp(s_ij - c_j) v_j = exp(lse'_i) * softmax-attention_i`` with the per-key
   bias ``-c_j`` as a score mod (:class:`KeyBias`), ``lse'`` its log-sum-exp
   (``exp(lse'_i) <= S`` since every ``A_ij <= 1``: no overflow).

The reference normalises the dense masked exponentials over the query axis.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..api import attention
from ..geometry import Geometry
from ..patterns.base import Pattern, as_pattern
from ..patterns.layout import BlockLayout, Tiling
from ..scores.base import ScoreContext, ScoreMod
from ._common import (
    DEFAULT_MAX_ELEMENTS, check_qkv, check_scale, compute_dtype_for, dense_mask, expand_heads,
    size_guard, static_pattern,
)

__all__ = ["reversed_attention", "reversed_attention_reference", "Transposed", "KeyBias"]


def _swap(g: Geometry) -> Geometry:
    return replace(g, q_shape=g.kv_shape, kv_shape=g.q_shape)


class Transposed(Pattern):
    """The pattern ``inner`` with queries and keys exchanged: ``mask(b, h, j, i)`` of the
    transposed problem (``S`` queries, ``L`` keys) is ``inner.mask(b, h, i, j)`` of the
    original one; the block layout is the inner layout, transposed."""

    def __init__(self, inner: Pattern):
        self.inner = as_pattern(inner, "inner")
        self.ndim = self.inner.ndim

    def mask(self, b, h, q_idx, kv_idx, geometry):
        return self.inner.mask(b, h, kv_idx, q_idx, _swap(geometry))

    def block_layout(self, tiling: Tiling) -> BlockLayout:
        t0 = Tiling(_swap(tiling.geometry), tiling.kv_tile, tiling.q_tile)
        lay = self.inner.block_layout(t0)
        return BlockLayout(lay.any.transpose(-1, -2), lay.full.transpose(-1, -2))

    def validate(self, geometry):
        self.inner.validate(_swap(geometry))

    def __repr__(self):
        return f"Transposed({self.inner!r})"


class KeyBias(ScoreMod):
    """Adds a per-(batch, query head, key) bias ``bias (B, Hq, S)`` (flat keys) to the logits.
    The bias may require grad (a tensor computed from the inputs): backends return its
    gradient like a parameter's."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        if not isinstance(bias, torch.Tensor) or bias.ndim != 3:
            raise TypeError(f"bias must be a (B, Hq, S) tensor, got {type(bias).__name__}")
        self.bias = bias

    def modify(self, score, ctx: ScoreContext):
        return score + self.bias[ctx.b, ctx.h, ctx.kv_idx].to(score.dtype)

    def validate(self, geometry):
        want = (geometry.batch, geometry.q_heads, geometry.kv_len)
        if tuple(self.bias.shape) != want:
            raise ValueError(f"KeyBias: bias.shape={tuple(self.bias.shape)}, expected (B, Hq, S) = {want}")

    def differentiable_tensors(self):
        return [self.bias] if self.bias.requires_grad else []


def reversed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Any = None,
    *,
    scale: float | None = None,
    backend: str = "auto",
    options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Reversed (column-normalised) attention, module docstring. Layout as
    :func:`attnlab.attention` (GQA, ``L != S``, 1-3 token axes, static patterns); returns
    ``(B, Hq, *L, Dv)`` in ``q``'s dtype."""
    g = check_qkv(q, k, v)
    pattern = static_pattern(pattern, g)
    scale = check_scale(scale, g.head_dim)
    B, Hq = g.batch, g.q_heads
    kq = expand_heads(k, g.group_size)  # the transposed problem's queries: (B, Hq, *S, D)
    dummy = q.new_zeros(B, Hq, *g.q_shape, 1)
    _, col_lse = attention(kq, q, dummy, Transposed(pattern), scale=scale, return_lse=True,
                           backend=backend, options=options)
    c = col_lse.reshape(B, Hq, g.kv_len)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))  # columns no query sees
    o, lse = attention(q, k, v, pattern, KeyBias(-c), scale=scale, return_lse=True,
                       backend=backend, options=options)
    return o * torch.exp(lse).to(o.dtype)[..., None]


def reversed_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Any = None,
    *,
    scale: float | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Dense: masked ``exp(s)`` normalised over the query axis (columns), ``@ v``."""
    g = check_qkv(q, k, v)
    pattern = static_pattern(pattern, g)
    scale = check_scale(scale, g.head_dim)
    B, Hq, L, S = g.batch, g.q_heads, g.q_len, g.kv_len
    size_guard("reversed_attention_reference", B * Hq * L * S, max_elements, "B*Hq*L*S")
    cdt = compute_dtype_for(q.dtype)
    qf = q.reshape(B, Hq, L, g.head_dim).to(cdt)
    kf = expand_heads(k.reshape(B, g.kv_heads, S, g.head_dim).to(cdt), g.group_size)
    vf = expand_heads(v.reshape(B, g.kv_heads, S, g.value_dim).to(cdt), g.group_size)
    s = scale * qf @ kf.transpose(-1, -2)
    M = torch.broadcast_to(dense_mask(pattern, g), s.shape)
    s = s.masked_fill(~M, float("-inf"))
    m = s.detach().amax(-2, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    col = e.sum(-2, keepdim=True)
    A = e / torch.where(col > 0, col, torch.ones_like(col))
    return (A @ vf).to(q.dtype).reshape(B, Hq, *g.q_shape, g.value_dim)
