"""Hierarchical (tree-search) top-k key blocks (HiP).

Lee, Park, Kim, Kim, Hwang, "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical
Attention Pruning", 2024. HiP finds, for each query block, approximately the top-k keys without
scoring all of them: the keys are split into a few coarse spans, each span is scored through a
representative, the best spans are kept and split, and so on down to single units, in
``O(log S)`` rounds of ``O(k)`` scores. Here the unit is a key block of ``block_kv`` tokens, the
result a block layout, and each span is scored by the blocks at the middle of its children (see
:class:`HierarchicalTopK`). HiP's own representative choice, its GPU kernel, its per-token
(rather than per-block) leaves and its mask caching across decoding steps are not reproduced.

The selection is made without autograd: gradients do not flow through which blocks are kept,
only through the exact softmax attention over them.
"""

from __future__ import annotations

import torch

from .._checks import check_int
from .content import SelectionContext, pooled_blocks
from .top_blocks import _KBlockSelection


def start_level(num_blocks: int, k: int, branching: int) -> int:
    """The coarsest level ``m`` at which the tree search starts: the smallest ``m >= 0`` with
    ``ceil(num_blocks / branching**m) <= k * branching`` spans (all of them are scored)."""
    m = 0
    while -(-num_blocks // branching ** m) > k * branching:
        m += 1
    return m


class HierarchicalTopK(_KBlockSelection):
    """Each query block keeps ``k`` key blocks found by a tree search over key spans (HiP).

    Lee et al., "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention
    Pruning", 2024.

    Definitions, per batch element, query head and query block ``r`` (keys through their kv
    head): the block score is the pooled logit ``s(c) = scale * mean(q in r) . mean(k in c)``;
    a block is *eligible* if it is a candidate (the enclosing intersection has a visible pair in
    it) and not the local block. A span is a run of ``branching**m`` blocks (level ``m``;
    ``[a, a + branching**m)``, clipped at the last block). The *representative* of a span is its
    middle eligible block (the one of rank ``(n - 1) // 2`` among its ``n`` eligible blocks);
    the score of a level-``m >= 1`` span is the largest representative score among its
    ``branching`` children (so a level-1 span scores the best block in it exactly), that of a
    level-0 span its block's score; spans with no eligible block score ``-inf``.

    Search: start with all spans of level ``M = start_level(nKb, k, branching)`` (at most
    ``k * branching`` of them), keep the ``k`` best; split each kept span into its ``branching``
    children, score them, keep the ``k`` best; repeat down to level 0. The result is the
    ``k`` best blocks found (those of score ``-inf`` dropped); with ``local=True`` (default) the
    local block is always kept and counted in ``k``, as in
    :class:`~attnlab.patterns.TopKBlocks`. When ``nKb <= k * branching`` the search starts at
    the blocks and equals ``TopKBlocks(k, block_size, local=local)`` exactly. With
    ``& Causal()`` and ``block_q == block_kv`` (``S - L`` a multiple of it), eligible blocks lie
    entirely in the past of every query of the block, so later keys never change the choice.

    Like HiP's, the search assumes that nearby keys score alike: a lone strong block inside a
    span whose representatives score low can be pruned early (``TopKBlocks`` scores every
    block and would find it).

    Cost per query block: ``O(k * branching**2 * log_branching(nKb))`` pooled dot products
    (each of the ``k * branching`` children of a round is scored through its ``branching``
    children) plus a binary search per representative in the running count of eligible blocks;
    the pooled keys cost ``O(S D)`` once and the running counts ``O(nQb * nKb)`` integers at the
    batch/head shape of the candidates (once, shared by all heads under a static restriction),
    the same size as the block layout that is returned.

    Args:
        k: key blocks per query block (``1 <= k <= ceil(S / block_kv)``); ``k`` equal to the
            number of key blocks is the enclosing pattern exactly.
        block_size: an int or ``(block_q, block_kv)``, in flat tokens.
        branching: children per span (``>= 2``).
        local, per_query: as :class:`~attnlab.patterns.TopKBlocks`.

    The selection ignores the score mod.
    """

    def __init__(self, k: int, block_size=64, branching: int = 2, *, local: bool = True, per_query: bool = False):
        super().__init__(k, block_size, local, None, per_query)
        self.branching = check_int("branching", branching, 2)

    def select(self, ctx: SelectionContext):
        g = ctx.geometry
        nq, nk = self.num_blocks(g)
        b, k = self.branching, self.k
        compute = torch.promote_types(ctx.q.dtype, torch.float32)
        pq = pooled_blocks(ctx.q.to(compute), self.query_block)  # (B, H, nq, D)
        pk = pooled_blocks(ctx.k_per_query_head.to(compute), self.block_kv)  # (B, H, nk, D)
        B, H, _, D = pq.shape
        dev = pq.device
        cand = ctx.candidate_blocks(self.query_block, self.block_kv)
        cand = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=dev) if cand is None else cand
        local = self.local_blocks(g, dev) if self.local else torch.zeros(nq, nk, dtype=torch.bool, device=dev)
        # running counts of eligible blocks at the candidates' own (Bb, Hb): (B, H) searches are
        # folded into their last axis, so a static restriction costs O(nq * nk) once, not per head
        eligible = cand & ~local
        Bb, Hb = eligible.shape[:2]
        cum = eligible.to(torch.int32).cumsum(-1, dtype=torch.int32).contiguous()  # eligible in [0, c]
        cum0 = torch.nn.functional.pad(cum, (1, 0))  # eligible blocks in [0, c)
        neg = float("-inf")

        def fold(x):  # (B, H, nq, M) -> (Bb, Hb, nq, B / Bb * H / Hb * M)
            M = x.shape[-1]
            x = x.reshape(Bb, B // Bb, Hb, H // Hb, nq, M).permute(0, 2, 4, 1, 3, 5)
            return x.reshape(Bb, Hb, nq, -1)

        def unfold(x):  # inverse of fold
            x = x.reshape(Bb, Hb, nq, B // Bb, H // Hb, -1).permute(0, 3, 1, 4, 2, 5)
            return x.reshape(B, H, nq, -1)

        def block_score(idx):  # idx (B, H, nq, M) -> (B, H, nq, M)
            M = idx.shape[-1]
            kk = pk.gather(2, idx.reshape(B, H, nq * M, 1).expand(-1, -1, -1, D)).reshape(B, H, nq, M, D)
            return ctx.scale * (kk * pq[:, :, :, None, :]).sum(-1)

        def representative_score(start, size):  # spans [start, start + size) -> score of the middle eligible block
            s, e = fold(start.clamp(max=nk)), fold((start + size).clamp(max=nk))
            before = cum0.gather(-1, s)
            n = cum0.gather(-1, e) - before
            rank = before + (n - 1).clamp(min=0) // 2
            blk = unfold(torch.searchsorted(cum, rank + 1).clamp(max=nk - 1))
            return block_score(blk).masked_fill(unfold(n) <= 0, neg)

        def span_score(start, m):  # level-m spans -> (B, H, nq, M)
            if m == 0:
                return representative_score(start, 1)
            child = b ** (m - 1)
            cs = start[..., None] + torch.arange(b, device=dev) * child
            return representative_score(cs.flatten(-2), child).reshape(*start.shape, b).amax(-1)

        m = start_level(nk, k, b)
        n0 = -(-nk // b ** m)
        starts = (torch.arange(n0, device=dev) * b ** m).expand(B, H, nq, n0)
        score = span_score(starts, m)
        while True:
            top = score.topk(min(k, score.shape[-1]), dim=-1)
            starts, score = starts.gather(-1, top.indices), top.values
            if m == 0:
                break
            m -= 1
            # children past the last block have no eligible block: they score -inf
            starts = (starts[..., None] + torch.arange(b, device=dev) * b ** m).flatten(-2)
            score = span_score(starts, m)
        # the k leaves found plus the local block (score +inf), best k of them; picks of score
        # -inf (no eligible block) go to a spare column that is dropped
        idx = starts.clamp(max=nk - 1)
        if self.local:
            has_local = (local & cand).any(-1, keepdim=True).expand(B, H, nq, 1)
            local_idx = local.to(torch.int8).argmax(-1).view(1, 1, nq, 1).expand(B, H, nq, 1)
            idx = torch.cat([idx, local_idx], -1)
            inf = torch.full_like(score[..., :1], float("inf"))
            score = torch.cat([score, inf.masked_fill(~has_local, neg)], -1)
        top = score.topk(min(k, score.shape[-1]), dim=-1)
        picked = idx.gather(-1, top.indices).masked_fill(top.values == neg, nk)
        keep = torch.zeros(B, H, nq, nk + 1, dtype=torch.bool, device=dev).scatter_(-1, picked, True)
        return self._layout(keep[..., :nk], cand)

    def __repr__(self):
        return f"HierarchicalTopK(k={self.k}, branching={self.branching}, {self._block_args()})"


__all__ = ["HierarchicalTopK", "start_level"]
