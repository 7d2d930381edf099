"""Selective attention: tokens can lower the attention that later tokens pay to earlier ones.

"Selective Attention Improves Transformer" (Leviathan et al., 2024). Parameter
free; causal self-attention.

Semantics (the paper's listing), with ``h0`` the selection head (head 0 by default) and
``A^h_ij = scale * q^h_i . k^h_j`` the causal logits of head ``h`` (``-inf`` for ``j > i``)::

    S_i'j = ReLU(A^h0_i'j)   for 1 <= j < i'    (never the first token (BOS), never itself)
          = 0                otherwise
    F_ij  = sum_{i' < i} S_i'j                   (accumulated over earlier queries only)
    o^h_i = sum_{j <= i} softmax_j(A^h_ij - F_ij) v^h_j      for every head h

so the selection of query ``i'`` against key ``j`` lowers the logit of ``j`` for every later
query. Self-attention only (``L == S``); GQA: head ``h0`` of ``q`` with its key head.

Fast path (:func:`selective_attention`): the logits inherently depend on the whole history
of ``F``, so the queries are processed in chunks of ``chunk_size`` rows, carrying the running
column sums ``c_j = sum_{i' < start} S_i'j`` (``(B, S)``) between chunks; chunk ``[a, b)``
reads only the keys ``[0, b)``. Each chunk runs under activation checkpointing: memory
``B * Hq * chunk * S`` at a time, plus ``(L / chunk) * B * S`` carried sums kept for backward;
never ``B * Hq * L * S``. The reference materialises the paper's equations in full.
"""

from __future__ import annotations

import torch

from ._common import (
    DEFAULT_MAX_ELEMENTS, check_positive_int, check_qkv, check_scale, compute_dtype_for,
    expand_heads, maybe_checkpoint, row_chunks, safe_softmax_lse, size_guard,
)

__all__ = ["selective_attention", "selective_attention_reference"]


def _prepare(q, k, v, scale, selection_head):
    g = check_qkv(q, k, v)
    if g.ndim != 1:
        raise ValueError(
            f"selective attention is defined on one token axis; got q.shape={tuple(q.shape)} "
            "(expected (B, H, L, D))"
        )
    if g.q_len != g.kv_len:
        raise ValueError(
            f"selective attention is causal self-attention and needs L == S; got "
            f"q.shape[2]={g.q_len}, k.shape[2]={g.kv_len}"
        )
    if isinstance(selection_head, bool) or not isinstance(selection_head, int):
        raise TypeError(f"selection_head must be an int, got selection_head={selection_head!r}")
    if not 0 <= selection_head < g.q_heads:
        raise ValueError(
            f"selection_head must be in [0, {g.q_heads}) (the query heads), got selection_head={selection_head}"
        )
    return g, check_scale(scale, g.head_dim)


def selective_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    selection_head: int = 0,
    chunk_size: int = 128,
) -> torch.Tensor:
    """Causal selective attention (module docstring), chunked over queries.

    Args:
        q, k, v: ``(B, Hq, L, D)``, ``(B, Hkv, L, D)``, ``(B, Hkv, L, Dv)``.
        scale: logit scale, ``1/sqrt(D)`` when None.
        selection_head: the query head whose logits give the selection (the paper: 0).
        chunk_size: query rows per chunk.

    Returns ``(B, Hq, L, Dv)`` in ``q``'s dtype.
    """
    g, scale = _prepare(q, k, v, scale, selection_head)
    chunk = check_positive_int("chunk_size", chunk_size)
    cdt = compute_dtype_for(q.dtype)
    B, Hq, Hkv, G, L = g.batch, g.q_heads, g.kv_heads, g.group_size, g.q_len
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    dev = q.device

    def step(a, qc, kp, vp, carried):
        C, n = qc.shape[2], kp.shape[2]
        s = torch.matmul(qc.view(B, Hkv, G, C, -1), kp.unsqueeze(2).transpose(-1, -2)) * scale
        s = s.reshape(B, Hq, C, n)
        rows = torch.arange(a, a + C, device=dev).view(-1, 1)
        cols = torch.arange(n, device=dev).view(1, -1)
        s = s.masked_fill(cols > rows, float("-inf"))
        chosen = (cols < rows) & (cols > 0)
        sel = torch.where(chosen, torch.relu(s[:, selection_head]), torch.zeros((), dtype=s.dtype, device=dev))
        F = carried.unsqueeze(1) + (torch.cumsum(sel, 1) - sel)  # exclusive: earlier rows only
        p, _ = safe_softmax_lse(s - F.unsqueeze(1))
        out = torch.matmul(p.view(B, Hkv, G, C, n), vp.unsqueeze(2)).reshape(B, Hq, C, -1)
        return out, sel.sum(1)

    carried = qf.new_zeros(B, L)
    outs = []
    for a, b in row_chunks(L, chunk):
        out, add = maybe_checkpoint(lambda *t, _a=a: step(_a, *t), qf[:, :, a:b], kf[:, :, :b], vf[:, :, :b],
                                    carried[:, :b])
        outs.append(out)
        if b < L:
            carried = carried + torch.nn.functional.pad(add, (0, L - b))
    return torch.cat(outs, 2).to(q.dtype)


def selective_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    selection_head: int = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """The paper's listing, dense: causal logits, ``S = ReLU(logits[h0])`` with the BOS column
    and the diagonal zeroed, shifted one query down, ``F = cumsum(S)`` over queries,
    ``softmax(logits - F) @ v``."""
    g, scale = _prepare(q, k, v, scale, selection_head)
    L = g.q_len
    size_guard("selective_attention_reference", g.batch * g.q_heads * L * L, max_elements, "B*Hq*L*L")
    cdt = compute_dtype_for(q.dtype)
    kf = expand_heads(k.to(cdt), g.group_size)
    vf = expand_heads(v.to(cdt), g.group_size)
    logits = scale * q.to(cdt) @ kf.transpose(-1, -2)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    logits = logits.masked_fill(~causal, float("-inf"))
    S = torch.relu(logits[:, selection_head])  # (B, L, L); ReLU(-inf) = 0
    keep = torch.ones(L, L, dtype=S.dtype, device=q.device)
    keep[:, 0] = 0  # do not mask <BOS>
    keep = keep * (1 - torch.eye(L, dtype=S.dtype, device=q.device))  # do not mask self
    S = S * keep
    S = torch.roll(S, 1, -2)  # query i' acts on queries i > i' only
    S = torch.cat([torch.zeros_like(S[:, :1]), S[:, 1:]], 1)
    F = torch.cumsum(S, -2)
    p, _ = safe_softmax_lse(logits - F[:, None])
    return (p @ vf).to(q.dtype)
