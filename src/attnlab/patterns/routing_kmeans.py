"""k-means routing: queries and keys routed to shared centroids attend within their cluster.

Roy, Saffar, Vaswani, Grangier, "Efficient Content-Based Sparse Attention with Routing
Transformers", TACL 2021. Queries and keys are normalised to the unit sphere and assigned to
the nearest of ``C`` centroids shared by queries and keys (one set per head); query ``i`` sees
key ``j`` iff both went to the same centroid. The paper's *balanced* variant instead lets every
centroid take its ``w`` nearest queries and its ``w`` nearest keys (so every cluster has
``w`` members on each side and a token may be in several clusters or in none). Centroids are
learned by online k-means (an exponential moving average of the vectors assigned to them),
kept outside the gradient (:class:`KMeansRouter`).

The routing is a discrete choice made without autograd: no gradient flows through *which*
keys a query sees; gradients flow through the exact softmax attention over them. The
selection resolves to a static :class:`ClusterMask` whose block layout comes from per-tile
cluster-presence bitmaps, ``O(tiles x clusters)``, never ``L x S``.

Causality: with fixed centroids (a tensor or a :class:`KMeansRouter`) and ``window=None`` a
token's cluster depends on that token alone, so ``KMeansRouting(...) & Causal()`` never lets a
later token change an earlier query's output. The balanced variant (a centroid's ``w``
nearest tokens are ranked over the whole sequence) and the per-call k-means of
``centroids=None`` (centroids fitted to all tokens) do look at later tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int
from ..geometry import Geometry
from .base import Pattern
from .content import ContentPattern, SelectionContext
from .layout import BlockLayout, Tiling

_BITS = 60  # cluster bits per int64 word (clear of the sign bit)


def _pack_bits(member: torch.Tensor) -> torch.Tensor:
    """``(..., C)`` bool -> ``(..., ceil(C / 60))`` int64 words, bit ``c % 60`` of word ``c // 60``."""
    C = member.shape[-1]
    W = -(-C // _BITS)
    pad = W * _BITS - C
    m = F.pad(member, (0, pad)).reshape(*member.shape[:-1], W, _BITS).to(torch.int64)
    weights = torch.ones(_BITS, dtype=torch.int64, device=member.device) << torch.arange(
        _BITS, dtype=torch.int64, device=member.device)
    return (m * weights).sum(-1)


def _tile_presence(member: torch.Tensor, token_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile, the clusters present in *some* real token and in *every* real token:
    two ``(Bb, Hb, num_tiles, C)`` bool tensors (``O(tokens x C)``)."""
    ok = (token_index >= 0)[None, None, :, :, None]
    m = member[:, :, token_index.clamp(min=0)]  # (Bb, Hb, nT, t, C)
    return (m & ok).any(3), (m | ~ok).all(3)


class ClusterMask(Pattern):
    """Query ``i`` sees key ``j`` iff they share a cluster.

    ``q_cluster (Bb, Hb, L)`` and ``k_cluster (Bb, Hb, S)`` integer cluster ids (``-1``: in no
    cluster; ``Bb`` in ``{1, B}``, ``Hb`` in ``{1, Hq}``) give the mask ``q_cluster[i] ==
    k_cluster[j] >= 0``. :meth:`from_membership` takes bool memberships ``(Bb, Hb, L, C)`` /
    ``(Bb, Hb, S, C)`` instead, for tokens in several clusters (balanced routing): visible iff
    some cluster holds both. Memberships are kept as bitmaps (60 clusters per int64 word), so the
    mask is one ``&`` per word.

    Block layout from per-tile cluster presence: a tile pair is touched iff some cluster has a
    query in the query tile and a key in the key tile, and full iff some cluster holds every
    query and every key of the two tiles: ``O(tiles x C)`` (a matmul of presence bitmaps).
    Exact for cluster ids (one cluster per token); ``full`` may under-approximate for
    memberships.
    """

    def __init__(self, q_cluster: torch.Tensor, k_cluster: torch.Tensor, num_clusters: int | None = None):
        for name, t in (("q_cluster", q_cluster), ("k_cluster", k_cluster)):
            if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64) or t.ndim != 3:
                raise TypeError(f"{name} must be an int32/int64 tensor of shape (B or 1, H or 1, tokens), got "
                                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        top = int(max(q_cluster.max(), k_cluster.max())) + 1 if q_cluster.numel() else 1
        C = max(1, top) if num_clusters is None else check_int("num_clusters", num_clusters, 1)
        if top > C:
            raise ValueError(f"cluster ids must be < num_clusters={C}, got max id {top - 1}")
        self._set(F.one_hot(q_cluster.long().clamp(min=-1) + 1, C + 1)[..., 1:].bool(),
                  F.one_hot(k_cluster.long().clamp(min=-1) + 1, C + 1)[..., 1:].bool(), exact=True)

    @classmethod
    def from_membership(cls, q_member: torch.Tensor, k_member: torch.Tensor) -> ClusterMask:
        """Tokens in any number of clusters: ``q_member (Bb, Hb, L, C)``, ``k_member (Bb, Hb, S, C)`` bool."""
        for name, t in (("q_member", q_member), ("k_member", k_member)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or t.ndim != 4:
                raise TypeError(f"{name} must be a bool tensor (B or 1, H or 1, tokens, C), got "
                                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if q_member.shape[-1] != k_member.shape[-1]:
            raise ValueError(f"q_member and k_member must have the same number of clusters, got "
                             f"{q_member.shape[-1]} and {k_member.shape[-1]}")
        self = cls.__new__(cls)
        self._set(q_member, k_member, exact=False)
        return self

    def _set(self, q_member, k_member, exact):
        self.q_member = q_member.detach()
        self.k_member = k_member.detach()
        self.num_clusters = q_member.shape[-1]
        self.exact_full = exact
        self._bits: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, device):
        if device not in self._bits:
            self._bits[device] = (_pack_bits(self.q_member.to(device)), _pack_bits(self.k_member.to(device)))
        return self._bits[device]

    def validate(self, geometry: Geometry) -> None:
        super().validate(geometry)
        for name, t, n in (("q", self.q_member, geometry.q_len), ("k", self.k_member, geometry.kv_len)):
            Bb, Hb, N, _ = t.shape
            if N != n or Bb not in (1, geometry.batch) or Hb not in (1, geometry.q_heads):
                raise ValueError(f"{name} clusters must have shape (1 or B={geometry.batch}, 1 or "
                                 f"Hq={geometry.q_heads}, {n}), got {tuple(t.shape[:3])}")

    def mask(self, b, h, q_idx, kv_idx, geometry):
        qb, kb = self._on(q_idx.device)
        bq = b if qb.shape[0] > 1 else 0
        hq = h if qb.shape[1] > 1 else 0
        bk = b if kb.shape[0] > 1 else 0
        hk = h if kb.shape[1] > 1 else 0
        shared = qb[bq, hq, q_idx] & kb[bk, hk, kv_idx]  # (..., W)
        return shared[..., 0] != 0 if shared.shape[-1] == 1 else (shared != 0).any(-1)

    def block_layout(self, tiling: Tiling) -> BlockLayout:
        dev = tiling.device
        q_any, q_all = _tile_presence(self.q_member.to(dev), tiling.q_token_index)
        k_any, k_all = _tile_presence(self.k_member.to(dev), tiling.kv_token_index)
        f = torch.float32
        any_ = (q_any.to(f) @ k_any.to(f).transpose(-1, -2)) > 0.5
        full = (q_all.to(f) @ k_all.to(f).transpose(-1, -2)) > 0.5
        return BlockLayout(any_, full)

    def may_have_empty_rows(self, geometry):
        return True

    def __repr__(self):
        return (f"ClusterMask(num_clusters={self.num_clusters}, q={tuple(self.q_member.shape[:3])}, "
                f"k={tuple(self.k_member.shape[:3])})")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``(B, H, N)`` index of the centroid with the largest cosine similarity to each vector of
    ``x (B, H, N, D)`` (the nearest on the unit sphere); ``centroids`` ``(H or 1, C, D)`` or
    ``(B, H, C, D)``; ties go to the lower index."""
    return (_unit(x) @ _unit(centroids).transpose(-1, -2)).argmax(-1)


def _as_centroids(c: torch.Tensor) -> torch.Tensor:
    return c[None] if c.ndim == 2 else c


def _farthest_point_init(x: torch.Tensor, C: int) -> torch.Tensor:
    """``x (H, N, D)`` unit vectors -> ``(H, C, D)``: the first vector, then repeatedly the one
    least similar to every centroid chosen so far (deterministic)."""
    H = x.shape[0]
    chosen = [x[:, 0]]
    best = x @ x[:, 0, :, None]  # (H, N, 1) similarity to the nearest chosen centroid
    for _ in range(1, C):
        nxt = best[..., 0].argmin(-1)  # (H,)
        c = x[torch.arange(H, device=x.device), nxt]
        chosen.append(c)
        best = torch.maximum(best, x @ c[:, :, None])
    return torch.stack(chosen, 1)


class KMeansRouting(ContentPattern):
    """Routing Transformer attention: query ``i`` sees key ``j`` iff they are routed to the same
    centroid (see the module docstring).

    Roy et al., "Efficient Content-Based Sparse Attention with Routing Transformers", 2021.

    Selection (without autograd): ``q_i`` and ``k_j`` are normalised to unit length; with
    ``window=None`` each goes to the centroid of largest cosine similarity (per query head ``h``;
    keys through their kv head ``h // (Hq / Hkv)`` and head ``h``'s centroids), and the result
    is a :class:`ClusterMask` with ``q_cluster[i] == k_cluster[j]``. With ``window=w`` (the
    paper's balanced routing) every centroid takes the ``w`` queries and the ``w`` keys most
    similar to it (ties to the lower index), and ``i`` sees ``j`` iff some centroid took both.

    Args:
        num_clusters: ``C >= 1``; ``C = 1`` (unbalanced) is dense attention.
        centroids: ``(C, D)`` or ``(H, C, D)`` (``H`` the number of query heads) tensor, a
            :class:`KMeansRouter` (its current centroids are read at every call), or ``None``:
            fit k-means to each call's own normalised queries and keys, per batch element and
            head (``iters`` Lloyd steps from ``C`` evenly spaced tokens).
        window: ``None`` or the balanced cluster size ``w`` (``1 <= w <= min(L, S)``).
        iters: Lloyd steps of the per-call k-means (``centroids=None`` only).

    Inside an intersection no candidate restriction is needed (clusters are not a budget): the
    static parts simply remove pairs. The selection ignores the score mod.
    """

    def __init__(self, num_clusters: int, *, centroids=None, window: int | None = None, iters: int = 3):
        self.num_clusters = check_int("num_clusters", num_clusters, 1)
        if centroids is not None and not isinstance(centroids, (torch.Tensor, KMeansRouter)):
            raise TypeError(f"centroids must be None, a (C, D) / (H, C, D) tensor or a KMeansRouter, got "
                            f"{type(centroids).__name__}")
        if isinstance(centroids, torch.Tensor):
            if centroids.ndim not in (2, 3) or not centroids.is_floating_point():
                raise ValueError(f"centroids must be a float tensor (C, D) or (H, C, D), got "
                                 f"{centroids.dtype} {tuple(centroids.shape)}")
            centroids = centroids.detach()
        c = centroids.centroids if isinstance(centroids, KMeansRouter) else centroids
        if c is not None and c.shape[-2] != self.num_clusters:
            raise ValueError(f"centroids hold {c.shape[-2]} clusters but num_clusters={self.num_clusters}")
        self.centroids = centroids
        self.window = None if window is None else check_int("window", window, 1)
        self.iters = check_int("iters", iters, 0)

    def _centroid_tensor(self) -> torch.Tensor | None:
        c = self.centroids
        return c.centroids if isinstance(c, KMeansRouter) else c

    def validate(self, geometry: Geometry) -> None:
        super().validate(geometry)
        c = self._centroid_tensor()
        if c is not None:
            if c.shape[-1] != geometry.head_dim:
                raise ValueError(f"centroids have dimension {c.shape[-1]} but the head dimension is "
                                 f"D={geometry.head_dim}")
            if c.ndim == 3 and c.shape[0] not in (1, geometry.q_heads):
                raise ValueError(f"centroids (H, C, D) must have H = 1 or Hq={geometry.q_heads}, got "
                                 f"centroids.shape={tuple(c.shape)}")
        if self.window is not None and self.window > min(geometry.q_len, geometry.kv_len):
            raise ValueError(f"window={self.window} is larger than min(L, S) = "
                             f"{min(geometry.q_len, geometry.kv_len)}: a balanced cluster takes window "
                             f"queries and window keys")

    def fit_centroids(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Per-call k-means on ``cat(q, k)`` normalised, per (batch, head): ``(B, H, C, D)``."""
        x = _unit(torch.cat([q, k], 2))
        N = x.shape[2]
        start = torch.linspace(0, N - 1, self.num_clusters, device=x.device).round().long()
        cent = x[:, :, start]
        for _ in range(self.iters):
            ids = nearest_centroid(x, cent)
            sums = torch.zeros_like(cent).scatter_add_(2, ids[..., None].expand_as(x), x)
            counts = torch.zeros(cent.shape[:3], dtype=x.dtype, device=x.device).scatter_add_(
                2, ids, torch.ones_like(ids, dtype=x.dtype))
            cent = torch.where(counts[..., None] > 0, _unit(sums), cent)
        return cent

    def select(self, ctx: SelectionContext) -> ClusterMask:
        compute = torch.promote_types(ctx.q.dtype, torch.float32)
        q = ctx.q.to(compute)
        k = ctx.k_per_query_head.to(compute)
        c = self._centroid_tensor()
        cent = self.fit_centroids(q, k) if c is None else _as_centroids(c.to(q.device, compute))
        if self.window is None:
            return ClusterMask(nearest_centroid(q, cent), nearest_centroid(k, cent), self.num_clusters)
        qs = _unit(q) @ _unit(cent).transpose(-1, -2)  # (B, H, L, C)
        ks = _unit(k) @ _unit(cent).transpose(-1, -2)
        return ClusterMask.from_membership(_top_members(qs, self.window), _top_members(ks, self.window))

    def __repr__(self):
        src = ("per-call k-means" if self.centroids is None else
               "KMeansRouter" if isinstance(self.centroids, KMeansRouter) else
               f"centroids{tuple(self.centroids.shape)}")
        win = "" if self.window is None else f", window={self.window}"
        return f"KMeansRouting(num_clusters={self.num_clusters}, {src}{win})"


def _top_members(sim: torch.Tensor, w: int) -> torch.Tensor:
    """``sim (B, H, N, C)`` -> ``(B, H, N, C)`` bool: for every centroid its ``w`` most similar
    tokens (a stable sort, so ties go to the lower token index)."""
    order = sim.argsort(dim=2, descending=True, stable=True)[:, :, :w]
    return torch.zeros_like(sim, dtype=torch.bool).scatter_(2, order, True)


class KMeansRouter(nn.Module):
    """Online k-means centroids for :class:`KMeansRouting`, one set of ``num_clusters`` per head.

    ``centroids`` ``(num_heads, num_clusters, head_dim)`` is a buffer (saved with the model, moved
    with ``.to()``, outside the gradient). :meth:`update` (a no-op in eval mode) assigns the unit
    normalised queries and keys to their nearest centroid and moves each centroid that received
    vectors by an exponential moving average towards their mean::

        mu_c <- decay * mu_c + (1 - decay) * mean_{x assigned to c} x / |x|

    (the Routing Transformer's update, with the sum over assigned vectors replaced by their
    mean; assignment uses ``mu_c / |mu_c|``). The first update in training mode initialises the
    centroids from the data (farthest-point seeding on that batch's vectors, per head).

    Usage::

        router = KMeansRouter(num_heads, head_dim, num_clusters)
        out = attnlab.attention(q, k, v, pattern=router.pattern() & Causal())
        router.update(q, k)          # training: after (or before) the attention
    """

    def __init__(self, num_heads: int, head_dim: int, num_clusters: int, *, decay: float = 0.999,
                 seed: int = 0):
        super().__init__()
        H = check_int("num_heads", num_heads, 1)
        D = check_int("head_dim", head_dim, 1)
        C = check_int("num_clusters", num_clusters, 1)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (0 <= decay < 1):
            raise ValueError(f"decay must be a float in [0, 1), got decay={decay!r}")
        self.decay = float(decay)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("centroids", _unit(torch.randn(H, C, D, generator=g)))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[1]

    def pattern(self, window: int | None = None) -> KMeansRouting:
        """A :class:`KMeansRouting` that reads this router's centroids at every call."""
        return KMeansRouting(self.num_clusters, centroids=self, window=window)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest-centroid ids ``(B, H, N)`` of ``x (B, H, N, D)``."""
        return nearest_centroid(x.detach().to(self.centroids.dtype), self.centroids)

    @torch.no_grad()
    def update(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """One online k-means step on ``q (B, H, L, D)`` and ``k (B, Hkv, S, D)`` (training mode)."""
        if not self.training:
            return
        H, C, D = self.centroids.shape
        if q.shape[1] != H or q.shape[-1] != D or k.shape[-1] != D or H % k.shape[1]:
            raise ValueError(f"update expects q (B, {H}, L, {D}) and k (B, Hkv, S, {D}) with {H} % Hkv == 0, "
                             f"got q {tuple(q.shape)} and k {tuple(k.shape)}")
        k = k.repeat_interleave(H // k.shape[1], dim=1)
        x = _unit(torch.cat([q.flatten(2, -2), k.flatten(2, -2)], 2).to(self.centroids.dtype))  # (B, H, N, D)
        x = x.transpose(0, 1).reshape(H, -1, D)  # (H, B*N, D)
        if not bool(self.initialized):
            self.centroids.copy_(_farthest_point_init(x, C))
            self.initialized.fill_(True)
        ids = nearest_centroid(x, self.centroids)  # (H, N)
        sums = torch.zeros_like(self.centroids).scatter_add_(1, ids[..., None].expand_as(x), x)
        counts = torch.zeros(H, C, dtype=x.dtype, device=x.device).scatter_add_(1, ids, torch.ones_like(x[..., 0]))
        mean = sums / counts.clamp(min=1)[..., None]
        moved = self.decay * self.centroids + (1 - self.decay) * mean
        self.centroids.copy_(torch.where(counts[..., None] > 0, moved, self.centroids))

    def forward(self, q: torch.Tensor, k: torch.Tensor, window: int | None = None) -> KMeansRouting:
        """Update (in training mode) and return the routing pattern."""
        self.update(q, k)
        return self.pattern(window)

    def extra_repr(self) -> str:
        H, C, D = self.centroids.shape
        return f"num_heads={H}, head_dim={D}, num_clusters={C}, decay={self.decay}"


__all__ = ["ClusterMask", "KMeansRouter", "KMeansRouting", "nearest_centroid"]
