"""Talking-heads attention: learned mixing of the heads' logits and of their probabilities.

"Talking-Heads Attention" (Shazeer et al., 2020).

Semantics, with ``Hq`` query heads, ``Hl`` logit heads, ``P_l`` of shape ``(Hq, Hl)`` and
``P_w`` of shape ``(Hl, Hq)``, ``A^h_ij = scale * q^h_i . k^{g(h)}_j`` (``g`` maps a query
head to its key/value head, GQA) and ``M`` the pattern's mask evaluated for the logit heads::

    J^h'_ij = sum_h P_l[h, h'] A^h_ij                     (logits mixed across heads)
    W^h'_ij = softmax_j(J^h'_ij if M^h'_ij else -inf)     (one softmax per logit head)
    U^h_ij  = sum_h' P_w[h', h] W^h'_ij                   (probabilities mixed back)
    o^h_i   = sum_j U^h_ij v^{g(h)}_j

Fast path (:func:`talking_heads_attention`): both mixings are linear, so the whole thing is
ONE call of :func:`attnlab.attention` on lifted heads, which inherits every pattern and
backend and never holds an L x S tensor::

    J^h'_ij = (concat_h P_l[h, h'] q^h_i) . (concat_h k^{g(h)}_j)   (dimension Hq * D, MQA)
    O^h'_i  = softmax-attention^h'_i over the values concat_m v^m_j (dimension Hkv * Dv)
    o^h_i   = sum_h' P_w[h', h] O^h'_i[block g(h)]

It costs ``Hq`` times the logit FLOPs and ``Hkv`` times the value FLOPs of plain attention (the
price of mixing heads without materialising the logits); the reference materialises the
``(B, Hl, L, S)`` maps.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..api import attention
from ._common import (
    DEFAULT_MAX_ELEMENTS, check_param, check_qkv, check_scale, compute_dtype_for, dense_mask,
    expand_heads, safe_softmax_lse, size_guard, static_pattern,
)

__all__ = ["talking_heads_attention", "talking_heads_attention_reference"]


def _prepare(q, k, v, logits_mix, weights_mix, scale):
    g = check_qkv(q, k, v)
    if not isinstance(logits_mix, torch.Tensor) or logits_mix.ndim != 2:
        raise ValueError(
            f"logits_mix must be a tensor of shape (Hq={g.q_heads}, Hl), got "
            f"{tuple(logits_mix.shape) if isinstance(logits_mix, torch.Tensor) else type(logits_mix).__name__}"
        )
    Hl = logits_mix.shape[1]
    logits_mix = check_param("logits_mix", logits_mix, (g.q_heads, Hl), q)
    weights_mix = check_param("weights_mix", weights_mix, (Hl, g.q_heads), q)
    return g, logits_mix, weights_mix, check_scale(scale, g.head_dim)


def talking_heads_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logits_mix: torch.Tensor,
    weights_mix: torch.Tensor,
    pattern: Any = None,
    *,
    scale: float | None = None,
    backend: str = "auto",
    options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Talking-heads attention (module docstring) as one lifted :func:`attnlab.attention` call.

    Args:
        q, k, v: ``(B, Hq, *L, D)``, ``(B, Hkv, *S, D)``, ``(B, Hkv, *S, Dv)``.
        logits_mix: ``(Hq, Hl)`` mixing of the logits (``P_l``).
        weights_mix: ``(Hl, Hq)`` mixing of the probabilities (``P_w``).
        pattern: any :class:`attnlab.Pattern` (a head-dependent one is evaluated on the
            ``Hl`` logit heads), a mask_mod, or None (Full).
        scale: ``1/sqrt(D)`` when None (``D`` the head dim of ``q``).
        backend, options: as :func:`attnlab.attention`.

    Returns ``(B, Hq, *L, Dv)`` in ``q``'s dtype.
    """
    g, P_l, P_w, scale = _prepare(q, k, v, logits_mix, weights_mix, scale)
    B, Hq, Hkv, G, D, Dv = g.batch, g.q_heads, g.kv_heads, g.group_size, g.head_dim, g.value_dim
    Hl = P_l.shape[1]
    qf = q.reshape(B, Hq, g.q_len, D)
    q_lift = torch.einsum("bhld,hg->bglhd", qf, P_l).reshape(B, Hl, *g.q_shape, Hq * D)
    ke = expand_heads(k.reshape(B, Hkv, g.kv_len, D), G)
    k_lift = ke.permute(0, 2, 1, 3).reshape(B, 1, *g.kv_shape, Hq * D)
    v_lift = v.reshape(B, Hkv, g.kv_len, Dv).permute(0, 2, 1, 3).reshape(B, 1, *g.kv_shape, Hkv * Dv)
    O = attention(q_lift, k_lift, v_lift, pattern, scale=scale, backend=backend, options=options)
    O = O.reshape(B, Hl, g.q_len, Hkv, Dv)
    out = torch.einsum("bglmd,gmn->bmnld", O, P_w.reshape(Hl, Hkv, G))
    return out.reshape(B, Hq, *g.q_shape, Dv)


def talking_heads_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logits_mix: torch.Tensor,
    weights_mix: torch.Tensor,
    pattern: Any = None,
    *,
    scale: float | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Dense talking heads: logits ``(B, Hq, L, S)``, mixed to ``Hl`` heads, masked, softmax,
    mixed back to ``Hq`` heads, ``@ v``."""
    g, P_l, P_w, scale = _prepare(q, k, v, logits_mix, weights_mix, scale)
    B, Hq, L, S = g.batch, g.q_heads, g.q_len, g.kv_len
    Hl = P_l.shape[1]
    size_guard("talking_heads_attention_reference", B * max(Hq, Hl) * L * S, max_elements,
               "B*max(Hq, Hl)*L*S")
    gl = replace(g, q_heads=Hl, kv_heads=1)
    pattern = static_pattern(pattern, gl)
    cdt = compute_dtype_for(q.dtype)
    qf = q.reshape(B, Hq, L, g.head_dim).to(cdt)
    kf = expand_heads(k.reshape(B, g.kv_heads, S, g.head_dim).to(cdt), g.group_size)
    vf = expand_heads(v.reshape(B, g.kv_heads, S, g.value_dim).to(cdt), g.group_size)
    A = scale * qf @ kf.transpose(-1, -2)
    J = torch.einsum("bhij,hg->bgij", A, P_l.to(cdt))
    J = J.masked_fill(~dense_mask(pattern, gl), float("-inf"))
    W, _ = safe_softmax_lse(J)
    U = torch.einsum("bgij,gh->bhij", W, P_w.to(cdt))
    return (U @ vf).to(q.dtype).reshape(B, Hq, *g.q_shape, g.value_dim)
