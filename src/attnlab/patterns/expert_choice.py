"""Expert-choice token routing per head (MoSA): each head picks the tokens it attends among.

Piękos, Csordás, Schmidhuber, "Mixture of Sparse Attention: Content-Based Learnable Sparse
Attention via Expert-Choice Routing", 2025. Every head has a router that scores every token;
the head keeps its ``k`` best tokens (expert choice: the head chooses tokens, not the tokens
heads), runs attention among those ``k`` tokens only (causal by original position in a
language model) and scatters the outputs back, scaled by the router's sigmoid score so that
the router is trained through the output. A head's cost drops from ``O(T^2)`` to ``O(k^2 + T)``.

:class:`ExpertChoice` is the selection as a pattern (selected queries see selected keys;
other queries see nothing and return 0). It is made without autograd: no gradient flows
through *which* tokens are chosen. :class:`MixtureOfSparseAttention` is the layer, whose router
receives gradients through the sigmoid gate on the outputs.

Causality: a head's top-k is taken over the whole sequence, so whether an early token is
selected depends on the scores of later tokens (as in MoSA's training). With the scores held
fixed, ``ExpertChoice(k, scores) & Causal()`` lets no later key change an earlier output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._checks import check_int
from ..geometry import Geometry
from .base import Causal, Pattern
from .content import ContentPattern, SelectionContext
from .layout import BlockLayout, Tiling


class TokenSubset(Pattern):
    """Query ``i`` sees key ``j`` iff ``q_selected[b, h, i]`` and ``k_selected[b, h, j]``.

    ``q_selected (Bb, Hb, L)`` and ``k_selected (Bb, Hb, S)`` are bool (``Bb`` in ``{1, B}``,
    ``Hb`` in ``{1, Hq}``). Block layout (exact): a tile pair is touched iff both tiles hold a
    selected token, full iff every token of both is selected; ``O(L + S + tiles)``.
    """

    def __init__(self, q_selected: torch.Tensor, k_selected: torch.Tensor):
        for name, t in (("q_selected", q_selected), ("k_selected", k_selected)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or t.ndim != 3:
                raise TypeError(f"{name} must be a bool tensor (B or 1, H or 1, tokens), got "
                                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        self.q_selected = q_selected.detach()
        self.k_selected = k_selected.detach()

    def validate(self, geometry: Geometry) -> None:
        super().validate(geometry)
        for name, t, n in (("q_selected", self.q_selected, geometry.q_len),
                           ("k_selected", self.k_selected, geometry.kv_len)):
            Bb, Hb, N = t.shape
            if N != n or Bb not in (1, geometry.batch) or Hb not in (1, geometry.q_heads):
                raise ValueError(f"{name} must have shape (1 or B={geometry.batch}, 1 or Hq={geometry.q_heads}, "
                                 f"{n}), got {tuple(t.shape)}")

    def mask(self, b, h, q_idx, kv_idx, geometry):
        qs = self.q_selected.to(q_idx.device)
        ks = self.k_selected.to(q_idx.device)
        return (qs[b if qs.shape[0] > 1 else 0, h if qs.shape[1] > 1 else 0, q_idx]
                & ks[b if ks.shape[0] > 1 else 0, h if ks.shape[1] > 1 else 0, kv_idx])

    @staticmethod
    def _per_tile(sel: torch.Tensor, token_index: torch.Tensor):
        ok = token_index >= 0
        s = sel[:, :, token_index.clamp(min=0)]  # (Bb, Hb, nT, t)
        return (s & ok).any(-1), (s | ~ok).all(-1)

    def block_layout(self, tiling: Tiling) -> BlockLayout:
        dev = tiling.device
        q_any, q_all = self._per_tile(self.q_selected.to(dev), tiling.q_token_index)
        k_any, k_all = self._per_tile(self.k_selected.to(dev), tiling.kv_token_index)
        return BlockLayout(q_any[..., :, None] & k_any[..., None, :], q_all[..., :, None] & k_all[..., None, :])

    def may_have_empty_rows(self, geometry):
        return not bool(self.q_selected.all() and self.k_selected.any(-1).all())

    def __repr__(self):
        return (f"TokenSubset(q_selected={tuple(self.q_selected.shape)}, "
                f"k_selected={tuple(self.k_selected.shape)}, selected per row={self.q_selected.sum(-1).float().mean():.1f})")


class ExpertChoice(ContentPattern):
    """MoSA's expert-choice selection: per (batch element, query head) the ``k`` tokens with the
    highest router score; a selected query sees the selected keys, an unselected query sees
    nothing (output 0, ``lse = -inf``).

    Piękos et al., "Mixture of Sparse Attention: Content-Based Learnable Sparse Attention via
    Expert-Choice Routing", 2025.

    Self-attention over one token set (``q`` and ``k`` token shapes equal): token ``t`` is
    selected for head ``h`` as a query and as a key together (the key through head ``h``'s kv
    head). ``ExpertChoice(k, r) & Causal()`` is MoSA's causal attention among the selected
    tokens by original position. ``k = L`` is the enclosing pattern exactly (dense attention on
    its own). Inside an intersection no candidate restriction applies (every token is a
    candidate; the static parts remove pairs). The selection ignores the score mod.

    Args:
        k: tokens per head, ``1 <= k <= L``.
        router: the scores, a float tensor ``(B or 1, Hq or 1, L)`` (flat tokens), or a callable
            ``router(q, k) -> (B, Hq, L)`` called on the (detached) ``q (B, Hq, L, D)`` and
            ``k (B, Hkv, S, D)`` of each call.
    """

    def __init__(self, k: int, router: torch.Tensor | Callable):
        self.k = check_int("k", k, 1)
        if isinstance(router, torch.Tensor):
            if router.ndim != 3 or not router.is_floating_point():
                raise ValueError(f"router scores must be a float tensor (B or 1, H or 1, L), got "
                                 f"{router.dtype} {tuple(router.shape)}")
            router = router.detach()
        elif not callable(router):
            raise TypeError(f"router must be a (B, H, L) score tensor or a callable (q, k) -> scores, got "
                            f"{type(router).__name__}")
        self.router = router

    def validate(self, geometry: Geometry) -> None:
        super().validate(geometry)
        if geometry.q_shape != geometry.kv_shape:
            raise ValueError(f"ExpertChoice selects one token set for queries and keys: q and k token shapes "
                             f"must be equal, got {geometry.q_shape} and {geometry.kv_shape}")
        if self.k > geometry.q_len:
            raise ValueError(f"k={self.k} is larger than the number of tokens L={geometry.q_len}")
        if isinstance(self.router, torch.Tensor):
            Bb, Hb, N = self.router.shape
            if N != geometry.q_len or Bb not in (1, geometry.batch) or Hb not in (1, geometry.q_heads):
                raise ValueError(f"router scores must have shape (1 or B={geometry.batch}, 1 or "
                                 f"Hq={geometry.q_heads}, L={geometry.q_len}), got {tuple(self.router.shape)}")

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        g = ctx.geometry
        r = self.router if isinstance(self.router, torch.Tensor) else self.router(ctx.q, ctx.k)
        if not isinstance(r, torch.Tensor) or r.ndim != 3 or r.shape[-1] != g.q_len:
            raise ValueError(f"router must return scores (B, Hq, L=({g.batch}, {g.q_heads}, {g.q_len}), got "
                             f"{tuple(getattr(r, 'shape', ()))}")
        return r.detach().to(ctx.q.device)

    def select(self, ctx: SelectionContext) -> TokenSubset:
        r = self.scores(ctx)
        chosen = r.topk(self.k, dim=-1).indices
        sel = torch.zeros(r.shape, dtype=torch.bool, device=r.device).scatter_(-1, chosen, True)
        return TokenSubset(sel, sel)

    def __repr__(self):
        src = f"scores{tuple(self.router.shape)}" if isinstance(self.router, torch.Tensor) else \
            getattr(self.router, "__name__", type(self.router).__name__)
        return f"ExpertChoice(k={self.k}, router={src})"


class MixtureOfSparseAttention(nn.Module):
    """MoSA layer on ``x (B, L, embed_dim)``: per head, a linear router scores every token, the
    head keeps its ``k`` best tokens, attends among them (causally by position when
    ``causal``), multiplies each selected token's output by ``sigmoid(router score)`` and
    scatters it back; unselected tokens get 0 from that head. Heads are merged and projected.

    Piękos et al., "Mixture of Sparse Attention: Content-Based Learnable Sparse Attention via
    Expert-Choice Routing", 2025.

    With ``gather=True`` (default) the selected tokens' ``q, k, v`` are gathered (in position
    order) and :func:`attnlab.attention` runs on ``(B, H, k, head_dim)`` with ``Causal()``:
    ``O(k^2)`` per head, MoSA's implementation. ``gather=False`` runs the same attention on
    the full sequence with the pattern ``ExpertChoice(k, scores) & Causal()`` (equal outputs and
    gradients; useful to inspect the pattern). The top-k choice carries no gradient; the router
    learns through the sigmoid gate.
    """

    def __init__(self, embed_dim: int, num_heads: int, k: int, *, causal: bool = True, bias: bool = True,
                 gather: bool = True):
        super().__init__()
        E = check_int("embed_dim", embed_dim, 1)
        H = check_int("num_heads", num_heads, 1)
        if E % H:
            raise ValueError(f"embed_dim={E} must be a multiple of num_heads={H}")
        self.embed_dim, self.num_heads, self.head_dim = E, H, E // H
        self.k = check_int("k", k, 1)
        for name, flag in (("causal", causal), ("gather", gather)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {name}={flag!r}")
        self.causal, self.gather = causal, gather
        self.qkv = nn.Linear(E, 3 * E, bias=bias)
        self.router = nn.Linear(E, H, bias=bias)
        self.out_proj = nn.Linear(E, E, bias=bias)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router scores ``(B, H, L)`` (differentiable) and the chosen tokens ``(B, H, k)`` in
        position order."""
        r = self.router(x).transpose(1, 2)
        return r, r.detach().topk(self.k, dim=-1).indices.sort(-1).values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..api import attention

        if x.ndim != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, L, embed_dim={self.embed_dim}), got {tuple(x.shape)}")
        B, L, E = x.shape
        if self.k > L:
            raise ValueError(f"k={self.k} is larger than the sequence length L={L}")
        H, Dh = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).reshape(B, L, 3, H, Dh).permute(2, 0, 3, 1, 4)
        r, idx = self.route(x)
        if self.gather:
            gi = idx[..., None].expand(-1, -1, -1, Dh)
            o = attention(q.gather(2, gi), k.gather(2, gi), v.gather(2, gi),
                          pattern=Causal() if self.causal else None)
            o = o * torch.sigmoid(r.gather(-1, idx))[..., None]
            y = torch.zeros_like(q).scatter(2, gi, o)
        else:
            pattern = ExpertChoice(self.k, r.detach())
            o = attention(q, k, v, pattern=pattern & Causal() if self.causal else pattern)
            y = o * torch.sigmoid(r)[..., None]  # unselected rows are 0
        return self.out_proj(y.transpose(1, 2).reshape(B, L, E))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, k={self.k}, causal={self.causal}, "
                f"gather={self.gather}")


__all__ = ["ExpertChoice", "MixtureOfSparseAttention", "TokenSubset"]
