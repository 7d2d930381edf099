"""Exact reference for :mod:`attnlab.linear.forms`: a plain loop over query tokens.

Every output is computed straight from the defining equations (see the module docstring of
:mod:`attnlab.linear.forms`), with explicit ``gamma^(i-j)`` weights; slow (``O(L^2)`` work)
but free of chunking or state bookkeeping. Use float64 for exact comparisons.
"""

from __future__ import annotations

from typing import Optional

import torch

from attnlab.linear.forms import (
    EPS,
    LinearAttentionState,
    StateLike,
    _as_decay,
    _as_state,
    _check_decay_causal,
    _check_normalize,
    _check_qkv,
)

__all__ = ["naive_recurrence"]


def naive_recurrence(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    decay=None,
    normalize: bool,
    initial_state: Optional[StateLike] = None,
    return_state: bool = False,
):
    """For each ``i``: ``num_i = sum_{j in J_i} gamma^(i-j) (q_i . k_j) v_j + gamma^(i+1) q_i S0``
    and ``den_i`` alike with ``v_j -> 1``, ``S0 -> z0``; ``o_i = num_i / (den_i + eps)`` when
    ``normalize`` (``J_i = {0..i}`` causal, all ``j`` and ``gamma = 1`` non-causal).

    Returns ``(B, H, L, Dv)``, or ``(out, LinearAttentionState)`` with the final state
    ``S = gamma^L S0 + sum_j gamma^(L-1-j) k_j v_j^T`` (``z`` alike) when ``return_state``.
    """
    _check_qkv(phi_q, phi_k, v, 4)
    _check_normalize(normalize)
    _check_decay_causal(decay, causal)
    B, H, L, Fd = phi_q.shape
    Dv = v.shape[-1]
    gamma = _as_decay(decay, H, phi_q)
    if gamma is None:
        gamma = torch.ones(H, dtype=phi_q.dtype, device=phi_q.device)
    S0, z0 = _as_state(initial_state, B, H, Fd, Dv, normalize, phi_q, "initial_state")
    g = gamma[None, :]  # (1, H)

    outs = []
    for i in range(L):
        n = i + 1 if causal else L
        q_i = phi_q[:, :, i]  # (B, H, F)
        if causal:
            w = g[..., None] ** (i - torch.arange(n, dtype=phi_q.dtype, device=phi_q.device))
        else:
            w = torch.ones(1, 1, n, dtype=phi_q.dtype, device=phi_q.device)
        a = (q_i[:, :, None, :] * phi_k[:, :, :n]).sum(dim=-1) * w  # (B, H, n)
        num = (a[..., None] * v[:, :, :n]).sum(dim=-2)  # (B, H, Dv)
        den = a.sum(dim=-1)  # (B, H)
        if S0 is not None:
            g0 = g ** (i + 1) if causal else torch.ones_like(g)
            num = num + g0[..., None] * (q_i[..., None] * S0).sum(dim=-2)
            if normalize:
                den = den + g0 * (q_i * z0).sum(dim=-1)
        outs.append(num / (den[..., None] + EPS) if normalize else num)
    out = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, Dv)
    if not return_state:
        return out

    if causal:
        w = g[..., None] ** (L - 1 - torch.arange(L, dtype=phi_q.dtype, device=phi_q.device))
        gL = g ** L
    else:
        w = torch.ones(1, 1, L, dtype=phi_q.dtype, device=phi_q.device)
        gL = torch.ones_like(g)
    kw = phi_k * w[..., None]  # (B, H, L, F)
    S = (kw[..., :, None] * v[..., None, :]).sum(dim=2)
    z = kw.sum(dim=2) if normalize else None
    if S0 is not None:
        S = S + gL[..., None, None] * S0
        if normalize:
            z = z + gL[..., None] * z0
    return out, LinearAttentionState(S, z)
