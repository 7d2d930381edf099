"""Helpers shared by the hybrid mechanisms: argument checks, GQA head expansion, the dense
masked softmax of the references, block-level score chunks and the module projections."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .._checks import check_int
from ..geometry import Geometry


def check_1d(g: Geometry, what: str) -> None:
    """One token axis (sequences): ``q (B, Hq, L, D)``, ``k``/``v (B, Hkv, S, D)``."""
    if g.ndim != 1:
        raise ValueError(
            f"{what} works on sequences: q, k, v must have one token axis (B, H, L, D), got q "
            f"token shape {g.q_shape} and k token shape {g.kv_shape}"
        )


def check_self(g: Geometry, what: str) -> None:
    """Self-attention: as many queries as keys (``L == S``)."""
    if g.q_shape != g.kv_shape:
        raise ValueError(
            f"{what} is self-attention: q and k must have the same token shape, got q token shape "
            f"{g.q_shape} and k token shape {g.kv_shape}"
        )


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {name}={value!r}")
    return value


def check_optional_int(name: str, value: object, minimum: int) -> int | None:
    return None if value is None else check_int(name, value, minimum)


def per_q_head(x: Tensor, q_heads: int) -> Tensor:
    """``(B, Hkv, ...)`` -> ``(B, Hq, ...)``: each key/value head repeated for its query group."""
    reps = q_heads // x.shape[1]
    return x if reps == 1 else x.repeat_interleave(reps, dim=1)


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last axis of ``logits`` restricted to ``mask``; rows with no visible
    entry are all zero (never NaN, finite gradients)."""
    z = logits.masked_fill(~mask, float("-inf"))
    m = z.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(z - m)
    tot = e.sum(-1, keepdim=True)
    return e / torch.where(tot > 0, tot, torch.ones_like(tot))


def top_k_mask(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest entries per row (last axis) among those ``> -inf``; ties
    go to the lower index (a stable descending sort), so the choice is deterministic on every
    device. ``+inf`` entries (forced choices) come first."""
    kk = min(k, scores.shape[-1])
    order = torch.sort(scores, dim=-1, descending=True, stable=True)
    idx, val = order.indices[..., :kk], order.values[..., :kk]
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return keep.scatter_(-1, idx, val > float("-inf"))


def rank_mask(scores: Tensor, eligible: Tensor, budget: Tensor | int) -> Tensor:
    """Reference form of :func:`top_k_mask`: an ``eligible`` entry is kept iff fewer than
    ``budget`` eligible entries beat it (a higher score, or an equal score at a lower index).
    Materialises ``(..., n, n)``; for references only."""
    n = scores.shape[-1]
    idx = torch.arange(n, device=scores.device)
    a, b = scores[..., :, None], scores[..., None, :]  # a: the entry, b: a competitor
    beats = (b > a) | ((b == a) & (idx[None, :] < idx[:, None]))
    rank = (beats & eligible[..., None, :]).sum(-1)
    return eligible & (rank < budget)


def query_positions(g: Geometry, device: torch.device) -> Tensor:
    """Absolute key-axis position of every query, bottom-right aligned: ``i + S - L``."""
    return torch.arange(g.q_len, device=device) + g.causal_offset


def grouped_scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """``scale * q k^T`` per query head for GQA: ``q (B, Hq, L, D)``, ``k (B, Hkv, N, D)`` ->
    ``(B, Hq, L, N)``. Callers keep ``N`` at block level (one key per block)."""
    return scale * (q @ per_q_head(k, q.shape[1]).transpose(-1, -2))


def chunked_block_reduce(
    fn: Callable[[Tensor, Tensor], Tensor], q: Tensor, kb: Tensor, budget: int = 1 << 18
) -> Tensor:
    """``fn(q, kb[:, :, c])`` over chunks ``c`` of the block axis 2 of ``kb`` (``(B, H, nb,
    ...)``), concatenated on the last axis. Each chunk is checkpointed under autograd, so the
    token-level scores inside ``fn`` live one chunk at a time in forward and in backward."""
    nb = kb.shape[2]
    rows = q.numel() // q.shape[-1]  # B * H * L query rows
    tokens = kb[0, 0, 0].numel() // kb.shape[-1]  # key tokens per block
    per_block = max(1, rows * tokens)
    step = max(1, min(nb, budget // per_block))
    grad = torch.is_grad_enabled() and (q.requires_grad or kb.requires_grad)
    outs = []
    for lo in range(0, nb, step):
        chunk = kb[:, :, lo:lo + step]
        outs.append(checkpoint(fn, q, chunk, use_reentrant=False) if grad else fn(q, chunk))
    return torch.cat(outs, dim=-1)


class Projections(nn.Module):
    """``q_proj (E -> Hq*D)``, ``k_proj``/``v_proj (E -> Hkv*D)`` and ``out_proj (Hq*D -> E)``,
    Xavier-uniform weights and zero biases; :meth:`qkv` splits ``x (B, L, E)`` into SDPA-layout
    heads and :meth:`out` merges ``(B, Hq, L, D)`` back to ``(B, L, E)``."""

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None, bias: bool,
                 factory: dict[str, Any]) -> None:
        super().__init__()
        check_int("embed_dim", embed_dim, 1)
        check_int("num_heads", num_heads, 1)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be a multiple of num_heads={num_heads}")
        kv = num_heads if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads, 1)
        if num_heads % kv:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={kv}")
        check_bool("bias", bias)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, kv
        self.head_dim = embed_dim // num_heads
        d = self.head_dim
        self.q_proj = nn.Linear(embed_dim, num_heads * d, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv * d, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv * d, bias=bias, **factory)
        self.out_proj = nn.Linear(num_heads * d, embed_dim, bias=bias, **factory)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def check_x(self, x: object) -> Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x.shape={tuple(x.shape)}, expected (B, L, {self.embed_dim})")
        return x

    def split(self, y: Tensor, heads: int) -> Tensor:
        B, L, _ = y.shape
        return y.view(B, L, heads, self.head_dim).transpose(1, 2)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.check_x(x)
        return (self.split(self.q_proj(x), self.num_heads), self.split(self.k_proj(x), self.num_kv_heads),
                self.split(self.v_proj(x), self.num_kv_heads))

    def out(self, o: Tensor) -> Tensor:
        B, H, L, D = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(B, L, H * D))


__all__ = [
    "check_1d", "check_self", "check_bool", "check_optional_int", "per_q_head", "masked_softmax",
    "query_positions", "top_k_mask", "rank_mask", "grouped_scores", "chunked_block_reduce",
    "Projections",
]
