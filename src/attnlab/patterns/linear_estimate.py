"""Top-k key blocks from a linear-attention estimate of the attention (SEA).

Lee, Kim, Tack, Hwang, "SEA: Sparse Linear Attention with Estimated Attention Mask", ICLR 2024.
SEA estimates the attention matrix at linear cost with kernel (linear) attention, compresses it
to a fixed width, keeps the top-k entries of each row as a sparse mask and runs softmax
attention on the mask only. Here the compressed width is the number of key blocks: the estimate
of query ``i``'s attention to key block ``c`` is the normalised linear attention mass

    est[i, c] = phi(q_i) . sum_{j in c} phi(k_j)  /  sum_{c'} phi(q_i) . sum_{j in c'} phi(k_j)

an ``L x ceil(S / block_kv)`` matrix (never ``L x S``). SEA's learned decoder of the compressed
matrix and its distillation from a teacher are not included: the feature map ``phi`` is fixed
(``elu+1`` by default, ReLU, or any callable such as a Performer random-feature module).

The selection is made without autograd: gradients do not flow through which blocks are kept,
only through the exact softmax attention over them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .content import SelectionContext
from .top_blocks import _KBlockSelection

_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu+1": lambda x: F.elu(x) + 1.0,
    "relu": torch.relu,
}


class LinearEstimateTopK(_KBlockSelection):
    """Each query block keeps the ``k`` key blocks with the largest linear-attention estimate
    of its attention mass (SEA).

    Lee et al., "SEA: Sparse Linear Attention with Estimated Attention Mask", 2024.

    Selection (without autograd), per batch element and query head (keys through their kv
    head): ``est[i, c]`` as in the module docstring, normalised over the candidate key blocks of
    ``i``'s block (those where the enclosing intersection has a visible pair) other than the
    local block; the score of (query block ``r``, key block ``c``) is the mean of ``est[i, c]``
    over the queries ``i`` of ``r``, so every query's estimated distribution weighs the same;
    each query block keeps its ``k`` best candidates. With ``local=True`` (default) the key
    block at the query block's own position is always kept (counted in ``k``) and left out of
    the normaliser, so with ``& Causal()`` and ``block_q == block_kv`` (``S - L`` a multiple of
    it) a query's selection reads only keys every query of its block can see: later keys never
    change earlier outputs.

    Per query *block* rather than per query (SEA's per-row top-k): the result is a
    :class:`~attnlab.patterns.BlockSparse` layout, which the tiled backend runs as dense tiles
    with no elementwise mask inside kept tiles, and its size is ``nQb x nKb`` instead of a per
    query list of ``k * block_kv`` keys. ``per_query=True`` gives SEA's per-row choice (of key
    blocks) as a :class:`~attnlab.patterns.KeySet`, on the slower binary-search mask.

    Args:
        k: key blocks kept per query block (``1 <= k <= ceil(S / block_kv)``); ``k`` equal to the
            number of key blocks is the enclosing pattern exactly.
        block_size: an int or ``(block_q, block_kv)``, in flat tokens.
        feature_map: ``"elu+1"``, ``"relu"`` or a callable ``(..., D) -> (..., F)`` with
            non-negative outputs, applied to ``q`` and ``k`` as given (no scale).
        local, per_query: as :class:`~attnlab.patterns.TopKBlocks`.

    The selection ignores the score mod.
    """

    def __init__(self, k: int, block_size=64, feature_map: str | Callable = "elu+1", *,
                 local: bool = True, per_query: bool = False):
        super().__init__(k, block_size, local, None, per_query)
        if isinstance(feature_map, str):
            if feature_map not in _MAPS:
                raise ValueError(f"feature_map must be one of {sorted(_MAPS)} or a callable, got {feature_map!r}")
        elif not callable(feature_map):
            raise TypeError(f"feature_map must be a string or a callable, got {type(feature_map).__name__}")
        self.feature_map = feature_map

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        fn = _MAPS[self.feature_map] if isinstance(self.feature_map, str) else self.feature_map
        return fn(x)

    def estimate(self, ctx: SelectionContext) -> torch.Tensor:
        """``(B, Hq, L, nKb)``: ``phi(q_i) . sum_{j in block c} phi(k_j)`` (unnormalised)."""
        compute = torch.promote_types(ctx.q.dtype, torch.float32)
        fq = self.phi(ctx.q.to(compute))
        fk = self.phi(ctx.k_per_query_head.to(compute))
        B, H, S, Fd = fk.shape
        nk = math.ceil(S / self.block_kv)
        ksum = F.pad(fk, (0, 0, 0, nk * self.block_kv - S)).reshape(B, H, nk, self.block_kv, Fd).sum(3)
        return fq @ ksum.transpose(-1, -2)

    def select(self, ctx: SelectionContext):
        g = ctx.geometry
        nq, nk = self.num_blocks(g)
        bq = self.query_block
        est = self.estimate(ctx)  # (B, Hq, L, nKb)
        B, H, L, _ = est.shape
        cand = ctx.candidate_blocks(bq, self.block_kv)
        cand = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=est.device) if cand is None else cand
        local = self.local_blocks(g, est.device) if self.local else torch.zeros(nq, nk, dtype=torch.bool,
                                                                                 device=est.device)
        norm_over = (cand & ~local).to(est.dtype)  # (Bb, Hb, nQb, nKb)
        rows = F.pad(est, (0, 0, 0, nq * bq - L)).reshape(B, H, nq, bq, nk)
        z = (rows * norm_over[:, :, :, None, :]).sum(-1, keepdim=True)
        p = torch.where(z > 0, rows / torch.where(z > 0, z, torch.ones_like(z)), torch.zeros_like(rows))
        counts = torch.full((nq, 1), float(bq), dtype=est.dtype, device=est.device)
        counts[-1] = L - (nq - 1) * bq
        scores = p.sum(3) / counts  # (B, Hq, nQb, nKb): mean estimated mass (padded rows are 0)
        cand = cand.expand(scores.shape)
        scores = scores.masked_fill(~cand, float("-inf"))
        if self.local:
            scores = scores.masked_fill(local & cand, float("inf"))
        chosen = scores.topk(self.k, dim=-1).indices
        keep = torch.zeros_like(cand).scatter_(-1, chosen, True)
        return self._layout(keep, cand)

    def __repr__(self):
        fm = self.feature_map if isinstance(self.feature_map, str) else type(self.feature_map).__name__
        return f"LinearEstimateTopK(k={self.k}, {self._block_args()}, feature_map={fm!r})"


__all__ = ["LinearEstimateTopK"]
