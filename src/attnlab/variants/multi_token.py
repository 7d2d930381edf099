"""Multi-Token Attention (MTA): a learned convolution over the attention logits.

"Multi-Token Attention" (Golovneva et al., 2025). Each weight depends
on several nearby queries and keys, through a per-head 2-D convolution over the
(query, key) logit map, with masking before and after it so no hidden pair leaks in, and an
optional mixing of heads within groups.

Semantics, for head ``h`` with kernel ``theta_h`` of size ``(c_q, c_k)``, ``p = c_k // 2``,
``A_ij = scale * q_i . k_j`` and ``M`` the pattern's mask (Full by default; ``Causal()`` for
the paper's language models)::

    A0_ij = A_ij if M_ij else 0                                   (Mask_0 before the conv)
    C_ij  = sum_{a=0}^{c_q-1} sum_{b=0}^{c_k-1} theta_h[a, b] * A0_{i-a, j-b+p}
            (terms outside the logit map are 0: queries look back only, keys both ways)
    W     = softmax_j( C_ij if M_ij else -inf )                   (Mask_-inf after it)
    o_i   = sum_j W_ij v_j

With causal ``M`` every term reads a pair ``(i-a, j')`` with ``j' <= i-a <= i``: nothing from
the future. Head mixing (``head_mix`` of shape ``(Hq / c_h, c_h, c_h)``) mixes the heads of
each group of ``c_h`` consecutive heads, ``X'_{g c_h + r} = sum_s head_mix[g, r, s] X_{g c_h + s}``,
applied to the conv output before the ``-inf`` mask (``head_mix_position="pre"``) or to the
probabilities ``W`` (``"post"``, the default).

Fast path (:func:`multi_token_attention`): query chunks of ``chunk_size`` rows. Each chunk
computes the logits of its rows and of the ``c_q - 1`` rows above it, over the contiguous
range of key tiles those rows touch in the pattern's block layout (keys a causal or windowed
pattern hides from the whole chunk are zeros before the conv and hidden after it, so they are
left out), then one grouped ``conv2d``, the mask, the softmax and ``@ v``, under activation
checkpointing. Memory ``B * Hq * (chunk + c_q) * range`` at a time, at most
``(chunk + c_q) * S``: the logit map is inherent to the mechanism, so a key range is computed,
not the pattern's exact span. The reference applies the double sum above literally, with
shifted copies of ``A0``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..patterns.layout import Tiling
from ._common import (
    DEFAULT_MAX_ELEMENTS, check_param, check_positive_int, check_qkv, check_scale,
    compute_dtype_for, dense_mask, expand_heads, maybe_checkpoint, row_chunks, safe_softmax_lse,
    size_guard, static_pattern,
)

__all__ = ["multi_token_attention", "multi_token_attention_reference"]

_POSITIONS = ("pre", "post")


def _prepare(q, k, v, pattern, kernel, head_mix, head_mix_position, scale):
    g = check_qkv(q, k, v)
    if g.ndim != 1:
        raise ValueError(
            f"multi-token attention convolves a (query, key) map of one token axis; got "
            f"q.shape={tuple(q.shape)} (expected (B, H, L, D))"
        )
    pattern = static_pattern(pattern, g)
    if not isinstance(kernel, torch.Tensor) or kernel.ndim != 3:
        raise ValueError(
            f"kernel must be a tensor of shape (Hq={g.q_heads}, c_q, c_k), got "
            f"{tuple(kernel.shape) if isinstance(kernel, torch.Tensor) else type(kernel).__name__}"
        )
    kernel = check_param("kernel", kernel, (g.q_heads, kernel.shape[1], kernel.shape[2]), q)
    if head_mix is not None:
        if not isinstance(head_mix, torch.Tensor) or head_mix.ndim != 3 or head_mix.shape[1] != head_mix.shape[2]:
            raise ValueError(
                "head_mix must be a tensor of shape (Hq / c_h, c_h, c_h), got "
                f"{tuple(head_mix.shape) if isinstance(head_mix, torch.Tensor) else type(head_mix).__name__}"
            )
        ch = head_mix.shape[1]
        if g.q_heads % ch or head_mix.shape[0] != g.q_heads // ch:
            raise ValueError(
                f"head_mix.shape={tuple(head_mix.shape)} does not group Hq={g.q_heads} heads into "
                f"groups of c_h={ch}: expected ({g.q_heads // ch if g.q_heads % ch == 0 else 'Hq/c_h'}, {ch}, {ch})"
            )
        head_mix = check_param("head_mix", head_mix, tuple(head_mix.shape), q)
    if head_mix_position not in _POSITIONS:
        raise ValueError(f"head_mix_position must be one of {_POSITIONS}, got {head_mix_position!r}")
    return g, pattern, kernel, head_mix, check_scale(scale, g.head_dim)


def _mix(x: torch.Tensor, head_mix: torch.Tensor | None) -> torch.Tensor:
    """Mix heads within groups: ``(B, H, ...)`` with ``head_mix (H / c, c, c)``."""
    if head_mix is None:
        return x
    n, c = head_mix.shape[0], head_mix.shape[1]
    xg = x.reshape(x.shape[0], n, c, *x.shape[2:])
    out = torch.einsum("bgs...,grs->bgr...", xg, head_mix)
    return out.reshape(x.shape)


def multi_token_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: torch.Tensor,
    pattern: Any = None,
    *,
    head_mix: torch.Tensor | None = None,
    head_mix_position: str = "post",
    scale: float | None = None,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Multi-token attention (module docstring), chunked over queries.

    Args:
        q, k, v: ``(B, Hq, L, D)``, ``(B, Hkv, S, D)``, ``(B, Hkv, S, Dv)``; GQA allowed.
        kernel: ``(Hq, c_q, c_k)`` key-query convolution kernels, one per query head.
        pattern: a 1-D :class:`attnlab.Pattern` or mask_mod (None: Full).
        head_mix: optional ``(Hq / c_h, c_h, c_h)`` head-mixing weights.
        head_mix_position: ``"post"`` (mix the probabilities) or ``"pre"`` (mix the conv output).
        scale: logit scale, ``1/sqrt(D)`` when None.
        chunk_size: query rows per chunk.

    Returns ``(B, Hq, L, Dv)`` in ``q``'s dtype.
    """
    g, pattern, kernel, head_mix, scale = _prepare(q, k, v, pattern, kernel, head_mix, head_mix_position, scale)
    chunk = check_positive_int("chunk_size", chunk_size)
    cdt = compute_dtype_for(q.dtype)
    B, Hq, Hkv, G, L, S = g.batch, g.q_heads, g.kv_heads, g.group_size, g.q_len, g.kv_len
    cq, ck = kernel.shape[1], kernel.shape[2]
    p = ck // 2
    dev = q.device
    b_idx = torch.arange(B, device=dev).view(-1, 1, 1, 1)
    h_idx = torch.arange(Hq, device=dev).view(1, -1, 1, 1)
    kv_idx = torch.arange(S, device=dev).view(1, 1, 1, -1)
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)

    def step(a, lo, j0, qh, kk, vv, w, mix):
        n, nk = qh.shape[2], kk.shape[2]  # rows lo .. a + C - 1 (lo = max(0, a - cq + 1)), keys j0 ..
        s = torch.matmul(qh.view(B, Hkv, G, n, -1), kk.unsqueeze(2).transpose(-1, -2)) * scale
        s = s.reshape(B, Hq, n, nk)
        rows = torch.arange(lo, lo + n, device=dev).view(1, 1, -1, 1)
        m = torch.broadcast_to(pattern.mask(b_idx, h_idx, rows, kv_idx[..., j0:j0 + nk], g), s.shape)
        s0 = torch.where(m, s, torch.zeros((), dtype=s.dtype, device=dev))
        # rows above the first query and keys outside the range are zeros of the conv's input
        s0 = F.pad(s0, (ck - 1 - p, p, cq - 1 - (a - lo), 0))
        conv = F.conv2d(s0, w.flip(-1, -2).unsqueeze(1), groups=Hq)  # (B, Hq, C, nk)
        keep = m[:, :, a - lo:]
        if mix is not None and head_mix_position == "pre":
            conv = _mix(conv, mix)
        probs, _ = safe_softmax_lse(conv.masked_fill(~keep, float("-inf")))
        if mix is not None and head_mix_position == "post":
            probs = _mix(probs, mix)
        C = probs.shape[2]
        return torch.matmul(probs.view(B, Hkv, G, C, nk), vv.unsqueeze(2)).reshape(B, Hq, C, -1)

    outs = []
    extra = (head_mix,) if head_mix is not None else ()
    # keys no row of a chunk (halo included) sees are zeros before the conv and hidden after
    # it: only the range [j0, j1) of the key tiles the chunk's rows touch takes part
    kv_tile = 16
    touched = pattern.block_layout(Tiling(g, (chunk,), (kv_tile,))).any
    touched = touched.reshape(-1, *touched.shape[-2:]).any(0)  # (query tiles, key tiles)
    for a, b in row_chunks(L, chunk):
        lo = max(0, a - cq + 1)
        cols = touched[lo // chunk: a // chunk + 1].any(0).nonzero().flatten()
        if cols.numel() == 0:
            outs.append(qf.new_zeros(B, Hq, b - a, g.value_dim))
            continue
        j0, j1 = int(cols[0]) * kv_tile, min(S, (int(cols[-1]) + 1) * kv_tile)
        fn = (lambda qh, kk, vv, w, *mx, _a=a, _lo=lo, _j0=j0: step(_a, _lo, _j0, qh, kk, vv, w, mx[0] if mx else None))
        outs.append(maybe_checkpoint(fn, qf[:, :, lo:b], kf[:, :, j0:j1], vf[:, :, j0:j1], kernel, *extra))
    return torch.cat(outs, 2).to(q.dtype)


def multi_token_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: torch.Tensor,
    pattern: Any = None,
    *,
    head_mix: torch.Tensor | None = None,
    head_mix_position: str = "post",
    scale: float | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """The double sum of the module docstring on the dense ``(B, Hq, L, S)`` logit map."""
    g, pattern, kernel, head_mix, scale = _prepare(q, k, v, pattern, kernel, head_mix, head_mix_position, scale)
    L, S = g.q_len, g.kv_len
    size_guard("multi_token_attention_reference", g.batch * g.q_heads * L * S, max_elements, "B*Hq*L*S")
    cdt = compute_dtype_for(q.dtype)
    kernel = kernel.to(cdt)
    A = scale * q.to(cdt) @ expand_heads(k.to(cdt), g.group_size).transpose(-1, -2)
    M = torch.broadcast_to(dense_mask(pattern, g), A.shape)
    A0 = torch.where(M, A, torch.zeros_like(A))
    cq, ck = kernel.shape[1], kernel.shape[2]
    p = ck // 2
    C = torch.zeros_like(A0)
    for a in range(cq):
        for b in range(ck):
            o = b - p  # C_ij += theta[a, b] * A0[i - a, j - o]
            shifted = torch.zeros_like(A0)
            i_lo = a
            j_lo, j_hi = max(0, o), min(S, S + o)
            if i_lo < L and j_lo < j_hi:
                shifted[:, :, i_lo:, j_lo:j_hi] = A0[:, :, : L - a, j_lo - o: j_hi - o]
            C = C + kernel[:, a, b].view(1, -1, 1, 1) * shifted
    if head_mix is not None and head_mix_position == "pre":
        C = _mix(C, head_mix.to(cdt))
    W, _ = safe_softmax_lse(C.masked_fill(~M, float("-inf")))
    if head_mix is not None and head_mix_position == "post":
        W = _mix(W, head_mix.to(cdt))
    out = W @ expand_heads(v.to(cdt), g.group_size)
    return out.to(q.dtype)
