r"""Landmark attention: a landmark token per block gates the attention to that block's tokens.

Mohtashami, Jaggi, "Landmark Attention: Random-Access Infinite Context Length for Transformers"
(NeurIPS 2023).

The sequence carries its landmarks: with ``b = block_size``, the key positions
``j % (b + 1) == b`` are landmark tokens (:func:`insert_landmarks` places a landmark after every
``b`` regular tokens); group ``G(j) = j // (b + 1)`` is a block of ``b`` regular tokens followed
by its landmark. Causal, queries bottom-right aligned (query ``i`` sits at ``t = i + S - L``).
This is the grouped softmax of the paper's training formulation, as in its released
``landmark_grouped_softmax`` ("mem_opt"). Per query head, with ``s_tj = scale * q_t . k_j``:

* the current section ``C(t)``: the regular keys ``j <= t`` of the query's own group (the group's
  landmark is ignored, also when the query is that landmark);
* the earlier landmarks ``l_c`` of the groups ``c < G(t)`` (retrieval: only the ``top_k`` of them
  with the largest ``s_{t, l_c}``, per query and head);
* one softmax over ``C(t)`` and those landmarks; a landmark's probability is handed to its block::

      Z = sum_{j in C(t)} exp(s_tj) + sum_c exp(s_{t, l_c})
      P[t, j] = exp(s_tj) / Z                                               j in C(t)
      P[t, j] = exp(s_{t, l_c}) / Z * softmax_{j' regular in c}(s_tj')[j]    j regular in group c
      o_t = sum_j P[t, j] v_j        (landmark values are never read)

``top_k`` is the paper's block retrieval done inside one sequence: it keeps, per query and head,
the ``top_k`` earlier blocks with the highest landmark score (ties to the earlier block) and
renormalises over them and the current section. (The released cache additionally keeps the
blocks of the current chunk and can share the choice across heads; neither is done here.)

Fast path: the grouped softmax equals one softmax with a block-level additive bias
``beta[t, c] = s_{t, l_c} - logsumexp_{j' regular in c} s_tj'`` on the regular keys of earlier
groups (0 on the current section, ``-inf`` on landmarks), so it runs as one
:func:`attnlab.attention` call with ``Causal()`` (``BlockSparse(layout, (1, b + 1)) & Causal()``
with ``top_k``) and a score mod reading ``beta (B, Hq, L, nG)``. The per-block log-sum-exps are
computed in checkpointed chunks of key groups (token scores live one chunk at a time), so
memory is O(L * nG), never O(L * S). Gradients flow through ``beta`` (landmark scores and the
block log-sum-exps) and the attention; the ``top_k`` choice is discrete and has none.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..api import attention
from ..geometry import check_qkv, check_scale
from ..patterns import BlockSparse, Causal
from ..scores.base import ScoreContext, ScoreMod
from ._common import (
    Projections, check_1d, check_bool, check_optional_int, chunked_block_reduce, masked_softmax,
    per_q_head, query_positions, rank_mask, top_k_mask,
)

__all__ = [
    "landmark_attention", "landmark_attention_reference", "LandmarkAttention", "insert_landmarks",
    "remove_landmarks", "landmark_mask",
]


def landmark_mask(length: int, block_size: int, device=None) -> Tensor:
    """``(length,)`` bool: True at the landmark positions ``j % (block_size + 1) == block_size``."""
    return torch.arange(length, device=device) % (block_size + 1) == block_size


def insert_landmarks(x: Tensor, block_size: int, landmark: Tensor) -> Tensor:
    """``x (B, N, E)`` -> ``(B, N + N // block_size, E)``: ``landmark (E,)`` inserted after every
    ``block_size`` tokens (an incomplete last block gets none)."""
    b = check_int("block_size", block_size, 1)
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a (B, N, E) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    B, N, E = x.shape
    if not isinstance(landmark, torch.Tensor) or tuple(landmark.shape) != (E,):
        got = getattr(landmark, "shape", landmark)
        raise ValueError(f"landmark must be an (E,) = ({E},) tensor, got {got}")
    n = N // b
    full = x[:, : n * b].reshape(B, n, b, E)
    lm = landmark.to(x.dtype).expand(B, n, 1, E)
    return torch.cat([torch.cat([full, lm], 2).reshape(B, n * (b + 1), E), x[:, n * b:]], 1)


def remove_landmarks(y: Tensor, block_size: int) -> Tensor:
    """Inverse of :func:`insert_landmarks` on ``(B, L, E)``: drops the landmark positions."""
    b = check_int("block_size", block_size, 1)
    return y[:, ~landmark_mask(y.shape[1], b, y.device)]


def _check(q, k, v, block_size, top_k):
    g = check_qkv(q, k, v)
    check_1d(g, "landmark_attention")
    b = check_int("block_size", block_size, 1)
    top_k = check_optional_int("top_k", top_k, 1)
    n_land = g.kv_len // (b + 1)
    if top_k is not None and top_k > n_land:
        raise ValueError(
            f"top_k={top_k} is larger than the number of landmark blocks S // (block_size + 1) = "
            f"{g.kv_len} // {b + 1} = {n_land}"
        )
    return g, b, top_k, n_land


class _GroupBias(ScoreMod):
    """Adds ``table[b, h, i, kv_idx // group]`` and ``-inf`` on landmark keys."""

    def __init__(self, table: Tensor, group: int) -> None:
        super().__init__()
        self.table, self.group = table, group

    def differentiable_tensors(self) -> list[Tensor]:
        return [self.table] if self.table.requires_grad else []

    def modify(self, score: Tensor, ctx: ScoreContext) -> Tensor:
        bias = self.table[ctx.b, ctx.h, ctx.q_idx, torch.div(ctx.kv_idx, self.group, rounding_mode="floor")]
        land = torch.remainder(ctx.kv_idx, self.group) == self.group - 1
        return (score + bias.to(score.dtype)).masked_fill(land, float("-inf"))


def _block_lse(q: Tensor, k_regular: Tensor, scale: float) -> Tensor:
    """``(B, Hq, L, n)``: log-sum-exp of ``scale * q . k`` over the regular keys of each group;
    ``k_regular (B, Hkv, n, b, D)``."""
    B, Hq, L, D = q.shape
    Hkv = k_regular.shape[1]

    def fn(qq: Tensor, kb: Tensor) -> Tensor:
        qg = qq.view(B, Hkv, Hq // Hkv, L, D)
        s = torch.einsum("bhgld,bhnjd->bhglnj", qg, kb) * scale
        return torch.logsumexp(s, -1).reshape(B, Hq, L, kb.shape[2])

    return chunked_block_reduce(fn, q, k_regular)


def landmark_attention(q: Tensor, k: Tensor, v: Tensor, *, block_size: int, top_k: int | None = None,
                       scale: float | None = None, backend: str = "auto") -> Tensor:
    """Landmark attention's grouped softmax (see the module docstring).

    Args:
        q: ``(B, Hq, L, D)``; k, v: ``(B, Hkv, S, D)`` / ``(..., Dv)``, sequences with a landmark
            at every ``(block_size + 1)``-th key position (:func:`insert_landmarks`); ``L <= S``
            for decoding (bottom-right).
        block_size: regular tokens per block. top_k: retrieval, the earlier blocks kept per query
            and head (``<= S // (block_size + 1)``); None keeps them all (training formulation).
        scale: ``1/sqrt(D)`` when None. backend: passed to :func:`attnlab.attention`.

    Returns ``(B, Hq, L, Dv)``; outputs at landmark query positions are computed like any other.
    """
    g, b, top_k, n = _check(q, k, v, block_size, top_k)
    scale = check_scale(scale, g.head_dim)
    G = b + 1
    ng = math.ceil(g.kv_len / G)
    t = query_positions(g, q.device)
    qg = torch.div(t, G, rounding_mode="floor")  # the query's group (negative: no key)
    c = torch.arange(ng, device=q.device)
    earlier = c[None, :] < qg[:, None]  # (L, ng); such groups are complete
    current = c[None, :] == qg[:, None]
    cdt = torch.promote_types(q.dtype, torch.float32)  # the block-level bias in float32 at least
    table = q.new_zeros(g.batch, g.q_heads, g.q_len, ng, dtype=cdt)
    allowed = current
    pattern = Causal()
    if n:
        qc = q.to(cdt)
        kb = k[:, :, : n * G].reshape(g.batch, g.kv_heads, n, G, g.head_dim).to(cdt)
        s_land = scale * qc @ per_q_head(kb[:, :, :, b], g.q_heads).transpose(-1, -2)  # (B, Hq, L, n)
        beta = s_land - _block_lse(qc, kb[:, :, :, :b], scale)
        keep = earlier[:, :n]
        if top_k is not None:
            keep = top_k_mask(s_land.detach().masked_fill(~keep, float("-inf")), top_k)
        keep = torch.cat([keep.expand_as(beta), torch.zeros_like(table, dtype=torch.bool)[..., n:]], -1)
        table = torch.cat([torch.where(keep[..., :n], beta, torch.zeros_like(beta)), table[..., n:]], -1)
        allowed = keep | current
        if top_k is not None:
            pattern = BlockSparse(allowed, (1, G)) & Causal()
    table = table.masked_fill(~allowed, float("-inf"))
    return attention(q, k, v, pattern, _GroupBias(table, G), scale=scale, backend=backend)


def landmark_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, block_size: int,
                                 top_k: int | None = None, scale: float | None = None) -> Tensor:
    """Dense reference of :func:`landmark_attention`, the grouped softmax written out: one
    masked softmax over the current section and the (kept) earlier landmarks, one masked softmax
    per earlier group over its regular tokens, and their product. Retrieval keeps a block iff
    fewer than ``top_k`` earlier landmarks beat it (score higher, or tie at a lower index).
    Materialises ``(B, Hq, L, S)``."""
    g, b, top_k, n = _check(q, k, v, block_size, top_k)
    scale = check_scale(scale, g.head_dim)
    G, Hq, S = b + 1, g.q_heads, g.kv_len
    kf, vf = per_q_head(k, Hq), per_q_head(v, Hq)
    s = scale * q @ kf.transpose(-1, -2)  # (B, Hq, L, S)
    t = (torch.arange(g.q_len, device=q.device) + S - g.q_len)[:, None]
    j = torch.arange(S, device=q.device)[None, :]
    gj, gt = j // G, torch.div(t, G, rounding_mode="floor")
    is_land = (j % G) == b
    current = (gj == gt) & (j <= t) & ~is_land  # (L, S)
    prev_land = is_land & (gj < gt)
    if top_k is not None:
        cols = torch.arange(n, device=q.device) * G + b  # the landmark key positions
        kept = torch.zeros(s.shape, dtype=torch.bool, device=q.device)
        eligible = prev_land[:, cols].expand(s.shape[:-1] + (n,))
        kept[..., cols] = rank_mask(s.detach()[..., cols], eligible, top_k)
        prev_land = kept
    outer = masked_softmax(s, current | prev_land)  # current section + landmarks
    out = (outer * current) @ vf
    # landmark c's probability times the softmax inside group c (regular tokens only)
    regular_prev = ~is_land & (gj < gt)
    for c in range(n):
        in_c = regular_prev & (gj == c)
        if not bool(in_c.any()):
            continue
        inner = masked_softmax(s, in_c.expand_as(s))
        gate = outer[..., c * G + b: c * G + b + 1]  # probability of landmark c
        out = out + gate * (inner @ vf)
    return out


class LandmarkAttention(Projections):
    """Causal multi-head self-attention with landmark grouped softmax, on sequences that carry
    their landmark tokens (:func:`insert_landmarks`; a landmark every ``block_size + 1``
    positions), as the paper's layers do.

    Args:
        embed_dim: ``E``; num_heads: ``Hq``; num_kv_heads: GQA (default ``Hq``).
        block_size: regular tokens per block. top_k: retrieval (None: all blocks).
        bias: projection biases.

    Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` and ``landmark (E,)``, the
    landmark token's embedding, which :meth:`insert` places into a sequence of regular tokens.
    ``x (B, L, E) -> (B, L, E)`` (landmark positions included); ``forward(x, reference=True)`` runs
    the dense reference.
    """

    def __init__(self, embed_dim: int, num_heads: int, block_size: int, *, top_k: int | None = None,
                 num_kv_heads: int | None = None, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, num_kv_heads, bias, {"device": device, "dtype": dtype})
        self.block_size = check_int("block_size", block_size, 1)
        self.top_k = check_optional_int("top_k", top_k, 1)
        self.landmark = nn.Parameter(0.02 * torch.randn(embed_dim, device=device, dtype=dtype))

    def insert(self, x: Tensor) -> Tensor:
        """Regular tokens ``(B, N, E)`` -> with this layer's landmark embedding inserted."""
        return insert_landmarks(x, self.block_size, self.landmark)

    def forward(self, x: Tensor, *, reference: bool = False) -> Tensor:
        q, k, v = self.qkv(x)
        fn = landmark_attention_reference if check_bool("reference", reference) else landmark_attention
        return self.out(fn(q, k, v, block_size=self.block_size, top_k=self.top_k))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, block_size={self.block_size}, "
                f"top_k={self.top_k}")
