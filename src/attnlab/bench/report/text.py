"""The plain-text summary of ``attnlab bench`` printed in the terminal."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .crossover import Crossover, _crossovers_by_baseline
from .formatting import (
    _counts_text,
    _env_summary,
    _short_len,
    _shorten,
    fmt_err,
    fmt_ratio,
    fmt_sig,
)
from .quality_table import QualityRow, _aggregate_quality, _best_quality, _quality_value
from .records import BASELINE_SHORT, BASELINES, DENSE, FAST, HIGH_SPREAD, SeriesKey, _baselines
from .records import _Data, _impl_order, _parse, _Section, _sections
from .summary import _summary_rows, _Versus


def _peer_lines(data: _Data) -> list[str]:
    """One line per implementation: its records counted by status (and the commonest reason)."""
    lines = []
    for impl in _impl_order(r.impl for r in data.eff):
        counts: Counter[str] = Counter()
        reasons: dict[str, Counter[str]] = {}
        for r in data.eff:
            if r.impl == impl:
                counts[r.status_label] += 1
                if not r.ok and r.reason:
                    reasons.setdefault(r.status_label, Counter())[r.reason] += 1
        parts = []
        for label, n in sorted(
            counts.items(), key=lambda kv: (not kv[0].startswith("ok"), -kv[1])
        ):
            rs = reasons.get(label)
            text = label
            if rs:
                reason = rs.most_common(1)[0][0]
                more = f"; +{len(rs) - 1} other reason{'s' * (len(rs) > 2)}" if len(rs) > 1 else ""
                text += f" ({_shorten(reason, 48, '...')}{more})"
            parts.append(
                text if len(counts) == 1 and not label.startswith("ok") else f"{text} {n}"
            )
        lines.append(f"{impl}: " + ", ".join(parts))
    return lines


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Aligned plain-text columns; columns empty in every row are left out."""
    keep = (
        [i for i in range(len(headers)) if any(r[i] for r in rows)]
        if rows
        else list(range(len(headers)))
    )
    widths = {
        i: max(len(headers[i]), *(len(r[i]) for r in rows)) if rows else len(headers[i])
        for i in keep
    }

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cells[i].rjust(widths[i]) if i in right else cells[i].ljust(widths[i]) for i in keep
        ).rstrip()

    return [line(headers), line(["-" * widths.get(i, 0) for i in range(len(headers))])] + [
        line(r) for r in rows
    ]


def summary_table(records: Iterable[Mapping[str, Any]]) -> str:
    """A plain-text summary (at most about 120 columns; about 140 with the sdpa_fast columns):
    per (dtype, device), every attnlab mechanism × pattern at its largest measured length
    (backend, forward and fwd+bwd ms, time ratio to sdpa_dense and to sdpa_fast, peak MiB,
    the largest relative errors over the lengths, crossover lengths vs sdpa_dense and vs
    sdpa_fast); the records per implementation and status; the quality results (mean ± sd
    over seeds). Sections without records are omitted (so are the sdpa_fast columns where it
    was not measured); no records at all gives a one-line message."""
    data = _parse(records)
    if not data.records:
        return (
            "attnlab bench: no records (run `attnlab bench` first, or check the results folder)\n"
        )
    sections = _sections(data)
    xo = _crossovers_by_baseline(sections)
    env = dict(_env_summary(data.records))
    out = [f"attnlab bench: {_counts_text(data)}"]
    head_env = " · ".join(
        f"{k} {env[k]}" for k in ("torch", "device", "threads", "commit") if k in env
    )
    if head_env:
        out.append(head_env)
    if not data.eff and not data.qual and not data.fidelity:
        out.append("no efficiency, quality or fidelity records")
    for sec in sections:
        out += _efficiency_lines(sec, xo)
    if data.eff:
        out += ["", "Implementations (records by status)"] + [
            "  " + ln for ln in _peer_lines(data)
        ]
    out += _quality_lines(_aggregate_quality(data.qual))
    if data.fidelity:
        from ..fidelity_suite import format_table

        out += ["", "Fidelity: training-free in all-MiniLM-L6-v2, against dense attention",
                format_table(data.fidelity).rstrip()]
    if data.notes:
        out += [""] + [f"note: {n}" for n in data.notes]
    return "\n".join(out).rstrip() + "\n"


_CROSSOVER_HEADER = {DENSE: "crossover", FAST: "vs flash"}


def _ratio_text(v: _Versus, L: int) -> str:
    """``0.13x``, ``0.95xf`` (forward times), ``1.2x@8k`` (at a smaller length)."""
    text = fmt_ratio(v.ratio, "-", "x") + ("f" if v.metric == "fwd" else "")
    if v.L is not None and v.L != L:
        text += f"@{_short_len(v.L)}"
    return text


def _efficiency_lines(
    sec: _Section, xo: Mapping[str, Mapping[SeriesKey, Crossover]]
) -> list[str]:
    """The summary table of one (dtype, device) and its notes (none without attnlab rows)."""
    rows = _summary_rows(sec, xo)
    if not rows:
        return []
    bases = _baselines(sec)
    out = [
        "",
        f"Efficiency, {sec.dtype} on {sec.device}"
        + (f" ({sec.shape_label})" if sec.shape_label else "")
        + ": attnlab at the largest measured L; t/dense = time / sdpa_dense time",
    ]
    cells, prev, flagged = [], None, False
    for s in rows:
        r = s.row
        flag = ""
        if any((r.spread(m) or 0) > HIGH_SPREAD for m in ("fwd", "fwdbwd")):
            flag, flagged = "~", True
        timing = r.ok and r.time_ms is not None
        crossings = [s.vs[b].crossover for b in BASELINES]
        cells.append(
            [
                s.mechanism if s.mechanism != prev else "",
                s.pattern,
                str(s.L) + ("!" if s.failed_above else ""),
                (r.backend or "") if timing else _shorten(r.status_label, 13, "..."),
                fmt_sig(r.fwd_ms, missing="-") + (flag if r.fwd_ms is not None else ""),
                fmt_sig(r.fwdbwd_ms, missing="-") + (flag if r.fwdbwd_ms is not None else ""),
                *(_ratio_text(s.vs[b], s.L) if b in bases else "" for b in BASELINES),
                fmt_sig(r.peak_mib, missing="-"),
                fmt_err(s.err_out, "-"),
                fmt_err(s.err_grad, "-"),
                *(
                    (c.label(ascii=True) if c else "-") if b in bases else ""
                    for b, c in zip(BASELINES, crossings)
                ),
            ]
        )
        prev = s.mechanism
    out += _table(
        ["mechanism", "pattern", "L", "backend", "fwd ms", "f+b ms"]
        + [f"t/{BASELINE_SHORT[b]}" for b in BASELINES]
        + ["peak MiB", "err out", "err grad"]
        + [_CROSSOVER_HEADER[b] for b in BASELINES],
        cells,
        right=set(range(2, len(cells[0]))) - {3},
    )
    notes = []
    if FAST in bases:
        notes.append(
            "t/flash: time / sdpa_fast time, SDPA without the pattern (what ignoring the "
            "sparsity costs; not the same function)"
        )
    if any(s.vs[DENSE].crossover for s in rows):
        notes.append(
            "crossover: smallest L from which attnlab stays faster than sdpa_dense ('<=L': "
            "already at the smallest L)"
        )
    if FAST in bases and any(s.vs[FAST].crossover for s in rows):
        notes.append("vs flash: the same crossover against sdpa_fast")
    if any(s.err_out is not None or s.err_grad is not None for s in rows):
        notes.append(
            "err: largest relative error vs the float64 reference over the measured lengths"
        )
    if any(v.crossover and v.crossover.lost_again for s in rows for v in s.vs.values()):
        notes.append("never*: faster at some shorter L only, slower again at the largest")
    for b in bases:
        if any(s.vs[b].L is not None and s.vs[b].L != s.L for s in rows):
            notes.append(f"t/{BASELINE_SHORT[b]}@L: at the largest L that {b} measured too")
    fwd_only = [
        f"t/{BASELINE_SHORT[b]}" for b in bases if any(s.vs[b].metric == "fwd" for s in rows)
    ]
    if fwd_only:
        notes.append(f"{', '.join(fwd_only)} ending in f: forward times (no fwd+bwd on one side)")
    if flagged:
        notes.append(f"~: timing spread above {HIGH_SPREAD:.0%} of the median")
    if any(s.failed_above for s in rows):
        notes.append("L!: attnlab failed at a larger L (see Implementations)")
    return out + ["  " + note for note in notes]


def _quality_lines(qrows: Sequence[QualityRow]) -> list[str]:
    """The quality table (mean ± sd over seeds), none without quality rows."""
    if not qrows:
        return []
    best = _best_quality(qrows)
    out = ["", "Quality (mean ± sd over n seeds; * best of its task)"]
    cells = []
    prev_task = None
    for q in qrows:
        direction = (
            ""
            if q.higher_is_better is None
            else (" (higher better)" if q.higher_is_better else " (lower better)")
        )
        value = _quality_value(q, "-") + (" *" if best.get((q.task, q.metric)) is q else "")
        cells.append(
            [
                q.task if q.task != prev_task else "",
                q.variant,
                q.mechanism if q.mechanism and q.mechanism != q.variant else "",
                " ".join(
                    x for x in (q.preset or "", f"{q.steps} steps" if q.steps else "") if x
                ),
                q.metric + direction,
                value,
                str(q.n) + (f" ({q.failed} failed)" if q.failed else ""),
                fmt_sig(q.train_s, missing="-"),
                _shorten(q.extra, 30, "..."),
            ]
        )
        prev_task = q.task
    heads = ["task", "variant", "mechanism", "preset", "metric", "mean ± sd", "n", "train s"]
    return out + _table(
        heads + ["other"],
        cells,
        right={7},
    )
