r"""Flow-Attention: linear attention normalised by flow conservation.

Wu, Wu, Xu, Wang, Long, "Flowformer: Linearizing Transformers with Conservation Flows",
ICML 2022.

Attention is read as a flow network: the ``S`` values are sources, the ``L`` outputs sinks and
``phi(q_i) . phi(k_j)`` the capacity from source ``j`` to sink ``i``, with ``phi = sigmoid``
(non-negative). For one head (``i`` over queries, ``j`` over keys; non-causal)::

    I_i  = phi(q_i) . sum_j phi(k_j)                       incoming flow of sink i
    O_j  = phi(k_j) . sum_i phi(q_i)                       outgoing flow of source j
    I^_i = phi(q_i) . sum_j phi(k_j) / (O_j + eps)         incoming flow, outgoing conserved
    O^_j = phi(k_j) . sum_i phi(q_i) / (I_i + eps)         outgoing flow, incoming conserved
    w_j  = S * softmax_j(O^_j)                             source competition
    r_i  = sigmoid(I^_i * L / S)                           sink allocation
    o_i  = r_i * (phi(q_i) / (I_i + eps)) . sum_j phi(k_j) (w_j v_j)^T

``eps`` enters in exactly three places: it is added to ``O_j`` in ``I^`` and to ``I_i`` in
``O^`` and in the output's normaliser; nowhere else (no clamp). With ``phi = sigmoid`` both
flows are positive, so ``eps = 0`` is allowed. The fast path keeps ``(S, D)``/``(L, D)``
terms and one ``D x Dv`` state per query head, never the ``L x S`` capacities.
"""

from __future__ import annotations

import math

import torch

from attnlab.geometry import check_qkv

__all__ = ["flow_attention", "flow_attention_reference"]


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float >= 0, got eps={eps!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite float >= 0, got eps={eps!r}")
    return float(eps)


def _prepare(q, k, v, eps):
    """Validate, apply ``phi``, group query heads by key/value head, upcast half precision.

    Returns ``phi_q (B, Hkv, G, L, D)``, ``phi_k (B, Hkv, 1, S, D)``, ``v (B, Hkv, 1, S, Dv)``,
    the geometry and ``eps``.
    """
    g = check_qkv(q, k, v)
    eps = _check_eps(eps)
    dt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    B, Hkv, G = g.batch, g.kv_heads, g.group_size
    pq = torch.sigmoid(q.to(dt).reshape(B, Hkv, G, g.q_len, g.head_dim))
    pk = torch.sigmoid(k.to(dt).reshape(B, Hkv, 1, g.kv_len, g.head_dim))
    vf = v.to(dt).reshape(B, Hkv, 1, g.kv_len, g.value_dim)
    return pq, pk, vf, g, eps


def _finish(out: torch.Tensor, g, like: torch.Tensor) -> torch.Tensor:
    return out.reshape(g.batch, g.q_heads, *g.q_shape, g.value_dim).to(like.dtype)


def flow_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = 1e-6
) -> torch.Tensor:
    """Flow-Attention of Flowformer (Wu et al., 2022); see the module docstring for the exact
    formula and where ``eps`` enters.

    Args:
        q: ``(B, Hq, *L, D)`` queries (one or more token axes).
        k: ``(B, Hkv, *S, D)`` keys; ``Hq`` a multiple of ``Hkv`` (GQA: query head ``h`` uses
            key/value head ``h // (Hq // Hkv)``; flows are summed per query head). ``L != S``
            is allowed.
        v: ``(B, Hkv, *S, Dv)`` values.
        eps: added to every flow that is divided by (``I_i``, ``O_j``); a float ``>= 0``.

    Returns:
        ``(B, Hq, *L, Dv)`` in the dtype of ``q`` (float16/bfloat16 computed in float32).
        Linear in ``L`` and ``S``: no ``L x S`` tensor.
    """
    pq, pk, vf, g, eps = _prepare(q, k, v, eps)
    L, S = g.q_len, g.kv_len
    incoming = pq @ pk.sum(dim=-2).unsqueeze(-1)  # (B, Hkv, G, L, 1)
    outgoing = pk @ pq.sum(dim=-2).unsqueeze(-1)  # (B, Hkv, G, S, 1)
    conserved_in = pq @ (pk / (outgoing + eps)).sum(dim=-2).unsqueeze(-1)
    conserved_out = pk @ (pq / (incoming + eps)).sum(dim=-2).unsqueeze(-1)
    competition = torch.softmax(conserved_out, dim=-2) * S
    allocation = torch.sigmoid(conserved_in * (L / S))
    state = pk.transpose(-1, -2) @ (vf * competition)  # (B, Hkv, G, D, Dv)
    out = allocation * ((pq / (incoming + eps)) @ state)
    return _finish(out, g, q)


def flow_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = 1e-6
) -> torch.Tensor:
    """Reference for :func:`flow_attention` on the dense ``L x S`` capacity matrix
    ``A = phi(Q) phi(K)^T``: ``I = A 1``, ``O = A^T 1``, ``I^ = A (1 / (O + eps))``,
    ``O^ = A^T (1 / (I + eps))``, ``w = S softmax(O^)``, ``r = sigmoid(I^ L / S)`` and
    ``o = r * (diag(1 / (I + eps)) A) (w * V)``."""
    pq, pk, vf, g, eps = _prepare(q, k, v, eps)
    L, S = g.q_len, g.kv_len
    a = pq @ pk.transpose(-1, -2)  # (B, Hkv, G, L, S)
    incoming = a.sum(dim=-1)
    outgoing = a.sum(dim=-2)
    conserved_in = (a / (outgoing + eps)[..., None, :]).sum(dim=-1)
    conserved_out = (a / (incoming + eps)[..., :, None]).sum(dim=-2)
    competition = torch.softmax(conserved_out, dim=-1) * S
    allocation = torch.sigmoid(conserved_in * (L / S))
    flow = a / (incoming + eps)[..., None]
    out = allocation[..., None] * (flow @ (competition[..., None] * vf))
    return _finish(out, g, q)
