"""attnlab compared with a baseline (``sdpa_dense`` unless said otherwise; or ``sdpa_fast``):
time ratios, and crossover lengths, from which sequence length on attnlab stays faster.

Times compared with a baseline are fwd+bwd where both sides have it, else forward."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .records import ATTNLAB, BASELINES, DENSE, SeriesKey, _Eff, _parse, _Section, _sections
from .records import _unique_order


def _pair(a: _Eff | None, d: _Eff | None) -> tuple[float, float, str] | None:
    """(attnlab ms, baseline ms, metric) at one length: fwd+bwd where both have it, else fwd."""
    if a is None or d is None or not a.ok or not d.ok:
        return None
    if a.fwdbwd_ms is not None and d.fwdbwd_ms is not None:
        return a.fwdbwd_ms, d.fwdbwd_ms, "fwd+bwd"
    if a.fwd_ms is not None and d.fwd_ms is not None:
        return a.fwd_ms, d.fwd_ms, "fwd"
    return None


def _ratio_at(
    att: Mapping[int, _Eff], base: Mapping[int, _Eff], L: int
) -> tuple[float, int, str] | None:
    """(attnlab time / baseline time, length, metric) at the largest length up to ``L`` where
    both have a time (see :func:`_pair`); None when there is none."""
    for Lc in sorted(att, reverse=True):
        p = _pair(att[Lc], base.get(Lc)) if Lc <= L else None
        if p is not None:
            return p[0] / p[1], Lc, p[2]
    return None


@dataclass(frozen=True)
class Crossover:
    """How an attnlab series compares with a baseline (``sdpa_dense`` unless said otherwise)
    over the sweep.

    ``compared``: the lengths where both were measured (ok, with a common metric), in
    increasing order; ``faster``: those where attnlab was strictly faster; ``length``: the
    crossover length (see :func:`crossovers`), None when attnlab is not faster at the largest
    compared length. ``metrics``: the time metrics used (``"fwd+bwd"``, ``"fwd"``)."""

    length: int | None
    compared: tuple[int, ...]
    faster: tuple[int, ...]
    metrics: tuple[str, ...] = ("fwd+bwd",)

    @property
    def from_start(self) -> bool:
        """attnlab is faster from the smallest compared length on: the true crossover lies at
        or below it (the sweep did not measure where it happens)."""
        return self.length is not None and self.length == self.compared[0]

    @property
    def lost_again(self) -> bool:
        """attnlab was faster at some length but slower again at the largest ones."""
        return self.length is None and bool(self.faster)

    def label(self, ascii: bool = False) -> str:
        """``"≤ 256"`` (from the start), ``"4096"``, ``"never"``, or ``"never*"`` (faster at
        some lengths only, then slower again: see :attr:`faster`)."""
        if self.length is None:
            return "never*" if self.lost_again else "never"
        if self.from_start:
            return f"<={self.length}" if ascii else f"≤ {self.length}"
        return str(self.length)


def _crossover(att: Mapping[int, _Eff], base: Mapping[int, _Eff]) -> Crossover | None:
    points = []
    for L in sorted(att.keys() & base.keys()):
        p = _pair(att[L], base[L])
        if p is not None:
            points.append((L, p[0] < p[1], p[2]))
    if not points:
        return None
    length = None
    for L, faster, _ in reversed(points):
        if not faster:
            break
        length = L
    return Crossover(
        length,
        tuple(L for L, _, _ in points),
        tuple(L for L, f, _ in points if f),
        tuple(_unique_order(m for _, _, m in points)),
    )


def crossover_details(
    records: Iterable[Mapping[str, Any]], *, baseline: str = DENSE
) -> dict[SeriesKey, Crossover]:
    """:class:`Crossover` of every attnlab series ``(mechanism, pattern, dtype, device)``
    that has at least one length also measured by ``baseline`` (an implementation name:
    ``"sdpa_dense"``, ``"sdpa_fast"``, or any peer)."""
    return _crossovers_of(_sections(_parse(records)), baseline)


def _crossovers_of(
    sections: Sequence[_Section], baseline: str = DENSE
) -> dict[SeriesKey, Crossover]:
    out = {}
    for sec in sections:
        for (mech, pattern), by_impl in sec.series.items():
            if ATTNLAB in by_impl and baseline in by_impl:
                c = _crossover(by_impl[ATTNLAB], by_impl[baseline])
                if c is not None:
                    out[(mech, pattern, sec.dtype, sec.device)] = c
    return out


def crossovers(
    records: Iterable[Mapping[str, Any]], *, baseline: str = DENSE
) -> dict[SeriesKey, int | None]:
    """Crossover length of every attnlab series, keyed ``(mechanism, pattern, dtype, device)``.

    The crossover length is the smallest ``L`` of the sweep from which attnlab's time is
    strictly below ``baseline``'s at that ``L`` and at every larger ``L`` where both were
    measured (status ok; fwd+bwd times where both have one at that ``L``, else forward).
    Lengths where either side failed or was not measured are ignored.

    - attnlab faster at every compared length: the *smallest compared length* is returned;
      the real crossover lies at or below it (the report writes ``"≤ L"``;
      :attr:`Crossover.from_start` of :func:`crossover_details` tells this case apart);
    - attnlab faster at some lengths but slower at the largest one(s) ("overtakes, then
      loses again"): only the last run of faster lengths counts; if attnlab is slower at the
      largest compared length, the value is None;
    - never faster: None.

    ``baseline``: ``"sdpa_dense"`` (the default: SDPA with the pattern as a dense mask, the
    same function) or ``"sdpa_fast"`` (SDPA without the pattern: what ignoring the sparsity
    costs, not the same function); any other implementation name works the same way.

    Series without any length compared with ``baseline`` are absent."""
    return {k: c.length for k, c in crossover_details(records, baseline=baseline).items()}


def _crossovers_by_baseline(
    sections: Sequence[_Section],
) -> dict[str, dict[SeriesKey, Crossover]]:
    """``{baseline: crossover details}`` for sdpa_dense and sdpa_fast."""
    return {b: _crossovers_of(sections, b) for b in BASELINES}
