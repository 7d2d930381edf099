"""SeerAttention's learned block gate and the block-level target it is distilled from.

Gao et al., "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs", 2024: a small
gate scores (query block, key block) pairs from pooled ``q`` and ``k``; it is trained so that the
softmax of its scores over key blocks matches the block-level attention mass of the model's own
dense attention, then used to choose blocks (``TopKBlocks(k, gate=gate)``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_int
from ..geometry import check_qkv, check_scale
from .block_sparse import block_pair
from .content import pooled_blocks


class SeerGate(nn.Module):
    """``scores[b, h, r, c] = (P_q[h] pq_r) . (P_k[h] pk_c) / sqrt(gate_dim)`` on pooled blocks
    ``pq (B, Hq, nQb, D)``, ``pk (B, Hq, nKb, D)``, with per-head projections ``P_q, P_k``
    (``gate_dim x D``), initialised so that the gate starts as the plain pooled logit."""

    def __init__(self, head_dim: int, num_heads: int, gate_dim: int | None = None):
        super().__init__()
        self.head_dim = check_int("head_dim", head_dim, 1)
        self.num_heads = check_int("num_heads", num_heads, 1)
        self.gate_dim = check_int("gate_dim", gate_dim if gate_dim is not None else head_dim, 1)
        eye = torch.eye(self.gate_dim, self.head_dim)
        self.proj_q = nn.Parameter(eye.repeat(num_heads, 1, 1))
        self.proj_k = nn.Parameter(eye.repeat(num_heads, 1, 1).clone())

    def forward(self, pooled_q: torch.Tensor, pooled_k: torch.Tensor) -> torch.Tensor:
        if pooled_q.shape[1] != self.num_heads or pooled_q.shape[-1] != self.head_dim:
            raise ValueError(f"pooled_q must be (B, {self.num_heads}, nQb, {self.head_dim}), got "
                             f"{tuple(pooled_q.shape)}")
        a = pooled_q @ self.proj_q.transpose(-1, -2).to(pooled_q.dtype)
        b = pooled_k @ self.proj_k.transpose(-1, -2).to(pooled_k.dtype)
        return (a @ b.transpose(-1, -2)) / math.sqrt(self.gate_dim)


def block_attention_mass(q: torch.Tensor, k: torch.Tensor, block_size, *, causal: bool = False,
                         scale: float | None = None, chunk: int = 256) -> torch.Tensor:
    """``(B, Hq, nQb, nKb)``: the dense attention probability of each query block's queries on
    each key block, averaged over the block's queries (rows sum to 1 over key blocks where a
    query sees any key). Computed a chunk of queries at a time (``chunk x S`` logits), the
    distillation target of :class:`SeerGate`."""
    g = check_qkv(q, k, k)
    bq, bk = block_pair(block_size)
    scale = check_scale(scale, g.head_dim)
    B, H, L, S = g.batch, g.q_heads, g.q_len, g.kv_len
    qf = q.reshape(B, H, L, -1)
    kf = k.reshape(B, g.kv_heads, S, -1).repeat_interleave(g.group_size, 1)
    nkb = -(-S // bk)
    out = []
    with torch.no_grad():
        chunk = max(bq, chunk // bq * bq)
        for q0 in range(0, L, chunk):
            s = scale * (qf[:, :, q0:q0 + chunk] @ kf.transpose(-1, -2))
            if causal:
                i = torch.arange(q0, q0 + s.shape[2], device=s.device)[:, None]
                s = s.masked_fill(torch.arange(S, device=s.device)[None, :] > i + S - L, float("-inf"))
            p = torch.softmax(s, -1).nan_to_num(0.0)
            p = torch.nn.functional.pad(p, (0, nkb * bk - S)).reshape(B, H, s.shape[2], nkb, bk).sum(-1)
            out.append(pooled_blocks(p, bq))
    return torch.cat(out, 2)


def seer_gate_loss(gate: SeerGate, q: torch.Tensor, k: torch.Tensor, block_size, *, causal: bool = False,
                   scale: float | None = None) -> torch.Tensor:
    """KL divergence from the dense block attention mass to the softmax of the gate's scores
    (per query block, over the key blocks a causal query block can see), averaged: the
    SeerAttention distillation loss. Differentiable in the gate's parameters only."""
    g = check_qkv(q, k, k)
    bq, bk = block_pair(block_size)
    target = block_attention_mass(q, k, (bq, bk), causal=causal, scale=scale)
    qf = q.detach().reshape(g.batch, g.q_heads, g.q_len, -1)
    kf = k.detach().reshape(g.batch, g.kv_heads, g.kv_len, -1).repeat_interleave(g.group_size, 1)
    scores = gate(pooled_blocks(qf, bq), pooled_blocks(kf, bk))
    if causal:  # key block c is visible to query block r if its first key is to the last query
        r = torch.arange(scores.shape[2], device=scores.device)[:, None]
        last = torch.clamp((r + 1) * bq, max=g.q_len) - 1 + g.kv_len - g.q_len
        hidden = torch.arange(scores.shape[3], device=scores.device)[None, :] * bk > last
        hidden = hidden & ~hidden.all(-1, keepdim=True)  # rows that see nothing: no target either
        scores = scores.masked_fill(hidden, float("-inf"))
    logp = torch.log_softmax(scores, -1)
    kl = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-30)) - logp), torch.zeros_like(target))
    return kl.sum(-1).mean()
