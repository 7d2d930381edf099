"""Capture the per-layer, per-head attention probabilities of any code that calls
:func:`attnlab.attention`: attnlab modules, or a Hugging Face model routed through attnlab
(:func:`attnlab.inspect.use_attnlab`).

    from attnlab.inspect import capture
    with capture() as rec:
        model(x)
    rec.records          # one AttentionRecord per attention call, in call order
    rec.probs(0)         # (B, Hq, L, S) float32 of layer 0
    rec.stack()          # (layers, B, Hq, L, S)

Each record holds the probabilities of the call's own problem (its ``q``, ``k``, resolved
pattern, score mod and scale), computed by the same reference computation as
:func:`attnlab.attention_weights`, so a capture equals ``attention_weights`` on the same
arguments exactly (before the cast to ``dtype``). Inside :func:`attnlab.inspect.intervene`
the records hold the *edited* probabilities (what the call multiplied ``v`` with), with
``edited=True``.

Long inputs: with ``summary="auto"`` a call whose dense map has more than
``max_dense_elements`` entries (``B * Hq * L * S``) is recorded as a summary instead
(:mod:`attnlab.inspect._summary`: per-query entropy, mean attention distance, maximum and
number of visible keys, per-key received mass), computed over query/key tiles without an
``L x S`` tensor; ``summary=True`` always summarises, ``summary=False`` never does (the
reference computation's size guard, ``1 << 27`` elements or ``max_dense_elements`` if larger,
still applies). The recording's cost is that of one more attention computation per call,
outside autograd unless ``detach=False``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..backends.base import Problem
from ..backends.reference import DEFAULT_MAX_ELEMENTS, reference_attention
from ._hook import Session, activate, layer_scope
from ._summary import blockwise_summary, choose_tiles, dense_summary, summary_elements

__all__ = ["AttentionRecord", "Recording", "capture", "layer_scope"]


@dataclass
class AttentionRecord:
    """One :func:`attnlab.attention` call seen by :func:`capture`.

    Attributes:
        name: the layer's name (the module path on the Hugging Face route, from
            :func:`layer_scope`), else ``"call<i>"``.
        layer: the layer index (the module's ``layer_idx`` on the Hugging Face route, from
            :func:`layer_scope`), else the call index within the capture.
        call: the index of the call within the capture (call order).
        probs: ``(B, Hq, L, S)`` probabilities over flat token indices (``L``, ``S`` the
            products of the query and key token shapes), or None when summarised. Rows sum to 1
            over the visible keys, 0 for a query that sees no key (before any edit).
        summary: None, or the dict of :mod:`attnlab.inspect._summary` (``entropy``,
            ``distance``, ``max_prob``, ``visible_keys`` ``(B, Hq, L)``; ``key_mass``
            ``(B, Hq, S)``).
        q_shape, kv_shape: the query and key token shapes (``(L,)`` for sequences).
        kv_heads: the number of key/value heads (``Hq // kv_heads`` query heads share one).
        pattern: ``repr`` of the resolved pattern the call ran with.
        edited: True when an intervention edited the probabilities.
        q, k, v: the call's inputs ``(B, H, *L, D)`` when ``capture(qkv=True)``, else None.
    """

    name: str
    layer: int
    call: int
    probs: torch.Tensor | None
    summary: dict[str, torch.Tensor] | None
    q_shape: tuple[int, ...]
    kv_shape: tuple[int, ...]
    kv_heads: int
    pattern: str
    edited: bool = False
    q: torch.Tensor | None = field(default=None, repr=False)
    k: torch.Tensor | None = field(default=None, repr=False)
    v: torch.Tensor | None = field(default=None, repr=False)

    @property
    def q_len(self) -> int:
        return _prod(self.q_shape)

    @property
    def kv_len(self) -> int:
        return _prod(self.kv_shape)

    @property
    def causal_offset(self) -> int:
        """``S - L``: query ``i`` is aligned with key ``i + S - L`` (bottom-right)."""
        return self.kv_len - self.q_len

    def __repr__(self) -> str:
        what = (f"probs={tuple(self.probs.shape)}" if self.probs is not None
                else f"summary={sorted(self.summary or {})}")
        return (f"AttentionRecord(name={self.name!r}, layer={self.layer}, call={self.call}, {what}, "
                f"pattern={self.pattern}, edited={self.edited})")


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class Recording:
    """The records of one :func:`capture` block (filled while the block runs)."""

    def __init__(self, *, summary: str | bool, max_dense_elements: int, detach: bool,
                 device: torch.device | None, dtype: torch.dtype | None, qkv: bool,
                 tile: tuple[int, int] | None) -> None:
        self.records: list[AttentionRecord] = []
        self.summary, self.max_dense_elements, self.detach = summary, max_dense_elements, detach
        self.device, self.dtype, self.qkv, self.tile = device, dtype, qkv, tile
        self.session = Session()

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[AttentionRecord]:
        return iter(self.records)

    def __getitem__(self, i: int) -> AttentionRecord:
        return self.records[i]

    def layers(self) -> list[int]:
        """The distinct layer indices recorded, sorted."""
        return sorted({r.layer for r in self.records})

    def for_layer(self, layer: int) -> list[AttentionRecord]:
        """Every record of ``layer``, in call order (a layer called several times, e.g. per
        generated token, has several)."""
        return [r for r in self.records if r.layer == layer]

    def probs(self, layer: int) -> torch.Tensor:
        """``(B, Hq, L, S)`` probabilities of ``layer``; ``ValueError`` when the layer has no
        record, several (use :meth:`for_layer`), or was summarised."""
        found = self.for_layer(layer)
        if len(found) != 1:
            raise ValueError(
                f"layer={layer!r} has {len(found)} records, expected exactly 1 (recorded layers: "
                f"{self.layers()}); use rec.for_layer({layer!r}) for a layer called several times")
        if found[0].probs is None:
            raise ValueError(
                f"layer={layer!r} was recorded as a summary (its dense map exceeds "
                f"max_dense_elements={self.max_dense_elements}); read rec.for_layer({layer!r})[0]"
                ".summary, or capture(summary=False)")
        return found[0].probs

    def stack(self) -> torch.Tensor:
        """``(layers, B, Hq, L, S)``: the maps of every recorded layer, in layer order;
        ``ValueError`` when a layer has several records or a summary, or shapes differ."""
        maps = [self.probs(layer) for layer in self.layers()]
        if not maps:
            raise ValueError("nothing was recorded: no attnlab.attention call ran inside capture()")
        shapes = {tuple(m.shape) for m in maps}
        if len(shapes) > 1:
            raise ValueError(f"the recorded maps have different shapes {sorted(shapes)}; read "
                             "rec.probs(layer) one layer at a time")
        return torch.stack(maps)

    # -- called by the hook ---------------------------------------------------------------

    def _wants_summary(self, problem: Problem) -> bool:
        if self.summary == "auto":
            return summary_elements(problem.geometry) > self.max_dense_elements
        return bool(self.summary)

    def _store(self, x: torch.Tensor) -> torch.Tensor:
        if self.detach:
            x = x.detach()
        if self.dtype is not None and x.is_floating_point():
            x = x.to(self.dtype)
        return x if self.device is None else x.to(self.device)

    def _append(self, problem: Problem, layer: int, name: str, call: int, probs, summary, edited: bool) -> None:
        g = problem.geometry
        qkv = [self._store(t) for t in (problem.q, problem.k, problem.v)] if self.qkv else [None] * 3
        self.records.append(AttentionRecord(
            name, layer, call, None if probs is None else self._store(probs),
            None if summary is None else {k: self._store(v) for k, v in summary.items()},
            tuple(g.q_shape), tuple(g.kv_shape), g.kv_heads, repr(problem.pattern), edited, *qkv))

    def record_call(self, problem: Problem, layer: int, name: str, call: int) -> None:
        """Record an unedited call (its probabilities recomputed by the reference path)."""
        if self._wants_summary(problem):
            q_tile, kv_tile = self.tile or choose_tiles(problem.geometry, self.max_dense_elements)
            self._append(problem, layer, name, call, None, blockwise_summary(problem, q_tile, kv_tile), False)
            return
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach):
            p = reference_attention(
                problem.q, problem.k, problem.v, pattern=problem.pattern, score_mod=problem.score_mod,
                scale=problem.scale, max_elements=max(DEFAULT_MAX_ELEMENTS, self.max_dense_elements),
                return_weights=True)
        self._append(problem, layer, name, call, p, None, False)

    def record_probs(self, problem: Problem, probs: torch.Tensor, visible: torch.Tensor, layer: int, name: str,
                     call: int, *, edited: bool) -> None:
        """Record the (edited) dense probabilities a call used."""
        if self._wants_summary(problem):
            with torch.no_grad():
                summary = dense_summary(probs.detach(), visible, problem.geometry)
            self._append(problem, layer, name, call, None, summary, edited)
        else:
            self._append(problem, layer, name, call, probs, None, edited)


def _check_options(summary, max_dense_elements, detach, device, dtype, qkv, tile):
    if not isinstance(summary, bool) and not (isinstance(summary, str) and summary == "auto"):
        raise ValueError(f"summary={summary!r}, expected 'auto', True or False")
    if isinstance(max_dense_elements, bool) or not isinstance(max_dense_elements, int) or max_dense_elements < 1:
        raise ValueError(f"max_dense_elements={max_dense_elements!r}, expected an int >= 1")
    for name, value in (("detach", detach), ("qkv", qkv)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}={value!r}, expected a bool")
    if dtype is not None and dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype={dtype!r}, expected a floating torch dtype or None (keep the compute dtype)")
    if tile is not None:
        ok = (isinstance(tile, tuple) and len(tile) == 2
              and all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in tile))
        if not ok:
            raise ValueError(f"tile={tile!r}, expected None or a (q_tile, kv_tile) tuple of ints >= 1")
    try:
        return None if device is None else torch.device(device)
    except (TypeError, RuntimeError):
        raise ValueError(f"device={device!r}, expected a torch device (e.g. 'cpu') or None") from None


@contextlib.contextmanager
def capture(*, summary: str | bool = "auto", max_dense_elements: int = 1 << 24, detach: bool = True,
            device: str | torch.device | None = "cpu", dtype: torch.dtype | None = torch.float32,
            qkv: bool = False, tile: tuple[int, int] | None = None) -> Iterator[Recording]:
    """Record every :func:`attnlab.attention` call inside the block (module docstring).

    Args:
        summary: ``"auto"`` (summarise calls whose ``B * Hq * L * S`` exceeds
            ``max_dense_elements``), True (always summarise) or False (always dense).
        max_dense_elements: the threshold of ``"auto"``, and the tile budget of summaries.
        detach: record outside autograd (True); False keeps the records in the graph, so a
            loss on them back-propagates to ``q`` and ``k`` (dense records only).
        device: where records are stored (``"cpu"``; None keeps the inputs' device).
        dtype: the dtype of stored tensors (float32; None keeps the compute dtype, float64
            for float64 inputs).
        qkv: also store each call's ``q``, ``k``, ``v`` in its record.
        tile: ``(q_tile, kv_tile)`` of the blockwise summary (default: from
            ``max_dense_elements``).

    Yields:
        a :class:`Recording`; captures nest (each records every call inside it).
    """
    device = _check_options(summary, max_dense_elements, detach, device, dtype, qkv, tile)
    rec = Recording(summary=summary, max_dense_elements=max_dense_elements, detach=detach, device=device,
                    dtype=dtype, qkv=qkv, tile=tile)
    with activate(recorder=rec):
        yield rec
