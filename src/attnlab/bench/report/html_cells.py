"""HTML table cells of report.html (text escaped unless ``raw``)."""

from __future__ import annotations

import html

from .formatting import fmt_ratio, fmt_sig
from .records import HIGH_SPREAD, _Eff


def _td(text: str, cls: str = "", title: str | None = None, raw: bool = False) -> str:
    attrs = f' class="{cls}"' if cls else ""
    if title:
        attrs += f' title="{html.escape(title)}"'
    return f"<td{attrs}>{text if raw else html.escape(text)}</td>"


def _th(text: str, cls: str = "") -> str:
    return f"<th{f' class={chr(34)}{cls}{chr(34)}' if cls else ''}>{html.escape(text)}</th>"


def _status_span(r: _Eff) -> str:
    cls = "st err" if r.status == "error" else "st ni" if r.status == "not installed" else "st"
    return f'<span class="{cls}">{html.escape(r.status)}</span>'


def _ratio_span(ratio: float, suffix: str = "", block: bool = True) -> str:
    """A time or memory ratio, green below 1, red from 1 (``block``: on its own line)."""
    cls = ("r " if block else "") + ("fast" if ratio < 1 else "slow")
    return f'<span class="{cls}">{html.escape(fmt_ratio(ratio) + suffix)}</span>'


def _time_cell(
    r: _Eff | None,
    metric: str,
    dense: _Eff | None,
    show_ratio: bool = True,
    fast: _Eff | None = None,
) -> str:
    """A time in ms; below it (``show_ratio``) the ratio to ``dense``'s time and, marked
    ``flash``, to ``fast``'s (sdpa_fast)."""
    if r is None:
        return _td("", "n")
    t = r.metric(metric)
    if t is None:
        if r.ok:  # e.g. a forward-only peer in a fwd+bwd table
            return _td("—", "n muted", r.reason or "not measured")
        return _td(_status_span(r), "n", r.reason or r.status, raw=True)
    text = html.escape(fmt_sig(t))
    spread = r.spread(metric)
    if spread is not None and spread > HIGH_SPREAD:
        text += f'<span class="flag" title="timing spread {spread:.0%} of the median">~</span>'
    d = dense.metric(metric) if dense is not None else None
    if show_ratio and d:
        ratio = t / d
        text += _ratio_span(ratio)
    f = fast.metric(metric) if fast is not None else None
    if show_ratio and f:
        text += _ratio_span(t / f, " flash")
    return _td(text, "n", raw=True)
