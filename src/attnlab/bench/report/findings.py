"""The key findings of report.html: per pattern the fastest and slowest mechanism and the
crossover lengths; peers that beat attnlab; the largest error; failures; the best quality
variant per task."""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Mapping, Sequence

from .crossover import Crossover, _pair, _ratio_at
from .formatting import fmt_err, fmt_ratio, fmt_sig
from .html_cells import _ratio_span, _td, _th
from .quality_table import QualityRow, _best_quality, _quality_value
from .records import ATTNLAB, BASELINES, SeriesKey, _baselines, _Data, _impl_order, _Section


def _findings_table(
    sec: _Section, xo: Mapping[str, Mapping[SeriesKey, Crossover]]
) -> str | None:
    """Per pattern: the fastest and slowest attnlab mechanism at the largest length (with the
    fastest one's time ratios to the baselines), and the crossover lengths vs each baseline
    grouped by length. ``xo``: the crossovers per baseline."""
    e = html.escape
    bases = _baselines(sec)
    rows = []
    for pattern in sec.patterns:
        cand = [
            (L, mech, r)
            for mech in sec.mechanisms
            for L, r in sec.get(mech, pattern, ATTNLAB).items()
            if r.time_ms is not None
        ]
        xs = {
            b: [
                (mech, c)
                for (mech, p, dt, dev), c in xo.get(b, {}).items()
                if (p, dt, dev) == (pattern, sec.dtype, sec.device)
            ]
            for b in bases
        }
        if not cand and not any(xs.values()):
            continue
        fastest = slowest = ""
        Lmax_text = ""
        if cand:
            Lmax = max(L for L, _, _ in cand)
            at = sorted(
                ((r.time_ms, mech, r) for L, mech, r in cand if L == Lmax), key=lambda t: t[0]
            )
            t, mech, r = at[0]
            metric = "fwd+bwd" if r.fwdbwd_ms is not None else "fwd"
            ratios = ""
            for b in bases:
                found = _ratio_at(sec.get(mech, pattern, ATTNLAB), sec.get(mech, pattern, b), Lmax)
                if found is not None:
                    ratio, Lc, _ = found
                    ratios += _ratio_span(ratio, f" {b}" + ("" if Lc == Lmax else f" at L={Lc}"))
            fastest = f"<b>{e(mech)}</b> {e(fmt_sig(t))} ms {metric}{ratios}"
            if len(at) > 1:
                slowest = f"{e(at[-1][1])} {e(fmt_sig(at[-1][0]))} ms"
            Lmax_text = (
                f'{Lmax} <span class="muted">({len(at)} mechanism{"s" * (len(at) > 1)})</span>'
            )
        rows.append(
            "<tr>"
            + _td(pattern)
            + _td(Lmax_text, "n", raw=True)
            + _td(fastest, raw=True)
            + _td(slowest, raw=True)
            + "".join(_td(_crossover_groups(xs[b]), "w", raw=True) for b in bases)
            + "</tr>"
        )
    if not rows:
        return None
    head = (
        "<tr>"
        + _th("pattern")
        + _th("largest L", "n")
        + _th("fastest attnlab mechanism")
        + _th("slowest")
        + "".join(_th(f"crossover length vs {b}: mechanisms") for b in bases)
        + "</tr>"
    )
    return f'<table class="findings-t"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _crossover_groups(xs: Sequence[tuple[str, Crossover]]) -> str:
    """``<b>≤ 256</b>: a, b<br><b>never</b>: c`` (``*``: faster at some shorter L only)."""
    groups: dict[str, list[str]] = {}
    for mech, c in sorted(xs, key=lambda mc: (mc[1].length is None, mc[1].length or 0)):
        groups.setdefault(c.label() if c.length is not None else "never", []).append(
            mech + ("*" if c.lost_again else "")
        )
    return "<br>".join(
        f"<b>{html.escape(label)}</b>: {html.escape(', '.join(ms))}"
        for label, ms in groups.items()
    )


def _findings(data: _Data, sections: Sequence[_Section], qrows: Sequence[QualityRow]) -> list[str]:
    """Key findings besides the per-pattern table, as HTML fragments (strings escaped)."""
    e = html.escape
    out = []
    multi = len(sections) > 1
    for sec in sections:
        pre = f"<b>{e(sec.label)}</b>: " if multi else ""
        # per peer: on how many (mechanism, pattern) it beats attnlab at their largest common L
        beats: dict[str, list[tuple[float, str, str, int, str]]] = {}
        compared: Counter[str] = Counter()
        for (mech, pattern), by_impl in sec.series.items():
            att = by_impl.get(ATTNLAB, {})
            for impl, rows in by_impl.items():
                if impl == ATTNLAB or impl in BASELINES:
                    continue
                common = [L for L in sorted(att.keys() & rows.keys()) if _pair(att[L], rows[L])]
                if common:
                    compared[impl] += 1
                    a, peer, m = _pair(att[common[-1]], rows[common[-1]])  # type: ignore[misc]
                    if peer < a:
                        beats.setdefault(impl, []).append((peer / a, mech, pattern, common[-1], m))
        for impl in _impl_order(compared):
            if impl not in beats:
                out.append(
                    f"{pre}<b>{e(impl)}</b> is slower than attnlab on all {compared[impl]} "
                    "(mechanism, pattern) pairs it ran, at their largest common length"
                )
                continue
            bs = sorted(beats[impl])
            r, mech, pattern, L, m = bs[0]
            out.append(
                f"{pre}<b>{e(impl)}</b> is faster than attnlab on {len(bs)} of {compared[impl]} "
                f"(mechanism, pattern) pairs at their largest common length; most on {e(mech)} "
                f"{e(pattern)} L={L}: {e(fmt_ratio(r))} attnlab's {m} time"
            )
        errs = [
            (max(v for v in (r.err_out, r.err_grad) if v is not None), r)
            for by_impl in sec.series.values()
            for r in by_impl.get(ATTNLAB, {}).values()
            if r.err_out is not None or r.err_grad is not None
        ]
        if errs:
            v, r = max(errs, key=lambda t: t[0])
            which = "gradients" if r.err_grad == v else "output"
            out.append(
                f"{pre}largest relative error vs the float64 reference: <b>{fmt_err(v)}</b> "
                f"({e(r.mechanism)} {e(r.pattern)} L={r.L}, {which})"
            )
        failed = [
            r
            for by_impl in sec.series.values()
            for r in by_impl.get(ATTNLAB, {}).values()
            if not r.ok
        ]
        if failed:
            shown = ", ".join(
                f"{r.mechanism} {r.pattern} L={r.L} ({r.status})" for r in failed[:4]
            )
            more = f" and {len(failed) - 4} more" if len(failed) > 4 else ""
            out.append(
                f'{pre}<span class="slow">attnlab did not complete {len(failed)} '
                "measurement(s)</span>: "
                f"{e(shown)}{more}"
            )
    for (task, metric), q in _best_quality(qrows).items():
        n_variants = sum(
            1 for r in qrows if r.task == task and r.metric == metric and r.mean is not None
        )
        out.append(
            f"quality, <b>{e(task)}</b>: best <b>{e(q.variant)}</b>, {e(metric)} "
            f"{e(_quality_value(q))} (n={q.n}; {n_variants} variants)"
        )
    return out
