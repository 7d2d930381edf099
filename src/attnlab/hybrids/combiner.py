r"""Combiner-Fixed: direct attention inside the local region, one abstraction per other region.

Ren, Dai, Dai, Yang, Leskovec, Schuurmans, Dai, "Combiner: Full Attention Transformer with
Sparse Computation Cost" (NeurIPS 2021).

The sequence is cut into regions of ``R = region_size`` tokens (``nR = ceil(L / R)``, the last
one shorter). Combiner approximates ``p(j | i)`` for a key ``j`` in another region ``r`` by
``p(r | i) q(j | r)``: a region-level probability times a query-independent local distribution.
Per query head, with ``s = scale`` and ``pool`` the elementwise max (the released code's
``jnp.max``) or the mean over the region's tokens::

    region summaries:  qbar_r = pool(q_j : j in r),  kbar_r = pool(k_j : j in r)
                       vbar_r = sum_{j in r} softmax_j(s qbar_r . k_j) v_j      (q(j | r))
    joint softmax of query i over
        direct keys   j in region(i)        (causal: j <= i)            logit s q_i . k_j
        abstractions  r != region(i)        (causal: r < region(i))     logit s q_i . kbar_r
    o_i = sum_j P_ij v_j + sum_r P_ir vbar_r

which is the released ``combiner/jax`` "sqrt(n)" layer (Combiner-Fixed) for ``causal=True``;
``causal=False`` lets every query see its whole region and every other region's abstraction.
Every query reaches every (earlier) key, directly or through an abstraction ("full attention").

Fast path, all on :func:`attnlab.attention`: the summary values (``nR`` summary queries, each
over its own region: ``BlockSparse`` with a diagonal ``(nR, nR)`` layout and blocks ``(1, R)``),
the direct part (``BlockSparse`` block-diagonal, ``& Causal()`` when causal) and the abstraction
part (``BlockSparse`` over ``(query region, region)`` with blocks ``(R, 1)``), the last two
merged by their log-sum-exps (:func:`attnlab.merge_attentions`), which is exactly the joint
softmax. Memory O(L * (R + nR)). With GQA the region keys ``kbar`` are per key/value head and
the summary values per query head (``qbar`` is). Gradients flow through everything (the pooling
max by its subgradient). Combiner-Axial / -Logsparse / -Mixture are not implemented.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_int
from ..api import attention
from ..geometry import check_qkv, check_scale
from ..merge import merge_attentions
from ..patterns import BlockSparse, Causal
from ._common import Projections, check_1d, check_bool, check_self, masked_softmax, per_q_head

__all__ = ["combiner_attention", "combiner_attention_reference", "CombinerAttention", "region_pool"]

_POOLS = ("max", "mean")


def _check(q, k, v, region_size, causal, pool):
    g = check_qkv(q, k, v)
    check_1d(g, "combiner_attention")
    check_self(g, "combiner_attention")
    R = check_int("region_size", region_size, 1)
    check_bool("causal", causal)
    if pool not in _POOLS:
        raise ValueError(f"pool must be one of {_POOLS}, got pool={pool!r}")
    return g, R, math.ceil(g.q_len / R)


def region_pool(x: Tensor, R: int, pool: str) -> Tensor:
    """``(B, H, L, D)`` -> ``(B, H, ceil(L / R), D)``: max or mean over each region (the last
    region pools only its own tokens)."""
    B, H, L, D = x.shape
    n = math.ceil(L / R)
    pad = n * R - L
    fill = float("-inf") if pool == "max" else 0.0
    xp = torch.cat([x, x.new_full((B, H, pad, D), fill)], 2) if pad else x
    xp = xp.view(B, H, n, R, D)
    if pool == "max":
        return xp.amax(3)
    counts = torch.clamp(L - torch.arange(n, device=x.device) * R, max=R).to(x.dtype)
    return xp.sum(3) / counts[:, None]


def combiner_attention(q: Tensor, k: Tensor, v: Tensor, *, region_size: int, causal: bool = True,
                       pool: str = "max", scale: float | None = None, backend: str = "auto") -> Tensor:
    """Combiner-Fixed self-attention (see the module docstring).

    Args:
        q: ``(B, Hq, L, D)``; k, v: ``(B, Hkv, L, D)`` / ``(..., Dv)`` (self-attention, ``L == S``).
        region_size: ``R``, tokens per region, any int ``>= 1`` (``R >= L``: one region, plain
            attention; ``R == 1``: every key its own region, also plain attention).
        causal: causal (autoregressive) or bidirectional.
        pool: ``"max"`` (the released code) or ``"mean"`` for the region query and key.
        scale: ``1/sqrt(D)`` when None. backend: passed to :func:`attnlab.attention`.

    Returns ``(B, Hq, L, Dv)``.
    """
    g, R, n = _check(q, k, v, region_size, causal, pool)
    scale = check_scale(scale, g.head_dim)
    dev = q.device
    eye = torch.eye(n, dtype=torch.bool, device=dev)
    qbar = region_pool(q, R, pool)
    vbar = attention(qbar, k, v, BlockSparse(eye, (1, R)), scale=scale, backend=backend)  # (B, Hq, n, Dv)
    kbar = per_q_head(region_pool(k, R, pool), g.q_heads)
    local = BlockSparse(eye, R)
    o_dir, l_dir = attention(q, k, v, local & Causal() if causal else local, scale=scale, return_lse=True,
                             backend=backend)
    if n == 1:
        return o_dir
    r = torch.arange(n, device=dev)
    other = r[None, :] < r[:, None] if causal else r[None, :] != r[:, None]
    o_abs, l_abs = attention(q, kbar, vbar, BlockSparse(other, (R, 1)), scale=scale, return_lse=True,
                             backend=backend)
    return merge_attentions([o_dir, o_abs], [l_dir, l_abs])[0]


def combiner_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, region_size: int, causal: bool = True,
                                 pool: str = "max", scale: float | None = None) -> Tensor:
    """Dense reference of :func:`combiner_attention`: region summaries pooled token by token
    from a ``(nR, L)`` membership mask, and one softmax over the concatenated ``[L direct |
    nR abstraction]`` logits with the masks of the definition."""
    g, R, n = _check(q, k, v, region_size, causal, pool)
    scale = check_scale(scale, g.head_dim)
    Hq, L, dev = g.q_heads, g.q_len, q.device
    pos = torch.arange(L, device=dev)
    reg = pos // R
    member = torch.arange(n, device=dev)[:, None] == reg[None, :]  # (n, L)

    def pooled(x: Tensor) -> Tensor:
        m = member[None, None, :, :, None]
        if pool == "max":
            return x[:, :, None].masked_fill(~m, float("-inf")).amax(3)
        return (x[:, :, None] * m).sum(3) / member.sum(-1)[:, None].to(x.dtype)

    qbar, kbar = pooled(q), per_q_head(pooled(k), Hq)
    kf, vf = per_q_head(k, Hq), per_q_head(v, Hq)
    vbar = masked_softmax(scale * qbar @ kf.transpose(-1, -2), member) @ vf
    direct = reg[:, None] == reg[None, :]
    if causal:
        direct = direct & (pos[None, :] <= pos[:, None])
    r = torch.arange(n, device=dev)
    other = (r[None, :] < reg[:, None]) if causal else (r[None, :] != reg[:, None])
    logits = torch.cat([scale * q @ kf.transpose(-1, -2), scale * q @ kbar.transpose(-1, -2)], -1)
    p = masked_softmax(logits, torch.cat([direct, other], -1))
    return p[..., :L] @ vf + p[..., L:] @ vbar


class CombinerAttention(Projections):
    """Combiner-Fixed multi-head self-attention (:func:`combiner_attention`).

    Args:
        embed_dim: ``E``; num_heads: ``Hq`` (head dim ``E // Hq``); num_kv_heads: GQA (default
            ``Hq``). region_size, causal, pool: as in the function. bias: projection biases.

    Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (Xavier-uniform, zero bias).
    ``x (B, L, E) -> (B, L, E)``; ``forward(x, reference=True)`` runs the dense reference.
    """

    def __init__(self, embed_dim: int, num_heads: int, region_size: int, *, causal: bool = True,
                 pool: str = "max", num_kv_heads: int | None = None, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, num_kv_heads, bias, {"device": device, "dtype": dtype})
        self.region_size = check_int("region_size", region_size, 1)
        self.causal = check_bool("causal", causal)
        if pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got pool={pool!r}")
        self.pool = pool

    def forward(self, x: Tensor, *, reference: bool = False) -> Tensor:
        q, k, v = self.qkv(x)
        fn = combiner_attention_reference if check_bool("reference", reference) else combiner_attention
        return self.out(fn(q, k, v, region_size=self.region_size, causal=self.causal, pool=self.pool))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, region_size={self.region_size}, "
                f"causal={self.causal}, pool={self.pool!r}")
