"""The :class:`ScoreMod` protocol: what is added to, or done with, the logits.

A score mod receives the scaled logits ``score = scale * q_i . k_j`` (any shape) and a
:class:`ScoreContext` whose integer index tensors ``b``, ``h``, ``q_idx``, ``kv_idx``
broadcast against ``score`` (flat token indices, query head index), and returns the new
logits, of the same shape. Masking is applied after the score mod. Score mods that need
the query vector itself (Music Transformer's relative embeddings) set
``needs_query = True`` and read ``ctx.query``, whose shape is ``score.shape[:-1] + (D,)``.

Score mods are ``torch.nn.Module`` s, so learned tables are parameters that a model
registers and an optimiser updates; every backend lets gradients reach them. A plain
FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)`` callable is accepted wherever a
score mod is (:class:`CallableScoreMod`), and score mods are themselves callable with that
signature when they do not need the query.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..geometry import Geometry


@dataclass
class ScoreContext:
    """Indices (broadcastable to the score tensor) and, when needed, the query rows."""

    b: torch.Tensor
    h: torch.Tensor
    q_idx: torch.Tensor
    kv_idx: torch.Tensor
    geometry: Geometry
    query: torch.Tensor | None = None


class ScoreMod(nn.Module):
    """Base class of score modifications. Subclasses implement :meth:`modify`."""

    needs_query: bool = False

    def modify(self, score: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not define modify()")

    def validate(self, geometry: Geometry) -> None:
        """Raise ``ValueError`` if the score mod cannot apply to ``geometry``."""

    def differentiable_tensors(self) -> list[torch.Tensor]:
        """Tensors whose gradients backends must compute: the parameters, by default."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, score, b=None, h=None, q_idx=None, kv_idx=None, *, ctx=None, geometry=None):
        """``modify(score, ctx)``, or the FlexAttention signature ``(score, b, h, q_idx, kv_idx)``."""
        if ctx is None:
            if self.needs_query:
                raise TypeError(
                    f"{type(self).__name__} needs the query vectors and cannot be called with the "
                    "FlexAttention score_mod signature"
                )
            ctx = ScoreContext(b, h, q_idx, kv_idx, geometry)
        return self.modify(score, ctx)

    def as_score_mod(self, geometry: Geometry):
        """A FlexAttention-style ``score_mod(score, b, h, q_idx, kv_idx)`` with geometry bound."""
        if self.needs_query:
            raise TypeError(f"{type(self).__name__} needs the query vectors: not a plain score_mod")

        def score_mod(score, b, h, q_idx, kv_idx):
            return self.modify(score, ScoreContext(b, h, q_idx, kv_idx, geometry))

        return score_mod

    def __add__(self, other: object) -> "ScoreModChain":
        return ScoreModChain([self, as_score_mod(other, "other")])


class CallableScoreMod(ScoreMod):
    """A plain ``score_mod(score, b, h, q_idx, kv_idx) -> score`` callable."""

    def __init__(self, fn: Callable, name: str | None = None):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"score_mod must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "score_mod")

    def differentiable_tensors(self) -> list[torch.Tensor]:
        """Tensors that need gradients and that the callable reaches through its closure or
        globals (directly, or as parameters of a referenced ``nn.Module``), so that backends
        which run the score mod outside autograd can still return their gradients."""
        found: dict[int, torch.Tensor] = {}
        try:
            refs = inspect.getclosurevars(self.fn)
            values = list(refs.nonlocals.values()) + list(refs.globals.values())
        except (TypeError, ValueError):  # builtins, functools.partial, callable objects
            values = list(getattr(self.fn, "__dict__", {}).values())
            values += list(getattr(self.fn, "args", ())) + list(getattr(self.fn, "keywords", {}).values())
            if isinstance(self.fn, nn.Module):
                values.append(self.fn)
        for v in values:
            if isinstance(v, nn.Module):
                for p in v.parameters():
                    if p.requires_grad:
                        found[id(p)] = p
            elif isinstance(v, torch.Tensor) and v.requires_grad:
                found[id(v)] = v
        return list(found.values())

    def modify(self, score, ctx):
        out = self.fn(score, ctx.b, ctx.h, ctx.q_idx, ctx.kv_idx)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"score_mod {self.name!r} must return a tensor, got {type(out).__name__}")
        return out

    def extra_repr(self) -> str:
        return self.name


class ScoreModChain(ScoreMod):
    """Apply several score mods in order."""

    def __init__(self, mods: Sequence[ScoreMod]):
        super().__init__()
        flat: list[ScoreMod] = []
        for m in mods:
            flat.extend(m.mods if isinstance(m, ScoreModChain) else [m])
        self.mods = nn.ModuleList(flat)
        self.needs_query = any(m.needs_query for m in flat)

    def modify(self, score, ctx):
        for m in self.mods:
            score = m.modify(score, ctx)
        return score

    def validate(self, geometry):
        for m in self.mods:
            m.validate(geometry)

    def differentiable_tensors(self) -> list[torch.Tensor]:
        found: dict[int, torch.Tensor] = {}
        for m in self.mods:
            for t in m.differentiable_tensors():
                found[id(t)] = t
        return list(found.values())


def init_table_(table: torch.Tensor, std: float) -> None:
    """Fill a learned table from ``normal(0, std)``, or with zeros when ``std == 0``."""
    with torch.no_grad():
        if std > 0:
            table.normal_(0.0, std)
        else:
            table.zero_()


def as_score_mod(score_mod: object, name: str = "score_mod") -> ScoreMod | None:
    """Turn ``None``, a :class:`ScoreMod`, a callable or a sequence of them into a ScoreMod."""
    if score_mod is None or isinstance(score_mod, ScoreMod):
        return score_mod
    if isinstance(score_mod, (list, tuple)):
        return ScoreModChain([as_score_mod(m, name) for m in score_mod])
    if callable(score_mod):
        return CallableScoreMod(score_mod)
    raise TypeError(
        f"{name} must be an attnlab ScoreMod, a score_mod(score, b, h, q_idx, kv_idx) callable, "
        f"a list of them or None, got {type(score_mod).__name__}"
    )


