r"""Efficient Attention: softmax-normalised queries and keys, associated the cheap way round.

Shen, Zhang, Zhao, Yi, Li, "Efficient Attention: Attention with Linear Complexities", WACV 2021.

For one head, with ``q_i`` the ``D`` features of query ``i`` and ``k_j``, ``v_j`` those of key
and value ``j`` (``j`` over all ``S`` keys; non-causal)::

    rho_q(Q)[i, f] = softmax over f  of  Q[i, :]      (each query over its D features)
    rho_k(K)[j, f] = softmax over j  of  K[:, f]      (each key feature over the S keys)
    E(Q, K, V)     = rho_q(Q) @ (rho_k(K)^T @ V)      (B, Hq, *L, Dv)

There is no logit scale (the paper's softmax normalisation has none). The implied ``L x S``
matrix ``rho_q(Q) rho_k(K)^T`` has rows that sum to 1 (every column of ``rho_k(K)`` sums to 1
and every row of ``rho_q(Q)`` does too), so each output row is a convex combination of value
rows. The fast path only forms the ``D x Dv`` context ``rho_k(K)^T V`` per key/value head.
"""

from __future__ import annotations

import torch

from attnlab.geometry import check_qkv

__all__ = ["efficient_attention", "efficient_attention_reference"]


def _prepare(q, k, v):
    """Validate, flatten token axes and upcast half precision: ``(q, k, v, geometry)``."""
    g = check_qkv(q, k, v)
    dt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    q = q.reshape(g.batch, g.q_heads, g.q_len, g.head_dim).to(dt)
    k = k.reshape(g.batch, g.kv_heads, g.kv_len, g.head_dim).to(dt)
    v = v.reshape(g.batch, g.kv_heads, g.kv_len, g.value_dim).to(dt)
    return q, k, v, g


def efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Efficient Attention ``softmax_D(Q) @ (softmax_S(K)^T @ V)`` (Shen et al., 2021).

    Args:
        q: ``(B, Hq, *L, D)`` queries (one or more token axes).
        k: ``(B, Hkv, *S, D)`` keys, ``Hq`` a multiple of ``Hkv`` (query head ``h`` uses key/value
            head ``h // (Hq // Hkv)``).
        v: ``(B, Hkv, *S, Dv)`` values.

    Returns:
        ``(B, Hq, *L, Dv)`` in the dtype of ``q`` (float16/bfloat16 are computed in float32).
        Non-causal; memory ``O((L + S) D + D Dv)`` per head, never ``L x S``.
    """
    qf, kf, vf, g = _prepare(q, k, v)
    G = g.group_size
    context = kf.softmax(dim=-2).transpose(-1, -2) @ vf  # (B, Hkv, D, Dv)
    rq = qf.softmax(dim=-1).view(g.batch, g.kv_heads, G, g.q_len, g.head_dim)
    out = rq @ context[:, :, None]
    return out.reshape(g.batch, g.q_heads, *g.q_shape, g.value_dim).to(q.dtype)


def efficient_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Reference for :func:`efficient_attention`: the explicit ``(B, Hq, L, S)`` matrix
    ``M = softmax_D(Q) softmax_S(K)^T`` (key/value heads repeated for GQA), then ``M @ V``."""
    qf, kf, vf, g = _prepare(q, k, v)
    kf = kf.repeat_interleave(g.group_size, dim=1)
    vf = vf.repeat_interleave(g.group_size, dim=1)
    m = qf.softmax(dim=-1) @ kf.softmax(dim=-2).transpose(-1, -2)
    out = m @ vf
    return out.reshape(g.batch, g.q_heads, *g.q_shape, g.value_dim).to(q.dtype)
