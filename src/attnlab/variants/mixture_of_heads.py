"""Mixture-of-Head attention (MoH): each token routes itself to a few heads.

"MoH: Multi-Head Attention as Mixture-of-Head Attention" (Jin et al., 2024).
Heads are experts: ``h_s`` shared heads are always on, a per-token router picks the top-k of
the ``h_r`` routed heads, and the head outputs are summed with the router's weights instead
of plainly (``O = sum_h g_h H_h W_o^h``, which is the output projection of the gated heads).

Gates, for token ``t`` with router logits ``r_t`` (``h_r``), shared logits ``u_t`` (``h_s``)
and balance logits ``w_t`` (2)::

    [alpha_1, alpha_2] = softmax(w_t)
    g_h = alpha_1 softmax(u_t)_h                       for the shared heads h < h_s
    g_h = alpha_2 softmax(r_t)_h * [r_t,h in top-k(r_t)]  for the routed heads

(the routed softmax is over all routed heads and is not renormalised after the top-k; with
no shared heads ``g = softmax(r_t) * top-k mask``). The auxiliary load-balance loss is
``L_b = sum_h f_h P_h`` over routed heads, ``f_h = h_r / (k T) * #{t : h in top-k(r_t)}``,
``P_h = mean_t softmax(r_t)_h`` (:func:`moh_balance_loss`).

Fast path (:func:`mixture_of_heads_attention`): one :func:`attnlab.attention` call over the
user's pattern intersected with :class:`ActiveRows` (a query row of a head is visible only
where its gate is non-zero), so the tiled backend skips every (query tile, head) that no
token routed to, as MoH's efficiency claim needs; the output rows are then multiplied by the
gates. Gradients reach the gates (hence the router) through the softmaxes; *which* heads
are chosen is a discrete choice without gradient. The reference runs dense attention on
every head and multiplies by gates computed independently (ranks by sorting instead of
``topk``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..api import attention
from ..backends.reference import reference_attention
from ..patterns.base import Pattern, as_pattern
from ..patterns.layout import BlockLayout
from ._common import DEFAULT_MAX_ELEMENTS, check_positive_int, check_qkv, size_guard

__all__ = [
    "ActiveRows", "moh_gates", "moh_gates_reference", "moh_balance_loss", "mixture_of_heads_attention",
    "mixture_of_heads_attention_reference",
]


class ActiveRows(Pattern):
    """Rows of query heads that are on: ``mask(b, h, i, j) = active[b, h, i]``, with
    ``active`` a boolean ``(B, Hq, L)`` tensor (flat query tokens). Its block layout touches a
    (batch, head, query tile) only if some row of the tile is active."""

    def __init__(self, active: torch.Tensor):
        if not isinstance(active, torch.Tensor) or active.dtype != torch.bool or active.ndim != 3:
            raise TypeError(
                f"active must be a boolean tensor of shape (B, Hq, L), got "
                f"{getattr(active, 'dtype', type(active).__name__)} {tuple(getattr(active, 'shape', ()))}"
            )
        self.active = active

    def validate(self, geometry) -> None:
        want = (geometry.batch, geometry.q_heads, geometry.q_len)
        if tuple(self.active.shape) != want:
            raise ValueError(f"ActiveRows: active.shape={tuple(self.active.shape)}, expected {want}")

    def mask(self, b, h, q_idx, kv_idx, geometry):
        m = self.active[b, h, q_idx]
        return m & torch.ones_like(kv_idx, dtype=torch.bool)

    def block_layout(self, tiling):
        idx = tiling.q_token_index  # (nQ, Tq), -1 padding
        a = self.active[:, :, idx.clamp(min=0)]  # (B, H, nQ, Tq)
        ok = idx >= 0
        any_ = (a & ok).any(-1)
        full = (a | ~ok).all(-1)
        nk = tiling.num_kv_tiles
        shape = (*any_.shape, nk)
        return BlockLayout(any_[..., None].expand(shape), full[..., None].expand(shape))

    def may_have_empty_rows(self, geometry):
        return True

    def __repr__(self):
        return f"ActiveRows(active={tuple(self.active.shape)})"


def _check_logits(name, x, shape_prefix, heads=None):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {type(x).__name__}")
    if x.ndim < 2 or (shape_prefix is not None and tuple(x.shape[:-1]) != shape_prefix):
        raise ValueError(
            f"{name} must have shape (B, *L, n) matching the router logits' (B, *L), got "
            f"{name}.shape={tuple(x.shape)}"
        )
    if heads is not None and x.shape[-1] != heads:
        raise ValueError(f"{name}.shape[-1]={x.shape[-1]}, expected {heads}")


def _prepare_gates(router_logits, top_k, shared_logits, balance_logits):
    _check_logits("router_logits", router_logits, None)
    prefix = tuple(router_logits.shape[:-1])
    n_routed = router_logits.shape[-1]
    top_k = check_positive_int("top_k", top_k)
    if top_k > n_routed:
        raise ValueError(f"top_k={top_k} exceeds the number of routed heads router_logits.shape[-1]={n_routed}")
    if shared_logits is not None:
        _check_logits("shared_logits", shared_logits, prefix)
        if balance_logits is None:
            raise ValueError("balance_logits (B, *L, 2) are required when shared_logits are given")
        _check_logits("balance_logits", balance_logits, prefix, heads=2)
    elif balance_logits is not None:
        raise ValueError("balance_logits are only used with shared_logits (shared heads)")
    return top_k


def moh_gates(
    router_logits: torch.Tensor,
    top_k: int,
    shared_logits: torch.Tensor | None = None,
    balance_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoH gates ``(B, *L, h_s + h_r)`` (shared heads first), module docstring."""
    top_k = _prepare_gates(router_logits, top_k, shared_logits, balance_logits)
    routed = torch.softmax(router_logits, -1)
    chosen = torch.zeros_like(router_logits, dtype=torch.bool)
    chosen.scatter_(-1, router_logits.topk(top_k, -1).indices, True)
    routed = torch.where(chosen, routed, torch.zeros_like(routed))
    if shared_logits is None:
        return routed
    alpha = torch.softmax(balance_logits, -1)
    shared = alpha[..., :1] * torch.softmax(shared_logits, -1)
    return torch.cat([shared, alpha[..., 1:] * routed], -1)


def moh_gates_reference(
    router_logits: torch.Tensor,
    top_k: int,
    shared_logits: torch.Tensor | None = None,
    balance_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gate formula written out: exponentials over sums, top-k by rank (sorting)."""
    top_k = _prepare_gates(router_logits, top_k, shared_logits, balance_logits)

    def softmax(x):
        e = torch.exp(x - x.detach().amax(-1, keepdim=True))
        return e / e.sum(-1, keepdim=True)

    rank = router_logits.argsort(-1, descending=True).argsort(-1)  # 0 = largest
    routed = softmax(router_logits) * (rank < top_k).to(router_logits.dtype)
    if shared_logits is None:
        return routed
    a = softmax(balance_logits)
    return torch.cat([a[..., 0:1] * softmax(shared_logits), a[..., 1:2] * routed], -1)


def moh_balance_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """MoH's load-balance loss ``sum_h f_h P_h`` over the routed heads (a scalar)."""
    top_k = _prepare_gates(router_logits, top_k, None, None)
    n = router_logits.shape[-1]
    r = router_logits.reshape(-1, n)
    chosen = torch.zeros_like(r).scatter_(-1, r.topk(top_k, -1).indices, 1.0)
    f = chosen.sum(0) * (n / (top_k * r.shape[0]))
    P = torch.softmax(r, -1).mean(0)
    return (f * P).sum()


def _check_gates(gates, g, q):
    want = (g.batch, *g.q_shape, g.q_heads)
    if not isinstance(gates, torch.Tensor) or not gates.is_floating_point():
        raise TypeError(f"gates must be a floating-point tensor of shape {want}, got {type(gates).__name__}")
    if tuple(gates.shape) != want:
        raise ValueError(f"gates must have shape (B, *L, Hq) = {want}, got gates.shape={tuple(gates.shape)}")
    if gates.device != q.device:
        raise ValueError(f"gates are on {gates.device} but q is on {q.device}")
    return gates.reshape(g.batch, g.q_len, g.q_heads).transpose(1, 2)  # (B, Hq, L)


def mixture_of_heads_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    pattern: Any = None,
    score_mod: Any = None,
    *,
    scale: float | None = None,
    skip_inactive: bool = True,
    backend: str = "auto",
    options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Gated head outputs ``g_h(t) * attention_h(t)`` ``(B, Hq, *L, Dv)``: MoH's head outputs
    before the output projection (which sums them). ``gates`` is ``(B, *L, Hq)``, e.g. from
    :func:`moh_gates`. With ``skip_inactive`` (default) rows whose gate is 0 are not computed
    (the pattern is intersected with :class:`ActiveRows`; this needs a backend that runs
    arbitrary patterns, i.e. not ``sdpa``)."""
    g = check_qkv(q, k, v)
    gt = _check_gates(gates, g, q)
    if not isinstance(skip_inactive, bool):
        raise TypeError(f"skip_inactive must be a bool, got skip_inactive={skip_inactive!r}")
    if skip_inactive:
        pattern = as_pattern(pattern) & ActiveRows(gt.detach() != 0)
    out = attention(q, k, v, pattern, score_mod, scale=scale, backend=backend, options=options)
    return out * gt.reshape(g.batch, g.q_heads, *g.q_shape, 1).to(out.dtype)


def mixture_of_heads_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    pattern: Any = None,
    score_mod: Any = None,
    *,
    scale: float | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Dense attention of every head (reference backend), times the gates."""
    g = check_qkv(q, k, v)
    gt = _check_gates(gates, g, q)
    size_guard("mixture_of_heads_attention_reference", g.batch * g.q_heads * g.q_len * g.kv_len,
               max_elements, "B*Hq*L*S")
    out = reference_attention(q, k, v, pattern, score_mod, scale=scale, max_elements=max_elements)
    return out * gt.reshape(g.batch, g.q_heads, *g.q_shape, 1).to(out.dtype)
