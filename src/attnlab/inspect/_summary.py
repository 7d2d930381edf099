"""Per-query and per-key summaries of an attention map, dense or blockwise.

The summary of probabilities ``p (B, Hq, L, S)`` (flat token indices) holds:

- ``"entropy"`` ``(B, Hq, L)``: ``-sum_j p_ij log p_ij`` (natural log, terms with
  ``p_ij = 0`` count 0; 0 for a query that sees no key);
- ``"distance"`` ``(B, Hq, L)``: the mean attention distance ``sum_j p_ij d(i, j)``
  (:func:`token_distance`);
- ``"key_mass"`` ``(B, Hq, S)``: the attention mass each key receives, ``sum_i p_ij``;
- ``"max_prob"`` ``(B, Hq, L)``: ``max_j p_ij``;
- ``"visible_keys"`` ``(B, Hq, L)`` int64: how many keys the pattern lets query ``i`` see.

:func:`blockwise_summary` computes them for one attention call without an ``L x S`` tensor:
over tiles of ``q_tile`` queries by ``kv_tile`` keys, a first pass finds every query's
running maximum and log-sum-exp (the online-softmax recurrence), a second pass recomputes
each tile's logits, turns them into exact probabilities ``exp(logit - lse)`` and accumulates
the sums. Memory is ``O(B Hq q_tile kv_tile)`` plus the outputs; the logits are computed
twice. :func:`dense_summary` computes the same quantities from a materialised map.
"""

from __future__ import annotations

import math

import torch

from ..backends.base import Problem
from ..backends.reference import compute_dtype_for
from ..geometry import Geometry, unravel
from ..scores.base import ScoreContext

SUMMARY_KEYS = ("entropy", "distance", "key_mass", "max_prob", "visible_keys")


def token_distance(geometry: Geometry, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """Distance ``d(i, j)`` between flat query indices ``q_idx (Tq,)`` and key indices
    ``kv_idx (Tk,)``, shape ``(Tq, Tk)`` float32.

    One token axis, or query and key grids of different shapes: ``|i + S - L - j|`` on flat
    indices (queries bottom-right aligned with the keys, as :class:`attnlab.Causal` is; plain
    ``|i - j|`` for self-attention). Several axes with equal query and key grids: the
    Euclidean distance between the grid coordinates of ``i`` and ``j``."""
    if geometry.ndim > 1 and geometry.q_shape == geometry.kv_shape:
        qc = torch.stack(unravel(q_idx, geometry.q_shape), -1).float()
        kc = torch.stack(unravel(kv_idx, geometry.kv_shape), -1).float()
        return torch.cdist(qc, kc)
    offset = geometry.kv_len - geometry.q_len
    return (q_idx[:, None] + offset - kv_idx[None, :]).abs().float()


def dense_summary(probs: torch.Tensor, visible: torch.Tensor, geometry: Geometry) -> dict[str, torch.Tensor]:
    """The summary of a materialised map ``probs (B, Hq, L, S)`` whose pattern lets query
    ``i`` see key ``j`` where ``visible`` (broadcastable bool) is True."""
    g = geometry
    dev = probs.device
    d = token_distance(g, torch.arange(g.q_len, device=dev), torch.arange(g.kv_len, device=dev))
    plogp = torch.where(probs > 0, probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny)),
                        torch.zeros((), dtype=probs.dtype, device=dev))
    shape = (g.batch, g.q_heads, g.q_len)
    return {
        "entropy": -plogp.sum(-1),
        "distance": (probs * d.to(probs.dtype)).sum(-1),
        "key_mass": probs.sum(-2),
        "max_prob": probs.amax(-1) if g.kv_len else probs.new_zeros(shape),
        "visible_keys": torch.broadcast_to(visible, probs.shape).sum(-1).to(torch.int64),
    }


def _tile_logits(problem: Problem, qf: torch.Tensor, kf: torch.Tensor, q0: int, q1: int, k0: int, k1: int
                 ) -> torch.Tensor:
    """Masked logits of queries ``q0:q1`` and keys ``k0:k1``, ``(B, Hq, q1-q0, k1-k0)``:
    the corresponding block of :func:`attnlab.backends.reference.reference_logits`."""
    g = problem.geometry
    dev = qf.device
    q_t = qf[:, :, q0:q1]
    logits = problem.scale * (q_t @ kf[:, :, k0:k1].transpose(-1, -2))
    b = torch.arange(g.batch, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(g.q_heads, device=dev).view(1, -1, 1, 1)
    qi = torch.arange(q0, q1, device=dev).view(1, 1, -1, 1)
    ki = torch.arange(k0, k1, device=dev).view(1, 1, 1, -1)
    if problem.score_mod is not None:
        ctx = ScoreContext(b, h, qi, ki, g, query=q_t if problem.score_mod.needs_query else None)
        logits = problem.score_mod.modify(logits, ctx)
    mask = problem.pattern.mask(b, h, qi, ki, g)
    return logits.masked_fill(~mask, float("-inf"))


def choose_tiles(geometry: Geometry, tile_elements: int) -> tuple[int, int]:
    """``(q_tile, kv_tile)`` with ``B * Hq * q_tile * kv_tile <= tile_elements`` (at least 1 x 1)."""
    g = geometry
    per_pair = max(1, g.batch * g.q_heads)
    kv_tile = max(1, min(g.kv_len, 1024, tile_elements // per_pair))
    q_tile = max(1, min(g.q_len, tile_elements // (per_pair * kv_tile)))
    return q_tile, kv_tile


@torch.no_grad()
def blockwise_summary(problem: Problem, q_tile: int, kv_tile: int) -> dict[str, torch.Tensor]:
    """The summary of the probabilities of ``problem`` (an :func:`attnlab.attention` call),
    computed over ``q_tile x kv_tile`` tiles in two passes (module docstring), in float32
    (float64 for float64 inputs). Never materialises ``L x S``."""
    g = problem.geometry
    cdt = compute_dtype_for(problem.q.dtype)
    B, Hq, L, S = g.batch, g.q_heads, g.q_len, g.kv_len
    qf = problem.q.reshape(B, Hq, L, g.head_dim).to(cdt)
    kf = problem.k.reshape(B, g.kv_heads, S, g.head_dim).to(cdt)
    if Hq != g.kv_heads:
        kf = kf.repeat_interleave(g.group_size, dim=1)
    dev = qf.device
    out = {name: torch.zeros(B, Hq, L, dtype=cdt, device=dev) for name in ("entropy", "distance", "max_prob")}
    out["key_mass"] = torch.zeros(B, Hq, S, dtype=cdt, device=dev)
    out["visible_keys"] = torch.zeros(B, Hq, L, dtype=torch.int64, device=dev)
    neg_inf = torch.tensor(float("-inf"), dtype=cdt, device=dev)
    for q0 in range(0, L, q_tile):
        q1 = min(L, q0 + q_tile)
        m = torch.full((B, Hq, q1 - q0), float("-inf"), dtype=cdt, device=dev)
        s = torch.zeros_like(m)
        for k0 in range(0, S, kv_tile):  # pass 1: running max and sum of exp
            lt = _tile_logits(problem, qf, kf, q0, q1, k0, min(S, k0 + kv_tile))
            m_new = torch.maximum(m, lt.amax(-1))
            shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            s = s * torch.exp(m - shift) + torch.exp(lt - shift[..., None]).sum(-1)
            m = m_new
        nonempty = s > 0
        shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        lse = torch.where(nonempty, shift + torch.log(torch.where(nonempty, s, torch.ones_like(s))), neg_inf)
        out["max_prob"][:, :, q0:q1] = torch.where(nonempty, torch.exp(m - torch.where(nonempty, lse, m)),
                                                   torch.zeros_like(m))
        lse_safe = torch.where(nonempty, lse, torch.zeros_like(lse))[..., None]
        qi = torch.arange(q0, q1, device=dev)
        for k0 in range(0, S, kv_tile):  # pass 2: exact probabilities of the tile
            k1 = min(S, k0 + kv_tile)
            lt = _tile_logits(problem, qf, kf, q0, q1, k0, k1)
            seen = torch.isfinite(lt)
            logp = torch.where(seen, lt - lse_safe, neg_inf)
            p = torch.exp(logp)
            out["entropy"][:, :, q0:q1] -= torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
            d = token_distance(g, qi, torch.arange(k0, k1, device=dev)).to(cdt)
            out["distance"][:, :, q0:q1] += (p * d).sum(-1)
            out["key_mass"][:, :, k0:k1] += p.sum(-2)
            out["visible_keys"][:, :, q0:q1] += torch.broadcast_to(seen, p.shape).sum(-1)
    return out


def summary_elements(geometry: Geometry) -> int:
    """``B * Hq * L * S``: the size of the dense map of a problem."""
    return math.prod((geometry.batch, geometry.q_heads, geometry.q_len, geometry.kv_len))
