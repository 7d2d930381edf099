"""Sigmoid attention: an elementwise sigmoid of the logits instead of a row softmax.

"Theory, Analysis, and Best Practices for Sigmoid Self-Attention" (Ramapuram et al., 2024).

Semantics, for query ``i`` over the keys ``P(i)`` its pattern lets it see::

    o_i = sum_{j in P(i)} sigmoid(scale * q_i . k_j + s(i, j) + b) v_j

with ``s`` an optional score mod (ALiBi, relative bias, ...) and the bias ``b = -log(S)`` by
default (``S`` the number of key tokens; the paper's ``b = -log(n)`` for sequence length
``n``). There is no normalisation over keys, so a row with no visible key is 0.

Fast path (:func:`sigmoid_attention`): rows are independent sums over keys, so the queries are
cut into the tiles of the pattern's :meth:`~attnlab.Pattern.block_layout` and each query tile
gathers only the key tiles it touches (the elementwise mask only where a tile is partly
visible), under activation checkpointing: memory O(tile * span) at a time and O(L) kept for
backward, never an L x S tensor for sparse patterns. The reference materialises the logits.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..backends.reference import reference_logits
from ..scores.base import ScoreContext, as_score_mod
from ._blocks import DEFAULT_BLOCK_ELEMENTS, query_blocks
from ._common import (
    DEFAULT_MAX_ELEMENTS, check_qkv, check_scale, compute_dtype_for, expand_heads, flat,
    maybe_checkpoint, size_guard, static_pattern, unflat,
)

__all__ = ["sigmoid_attention", "sigmoid_attention_reference"]


def _bias(bias: object, kv_len: int) -> float:
    if bias is None:
        return -math.log(kv_len)
    if isinstance(bias, bool) or not isinstance(bias, (int, float)):
        raise TypeError(f"bias must be a float or None (-log S), got bias={bias!r}")
    if not math.isfinite(bias):
        raise ValueError(f"bias must be finite, got bias={bias!r}")
    return float(bias)


def _prepare(q, k, v, pattern, score_mod, scale, bias):
    g = check_qkv(q, k, v)
    pattern = static_pattern(pattern, g)
    score_mod = as_score_mod(score_mod)
    if score_mod is not None:
        score_mod.validate(g)
    return g, pattern, score_mod, check_scale(scale, g.head_dim), _bias(bias, g.kv_len)


def sigmoid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Any = None,
    score_mod: Any = None,
    *,
    scale: float | None = None,
    bias: float | None = None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Sigmoid attention over a pattern (module docstring), block-sparse.

    Args:
        q, k, v: ``(B, Hq, *L, D)``, ``(B, Hkv, *S, D)``, ``(B, Hkv, *S, Dv)`` (GQA allowed;
            1, 2 or 3 token axes, as the pattern requires).
        pattern: an :class:`attnlab.Pattern`, a mask_mod callable or None (Full).
        score_mod: an :class:`attnlab.ScoreMod`, a score_mod callable, a list, or None.
        scale: logit scale, ``1/sqrt(D)`` when None.
        bias: the constant added to every logit, ``-log(S)`` when None.
        block_elements: working-set budget ``B * Hq * queries * keys`` of one block.

    Returns ``(B, Hq, *L, Dv)`` in ``q``'s dtype (half precision is computed in float32).
    """
    g, pattern, score_mod, scale, b = _prepare(q, k, v, pattern, score_mod, scale, bias)
    if isinstance(block_elements, bool) or not isinstance(block_elements, int) or block_elements < 1:
        raise ValueError(f"block_elements must be a positive int, got block_elements={block_elements!r}")
    cdt = compute_dtype_for(q.dtype)
    B, Hq, Hkv, G = g.batch, g.q_heads, g.kv_heads, g.group_size
    qf, kf, vf = flat(q).to(cdt), flat(k).to(cdt), flat(v).to(cdt)
    params = score_mod.differentiable_tensors() if score_mod is not None else []
    dev = q.device
    b_idx = torch.arange(B, device=dev).view(-1, 1, 1, 1)
    h_idx = torch.arange(Hq, device=dev).view(1, -1, 1, 1)

    def block(q_idx, kv_idx, needs_mask, qb, kb, vb, *_params):
        Tq, span = qb.shape[2], kb.shape[2]
        s = torch.matmul(qb.view(B, Hkv, G, Tq, -1), kb.unsqueeze(2).transpose(-1, -2)) * scale
        s = s.reshape(B, Hq, Tq, span)
        qi, ki = q_idx.view(1, 1, -1, 1), kv_idx.view(1, 1, 1, -1)
        if score_mod is not None:
            ctx = ScoreContext(b_idx, h_idx, qi, ki, g, query=qb if score_mod.needs_query else None)
            s = score_mod.modify(s, ctx)
        w = torch.sigmoid(s + b)
        if needs_mask:
            w = torch.where(pattern.mask(b_idx, h_idx, qi, ki, g), w, torch.zeros_like(w))
        out = torch.matmul(w.view(B, Hkv, G, Tq, span), vb.unsqueeze(2))
        return out.reshape(B, Hq, Tq, -1)

    outs, order = [], []
    for blk in query_blocks(pattern, g, block_elements):
        qb = qf.index_select(2, blk.q_idx)
        if blk.kv_idx.numel() == 0:
            outs.append(qb.new_zeros(B, Hq, qb.shape[2], g.value_dim))
        else:
            kb, vb = kf.index_select(2, blk.kv_idx), vf.index_select(2, blk.kv_idx)
            outs.append(maybe_checkpoint(
                lambda *a, _q=blk.q_idx, _k=blk.kv_idx, _m=blk.needs_mask: block(_q, _k, _m, *a),
                qb, kb, vb, *params))
        order.append(blk.q_idx)
    perm = torch.cat(order)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=dev)
    out = torch.cat(outs, 2).index_select(2, inv)
    return unflat(out, g).to(q.dtype)


def sigmoid_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Any = None,
    score_mod: Any = None,
    *,
    scale: float | None = None,
    bias: float | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Dense sigmoid attention: ``sigmoid(masked logits + b) @ v`` (hidden pairs give
    ``sigmoid(-inf) = 0``)."""
    g, pattern, score_mod, scale, b = _prepare(q, k, v, pattern, score_mod, scale, bias)
    size_guard("sigmoid_attention_reference", g.batch * g.q_heads * g.q_len * g.kv_len,
               max_elements, "B*Hq*L*S")
    cdt = compute_dtype_for(q.dtype)
    w = torch.sigmoid(reference_logits(q, k, g, pattern, score_mod, scale, cdt) + b)
    vf = expand_heads(v.reshape(g.batch, g.kv_heads, g.kv_len, g.value_dim).to(cdt), g.group_size)
    return (w @ vf).to(q.dtype).reshape(g.batch, g.q_heads, *g.q_shape, g.value_dim)
