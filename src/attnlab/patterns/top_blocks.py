"""Block selection from pooled scores: top-k blocks (MoBA, NSA's selection branch, SeerAttention)
and top-p blocks (FlexPrefill, VMoBA's threshold).

Both score every (query block, key block) pair by its pooled logit
``s[r, c] = scale * mean(q in block r) . mean(k in block c)`` (or by a learned ``gate`` on the
pooled vectors, as SeerAttention's), a ``(L / block_q) x (S / block_kv)`` matrix per head, and
return a per-(batch, head) :class:`~attnlab.patterns.BlockSparse` layout. Attention over the
selected blocks is then exact. The selection itself is a discrete choice made without autograd:
no gradient flows through *which* blocks are chosen.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .._checks import check_int
from ..geometry import Geometry
from .block_sparse import BlockSparse, block_pair
from .content import ContentPattern, SelectionContext, pooled_blocks
from .key_set import KeySet


class _BlockSelection(ContentPattern):
    """Pooled block scores, candidates and the always-kept local blocks."""

    ndim = 1

    def __init__(self, block_size, local: bool, gate: Optional[Callable], per_query: bool):
        self.block_q, self.block_kv = block_pair(block_size)
        for name, flag in (("local", local), ("per_query", per_query)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {name}={flag!r}")
        self.per_query = per_query
        if gate is not None and not callable(gate):
            raise TypeError(f"gate must be callable (pooled_q, pooled_k) -> scores, got {type(gate).__name__}")
        self.local = local
        self.gate = gate

    @property
    def query_block(self) -> int:
        """Queries that share one selection: ``block_q``, or 1 with ``per_query``."""
        return 1 if self.per_query else self.block_q

    def num_blocks(self, geometry: Geometry) -> tuple[int, int]:
        return math.ceil(geometry.q_len / self.query_block), math.ceil(geometry.kv_len / self.block_kv)

    def block_scores(self, ctx: SelectionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, candidates)``, both ``(B, Hq, nQb, nKb)``; scores are ``-inf`` off the
        candidates (blocks where the enclosing intersection has no visible pair)."""
        compute = torch.promote_types(ctx.q.dtype, torch.float32)
        pq = pooled_blocks(ctx.q.to(compute), self.query_block)
        pk = pooled_blocks(ctx.k_per_query_head.to(compute), self.block_kv)
        if self.gate is None:
            scores = ctx.scale * (pq @ pk.transpose(-1, -2))
        else:
            scores = self.gate(pq, pk).to(compute)
            if scores.shape != pq.shape[:3] + (pk.shape[2],):
                raise ValueError(f"gate must return (B, Hq, nQb, nKb)={tuple(pq.shape[:3]) + (pk.shape[2],)}, "
                                 f"got {tuple(scores.shape)}")
        cand = ctx.candidate_blocks(self.query_block, self.block_kv)
        cand = torch.ones_like(scores, dtype=torch.bool) if cand is None else cand.expand(scores.shape)
        return scores.masked_fill(~cand, float("-inf")), cand

    def local_blocks(self, geometry: Geometry, device) -> torch.Tensor:
        """``(nQb, nKb)``: per query block, the key block holding the bottom-right aligned position
        ``i + S - L`` of its first query (clamped at key 0; none if no query of the block has a
        causally visible key). Under a causal mask that key is visible to every query of the
        block that sees any, so a selection that keeps this block leaves no such row empty."""
        nq, nk = self.num_blocks(geometry)
        off = geometry.kv_len - geometry.q_len
        r = torch.arange(nq, device=device)
        first = (r * self.query_block + off).clamp(min=0, max=geometry.kv_len - 1)
        last = torch.clamp((r + 1) * self.query_block, max=geometry.q_len) - 1 + off
        local = torch.where(last >= 0, first // self.block_kv, -1)
        return torch.arange(nk, device=device)[None, :] == local[:, None]

    def _layout(self, keep: torch.Tensor, cand: torch.Tensor):
        """The kept blocks as a BlockSparse layout, or with ``per_query`` as a KeySet of key
        blocks per query (a causal selection then depends on no later query)."""
        keep = keep & cand
        if not self.per_query:
            return BlockSparse(keep, (self.block_q, self.block_kv))
        n = max(1, int(keep.sum(-1).max()))
        idx = keep.to(torch.int8).topk(n, dim=-1).indices
        return KeySet(torch.where(keep.gather(-1, idx), idx, -1), block=self.block_kv)

    def _block_args(self) -> str:
        b = self.block_q if self.block_q == self.block_kv else (self.block_q, self.block_kv)
        gate = "" if self.gate is None else f", gate={type(self.gate).__name__}"
        per_query = ", per_query=True" if self.per_query else ""
        return f"block_size={b}, local={self.local}{per_query}{gate}"


class _KBlockSelection(_BlockSelection):
    """A selection of ``k`` key blocks per query block (or query), ``1 <= k <= ceil(S / block_kv)``."""

    def __init__(self, k: int, block_size, local: bool, gate: Optional[Callable], per_query: bool):
        super().__init__(block_size, local, gate, per_query)
        self.k = check_int("k", k, 1)

    def validate(self, geometry: Geometry) -> None:
        super().validate(geometry)
        nk = self.num_blocks(geometry)[1]
        if self.k > nk:
            raise ValueError(f"k={self.k} is larger than the number of key blocks ceil(S / block_kv) = "
                             f"ceil({geometry.kv_len} / {self.block_kv}) = {nk}")


class TopKBlocks(_KBlockSelection):
    """Each query block attends to the ``k`` key blocks with the highest pooled scores.

    With ``local=True`` (default) the key block at the query block's own (bottom-right aligned)
    position is always among the ``k`` (MoBA's current block; with ``& Causal()`` no row that
    could see a key is left empty). Inside an
    intersection only blocks with a visible pair compete (``TopKBlocks(8) & Causal()`` picks 8
    causally visible blocks). ``k`` equal to the number of key blocks gives the enclosing
    pattern exactly (dense attention on its own).

    Lu et al., "MoBA: Mixture of Block Attention for Long-Context LLMs", 2025 (top-k blocks by
    mean-pooled keys); Yuan et al., "Native Sparse Attention", 2025 (selection branch); Gao et
    al., "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs", 2024 (pooled
    ``q`` and ``k``, optionally through a learned ``gate(pooled_q, pooled_k) -> scores`` such as
    :class:`~attnlab.patterns.SeerGate`).

    Args:
        k: key blocks per query block (``1 <= k <= ceil(S / block_kv)``).
        block_size: an int or ``(block_q, block_kv)``, in flat tokens.
        local: always keep the local key blocks.
        per_query: choose per query token (MoBA's gating: ``q_i . mean(k in block)``) instead of
            per query block. Block pooling of queries lets a later query of a block influence an
            earlier one's choice, which causal training must not allow; per-query selection
            depends on the query alone. It resolves to a :class:`~attnlab.patterns.KeySet` of
            key blocks (a binary-search mask: slower than a block layout).
        gate: optional scorer of pooled blocks ``(B, Hq, nQb, D), (B, Hq, nKb, D) -> (B, Hq, nQb, nKb)``.
    """

    def __init__(self, k: int, block_size=64, *, local: bool = True, per_query: bool = False,
                 gate: Optional[Callable] = None):
        super().__init__(k, block_size, local, gate, per_query)

    def select(self, ctx: SelectionContext) -> BlockSparse:
        scores, cand = self.block_scores(ctx)
        if self.local:
            scores = scores.masked_fill(self.local_blocks(ctx.geometry, scores.device) & cand, float("inf"))
        chosen = scores.topk(self.k, dim=-1).indices
        keep = torch.zeros_like(cand).scatter_(-1, chosen, True)
        return self._layout(keep, cand)

    def __repr__(self):
        return f"TopKBlocks(k={self.k}, {self._block_args()})"


class TopPBlocks(_BlockSelection):
    """Each query block attends to the fewest key blocks whose share of the softmax of its
    pooled scores reaches ``p`` (blocks taken in decreasing score order; at least
    ``min_blocks``; plus the local blocks when ``local``). ``p = 1`` keeps every candidate.

    Lai et al., "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient
    Long-Sequence Inference", 2025 (cumulative-attention threshold); Wu et al., "VMoBA:
    Mixture-of-Block Attention for Video Diffusion Models", 2025 (cumulative-similarity
    threshold on block scores).

    Args:
        p: the mass to reach, in ``(0, 1]``.
        block_size, local, per_query, gate: as :class:`TopKBlocks`.
        min_blocks: the least number of blocks kept per query block (>= 1).
    """

    def __init__(self, p: float, block_size=64, *, min_blocks: int = 1, local: bool = True,
                 per_query: bool = False, gate: Optional[Callable] = None):
        super().__init__(block_size, local, gate, per_query)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise ValueError(f"p must be a float in (0, 1], got p={p!r}")
        self.p = float(p)
        self.min_blocks = check_int("min_blocks", min_blocks, 1)

    def select(self, ctx: SelectionContext) -> BlockSparse:
        scores, cand = self.block_scores(ctx)
        top = scores.amax(-1, keepdim=True)
        e = torch.exp(scores - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
        probs = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
        vals, order = probs.sort(-1, descending=True)
        before = torch.cumsum(vals, -1) - vals
        keep_sorted = before < self.p if self.p < 1 else torch.ones_like(before, dtype=torch.bool)
        keep_sorted[..., : self.min_blocks] = True
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        if self.local:
            keep = keep | self.local_blocks(ctx.geometry, keep.device)
        return self._layout(keep, cand)

    def __repr__(self):
        return f"TopPBlocks(p={self.p}, min_blocks={self.min_blocks}, {self._block_args()})"
