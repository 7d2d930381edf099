"""``report.html``: a self-contained page (inline CSS, plots embedded as base64 ``data:``
URIs, no external resource, no JavaScript) assembled from the findings and tables."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .crossover import Crossover, _crossovers_by_baseline
from .findings import _findings, _findings_table
from .formatting import _counts_text, _env_summary
from .html_cells import _td
from .html_tables import (
    _error_table,
    _memory_table,
    _peers_html,
    _quality_html,
    _summary_html,
    _time_table,
)
from .quality_table import _aggregate_quality
from .records import FAST, HIGH_SPREAD, SeriesKey, _baselines, _parse, _Section, _sections
from .summary import _summary_rows

REPORT_FILE = "report.html"


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 color:#1d232a;margin:0;background:#f6f7f9}
main{max-width:1320px;margin:0 auto;padding:24px 28px 48px;background:#fff}
h1{font-size:26px;margin:0 0 4px}
h2{font-size:20px;margin:32px 0 8px;border-bottom:2px solid #e3e6ea;padding-bottom:4px}
h3{font-size:16px;margin:20px 0 6px}
.sub{color:#5b6570;margin:0 0 14px}
table{border-collapse:collapse;margin:6px 0 14px;font-variant-numeric:tabular-nums}
th,td{padding:3px 9px;border-bottom:1px solid #e6e8eb;text-align:left;vertical-align:top;
 white-space:nowrap}
td.w{white-space:normal}
.tw{max-width:100%;overflow-x:auto}
th{background:#f0f2f5;font-weight:600;white-space:nowrap}
td.n,th.n{text-align:right;white-space:nowrap}
tbody tr:hover{background:#f7fafc}
tr.peer td{color:#5b6570;font-size:13px}
tr.peer td:first-child{padding-left:22px}
tr.grp td{border-top:2px solid #d5d9de}
.env td:first-child{color:#5b6570;padding-right:18px}
.findings{background:#f3f8ff;border:1px solid #cfe0f5;border-radius:6px;
 padding:10px 18px 10px 34px}
.findings li{margin:3px 0}
.findings-t td{padding:5px 10px}.findings-t td:nth-child(n+5){max-width:560px}
.findings-t th{white-space:normal}
nav.toc{margin:10px 0 4px;font-size:14px}nav.toc a{color:#2456a6;text-decoration:none}
a{color:#2456a6}
.fast{color:#17733a}.slow{color:#b3261e}
.r{display:block;font-size:11.5px}
.st{font-size:12px;color:#8a5300}.st.err{color:#b3261e}.st.ni{color:#6b7480}
.flag{color:#b36b00;cursor:help}
.notes{color:#8a5300}
.muted{color:#6b7480;font-size:13px}
figure{margin:16px 0 28px}figure img{max-width:100%;border:1px solid #eceef1}
figcaption{color:#5b6570;font-size:13px;margin-top:4px}
details>summary{cursor:pointer;color:#2456a6;margin:6px 0}
code{background:#f0f2f5;padding:0 3px;border-radius:3px}
"""


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)} (<code>{html.escape(path.name)}</code>)"
        "</figcaption></figure>"
    )


_BASELINES_LINE = (
    "Baselines: <code>sdpa_dense</code> = torch SDPA with the pattern as a dense boolean mask "
    "(the same function); <code>sdpa_fast</code> = torch SDPA without the pattern (no mask, "
    "<code>is_causal</code> for causal-self; FlashAttention on CUDA): what ignoring the "
    "sparsity costs, not the same function."
)


def _efficiency_html(
    sec: _Section, xo: Mapping[str, Mapping[SeriesKey, Crossover]]
) -> list[str]:
    """The body of one (dtype, device) efficiency section: its explanation, the summary at the
    largest length, the time tables per pattern, memory (folded) and errors."""
    e = html.escape
    fast = FAST in _baselines(sec)
    if fast:
        ratios = (
            f"{_BASELINES_LINE} t / dense and the small numbers below the times: attnlab's "
            "time over sdpa_dense's at the same L; t / flash and the numbers marked flash: over "
            'sdpa_fast\'s; <span class="fast">green</span> when faster. Crossover (vs flash: '
            "against sdpa_fast): "
        )
    else:
        ratios = (
            "t / dense and the small numbers below the times: attnlab's time over "
            "<code>sdpa_dense</code>'s (torch SDPA with a dense boolean mask of the same "
            'pattern) at the same L, <span class="fast">green</span> when faster. Crossover: '
        )
    out = [
        '<p class="muted">Times in ms, the median of the repeats '
        f'(<span class="flag">~</span>: spread above {HIGH_SPREAD:.0%} of the median). '
        + ratios
        + "the smallest L from which attnlab stays faster than sdpa_dense at every larger L "
        "both measured (≤ L: already at the smallest L measured; never*: faster at some "
        "shorter L only).</p>"
    ]
    rows = _summary_rows(sec, xo)
    if rows:
        out.append("<h3>At the largest measured length</h3>" + _summary_html(sec, rows))
    for metric, name in (("fwdbwd", "forward + backward"), ("fwd", "forward")):
        tabs = [(p, t) for p in sec.patterns if (t := _time_table(sec, p, metric))]
        if not tabs:
            continue
        inner = "".join(f"<h3>{e(p)} · {name} time (ms)</h3>{t}" for p, t in tabs)
        if metric == "fwd" and any(_time_table(sec, p, "fwdbwd") for p in sec.patterns):
            out.append(f"<details><summary>Forward times, per pattern</summary>{inner}</details>")
        else:
            out.append(inner)
    mem = [(p, t) for p in sec.patterns if (t := _memory_table(sec, p))]
    if mem:
        out.append(
            "<h3>Peak memory</h3><details><summary>Peak extra memory of one forward+backward "
            "(MiB; below: ratio to sdpa_dense), per pattern</summary>"
            + "".join(f"<h3>{e(p)}</h3>{t}" for p, t in mem)
            + "</details>"
        )
    err = _error_table(sec)
    if err:
        out.append(
            "<h3>Relative error vs the float64 reference (largest over the lengths)</h3>" + err
        )
    return out


def write_report(
    records: Iterable[Mapping[str, Any]], out_dir: str | Path, *, title: str = "attnlab bench"
) -> Path:
    """Write ``out_dir/report.html`` (and the PNG plots beside it) and return its path.

    The HTML is self-contained: inline CSS, the plots embedded as base64 ``data:`` URIs (the
    PNG files are kept beside it too), no external resource and no JavaScript. Contents: the
    environment; key findings (per pattern the fastest and slowest mechanism at the largest
    length and the crossover lengths vs sdpa_dense and sdpa_fast; peers that beat attnlab;
    the largest error; failures; the best quality variant per task); per (dtype, device) a
    summary at the largest length, per-pattern time tables (mechanism × L with the ratios to
    sdpa_dense and sdpa_fast; fwd+bwd, forward in a folded section), memory (folded) and error
    tables; the implementations/peers table (status and reason); the quality table; the
    plots. Without matplotlib the report is written without plots and says so; an empty
    record list gives a report saying so."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = _parse(records)
    sections = _sections(data)
    xo = _crossovers_by_baseline(sections)
    qrows = _aggregate_quality(data.qual)
    e = html.escape
    multi = len(sections) > 1

    plot_paths: list[tuple[Path, str]] = []
    plot_note = None
    if data.eff or data.qual:
        from .. import plots

        if not plots.available():
            plot_note = (
                "matplotlib is not installed: this report has no plots "
                "(pip install matplotlib, then write the report again)"
            )
        else:
            plot_paths, failures = plots.write_plots(data, out_dir)
            data.notes.extend(failures)

    body: list[str] = []
    toc: list[tuple[str, str]] = []

    def section(anchor: str, heading: str) -> None:
        toc.append((anchor, heading))
        body.append(f'<h2 id="{anchor}">{e(heading)}</h2>')

    tables = [(sec, _findings_table(sec, xo)) for sec in sections]
    bullets = _findings(data, sections, qrows)
    if any(t for _, t in tables) or bullets:
        section("findings", "Key findings")
        for sec, t in tables:
            if t:
                body.append((f"<h3>{e(sec.label)}</h3>" if multi else "") + t)
        if any(t and FAST in _baselines(sec) for sec, t in tables):
            body.append(f'<p class="muted">{_BASELINES_LINE}</p>')
        if bullets:
            body.append(
                '<ul class="findings">' + "".join(f"<li>{b}</li>" for b in bullets) + "</ul>"
            )
    notes = list(data.notes) + ([plot_note] if plot_note else [])
    if notes:
        body.append('<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")

    for k, sec in enumerate(sections):
        section(
            f"eff{k}",
            f"Efficiency: {sec.dtype} on {sec.device}"
            + (f" ({sec.shape_label})" if sec.shape_label else ""),
        )
        body += _efficiency_html(sec, xo)

    peers = _peers_html(data)
    if peers:
        section("peers", "Implementations and peers")
        body.append(
            '<p class="muted">Records per implementation and status. vs attnlab: the peer\'s time '
            "over attnlab's for the same mechanism, pattern and length.</p>" + peers
        )
    qt = _quality_html(qrows)
    if qt:
        section("quality", "Quality")
        body.append(
            '<p class="muted">Mean ± sample standard deviation over seeds (n: seeds with a '
            "result); the best of each task in bold; ↑ higher is better, ↓ lower.</p>" + qt
        )
    if plot_paths or plot_note:
        section("plots", "Plots")
        body.append(
            "".join(_img(p, cap) for p, cap in plot_paths)
            if plot_paths
            else f"<p>{e(plot_note)}</p>"
        )

    head = [
        f"<h1>{e(title)}</h1>",
        f'<p class="sub">{e(_counts_text(data))} · report written '
        f"{e(datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}</p>",
    ]
    env = _env_summary(data.records)
    if env:
        head.append(
            '<table class="env"><tbody>'
            + "".join(f"<tr>{_td(k)}{_td(v)}</tr>" for k, v in env)
            + "</tbody></table>"
        )
    if not data.records:
        head.append(
            "<p><b>No records.</b> The results folder holds no benchmark results yet: run "
            "<code>attnlab bench</code> first, or check the folder.</p>"
        )
    elif not data.eff and not data.qual:
        head.append("<p><b>No efficiency or quality records</b> among the records read.</p>")
    if len(toc) > 1:
        head.append(
            '<nav class="toc">'
            + " · ".join(f'<a href="#{a}">{e(h)}</a>' for a, h in toc)
            + "</nav>"
        )

    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title>"
        f"<style>{_CSS}</style></head><body><main>\n"
        + "\n".join(head + body)
        + "\n</main></body></html>\n"
    )
    doc = doc.replace("<table", '<div class="tw"><table').replace("</table>", "</table></div>")
    path = out_dir / REPORT_FILE
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(path)
    return path
