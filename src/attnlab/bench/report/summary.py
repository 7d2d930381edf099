"""attnlab per (mechanism, pattern) at its largest measured length, compared with the
baselines: the rows of the summary tables of the terminal and of report.html."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .crossover import Crossover, _ratio_at
from .records import ATTNLAB, BASELINES, SeriesKey, _Eff, _Section


@dataclass(frozen=True)
class _Versus:
    """attnlab against one baseline: ``ratio`` = attnlab's time / the baseline's at ``L``
    (the largest length both measured up to the summary's length, usually that length) in
    ``metric`` (``"fwd+bwd"`` or ``"fwd"``); ``crossover``: the series' crossover."""

    ratio: float | None = None
    L: int | None = None
    metric: str | None = None
    crossover: Crossover | None = None


@dataclass(frozen=True)
class _Summary:
    """attnlab's record at the largest measured length of a (mechanism, pattern); ``vs``: the
    comparison with each baseline (``vs["sdpa_dense"]``, ``vs["sdpa_fast"]``);
    ``err_out``/``err_grad``: the largest over the lengths."""

    mechanism: str
    pattern: str
    L: int
    row: _Eff
    err_out: float | None
    err_grad: float | None
    vs: Mapping[str, _Versus] = field(default_factory=dict)
    failed_above: tuple[_Eff, ...] = ()  # attnlab's failures at larger lengths


def _max(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def _summary_rows(
    sec: _Section, xo: Mapping[str, Mapping[SeriesKey, Crossover]]
) -> list[_Summary]:
    """Per mechanism × pattern: attnlab at its largest length with an ok record (else its
    largest length). ``xo``: the crossovers per baseline (``_crossovers_by_baseline``)."""
    out = []
    for mech in sec.mechanisms:
        for pattern in sec.patterns:
            att = sec.get(mech, pattern, ATTNLAB)
            if not att:
                continue
            ok = [L for L, r in att.items() if r.time_ms is not None]
            L = max(ok) if ok else max(att)
            vs = {}
            for base in BASELINES:
                found = _ratio_at(att, sec.get(mech, pattern, base), L)
                crossover = xo.get(base, {}).get((mech, pattern, sec.dtype, sec.device))
                vs[base] = _Versus(*(found or (None, None, None)), crossover)
            out.append(
                _Summary(
                    mech,
                    pattern,
                    L,
                    att[L],
                    _max(r.err_out for r in att.values()),
                    _max(r.err_grad for r in att.values()),
                    vs,
                    tuple(r for Lf, r in att.items() if Lf > L and not r.ok),
                )
            )
    return out
