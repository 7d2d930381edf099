"""The tables of report.html: time and memory per pattern (mechanism × L), errors, the
summary at the largest length, implementations and peers, quality."""

from __future__ import annotations

import html
import statistics
from collections.abc import Sequence

from .crossover import Crossover, _pair
from .formatting import _shorten, fmt_err, fmt_sig, fmt_ratio
from .html_cells import _ratio_span, _status_span, _td, _th, _time_cell
from .quality_table import QualityRow, _best_quality, _quality_value
from .records import ATTNLAB, BASELINE_SHORT, DENSE, FAST, PATTERNS, _baselines, _Data, _Eff
from .records import _impl_order, _pattern_order, _Section, _unique_order
from .summary import _Summary, _Versus


def _time_table(sec: _Section, pattern: str, metric: str) -> str | None:
    lengths = sec.lengths(pattern)
    mechs = [m for m in sec.mechanisms if (m, pattern) in sec.series]
    if not any(
        r.metric(metric) is not None
        for m in mechs
        for rows in sec.series[(m, pattern)].values()
        for r in rows.values()
    ):
        return None
    head = "<tr>" + _th("mechanism") + "".join(_th(f"L={L}", "n") for L in lengths) + "</tr>"
    body = []
    for mech in mechs:
        by_impl = sec.series[(mech, pattern)]
        dense, fast = by_impl.get(DENSE, {}), by_impl.get(FAST, {})
        impls = [i for i in sec.impls if i in by_impl]
        impls = [
            i
            for i in impls
            if i == ATTNLAB
            or any(r.metric(metric) is not None or not r.ok for r in by_impl[i].values())
        ]
        for k, impl in enumerate(impls):
            rows = by_impl[impl]
            name = mech if impl == ATTNLAB else f"{mech} · {impl}"
            cls = ' class="grp"' if k == 0 else ""
            if impl != ATTNLAB:
                cls = ' class="peer grp"' if k == 0 else ' class="peer"'
            cells = "".join(
                _time_cell(
                    rows.get(L),
                    metric,
                    dense.get(L) if impl != DENSE else None,
                    show_ratio=impl != DENSE,
                    fast=fast.get(L) if impl == ATTNLAB else None,
                )
                for L in lengths
            )
            body.append(f"<tr{cls}>{_td(name)}{cells}</tr>")
    return f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def _memory_table(sec: _Section, pattern: str) -> str | None:
    lengths = sec.lengths(pattern)
    mechs = [m for m in sec.mechanisms if (m, pattern) in sec.series]
    rows_html = []
    any_value = False
    for mech in mechs:
        by_impl = sec.series[(mech, pattern)]
        for impl in (i for i in sec.impls if i in by_impl):
            rows = by_impl[impl]
            if not any(r.ok and r.peak_mib is not None for r in rows.values()):
                continue
            any_value = True
            dense = by_impl.get(DENSE, {})
            cells = []
            for L in lengths:
                r = rows.get(L)
                if r is None or not r.ok or r.peak_mib is None:
                    cells.append(
                        _td("", "n")
                        if r is None
                        else _td(_status_span(r) if not r.ok else "—", "n", r.reason, raw=True)
                    )
                    continue
                text = html.escape(fmt_sig(r.peak_mib))
                d = dense.get(L)
                if impl != DENSE and d is not None and d.ok and d.peak_mib:
                    ratio = r.peak_mib / d.peak_mib
                    text += _ratio_span(ratio)
                cells.append(_td(text, "n", raw=True))
            name = mech if impl == ATTNLAB else f"{mech} · {impl}"
            cls = "grp" if impl == ATTNLAB else "peer"
            rows_html.append(f'<tr class="{cls}">{_td(name)}{"".join(cells)}</tr>')
    if not any_value:
        return None
    head = "<tr>" + _th("mechanism") + "".join(_th(f"L={L}", "n") for L in lengths) + "</tr>"
    return f"<table><thead>{head}</thead><tbody>{''.join(rows_html)}</tbody></table>"


def _error_table(sec: _Section) -> str | None:
    patterns = sec.patterns
    rows_html = []
    for mech in sec.mechanisms:
        cells = []
        have = False
        for pattern in patterns:
            att = [
                r
                for r in sec.get(mech, pattern, ATTNLAB).values()
                if r.err_out is not None or r.err_grad is not None
            ]
            if not att:
                cells += [_td("", "n"), _td("", "n")]
                continue
            have = True
            for attr in ("err_out", "err_grad"):
                vals = [(getattr(r, attr), r.L) for r in att if getattr(r, attr) is not None]
                if vals:
                    v, L = max(vals)
                    cells.append(
                        _td(
                            fmt_err(v),
                            "n",
                            f"largest at L={L}; measured at L="
                            + ", ".join(str(x) for x in sorted(x for _, x in vals)),
                        )
                    )
                else:
                    cells.append(_td("—", "n"))
        if have:
            rows_html.append(f"<tr>{_td(mech)}{''.join(cells)}</tr>")
    if not rows_html:
        return None
    head1 = (
        "<tr>"
        + _th("")
        + "".join(f'<th colspan="2" class="n">{html.escape(p)}</th>' for p in patterns)
        + "</tr>"
    )
    head2 = (
        "<tr>"
        + _th("mechanism")
        + "".join(_th("output", "n") + _th("grad", "n") for _ in patterns)
        + "</tr>"
    )
    return f"<table><thead>{head1}{head2}</thead><tbody>{''.join(rows_html)}</tbody></table>"


def _summary_html(sec: _Section, rows: Sequence[_Summary]) -> str:
    bases = _baselines(sec)
    heads = (
        ["mechanism", "pattern", "L", "backend", "fwd ms", "fwd+bwd ms"]
        + [f"t / {BASELINE_SHORT[b]}" for b in bases]
        + ["peak MiB", "max err out", "max err grad", "visible", "crossover"]
        + ["vs flash"] * (FAST in bases)
    )
    head = (
        "<tr>"
        + "".join(_th(h, "" if h in ("mechanism", "pattern", "backend") else "n") for h in heads)
        + "</tr>"
    )
    body = []
    prev = None
    for s in rows:
        r = s.row
        backend = html.escape(r.backend or "") if r.time_ms is not None else _status_span(r)
        cls = ' class="grp"' if s.mechanism != prev else ""
        L_cell = _td(str(s.L), "n")
        if s.failed_above:
            why = "; ".join(
                f"L={f.L}: {f.status}" + (f" ({f.reason})" if f.reason else "")
                for f in s.failed_above
            )
            larger = ", ".join(str(f.L) for f in s.failed_above)
            fail = f'<span class="r st err" title="{html.escape(why)}">failed at {larger}</span>'
            L_cell = _td(f"{s.L}{fail}", "n", raw=True)
        body.append(
            f"<tr{cls}>"
            + _td(s.mechanism if s.mechanism != prev else "")
            + _td(s.pattern)
            + L_cell
            + _td(backend, "", r.reason if not r.ok else None, raw=True)
            + _time_cell(r, "fwd", None, False)
            + _time_cell(r, "fwdbwd", None, False)
            + "".join(_ratio_td(s.vs[b], s.L, b) for b in bases)
            + _td(fmt_sig(r.peak_mib), "n")
            + _td(fmt_err(s.err_out), "n")
            + _td(fmt_err(s.err_grad), "n")
            + _td(fmt_sig(r.density, 2), "n")
            + "".join(_crossover_td(s.vs[b].crossover) for b in bases)
            + "</tr>"
        )
        prev = s.mechanism
    return f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def _ratio_td(v: _Versus, L: int, baseline: str) -> str:
    """attnlab's time over ``baseline``'s, with the length when not ``L`` and ``fwd`` when
    forward times."""
    text = ""
    if v.ratio is not None:
        text = _ratio_span(v.ratio, block=False)
        if v.L != L:
            why = f"{baseline} has no time at L={L}"
            text += f' <span class="muted" title="{why}">at L={v.L}</span>'
        if v.metric == "fwd":
            text += (
                ' <span class="muted" title="forward times: no fwd+bwd on one side">fwd</span>'
            )
    return _td(text, "n", raw=True)


def _crossover_td(xo: Crossover | None) -> str:
    title = None
    if xo is not None:
        title = (
            f"compared at L={', '.join(map(str, xo.compared))} ({'/'.join(xo.metrics)}); "
            f"attnlab faster at {', '.join(map(str, xo.faster)) or 'none'}"
        )
    return _td(
        xo.label() if xo else "—",
        "n " + ("" if xo is None else "fast" if xo.length is not None else "slow"),
        title,
    )


def _peers_html(data: _Data) -> str | None:
    if not data.eff:
        return None
    groups: dict[tuple[str, str, str], list[_Eff]] = {}
    for r in data.eff:
        groups.setdefault((r.impl, r.status_label, r.reason or ""), []).append(r)
    impl_order = {i: k for k, i in enumerate(_impl_order(r.impl for r in data.eff))}
    # peer time / attnlab time at the same (mechanism, pattern, L, dtype, device)
    att = {
        (r.mechanism, r.pattern, r.L, r.dtype, r.device): r for r in data.eff if r.impl == ATTNLAB
    }
    body = []
    for (impl, label, reason), rs in sorted(
        groups.items(),
        key=lambda kv: (impl_order[kv[0][0]], not kv[0][1].startswith("ok"), -len(kv[1])),
    ):
        mechs = _unique_order(r.mechanism for r in rs)
        pats = _pattern_order(r.pattern for r in rs)
        Ls = sorted({r.L for r in rs})
        ratios = []
        if impl != ATTNLAB:
            for r in rs:
                p = _pair(att.get((r.mechanism, r.pattern, r.L, r.dtype, r.device)), r)
                if p is not None:
                    ratios.append(p[1] / p[0])
        compile_s = [r.compile_s for r in rs if r.compile_s is not None]
        cls = (
            "st err"
            if label == "error"
            else "st ni"
            if label == "not installed"
            else "st"
            if not label.startswith("ok")
            else ""
        )
        mech_text = ", ".join(mechs[:8]) + (f", … ({len(mechs)} in all)" if len(mechs) > 8 else "")
        extra = []
        if ratios:
            extra.append(
                f"median time {fmt_ratio(statistics.median(ratios))} attnlab's "
                f"(faster in {sum(x < 1 for x in ratios)} of {len(ratios)})"
            )
        if compile_s:
            extra.append(f"compile {fmt_sig(statistics.median(compile_s))} s (median)")
        body.append(
            "<tr>"
            + _td(impl)
            + _td(f'<span class="{cls}">{html.escape(label)}</span>', raw=True)
            + _td(str(len(rs)), "n")
            + _td(_shorten(reason, 160), "w", reason if len(reason) > 160 else None)
            + _td(mech_text, "w")
            + _td("all four" if set(pats) == set(PATTERNS) else ", ".join(pats), "w")
            + _td(f"{Ls[0]}–{Ls[-1]}" if len(Ls) > 1 else str(Ls[0]))
            + _td("; ".join(extra), "w")
            + "</tr>"
        )
    head = (
        "<tr>"
        + "".join(
            _th(h, "n" if h == "records" else "")
            for h in [
                "implementation",
                "status",
                "records",
                "reason",
                "mechanisms",
                "patterns",
                "L",
                "vs attnlab",
            ]
        )
        + "</tr>"
    )
    return f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def _quality_html(qrows: Sequence[QualityRow]) -> str | None:
    if not qrows:
        return None
    best = _best_quality(qrows)
    show_mech = any(q.mechanism and q.mechanism != q.variant for q in qrows)
    show_extra = any(q.extra for q in qrows)
    body = []
    prev = None
    for q in qrows:
        direction = "" if q.higher_is_better is None else (" ↑" if q.higher_is_better else " ↓")
        value = html.escape(_quality_value(q))
        if best.get((q.task, q.metric)) is q:
            value = f"<b>{value}</b>"
        rng = f"{fmt_sig(q.min)} – {fmt_sig(q.max)}" if q.n > 1 else ""
        n_text = str(q.n) + (
            f' <span class="st err">+{q.failed} failed</span>' if q.failed else ""
        )
        cls = ' class="grp"' if q.task != prev else ""
        body.append(
            f"<tr{cls}>"
            + _td(q.task if q.task != prev else "")
            + _td(q.variant)
            + (_td(q.mechanism or "") if show_mech else "")
            + _td(q.preset or "")
            + _td(str(q.steps) if q.steps else "", "n")
            + _td(q.metric + direction)
            + _td(value, "n", raw=True)
            + _td(rng, "n")
            + _td(n_text, "n", "; ".join(q.reasons) or None, raw=True)
            + _td(fmt_sig(q.train_s), "n")
            + _td(f"{q.params:,}" if q.params else "—", "n")
            + (_td(q.extra, "muted w") if show_extra else "")
            + "</tr>"
        )
        prev = q.task
    heads = (
        ["task", "variant"]
        + (["mechanism"] if show_mech else [])
        + ["preset", "steps", "metric", "mean ± sd", "min – max", "n", "train s", "params"]
        + (["other"] if show_extra else [])
    )
    numeric = ("steps", "mean ± sd", "min – max", "n", "train s", "params")
    head = "<tr>" + "".join(_th(h, "n" if h in numeric else "") for h in heads) + "</tr>"
    return f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"
