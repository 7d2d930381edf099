"""PNG plots of ``attnlab bench`` results (used by :func:`attnlab.bench.report.write_report`).

matplotlib is imported inside the functions, never at module level, so that attnlab imports
without it; :func:`available` says whether it is installed. Figures are drawn with the
object-oriented API on an Agg canvas (``matplotlib.figure.Figure``): pyplot's global state
and backend are never touched and nothing is shown.

Every function takes the benchmark records (a list of record dicts, see
:mod:`attnlab.bench.report.records`) and an output folder, writes its PNGs there and returns their
paths; a plot without data is skipped. With several (dtype, device) combinations among the
efficiency records, every efficiency plot is drawn once per combination (file names end in
``_<dtype>_<device>``).

- :func:`time_vs_length`: per CAB pattern, a log–log overview of every attnlab mechanism
  (solid), the peers (dashed, ``mechanism · peer``) and the two baselines, each the median
  over the mechanisms' runs: sdpa_dense (thick grey: SDPA with the pattern as a dense mask)
  and sdpa_fast (thin black dashed: SDPA without the pattern); and per pattern small
  multiples, one panel per mechanism with attnlab, its baselines and its peers (fwd+bwd, and
  forward when measured);
- :func:`memory_vs_length`: the same overview for peak memory;
- :func:`errors`: horizontal log-scale bars of the largest ``err_out``/``err_grad`` per
  mechanism, with the dtype's machine epsilon for scale;
- :func:`quality`: per task, the mean metric per variant with ± sd error bars and the
  individual seeds as dots.
"""

from __future__ import annotations

import importlib.util
import math
import re
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .report.formatting import _short_len, fmt_sig
from .report.quality_table import QualityRow, _aggregate_quality, _best_quality
from .report.records import ATTNLAB, BASELINES, DENSE, FAST, _Data, _Eff, _parse, _Section
from .report.records import _sections, _unique_order

DPI = 110
# distinct colours for up to ~20 mechanisms (no grey: grey is sdpa_dense); markers cycle with
# another period, so colour + marker pairs stay unique beyond that
_COLORS = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#003f5c",
    "#e6ab02",
    "#1b9e77",
    "#7570b3",
    "#b10026",
    "#66a61e",
    "#a6761d",
    "#f781bf",
    "#4d4d9f",
    "#00a087",
    "#ff6f61",
]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]
_PEER_COLORS = [
    "#d95f02",
    "#7570b3",
    "#e7298a",
    "#66a61e",
    "#e6ab02",
    "#a6761d",
    "#1b9e77",
    "#17becf",
]
_PEER_MARKERS = ["s", "^", "D", "v", "P", "X", "*", "h"]
_DENSE_STYLE = dict(color="#8c8c8c", lw=4.5, alpha=0.55, solid_capstyle="round", zorder=1)
_FAST_STYLE = dict(color="black", lw=1.2, ls=(0, (5, 3)), zorder=2)
_ATT_COLOR = "#1f4e9c"
_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}
_METRIC_NAME = {"fwdbwd": "forward + backward", "fwd": "forward"}
_OVERVIEW_LABEL = {
    DENSE: "sdpa_dense (median over mechanisms)",
    FAST: "sdpa_fast, without the pattern (median)",
}
_PANEL_LABEL = {DENSE: "sdpa_dense (dense mask)", FAST: "sdpa_fast (without the pattern)"}


def available() -> bool:
    """Whether matplotlib is installed (the plots need it)."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["matplotlib"] is None
        return False


# --------------------------------------------------------------------------- helpers


def _data(records: Any) -> _Data:
    return records if isinstance(records, _Data) else _parse(records)


def _figure(width: float, height: float, constrained: bool = True):
    from matplotlib.figure import Figure

    if not constrained:
        return Figure(figsize=(width, height))
    fig = Figure(figsize=(width, height), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.06, w_pad=0.06, hspace=0.04, wspace=0.03)
    return fig


def _fixed_grid(
    fig,
    nrows: int,
    ncols: int,
    *,
    left: float,
    right: float,
    top: float,
    bottom: float,
    wspace: float,
    hspace: float,
) -> dict[str, float]:
    """``gridspec_kw`` placing an nrows × ncols grid with margins and gaps in inches (a fixed
    layout: constrained layout costs several draws per figure, slow with many panels)."""
    W, H = fig.get_size_inches()
    aw = (W - left - right - (ncols - 1) * wspace) / ncols
    ah = (H - top - bottom - (nrows - 1) * hspace) / nrows
    return dict(
        left=left / W,
        right=1 - right / W,
        top=1 - top / H,
        bottom=bottom / H,
        wspace=wspace / aw,
        hspace=hspace / ah,
    )


def _save(fig, path: Path, dpi: int) -> Path:
    fig.savefig(path, dpi=dpi, facecolor="white")
    return path


def _slug(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.+-]+", "-", p).strip("-") for p in parts if p)


def _suffix(sec: _Section, multi: bool) -> str:
    return "_" + _slug(sec.dtype, sec.device) if multi else ""


def _length_axis(ax, lengths: Sequence[int]) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ticks = sorted(set(lengths))
    if len(ticks) > 8:  # thin the labels, keep the ends
        step = math.ceil(len(ticks) / 8)
        ticks = ticks[::step] + ([ticks[-1]] if (len(ticks) - 1) % step else [])
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _short_len(int(x))))
    ax.xaxis.set_minor_locator(NullLocator())
    if ticks:
        lo, hi = min(lengths), max(lengths)
        ax.set_xlim(lo / 1.25, hi * 1.25) if lo != hi else ax.set_xlim(lo / 2, hi * 2)


def _num_label(v: float) -> str:
    if v <= 0:
        return ""
    if 1e-3 <= v < 1e4:
        return f"{v:.4g}"
    m, e = f"{v:.0e}".split("e")
    return f"{m}e{int(e)}"


def _log_y(ax) -> None:
    """Log y axis with plain-number labels (``0.5``, ``20``, ``1000``, ``1e4``)."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=8))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0), numticks=8))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _num_label(v)))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _label_minor_if_narrow(ax) -> None:
    """Label the 2 and 5 minor ticks too when the y axis spans less than two decades."""
    from matplotlib.ticker import FuncFormatter

    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo < 100:
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: _num_label(v)))


def _grid(ax) -> None:
    ax.grid(True, which="major", color="#dddddd", lw=0.7)
    ax.grid(True, which="minor", color="#eeeeee", lw=0.5)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _mech_style(i: int) -> dict[str, Any]:
    return dict(color=_COLORS[i % len(_COLORS)], marker=_MARKERS[i % len(_MARKERS)])


def _peer_style(peers: Sequence[str], impl: str) -> dict[str, Any]:
    k = peers.index(impl) if impl in peers else 0
    return dict(
        color=_PEER_COLORS[k % len(_PEER_COLORS)], marker=_PEER_MARKERS[k % len(_PEER_MARKERS)]
    )


def _points(
    rows: Mapping[int, _Eff], value: Callable[[_Eff], float | None]
) -> tuple[list, list]:
    xs, ys = [], []
    for L, r in sorted(rows.items()):
        v = value(r)
        if v is not None and v > 0:
            xs.append(L)
            ys.append(v)
    return xs, ys


def _baseline_median(sec: _Section, pattern: str, value, impl: str) -> tuple[list, list]:
    """Per length, the median over the mechanisms of a baseline's ``value``."""
    by_L: dict[int, list[float]] = {}
    for mech in sec.mechanisms:
        for L, r in sec.get(mech, pattern, impl).items():
            v = value(r)
            if v is not None and v > 0:
                by_L.setdefault(L, []).append(v)
    xs = sorted(by_L)
    return xs, [statistics.median(by_L[L]) for L in xs]


def _legend_outside(fig, handles: dict[str, Any], title: str | None = None) -> None:
    if not handles:
        return
    ncol = 1 if len(handles) <= 26 else 2
    fig.legend(
        list(handles.values()),
        list(handles.keys()),
        loc="outside right upper",
        fontsize=8.5,
        ncol=ncol,
        frameon=False,
        title=title,
        title_fontsize=9,
        handlelength=2.6,
    )


def _collect(ax, handles: dict[str, Any]) -> None:
    for h, lab in zip(*ax.get_legend_handles_labels()):
        handles.setdefault(lab, h)


def _patterns_with(sec: _Section, value) -> list[str]:
    return [
        p
        for p in sec.patterns
        if any(
            value(r) is not None
            for m in sec.mechanisms
            for rows in sec.series.get((m, p), {}).values()
            for r in rows.values()
        )
    ]


# --------------------------------------------------------------------------- overview plots


def _overview(
    sec: _Section, value, ylabel: str, title: str, path: Path, dpi: int
) -> Path | None:
    """2 × 2 (or fewer) panels, one per pattern: every attnlab mechanism, the peers, the
    baselines."""
    patterns = _patterns_with(sec, value)
    if not patterns:
        return None
    mechs = sec.mechanisms
    peers = [i for i in sec.impls if i not in (ATTNLAB, *BASELINES)]
    ncols = 1 if len(patterns) == 1 else 2
    nrows = math.ceil(len(patterns) / ncols)
    fig = _figure(5.0 * ncols + 3.2, 3.9 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    handles: dict[str, Any] = {}
    lengths = sec.lengths()
    for k, ax in enumerate(axes.flat):
        if k >= len(patterns):
            ax.set_visible(False)
            continue
        pattern = patterns[k]
        for impl, style in ((DENSE, _DENSE_STYLE), (FAST, _FAST_STYLE)):
            xs, ys = _baseline_median(sec, pattern, value, impl)
            if xs:
                ax.plot(xs, ys, label=_OVERVIEW_LABEL[impl], **style)
        for i, mech in enumerate(mechs):
            st = _mech_style(i)
            xs, ys = _points(sec.get(mech, pattern, ATTNLAB), value)
            if xs:
                ax.plot(xs, ys, label=mech, lw=1.6, ms=4, **st, zorder=3)
            for impl in peers:
                xs, ys = _points(sec.get(mech, pattern, impl), value)
                if xs:
                    ps = _peer_style(peers, impl)
                    ax.plot(
                        xs,
                        ys,
                        label=f"{mech} · {impl}",
                        ls=(0, (3, 2)),
                        lw=1.1,
                        color=st["color"],
                        marker=ps["marker"],
                        ms=4.5,
                        mfc="white",
                        mew=1.0,
                        alpha=0.8,
                        zorder=2,
                    )
        ax.set_title(pattern, fontsize=11)
        _log_y(ax)
        _length_axis(ax, lengths)
        _grid(ax)
        _collect(ax, handles)
        if k % ncols == 0:
            ax.set_ylabel(ylabel)
        if k // ncols == nrows - 1 or k + ncols >= len(patterns):
            ax.set_xlabel("sequence length L (queries)")
            ax.tick_params(labelbottom=True)
    for ax in axes.flat:
        _label_minor_if_narrow(ax)
    fig.suptitle(title, fontsize=12, x=0.02, ha="left")
    order = [_OVERVIEW_LABEL[DENSE], _OVERVIEW_LABEL[FAST]] + [
        lab for mech in mechs for lab in [mech] + [f"{mech} · {impl}" for impl in peers]
    ]
    _legend_outside(fig, {lab: handles[lab] for lab in order if lab in handles})
    return _save(fig, path, dpi)


def _small_multiples(
    sec: _Section, pattern: str, metric: str, path: Path, dpi: int
) -> Path | None:
    """One panel per mechanism: attnlab (solid), its sdpa_dense (grey), its sdpa_fast (black
    dashed), its peers (dashed)."""

    def value(r):
        return r.metric(metric)

    mechs = [
        m
        for m in sec.mechanisms
        if any(
            value(r) is not None
            for rows in sec.series.get((m, pattern), {}).values()
            for r in rows.values()
        )
    ]
    if not mechs:
        return None
    peers = [i for i in sec.impls if i not in (ATTNLAB, *BASELINES)]
    ncols = min(5, len(mechs))
    nrows = math.ceil(len(mechs) / ncols)
    ragged = nrows * ncols > len(mechs)  # panels above an empty slot show their x tick labels
    hspace = 0.62 if ragged else 0.36
    width = max(2.75 * ncols + 0.55, 5.2)  # a narrow figure has no room for title and legend
    fig = _figure(width, 1.95 * nrows + hspace * (nrows - 1) + 1.2, constrained=False)
    margins = dict(left=0.62, right=0.12, top=0.48, bottom=0.78, wspace=0.14, hspace=hspace)
    grid = _fixed_grid(fig, nrows, ncols, **margins)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True, gridspec_kw=grid)
    handles: dict[str, Any] = {}
    lengths = sec.lengths(pattern)
    for k, ax in enumerate(axes.flat):
        if k >= len(mechs):
            ax.set_visible(False)
            continue
        mech = mechs[k]
        for impl, style in ((DENSE, _DENSE_STYLE), (FAST, _FAST_STYLE)):
            xs, ys = _points(sec.get(mech, pattern, impl), value)
            if xs:
                ax.plot(xs, ys, label=_PANEL_LABEL[impl], **style)
        for impl in peers:
            xs, ys = _points(sec.get(mech, pattern, impl), value)
            if xs:
                ax.plot(
                    xs,
                    ys,
                    label=impl,
                    ls=(0, (4, 2)),
                    lw=1.3,
                    ms=4.5,
                    mfc="white",
                    mew=1.1,
                    **_peer_style(peers, impl),
                    zorder=2,
                )
        xs, ys = _points(sec.get(mech, pattern, ATTNLAB), value)
        if xs:
            ax.plot(xs, ys, label="attnlab", color=_ATT_COLOR, marker="o", lw=2, ms=3.8, zorder=3)
        failed = [L for L, r in sec.get(mech, pattern, ATTNLAB).items() if not r.ok]
        if failed:
            ax.plot(
                failed,
                [0.5] * len(failed),
                ls="none",
                marker="x",
                color="#b3261e",
                ms=6,
                mew=1.6,
                transform=ax.get_xaxis_transform(),
                label="attnlab failed",
                zorder=4,
                clip_on=False,
            )
        ax.set_title(mech, fontsize=9.5, pad=3)
        _log_y(ax)
        _length_axis(ax, lengths)
        _grid(ax)
        ax.tick_params(labelsize=8)
        _collect(ax, handles)
        if k % ncols == 0:
            ax.set_ylabel("ms", fontsize=9)
        if k + ncols >= len(mechs):
            ax.tick_params(labelbottom=True)
        if k >= (nrows - 1) * ncols:
            ax.set_xlabel("L (queries)", fontsize=9)
    for ax in axes.flat:
        _label_minor_if_narrow(ax)
    order = ["attnlab", _PANEL_LABEL[DENSE], _PANEL_LABEL[FAST]] + peers + ["attnlab failed"]
    ordered = {lab: handles[lab] for lab in order if lab in handles}
    # legend below the panels, in as many rows as the figure's width needs
    W, H = fig.get_size_inches()
    entry = max(0.07 * len(lab) + 0.65 for lab in ordered)
    leg_cols = max(1, min(len(ordered), int((W - 0.2) // entry)))
    extra = 0.22 * (math.ceil(len(ordered) / leg_cols) - 1)
    if extra:
        fig.set_size_inches(W, H + extra)
        margins["bottom"] += extra
        axes[0, 0].get_subplotspec().get_gridspec().update(
            **_fixed_grid(fig, nrows, ncols, **margins)
        )
        for ax in axes.flat:
            ax.set_position(ax.get_subplotspec().get_position(fig))
    name = _METRIC_NAME[metric]
    title = f"{pattern}: {name} time vs length ({sec.dtype}, {sec.device}; log–log, shared axes)"
    if len(title) * 0.085 > fig.get_size_inches()[0]:  # too wide for a narrow figure
        title = f"{pattern}: {name} time (ms) vs length"
    fig.suptitle(title, fontsize=11.5, y=1 - 0.12 / fig.get_size_inches()[1], va="top")
    fig.legend(
        list(ordered.values()),
        list(ordered.keys()),
        loc="lower center",
        ncol=leg_cols,
        fontsize=9.5,
        frameon=False,
        handlelength=2.8,
        bbox_to_anchor=(0.5, 0.0),
    )
    return _save(fig, path, dpi)


def _time_plots(data, out_dir: Path, dpi: int) -> list[tuple[Path, str]]:
    sections = _sections(data)
    multi = len(sections) > 1
    out = []
    for sec in sections:
        sfx = _suffix(sec, multi)
        has_fb = any(
            r.metric("fwdbwd") is not None
            for by in sec.series.values()
            for rows in by.values()
            for r in rows.values()
        )
        main = "fwdbwd" if has_fb else "fwd"
        p = _overview(
            sec,
            lambda r, main=main: r.metric(main),
            "time (ms)",
            f"{_METRIC_NAME[main]} time vs sequence length ({sec.dtype}, {sec.device}; log–log)",
            out_dir / f"time_vs_length{sfx}.png",
            dpi,
        )
        if p:
            out.append(
                (
                    p,
                    f"{_METRIC_NAME[main].capitalize()} time of every mechanism per pattern "
                    f"({sec.label}); {_baselines_caption(sec)}",
                )
            )
        for pattern in sec.patterns:
            for metric in ("fwdbwd", "fwd"):
                p = _small_multiples(
                    sec, pattern, metric, out_dir / f"time_{_slug(pattern)}_{metric}{sfx}.png", dpi
                )
                if p:
                    out.append(
                        (p, f"{pattern}: {_METRIC_NAME[metric]} time per mechanism ({sec.label})")
                    )
    return out


def _baselines_caption(sec: _Section) -> str:
    fast = "; black dashed: sdpa_fast (without the pattern)" if FAST in sec.impls else ""
    return f"dashed: peers; grey: sdpa_dense{fast}"


def _memory_plots(data, out_dir: Path, dpi: int) -> list[tuple[Path, str]]:
    sections = _sections(data)
    multi = len(sections) > 1
    out = []
    for sec in sections:
        p = _overview(
            sec,
            lambda r: r.peak_mib if r.ok else None,
            "peak memory (MiB)",
            f"peak memory of one forward+backward vs sequence length ({sec.dtype}, {sec.device}; "
            "log–log)",
            out_dir / f"memory_vs_length{_suffix(sec, multi)}.png",
            dpi,
        )
        if p:
            caption = f"Peak extra memory per pattern ({sec.label}); {_baselines_caption(sec)}"
            out.append((p, caption))
    return out


def _error_plots(data, out_dir: Path, dpi: int) -> list[tuple[Path, str]]:
    sections = _sections(data)
    multi = len(sections) > 1
    out = []
    for sec in sections:
        names, vals = [], []
        for mech in sec.mechanisms:
            rows = [r for p in sec.patterns for r in sec.get(mech, p, ATTNLAB).values()]
            eo = [r.err_out for r in rows if r.err_out is not None and r.err_out > 0]
            eg = [r.err_grad for r in rows if r.err_grad is not None and r.err_grad > 0]
            if eo or eg:
                names.append(mech)
                vals.append((max(eo) if eo else None, max(eg) if eg else None))
        if not names:
            continue
        n = len(names)
        fig = _figure(9.0, 0.34 * n + 1.6)
        ax = fig.subplots()
        ys = list(range(n))[::-1]
        h = 0.38
        for j, (label, color) in enumerate((("output", "#1f77b4"), ("gradients", "#ff7f0e"))):
            pos = [y + (h / 2 if j == 0 else -h / 2) for y in ys]
            v = [t[j] for t in vals]
            ax.barh(
                [p for p, x in zip(pos, v) if x],
                [x for x in v if x],
                height=h,
                color=color,
                label=label,
            )
        eps = _EPS.get(sec.dtype)
        if eps:
            ax.axvline(eps, color="#444444", ls=":", lw=1.2, label=f"{sec.dtype} machine epsilon")
        ax.set_xscale("log")
        lows = [x for t in vals for x in t if x] + ([eps] if eps else [])
        ax.set_xlim(left=min(lows) / 2.5)
        lo, hi = ax.get_xlim()
        if hi / lo < 100:  # less than two decades: label the 2 and 5 ticks too
            from matplotlib.ticker import FuncFormatter, LogLocator

            ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.0e}"))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}"))
        ax.set_yticks(ys, names, fontsize=9)
        ax.set_ylim(-0.7, n - 0.3)
        ax.set_xlabel(
            "largest relative error vs the float64 reference (over patterns and lengths)"
        )
        _grid(ax)
        ax.grid(False, axis="y")
        fig.suptitle(f"Relative error of attnlab ({sec.dtype}, {sec.device})", fontsize=11.5)
        fig.legend(
            *ax.get_legend_handles_labels(),
            loc="outside lower center",
            ncol=3,
            fontsize=9,
            frameon=False,
        )
        path = _save(fig, out_dir / f"errors{_suffix(sec, multi)}.png", dpi)
        out.append(
            (path, f"Largest relative error of output and gradients per mechanism ({sec.label})")
        )
    return out


def _quality_plots(data, out_dir: Path, dpi: int) -> list[tuple[Path, str]]:
    rows = [q for q in _aggregate_quality(data.qual) if q.mean is not None]
    if not rows:
        return []
    panels = _unique_order((q.task, q.metric) for q in rows)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    most = max(sum(1 for q in rows if (q.task, q.metric) == tm) for tm in panels)
    longest = max(len(_variant_label(q)) for q in rows)
    fig = _figure(min(17.0, ncols * (3.2 + 0.065 * longest)), nrows * (0.32 * most + 1.3) + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    best = _best_quality(rows)
    usual_n = Counter(q.n for q in rows).most_common(1)[0][0]
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.set_visible(False)
            continue
        task, metric = panels[k]
        qs = [q for q in rows if (q.task, q.metric) == (task, metric)]
        ys = list(range(len(qs)))[::-1]
        colors = ["#1f4e9c" if best.get((task, metric)) is q else "#8fb3e0" for q in qs]
        ax.barh(
            ys,
            [q.mean for q in qs],
            xerr=[q.std or 0 for q in qs],
            color=colors,
            height=0.62,
            error_kw=dict(ecolor="#333333", lw=1.1, capsize=3),
        )
        for y, q in zip(ys, qs):
            ax.plot(
                q.values,
                [y] * q.n,
                ls="none",
                marker="o",
                ms=3.2,
                color="#111111",
                alpha=0.55,
                zorder=3,
            )
            ax.annotate(
                f"{fmt_sig(q.mean)}" + (f" (n={q.n})" if q.n != usual_n else ""),
                (0, y),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                ha="left",
                fontsize=7.5,
                color="white" if best.get((task, metric)) is q else "#10243f",
            )
        ax.set_yticks(ys, [_variant_label(q) for q in qs], fontsize=8.5)
        hib = qs[0].higher_is_better
        arrow = "" if hib is None else (" (higher is better)" if hib else " (lower is better)")
        ax.set_xlabel(metric + arrow, fontsize=9)
        if metric == "accuracy" and all(0 <= v <= 1 for q in qs for v in q.values):
            ax.set_xlim(0, 1.0)
        ax.set_title(task, fontsize=10.5)
        ax.grid(True, axis="x", color="#dddddd", lw=0.7)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    fig.suptitle(
        f"Quality: mean over seeds (n={usual_n} unless noted), error bars ± sd, dots: seeds; "
        "dark: best of the task",
        fontsize=11,
    )
    path = _save(fig, out_dir / "quality.png", dpi)
    return [(path, "Quality per task: mean metric per variant, ± sd over seeds")]


def _variant_label(q: QualityRow) -> str:
    return q.variant if not q.extra else f"{q.variant} [{q.extra}]"


# --------------------------------------------------------------------------- public


def time_vs_length(
    records: Iterable[Mapping[str, Any]], out_dir: str | Path, *, dpi: int = DPI
) -> list[Path]:
    """Time vs length PNGs: ``time_vs_length.png`` (all mechanisms, one panel per pattern) and
    ``time_<pattern>_<fwdbwd|fwd>.png`` (one panel per mechanism). Returns the paths written."""
    return [p for p, _ in _time_plots(_data(records), _mkdir(out_dir), dpi)]


def memory_vs_length(
    records: Iterable[Mapping[str, Any]], out_dir: str | Path, *, dpi: int = DPI
) -> list[Path]:
    """``memory_vs_length.png``: peak MiB vs length per pattern (log–log)."""
    return [p for p, _ in _memory_plots(_data(records), _mkdir(out_dir), dpi)]


def errors(
    records: Iterable[Mapping[str, Any]], out_dir: str | Path, *, dpi: int = DPI
) -> list[Path]:
    """``errors.png``: largest err_out / err_grad per mechanism (log scale)."""
    return [p for p, _ in _error_plots(_data(records), _mkdir(out_dir), dpi)]


def quality(
    records: Iterable[Mapping[str, Any]], out_dir: str | Path, *, dpi: int = DPI
) -> list[Path]:
    """``quality.png``: per task, the mean metric per variant with ± sd over seeds."""
    return [p for p, _ in _quality_plots(_data(records), _mkdir(out_dir), dpi)]


def _mkdir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_plots(
    records: Any, out_dir: str | Path, *, dpi: int = DPI
) -> tuple[list[tuple[Path, str]], list[str]]:
    """All plots: ``([(path, caption), ...], [failure message, ...])``. A plot that raises is
    reported in the messages instead of aborting the others (the report stays usable)."""
    data, out = _data(records), _mkdir(out_dir)
    written: list[tuple[Path, str]] = []
    failures = []
    for name, fn in (
        ("time", _time_plots),
        ("memory", _memory_plots),
        ("errors", _error_plots),
        ("quality", _quality_plots),
    ):
        try:
            written += fn(data, out, dpi)
        except Exception as exc:  # noqa: BLE001 - one failing plot must not lose the report
            failures.append(f"{name} plot failed: {type(exc).__name__}: {exc}")
    return written, failures
