r"""Native Sparse Attention (NSA): compressed, selected and sliding-window branches, gated.

Yuan et al., "Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse
Attention" (2025); attnlab's catalog reaches it through "Optimizing Native Sparse Attention with
Latent Attention and Local Global Alternating Strategies" (2025), which keeps these three
branches.

Causal, with queries bottom-right aligned: query ``i`` sits at key position ``t = i + S - L``.
Keys are cut into blocks of ``l = block_size`` tokens (``nKb = ceil(S / l)``, the last one
shorter). For each query head, with ``s = scale``::

    compressed:  kc_b = phi_k(k[b*l : (b+1)*l]),  vc_b = phi_v(v[...])      complete blocks only
                 p_cmp[t, b] = softmax_b(s q_t . kc_b)  over blocks with (b+1)*l - 1 <= t
                 o_cmp = p_cmp @ vc
    selected:    score[t, b] = sum over the query heads h of the GQA group of p_cmp^h[t, b]
                 forced(t)   = {0 if include_first} | {blocks floor(t/l) - num_local_blocks + 1
                               .. floor(t/l)}, each only if it has started (b*l <= t)
                 sel(t)      = forced(t) + the highest-scoring other blocks with a compressed
                               score (ties to the lower block index), num_selected blocks in
                               all (fewer when fewer exist)
                 o_slc = softmax over keys j <= t with floor(j/l) in sel(t)
    window:      o_win = softmax over keys t - window + 1 <= j <= t
    out = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win

``phi`` is the mean over the block by default (any callable ``(B, H, n, l, D) -> (B, H, n, D')``
is accepted; :class:`BlockCompressor` is the paper's learned MLP with an intra-block position
embedding). ``gates (B, Hq, L, 3)`` are given; :class:`NativeSparseAttention` computes them as
``sigmoid(Linear(x))`` per head. A query whose branch sees nothing gets 0 from that branch.

This is the paper's ``l = l' = d`` case (compression blocks = selection blocks, stride = block
length), where it sets ``p_slc = p_cmp``; overlapping compression blocks (``d < l``) and selection
blocks of another size are not implemented. Selection is per query token (as in the paper) and
shared by the query heads of one key/value group (the paper's GQA-consistent selection). With
``query_block = m > 1`` the queries of each block of ``m`` share one selection, made from their
summed scores with the forced and complete blocks taken at the block's last query; then a query's
choice can depend on later queries of its own block (strict causality holds only across query
blocks), in exchange for fewer partially visible tiles in the selected branch.

Gradients: the top-n selection is discrete and computed without gradient; gradients reach q,
k, v through the three attentions (including the compressed keys and values, hence ``phi``'s
parameters) and the gates. Each branch runs on :func:`attnlab.attention`: compressed with
``BlockSparse`` over the (query, compressed key) visibility, selected with
``BlockSparse(layout, (1, l)) & Causal()``, window with ``SlidingWindow(window - 1, 0)``. Memory
is O(L * nKb) for the block scores and the layout, never O(L * S).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..api import attention
from ..geometry import check_qkv, check_scale
from ..patterns import BlockSparse, Causal, SlidingWindow
from ._common import (
    check_1d, check_bool, grouped_scores, masked_softmax, per_q_head, query_positions, rank_mask, top_k_mask,
)

__all__ = [
    "native_sparse_attention", "native_sparse_attention_reference", "BlockCompressor",
    "NativeSparseAttention", "compress_blocks",
]

Compress = Callable[[Tensor], Tensor]
_BRANCHES = ("compressed", "selected", "window")


def _branch_kv(q: Tensor, k: Any, v: Any):
    """``k``/``v`` as one tensor shared by the branches or a triple (compressed, selected,
    window); returns three (k, v) pairs and the geometry of the first."""
    multi = isinstance(k, (tuple, list)), isinstance(v, (tuple, list))
    if multi[0] != multi[1]:
        raise TypeError("k and v must both be tensors or both be (compressed, selected, window) triples")
    if multi[0]:
        if len(k) != 3 or len(v) != 3:
            raise ValueError(
                f"k and v triples must have 3 entries (compressed, selected, window), got len(k)={len(k)}, "
                f"len(v)={len(v)}"
            )
        pairs = list(zip(k, v))
    else:
        pairs = [(k, v)] * 3
    geos = [check_qkv(q, kk, vv) for kk, vv in pairs]
    for name, g in zip(_BRANCHES[1:], geos[1:]):
        if (g.kv_shape, g.kv_heads) != (geos[0].kv_shape, geos[0].kv_heads):
            raise ValueError(
                f"the {name} branch's k has token shape {g.kv_shape} and {g.kv_heads} heads, the "
                f"compressed branch's {geos[0].kv_shape} and {geos[0].kv_heads}; they must match"
            )
    return pairs, geos[0]


def _check_args(g, gates, block_size, num_selected, window, num_local_blocks, include_first):
    check_1d(g, "native_sparse_attention")
    l = check_int("block_size", block_size, 1)
    n = check_int("num_selected", num_selected, 1)
    check_int("window", window, 1)
    nl = check_int("num_local_blocks", num_local_blocks, 0)
    check_bool("include_first", include_first)
    nkb = math.ceil(g.kv_len / l)
    if n > nkb:
        raise ValueError(
            f"num_selected={n} is larger than the number of key blocks ceil(S / block_size) = "
            f"ceil({g.kv_len} / {l}) = {nkb}"
        )
    forced = nl + int(include_first)
    if n < forced:
        raise ValueError(
            f"num_selected={n} must be at least the number of always-selected blocks "
            f"num_local_blocks + include_first = {forced}"
        )
    if not isinstance(gates, torch.Tensor) or not gates.is_floating_point():
        raise TypeError(f"gates must be a floating-point torch.Tensor, got {type(gates).__name__}")
    want = (g.batch, g.q_heads, g.q_len, 3)
    if tuple(gates.shape) != want:
        raise ValueError(
            f"gates must have shape (B, Hq, L, 3) = {want}, got gates.shape={tuple(gates.shape)}"
        )
    if gates.device != g.device:
        raise ValueError(f"gates must be on {g.device}, got gates.device={gates.device}")
    return l, n, nkb


def compress_blocks(x: Tensor, block_size: int, fn: Compress | None, name: str = "compress") -> Tensor:
    """``(B, H, S, D)`` -> ``(B, H, S // block_size, D')``: ``fn`` (or the mean) over each
    complete block of ``block_size`` tokens; the incomplete last block is not compressed."""
    B, H, S, D = x.shape
    n = S // block_size
    blocks = x[:, :, : n * block_size].reshape(B, H, n, block_size, D)
    if fn is None:
        return blocks.mean(-2)
    out = fn(blocks)
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or tuple(out.shape[:3]) != (B, H, n):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name} must map (B, H, n, block, D) blocks to (B, H, n, D'), got {got} for n={n}")
    return out


def _compressed_visible(t: Tensor, n: int, block: int) -> Tensor:
    """``(L, n)``: compressed block ``b`` is visible to a query at position ``t`` once complete."""
    return ((torch.arange(n, device=t.device) + 1) * block - 1)[None, :] <= t[:, None]


def _forced_and_started(t: Tensor, nkb: int, block: int, num_local: int, include_first: bool):
    jb = torch.arange(nkb, device=t.device)[None, :]
    started = jb * block <= t[:, None]
    qb = torch.div(t, block, rounding_mode="floor")[:, None]
    forced = (jb <= qb) & (jb > qb - num_local)
    if include_first:
        forced = forced | (jb == 0)
    return forced & started, started


def nsa_selection(p_cmp: Tensor, t: Tensor, kv_heads: int, nkb: int, block: int, num_selected: int,
                  num_local: int, include_first: bool, query_block: int = 1) -> Tensor:
    """The selected-branch layout ``(B, Hq, ceil(L / query_block), nKb)`` from the compressed
    probabilities ``p_cmp (B, Hq, L, n)`` and the query positions ``t (L,)`` (no gradient):
    forced blocks plus the top-scoring complete ones, ``num_selected`` in all, shared by each
    GQA group (scores summed over its heads) and each query block (summed over its queries;
    forced / complete relative to the block's last query)."""
    B, Hq, L, n = p_cmp.shape
    with torch.no_grad():
        score = p_cmp.reshape(B, kv_heads, Hq // kv_heads, L, n).sum(2)
        if query_block > 1:
            nqb = math.ceil(L / query_block)
            pad = nqb * query_block - L
            score = torch.cat([score, score.new_zeros(B, kv_heads, pad, n)], 2)
            score = score.view(B, kv_heads, nqb, query_block, n).sum(3)
            t = t[torch.clamp(torch.arange(nqb, device=t.device) * query_block + query_block - 1, max=L - 1)]
        full = score.new_full(score.shape[:-1] + (nkb,), float("-inf"))
        visible = _compressed_visible(t, n, block)
        full[..., :n] = score.masked_fill(~visible, float("-inf"))
        forced, _ = _forced_and_started(t, nkb, block, num_local, include_first)
        full = full.masked_fill(forced, float("inf"))
        layout = top_k_mask(full, num_selected)
    return per_q_head(layout, Hq)


def native_sparse_attention(
    q: Tensor, k: Tensor | Sequence[Tensor], v: Tensor | Sequence[Tensor], gates: Tensor, *,
    block_size: int, num_selected: int, window: int, compress_k: Compress | None = None,
    compress_v: Compress | None = None, num_local_blocks: int = 2, include_first: bool = True,
    query_block: int = 1, scale: float | None = None, backend: str = "auto", return_branches: bool = False,
):
    """NSA's gated three-branch causal attention (see the module docstring).

    Args:
        q: ``(B, Hq, L, D)``. k, v: ``(B, Hkv, S, D)`` / ``(..., Dv)`` shared by the branches,
            or triples ``(compressed, selected, window)`` of such tensors (the paper gives each
            branch its own keys and values).
        gates: ``(B, Hq, L, 3)`` weights of the compressed, selected and window outputs.
        block_size: ``l``, tokens per compression / selection block.
        num_selected: ``n``, selected blocks per query, ``forced <= n <= ceil(S / l)``.
        window: sliding-window length ``w`` (keys ``t - w + 1 .. t``).
        compress_k, compress_v: ``phi`` for keys / values, ``(B, H, n, l, D) -> (B, H, n, D)``;
            the block mean when None.
        num_local_blocks: the query's block and the ``num_local_blocks - 1`` before it are
            always selected (the paper: 2); include_first: block 0 always selected (the paper:
            yes).
        query_block: queries sharing one selection (1: per query, strictly causal).
        scale: logit scale, ``1/sqrt(D)`` when None. backend: passed to :func:`attnlab.attention`.
        return_branches: also return the three branch outputs (ungated).

    Returns ``(B, Hq, L, Dv)`` (and the branch outputs when asked).
    """
    pairs, g = _branch_kv(q, k, v)
    l, n_sel, nkb = _check_args(g, gates, block_size, num_selected, window, num_local_blocks, include_first)
    qb = check_int("query_block", query_block, 1)
    scale = check_scale(scale, g.head_dim)
    t = query_positions(g, q.device)
    (kc_src, vc_src), (ks, vs), (kw, vw) = pairs
    kc = compress_blocks(kc_src, l, compress_k, "compress_k")
    vc = compress_blocks(vc_src, l, compress_v, "compress_v")
    n = kc.shape[2]
    if n == 0:
        p_cmp = q.new_zeros(g.batch, g.q_heads, g.q_len, 0, dtype=torch.promote_types(q.dtype, torch.float32))
        o_cmp = q.new_zeros(g.batch, g.q_heads, g.q_len, vc.shape[-1])
    else:
        visible = _compressed_visible(t, n, l)
        with torch.no_grad():  # selection scores in float32 at least (half inputs)
            cdt = torch.promote_types(q.dtype, torch.float32)
            p_cmp = masked_softmax(grouped_scores(q.detach().to(cdt), kc.detach().to(cdt), scale), visible)
        o_cmp = attention(q, kc, vc, BlockSparse(visible, (1, 1)), scale=scale, backend=backend)
    layout = nsa_selection(p_cmp, t, g.kv_heads, nkb, l, n_sel, num_local_blocks, include_first, qb)
    o_slc = attention(q, ks, vs, BlockSparse(layout, (qb, l)) & Causal(), scale=scale, backend=backend)
    o_win = attention(q, kw, vw, SlidingWindow(left=window - 1, right=0), scale=scale, backend=backend)
    return _combine(gates, (o_cmp, o_slc, o_win), return_branches)


def _combine(gates: Tensor, outs: tuple[Tensor, Tensor, Tensor], return_branches: bool):
    if len({o.shape[-1] for o in outs}) != 1:
        raise ValueError(
            f"the branches' value dims differ ({[o.shape[-1] for o in outs]}); compress_v must keep Dv"
        )
    gt = gates.to(outs[1].dtype)
    out = sum(gt[..., c, None] * o for c, o in enumerate(outs))
    return (out, outs) if return_branches else out


def native_sparse_attention_reference(
    q: Tensor, k: Tensor | Sequence[Tensor], v: Tensor | Sequence[Tensor], gates: Tensor, *,
    block_size: int, num_selected: int, window: int, compress_k: Compress | None = None,
    compress_v: Compress | None = None, num_local_blocks: int = 2, include_first: bool = True,
    query_block: int = 1, scale: float | None = None, return_branches: bool = False,
):
    """Dense reference of :func:`native_sparse_attention`: every branch's ``(L, S)`` token mask
    is built from the definition (selection by rank: a candidate block is kept iff fewer than
    ``n - |forced|`` candidates beat it: a higher score, or a tie at a lower block index) and
    each branch is a dense masked softmax. Same arguments; materialises ``(B, Hq, L, S)``."""
    pairs, g = _branch_kv(q, k, v)
    l, n_sel, nkb = _check_args(g, gates, block_size, num_selected, window, num_local_blocks, include_first)
    scale = check_scale(scale, g.head_dim)
    Hq, Hkv = g.q_heads, g.kv_heads
    t = (torch.arange(g.q_len, device=q.device) + g.kv_len - g.q_len)[:, None]  # (L, 1)
    j = torch.arange(g.kv_len, device=q.device)[None, :]  # (1, S)
    (kc_src, vc_src), (ks, vs), (kw, vw) = pairs
    kc = compress_blocks(kc_src, l, compress_k, "compress_k")
    vc = compress_blocks(vc_src, l, compress_v, "compress_v")
    n = kc.shape[2]
    b = torch.arange(n, device=q.device)[None, :]
    cmp_mask = b * l + l - 1 <= t  # a compressed block is visible once its last token is
    p_cmp = masked_softmax(scale * q @ per_q_head(kc, Hq).transpose(-1, -2), cmp_mask)
    o_cmp = p_cmp @ per_q_head(vc, Hq)

    # selection, per key/value group and query block, by rank
    qb = check_int("query_block", query_block, 1)
    B, L = g.batch, g.q_len
    rows = torch.arange(L, device=q.device) // qb  # the query block of every query
    nqb = int(rows[-1]) + 1
    member = (torch.arange(nqb, device=q.device)[:, None] == rows[None, :]).to(q.dtype)  # (nqb, L)
    score = member @ p_cmp.detach().reshape(B, Hkv, Hq // Hkv, L, n).sum(2)  # (B, Hkv, nqb, n)
    score = torch.cat([score, score.new_zeros(B, Hkv, nqb, nkb - n)], -1)
    t_blk = t[torch.clamp((torch.arange(nqb, device=q.device) + 1) * qb - 1, max=L - 1)]  # last query
    kb = torch.arange(nkb, device=q.device)[None, :]
    qblk = torch.div(t_blk, l, rounding_mode="floor")
    started = kb * l <= t_blk
    forced = started & (((kb <= qblk) & (kb > qblk - num_local_blocks)) | ((kb == 0) & include_first))
    cand = (kb * l + l - 1 <= t_blk) & ~forced  # complete, so it has a compressed score
    budget = n_sel - forced.sum(-1, keepdim=True)
    selected = forced | rank_mask(score, cand.expand(score.shape), budget)  # (B, Hkv, nqb, nkb)
    sel_tok = per_q_head(selected, Hq)[:, :, rows][..., torch.div(j[0], l, rounding_mode="floor")]
    sel_mask = sel_tok & (j <= t)
    o_slc = masked_softmax(scale * q @ per_q_head(ks, Hq).transpose(-1, -2), sel_mask) @ per_q_head(vs, Hq)
    win_mask = (j <= t) & (j >= t - window + 1)
    o_win = masked_softmax(scale * q @ per_q_head(kw, Hq).transpose(-1, -2), win_mask) @ per_q_head(vw, Hq)
    return _combine(gates, (o_cmp, o_slc, o_win), return_branches)


class BlockCompressor(nn.Module):
    """NSA's learned block compression ``phi``: an MLP over the flattened block of ``l`` token
    vectors plus a learned intra-block position embedding,
    ``phi(X) = W2 gelu(W1 flatten(X + P) + b1) + b2`` with ``P (l, D)``; shared by all heads.
    ``(B, H, n, l, D) -> (B, H, n, D)``."""

    def __init__(self, block_size: int, head_dim: int, hidden: int | None = None, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.block_size = check_int("block_size", block_size, 1)
        self.head_dim = check_int("head_dim", head_dim, 1)
        hidden = check_int("hidden", hidden, 1) if hidden is not None else 2 * head_dim
        fk = {"device": device, "dtype": dtype}
        self.position = nn.Parameter(0.02 * torch.randn(block_size, head_dim, **fk))
        self.fc1 = nn.Linear(block_size * head_dim, hidden, **fk)
        self.fc2 = nn.Linear(hidden, head_dim, **fk)

    def forward(self, blocks: Tensor) -> Tensor:
        if blocks.shape[-2:] != (self.block_size, self.head_dim):
            raise ValueError(
                f"blocks must end in (block_size, head_dim) = ({self.block_size}, {self.head_dim}), "
                f"got blocks.shape={tuple(blocks.shape)}"
            )
        h = (blocks + self.position).flatten(-2)
        return self.fc2(torch.nn.functional.gelu(self.fc1(h)))


class NativeSparseAttention(nn.Module):
    """Causal self-attention with NSA's three gated branches (:func:`native_sparse_attention`).

    Args:
        embed_dim: ``E``; num_heads: ``Hq`` (head dim ``E // Hq``); num_kv_heads: ``Hkv`` (GQA,
            default ``Hq``).
        block_size, num_selected, window, num_local_blocks, include_first, query_block: as in the
            function.
        compress: ``"mlp"`` (:class:`BlockCompressor` for keys and for values, the paper's) or
            ``"mean"``.
        bias: biases of the projections.

    Parameters: ``q_proj (E -> Hq*D)``; ``kv_proj (E -> 3 * 2 * Hkv*D)``, independent keys and
    values for the compressed, selected and window branches (as in the paper); ``gate (E -> 3*Hq)``
    with ``g = sigmoid(gate(x))`` per head and branch; ``compress_k``/``compress_v``; ``out_proj``.
    ``x (B, L, E) -> (B, L, E)``. ``forward(x, reference=True)`` runs the dense reference.
    """

    def __init__(self, embed_dim: int, num_heads: int, block_size: int, num_selected: int, window: int, *,
                 num_kv_heads: int | None = None, compress: str = "mlp", num_local_blocks: int = 2,
                 include_first: bool = True, query_block: int = 1, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        check_int("embed_dim", embed_dim, 1)
        check_int("num_heads", num_heads, 1)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be a multiple of num_heads={num_heads}")
        kv = num_heads if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads, 1)
        if num_heads % kv:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={kv}")
        if compress not in ("mlp", "mean"):
            raise ValueError(f"compress must be 'mlp' or 'mean', got compress={compress!r}")
        check_bool("bias", bias)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, kv
        self.head_dim = d = embed_dim // num_heads
        self.block_size = check_int("block_size", block_size, 1)
        self.num_selected = check_int("num_selected", num_selected, 1)
        self.window = check_int("window", window, 1)
        self.num_local_blocks = check_int("num_local_blocks", num_local_blocks, 0)
        self.include_first = check_bool("include_first", include_first)
        self.query_block = check_int("query_block", query_block, 1)
        if self.num_selected < self.num_local_blocks + int(include_first):
            raise ValueError(
                f"num_selected={num_selected} must be at least num_local_blocks + include_first = "
                f"{self.num_local_blocks + int(include_first)}"
            )
        fk = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * d, bias=bias, **fk)
        self.kv_proj = nn.Linear(embed_dim, 6 * kv * d, bias=bias, **fk)
        self.gate = nn.Linear(embed_dim, 3 * num_heads, **fk)
        self.out_proj = nn.Linear(num_heads * d, embed_dim, bias=bias, **fk)
        for lin in (self.q_proj, self.kv_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if compress == "mlp":
            self.compress_k = BlockCompressor(block_size, d, **fk)
            self.compress_v = BlockCompressor(block_size, d, **fk)
        else:
            self.compress_k = self.compress_v = None

    def forward(self, x: Tensor, *, reference: bool = False) -> Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x.shape={tuple(x.shape)}, expected (B, L, {self.embed_dim})")
        B, L, _ = x.shape
        H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, L, H, d).transpose(1, 2)
        kv = self.kv_proj(x).view(B, L, 6, Hkv, d).permute(2, 0, 3, 1, 4)
        ks, vs = tuple(kv[0::2]), tuple(kv[1::2])
        gates = torch.sigmoid(self.gate(x)).view(B, L, H, 3).transpose(1, 2)
        kw = dict(block_size=self.block_size, num_selected=self.num_selected, window=self.window,
                  compress_k=self.compress_k, compress_v=self.compress_v,
                  num_local_blocks=self.num_local_blocks, include_first=self.include_first,
                  query_block=self.query_block)
        ref = check_bool("reference", reference)
        fn = native_sparse_attention_reference if ref else native_sparse_attention
        o = fn(q, ks, vs, gates, **kw)
        return self.out_proj(o.transpose(1, 2).reshape(B, L, H * d))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"block_size={self.block_size}, num_selected={self.num_selected}, window={self.window}")
