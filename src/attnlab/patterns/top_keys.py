"""Per-query key selection: the top-k logits of each query (explicit sparse attention) and a
calibrated per-head threshold (Top-Theta).

Both stream over key chunks, keeping each query's best candidates (``(B, Hq, L, k)`` values and
indices), so the ``L x S`` logits exist one ``chunk x chunk`` block at a time and never whole.
The logits they rank are those attention will use: ``scale * q . k`` plus the call's score mod,
restricted to the visible pairs of an enclosing intersection. They resolve to a
:class:`~attnlab.patterns.KeySet`; attention over it is exact. No gradient flows through the
selection.
"""

from __future__ import annotations

import torch

from .._checks import check_int
from ..geometry import Geometry
from ..scores.base import ScoreContext
from .content import ContentPattern, SelectionContext
from .key_set import KeySet

CHUNK = 512


def _stream_top_k(ctx: SelectionContext, k: int, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)``, ``(B, Hq, L, k)``: each query's ``k`` largest logits (``-inf`` and
    index ``-1`` where fewer than ``k`` keys are visible), by one pass over key chunks."""
    g = ctx.geometry
    B, H, L, S = g.batch, g.q_heads, g.q_len, g.kv_len
    compute = torch.promote_types(ctx.q.dtype, torch.float32)
    q, keys = ctx.q.to(compute), ctx.k_per_query_head.to(compute)
    dev = q.device
    b = torch.arange(B, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, -1, 1, 1)
    vals_out, idx_out = [], []
    for q0 in range(0, L, chunk):
        q_c = q[:, :, q0:q0 + chunk]
        qi = torch.arange(q0, q0 + q_c.shape[2], device=dev).view(1, 1, -1, 1)
        vals = q_c.new_full((B, H, q_c.shape[2], k), float("-inf"))
        idx = torch.full(vals.shape, -1, dtype=torch.long, device=dev)
        for k0 in range(0, S, chunk):
            k_c = keys[:, :, k0:k0 + chunk]
            kj = torch.arange(k0, k0 + k_c.shape[2], device=dev).view(1, 1, 1, -1)
            s = ctx.scale * (q_c @ k_c.transpose(-1, -2))
            if ctx.score_mod is not None:
                s = ctx.score_mod.modify(s, ScoreContext(b, h, qi, kj, g, q_c))
            if ctx.within is not None:
                s = s.masked_fill(~ctx.within.mask(b, h, qi, kj, g), float("-inf"))
            both_v = torch.cat([vals, s], dim=-1)
            both_i = torch.cat([idx, kj.expand(s.shape)], dim=-1)
            vals, pos = both_v.topk(k, dim=-1)
            idx = both_i.gather(-1, pos)
        vals_out.append(vals)
        idx_out.append(torch.where(torch.isinf(vals) & (vals < 0), torch.full_like(idx, -1), idx))
    return torch.cat(vals_out, 2), torch.cat(idx_out, 2)


class TopKPerQuery(ContentPattern):
    """Each query attends to the ``k`` keys with its largest logits (ties broken arbitrarily;
    fewer where fewer keys are visible).

    Zhao et al., "Explicit Sparse Transformer: Concentrated Attention Through Explicit
    Selection", 2019; the top-k end of Top-Theta (Berestizshevsky et al., "Top-Theta Attention:
    Sparsifying Transformers by Compensated Thresholding", 2025). ``k = S`` is dense attention
    (over the enclosing pattern). Selection costs a full pass of ``q k^T`` (streamed); the
    attention after it touches only the tiles holding selected keys.
    """

    def __init__(self, k: int):
        self.k = check_int("k", k, 1)

    def validate(self, geometry: Geometry) -> None:
        super().validate(geometry)
        if self.k > geometry.kv_len:
            raise ValueError(f"k={self.k} is larger than the number of keys S={geometry.kv_len}")

    def select(self, ctx: SelectionContext) -> KeySet:
        return KeySet(_stream_top_k(ctx, self.k)[1])

    def __repr__(self):
        return f"TopKPerQuery(k={self.k})"


def _check_thresholds(thresholds) -> torch.Tensor:
    if isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        thresholds = torch.tensor([float(thresholds)])
    if not isinstance(thresholds, torch.Tensor) or not thresholds.is_floating_point() or thresholds.ndim != 1:
        raise TypeError(f"thresholds must be a float or a 1-D float tensor (one per query head), got "
                        f"{thresholds!r}")
    return thresholds.detach()


class TopTheta(ContentPattern):
    """Each query of head ``h`` attends to the keys whose logit is at least ``thresholds[h]``
    (at most ``max_keys`` of them: the largest), thresholds calibrated per head offline with
    :func:`calibrate_thresholds` so that a row keeps about a chosen number of keys.

    Berestizshevsky et al., "Top-Theta Attention: Sparsifying Transformers by Compensated
    Thresholding", 2025. The paper's compensation of the dropped mass (denominator and V-mean
    correction) is not applied: attention over the kept set is exact softmax attention over it.
    A query with no logit above its threshold sees no key (output 0).

    Args:
        thresholds: a float (every head) or a ``(Hq,)`` tensor.
        max_keys: the most keys a query keeps (bounds the selection's memory ``B Hq L max_keys``).
    """

    def __init__(self, thresholds, max_keys: int):
        self.thresholds = _check_thresholds(thresholds)
        self.max_keys = check_int("max_keys", max_keys, 1)

    def validate(self, geometry: Geometry) -> None:
        super().validate(geometry)
        if self.thresholds.numel() not in (1, geometry.q_heads):
            raise ValueError(f"thresholds must have 1 or Hq={geometry.q_heads} entries, got "
                             f"{self.thresholds.numel()}")

    def select(self, ctx: SelectionContext) -> KeySet:
        vals, idx = _stream_top_k(ctx, min(self.max_keys, ctx.geometry.kv_len))
        theta = self.thresholds.to(vals).view(1, -1, 1, 1)
        return KeySet(torch.where(vals >= theta, idx, torch.full_like(idx, -1)))

    def __repr__(self):
        return f"TopTheta(thresholds={self.thresholds.tolist()}, max_keys={self.max_keys})"


def calibrate_thresholds(q: torch.Tensor, k: torch.Tensor, keep: int, *, scale: float | None = None,
                         within=None, score_mod=None) -> torch.Tensor:
    """Per query head, the median over calibration rows (batch and queries) of each row's
    ``keep``-th largest logit: with these thresholds a typical row keeps about ``keep`` keys.
    ``q (B, Hq, *L, D)``, ``k (B, Hkv, *S, D)`` from the model's own activations; ``within`` an
    optional static pattern (e.g. ``Causal()``). Returns a ``(Hq,)`` float tensor."""
    from ..geometry import check_qkv, check_scale
    from ..patterns.base import as_pattern
    from ..scores.base import as_score_mod

    g = check_qkv(q, k, k)
    check_int("keep", keep, 1)
    if keep > g.kv_len:
        raise ValueError(f"keep={keep} is larger than the number of keys S={g.kv_len}")
    within = None if within is None else as_pattern(within, "within")
    with torch.no_grad():
        ctx = SelectionContext(q.detach().reshape(g.batch, g.q_heads, g.q_len, -1),
                               k.detach().reshape(g.batch, g.kv_heads, g.kv_len, -1), g,
                               check_scale(scale, g.head_dim), as_score_mod(score_mod), within)
        kth = _stream_top_k(ctx, keep)[0][..., -1]  # (B, Hq, L)
        kth = kth.transpose(0, 1).reshape(g.q_heads, -1)
        finite = torch.isfinite(kth)
        out = torch.stack([row[ok].median() if ok.any() else row.new_tensor(float("inf"))
                           for row, ok in zip(kth, finite)])
    return out.float()
