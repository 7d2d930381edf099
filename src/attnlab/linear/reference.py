"""Exact reference for :mod:`attnlab.linear.forms`: the defining recurrence, one token at a time.

Causal::

    S_t = g_t * S_{t-1} + k_t v_t^T,   z_t = g_t * z_{t-1} + k_t,   o_t = q_t S_t / (q_t . z_t + eps)

(``/ (...)`` only when ``normalize``), non-causal ``o_i = q_i S / (q_i . z + eps)`` with
``S = S0 + sum_j k_j v_j^T``. No chunking, no log-space bookkeeping, no shared code with the fast
forms beyond argument checks: slow (a Python loop over tokens) and the ground truth of the tests.
Use float64 for exact comparisons.
"""

from __future__ import annotations

from typing import Optional

import torch

from attnlab.linear.forms import (
    EPS,
    LinearAttentionState,
    StateLike,
    _as_decay,
    _as_gate,
    _as_state,
    _check_bool,
    _check_modes,
    _check_qkv,
)

__all__ = ["naive_recurrence"]


def naive_recurrence(phi_q, phi_k, v, *, causal: bool, decay=None, gate=None, normalize: bool,
                     initial_state: Optional[StateLike] = None, return_state: bool = False):
    """The recurrence of the module docstring, token by token.

    ``phi_q, phi_k (B, H, L, F)``, ``v (B, H, L, Dv)``; ``decay`` per head and ``gate``
    ``(B, H, L)`` / ``(B, H, L, F)`` in ``(0, 1]`` (causal only). Returns ``(B, H, L, Dv)``, or
    ``(out, LinearAttentionState)`` with the final state when ``return_state``.
    """
    _check_modes(causal, decay, gate)
    _check_qkv(phi_q, phi_k, v, 4, causal=causal)
    _check_bool("normalize", normalize)
    B, H, L, Fd = phi_q.shape
    Dv = v.shape[-1]
    gamma = _as_decay(decay, H, phi_q)
    g_tok = None if gate is None else _as_gate(gate, B, H, L, Fd, phi_q)
    S, z = _as_state(initial_state, B, H, Fd, Dv, normalize, phi_q, "initial_state")
    if S is None:
        S = phi_q.new_zeros(B, H, Fd, Dv)
        z = phi_q.new_zeros(B, H, Fd) if normalize else None

    def read(q_t, S, z):
        num = torch.einsum("bhf,bhfd->bhd", q_t, S)
        if not normalize:
            return num
        return num / (torch.einsum("bhf,bhf->bh", q_t, z)[..., None] + EPS)

    outs = []
    if not causal:
        S = S + torch.einsum("bhtf,bhtd->bhfd", phi_k, v)
        z = z + phi_k.sum(dim=2) if normalize else None
        outs = [read(phi_q[:, :, i], S, z) for i in range(L)]
    else:
        for t in range(L):
            g = torch.ones(B, H, Fd, dtype=phi_q.dtype, device=phi_q.device)
            if gamma is not None:
                g = g * gamma[None, :, None]
            if g_tok is not None:
                g = g * g_tok[:, :, t]
            k_t, v_t = phi_k[:, :, t], v[:, :, t]
            S = g[..., None] * S + k_t[..., :, None] * v_t[..., None, :]
            if normalize:
                z = g * z + k_t
            outs.append(read(phi_q[:, :, t], S, z))
    out = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, Dv)
    return (out, LinearAttentionState(S, z)) if return_state else out
