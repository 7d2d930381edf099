"""Triple-wise (Kronecker / tensor) attention: each query attends to *pairs* of keys.

"How to Capture Higher-order Correlations? Generalizing Matrix Softmax Attention to
Kronecker Computation" (Alman and Song, 2024); trained as in "Tensor Attention Training:
Provably Efficient Learning of Higher-order Transformers" (Liang et al., 2024).

Semantics: with ``K1 (.) K2`` the column-wise Kronecker product (row ``(j, l)`` is the
elementwise product ``k_j * k'_l``) and likewise ``V1 (.) V2``, the output is
``D^-1 exp(scale * Q (K1 (.) K2)^T) (V1 (.) V2)``, i.e. for query ``i``::

    s_ijl = scale * sum_d q_id k_jd k'_ld
    o_i   = sum_{(j, l) : M_ij and M_il} softmax_{(j, l)}(s_ijl) (v_j * v'_l)

over the pairs whose keys the pattern ``M`` both shows to ``i`` (Full by default; a row with
no visible pair is 0). ``k2, v2`` default to ``k, v``. The paper writes ``exp(Q K^T / d)``;
attnlab's default ``scale`` is ``1/sqrt(D)`` like everywhere else (pass ``scale=1/D`` for
the paper's). The exact computation is cubic (``L * S^2`` scores): the near-linear algorithm of
the paper is an approximation for bounded entries and is not implemented.

Fast path (:func:`tensor_attention`): query chunks whose ``(chunk, S, S)`` scores fit a
budget, ``(q_i * k_j) @ K2^T`` for the scores and ``sum_j v_j * (P_ij. @ V2)`` for the output
(never the ``S^2 x Dv`` Kronecker values), under activation checkpointing; refuses work above
``max_work`` (``B * Hq * L * S^2 * D``). The reference builds ``K1 (.) K2`` and ``V1 (.) V2``
as matrices and refuses above ``max_elements`` scores.
"""

from __future__ import annotations

from typing import Any

import torch

from .._checks import SizeLimitError
from ._common import (
    check_positive_int, check_qkv, check_scale, compute_dtype_for, dense_mask, expand_heads,
    flat, maybe_checkpoint, row_chunks, safe_softmax_lse, size_guard, static_pattern, unflat,
)

__all__ = ["tensor_attention", "tensor_attention_reference"]

DEFAULT_MAX_WORK = 1 << 32
DEFAULT_REFERENCE_ELEMENTS = 1 << 24
DEFAULT_CHUNK_ELEMENTS = 1 << 21


def _prepare(q, k, v, k2, v2, pattern, scale):
    g = check_qkv(q, k, v)
    k2 = k if k2 is None else k2
    v2 = v if v2 is None else v2
    for name, a, b in (("k2", k2, k), ("v2", v2, v)):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(a).__name__}")
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            raise ValueError(
                f"{name} must match {name[0]} in shape, dtype and device: got {name}.shape={tuple(a.shape)}, "
                f"{name[0]}.shape={tuple(b.shape)}"
            )
    return g, k2, v2, static_pattern(pattern, g), check_scale(scale, g.head_dim)


def tensor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k2: torch.Tensor | None = None,
    v2: torch.Tensor | None = None,
    pattern: Any = None,
    *,
    scale: float | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    max_work: int = DEFAULT_MAX_WORK,
) -> torch.Tensor:
    """Triple-wise attention (module docstring), exact, chunked over queries.

    Args:
        q: ``(B, Hq, *L, D)``; k, k2: ``(B, Hkv, *S, D)``; v, v2: ``(B, Hkv, *S, Dv)``.
        pattern: which keys each query may pair (a pair needs both), None for Full.
        scale: ``1/sqrt(D)`` when None.
        chunk_elements: budget of ``B * Hq * chunk * S^2`` scores per chunk.
        max_work: refuse above ``B * Hq * L * S^2 * D`` multiply-adds (ValueError).

    Returns ``(B, Hq, *L, Dv)`` in ``q``'s dtype.
    """
    g, k2, v2, pattern, scale = _prepare(q, k, v, k2, v2, pattern, scale)
    check_positive_int("chunk_elements", chunk_elements)
    check_positive_int("max_work", max_work)
    B, Hq, L, S, D = g.batch, g.q_heads, g.q_len, g.kv_len, g.head_dim
    work = B * Hq * L * S * S * D
    if work > max_work:
        raise SizeLimitError(
            f"tensor_attention is cubic: B*Hq*L*S^2*D = {B}*{Hq}*{L}*{S}^2*{D} = {work} multiply-adds, "
            f"above max_work={max_work}; use shorter sequences or raise max_work"
        )
    cdt = compute_dtype_for(q.dtype)
    G = g.group_size
    qf = flat(q).to(cdt)
    k1e, k2e = (expand_heads(flat(t).to(cdt), G) for t in (k, k2))
    v1e, v2e = (expand_heads(flat(t).to(cdt), G) for t in (v, v2))
    dev = q.device
    b_idx = torch.arange(B, device=dev).view(-1, 1, 1, 1)
    h_idx = torch.arange(Hq, device=dev).view(1, -1, 1, 1)
    kv_idx = torch.arange(S, device=dev).view(1, 1, 1, -1)
    rows = max(1, chunk_elements // max(1, B * Hq * S * S))

    def step(a, qc, ka, kb, va, vb):
        C = qc.shape[2]
        s = torch.matmul(qc.unsqueeze(3) * ka.unsqueeze(2), kb.unsqueeze(2).transpose(-1, -2)) * scale
        m = torch.broadcast_to(
            pattern.mask(b_idx, h_idx, torch.arange(a, a + C, device=dev).view(1, 1, -1, 1), kv_idx, g),
            (B, Hq, C, S),
        )
        s = s.masked_fill(~(m.unsqueeze(-1) & m.unsqueeze(-2)), float("-inf"))
        p, _ = safe_softmax_lse(s.reshape(B, Hq, C, S * S))
        t = torch.matmul(p.view(B, Hq, C, S, S), vb.unsqueeze(2))  # sum_l p_ijl v'_l
        return (t * va.unsqueeze(2)).sum(3)  # sum_j v_j * (...)

    outs = [maybe_checkpoint(lambda *t, _a=a: step(_a, *t), qf[:, :, a:b], k1e, k2e, v1e, v2e)
            for a, b in row_chunks(L, rows)]
    return unflat(torch.cat(outs, 2), g).to(q.dtype)


def tensor_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k2: torch.Tensor | None = None,
    v2: torch.Tensor | None = None,
    pattern: Any = None,
    *,
    scale: float | None = None,
    max_elements: int = DEFAULT_REFERENCE_ELEMENTS,
) -> torch.Tensor:
    """``D^-1 exp(scale Q (K1 (.) K2)^T) (V1 (.) V2)`` with the Kronecker matrices built."""
    g, k2, v2, pattern, scale = _prepare(q, k, v, k2, v2, pattern, scale)
    B, Hq, L, S = g.batch, g.q_heads, g.q_len, g.kv_len
    size_guard("tensor_attention_reference", B * Hq * L * S * S, max_elements, "B*Hq*L*S^2 scores")
    cdt = compute_dtype_for(q.dtype)
    G = g.group_size
    k1e, k2e = (expand_heads(flat(t).to(cdt), G) for t in (k, k2))
    v1e, v2e = (expand_heads(flat(t).to(cdt), G) for t in (v, v2))
    Kk = (k1e.unsqueeze(3) * k2e.unsqueeze(2)).reshape(B, Hq, S * S, -1)  # row (j, l) = k_j * k'_l
    Vk = (v1e.unsqueeze(3) * v2e.unsqueeze(2)).reshape(B, Hq, S * S, -1)
    logits = scale * flat(q).to(cdt) @ Kk.transpose(-1, -2)
    m = torch.broadcast_to(dense_mask(pattern, g), (B, Hq, L, S))
    pair = (m.unsqueeze(-1) & m.unsqueeze(-2)).reshape(B, Hq, L, S * S)
    p, _ = safe_softmax_lse(logits.masked_fill(~pair, float("-inf")))
    return unflat(p @ Vk, g).to(q.dtype)
