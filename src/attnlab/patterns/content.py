"""Content-based patterns: the visible set is chosen from the queries and keys themselves.

A :class:`ContentPattern` has no fixed mask. At each call :func:`attnlab.attention` hands it
the inputs (:class:`SelectionContext`) and it returns a *static* pattern for them (a
:class:`~attnlab.patterns.BlockSparse` layout, a :class:`~attnlab.patterns.KeySet` of
per-query keys, ...), which then runs on the ordinary backends: the tiled backend computes
exact softmax attention over the selected set, forward and backward.

Selections are computed on small summaries (pooled block scores of size
``(L / block) x (S / block)``, or per-query top-k kept while streaming over key blocks), never
on a materialised ``L x S`` logit matrix. They run under ``torch.no_grad()``: a selection is a
discrete choice, so gradients do not flow through *which* keys are chosen; they flow through
the attention over the chosen keys (and, in the modules that use them, through learned gates
that weight the outputs).

Composition: content patterns combine with static ones and with each other through ``|`` and
``&``. Inside an intersection the static parts restrict the candidates a selection may choose
from (``TopKBlocks(8) & Causal()`` picks its 8 blocks among the causally visible ones), so the
budget is never spent on pairs the intersection would drop.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..geometry import Geometry
from .base import Intersection, Pattern, Union
from .layout import Tiling


@dataclass(frozen=True)
class SelectionContext:
    """What a content pattern may look at: the inputs of one attention call.

    ``q`` ``(B, Hq, L, D)`` and ``k`` ``(B, Hkv, S, D)`` with flat token axes, detached;
    ``within`` is the static pattern the selection's result will be intersected with (``None``:
    no restriction); ``score_mod`` the call's score mod (or ``None``)."""

    q: torch.Tensor
    k: torch.Tensor
    geometry: Geometry
    scale: float
    score_mod: object = None
    within: Optional[Pattern] = None

    @property
    def k_per_query_head(self) -> torch.Tensor:
        """``k`` with its heads repeated to the ``Hq`` query heads (GQA)."""
        G = self.geometry.group_size
        return self.k if G == 1 else self.k.repeat_interleave(G, dim=1)

    def candidate_blocks(self, block_q: int, block_kv: int) -> Optional[torch.Tensor]:
        """``(Bb, Hb, nQb, nKb)`` bool: the blocks in which ``within`` has a visible pair
        (``None`` when there is no restriction)."""
        if self.within is None:
            return None
        g = self.geometry
        flat = replace(g, q_shape=(g.q_len,), kv_shape=(g.kv_len,))
        return self.within.block_layout(Tiling(flat, (block_q,), (block_kv,))).any


class ContentPattern(Pattern):
    """Base class of patterns whose visible set depends on ``q`` and ``k``.

    Subclasses implement :meth:`select`, returning a static pattern for one call. Their
    :meth:`mask` and :meth:`block_layout` cannot be evaluated without the inputs."""

    def select(self, ctx: SelectionContext) -> Pattern:
        raise NotImplementedError(f"{type(self).__name__} does not define select()")

    def _needs_inputs(self, what: str):
        return TypeError(
            f"{self!r} chooses its keys from q and k, so its {what} exists only per call; use it "
            "through attnlab.attention / attention_weights, or resolve it first with "
            "attnlab.patterns.resolve_pattern(pattern, q, k)"
        )

    def mask(self, b, h, q_idx, kv_idx, geometry):
        raise self._needs_inputs("mask")

    def block_layout(self, tiling):
        raise self._needs_inputs("block layout")

    def cache_key(self):
        return None


def has_content(pattern: Pattern) -> bool:
    """True if ``pattern`` is or contains a :class:`ContentPattern`."""
    if isinstance(pattern, ContentPattern):
        return True
    return isinstance(pattern, (Union, Intersection)) and any(has_content(p) for p in pattern.parts)


def _resolve(pattern: Pattern, ctx: SelectionContext) -> Pattern:
    if isinstance(pattern, ContentPattern):
        return pattern.select(ctx)
    if isinstance(pattern, Intersection) and has_content(pattern):
        static = [p for p in pattern.parts if not has_content(p)]
        inner = static + ([ctx.within] if ctx.within is not None else [])
        within = inner[0] if len(inner) == 1 else (Intersection(*inner) if inner else None)
        sub = replace(ctx, within=within)
        return Intersection(*[p if not has_content(p) else _resolve(p, sub) for p in pattern.parts])
    if isinstance(pattern, Union) and has_content(pattern):
        return Union(*[_resolve(p, ctx) for p in pattern.parts])
    return pattern


def resolve_pattern(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, geometry: Geometry | None = None,
                    scale: float | None = None, score_mod: object = None) -> Pattern:
    """``pattern`` with every content-based part replaced by the static pattern it selects
    for these ``q`` (``(B, Hq, *L, D)``) and ``k`` (``(B, Hkv, *S, D)``); static patterns are
    returned unchanged. Runs without autograd."""
    if not has_content(pattern):
        return pattern
    if geometry is None:
        from ..geometry import check_qkv

        geometry = check_qkv(q, k, k)
    if scale is None:
        scale = geometry.head_dim ** -0.5
    g = geometry
    with torch.no_grad():
        ctx = SelectionContext(q.detach().reshape(g.batch, g.q_heads, g.q_len, -1),
                               k.detach().reshape(g.batch, g.kv_heads, g.kv_len, -1), g, scale, score_mod)
        return _resolve(pattern, ctx)


def pooled_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of ``x (B, H, N, D)`` over consecutive blocks of ``block`` tokens along ``N`` (the
    last block over its real tokens only): ``(B, H, ceil(N / block), D)``."""
    B, H, N, D = x.shape
    nb = -(-N // block)
    pad = nb * block - N
    xs = torch.nn.functional.pad(x, (0, 0, 0, pad)).reshape(B, H, nb, block, D).sum(3)
    counts = torch.full((nb,), float(block), dtype=x.dtype, device=x.device)
    counts[-1] = block - pad
    return xs / counts[:, None]
