"""PNG plots of attention maps and per-head metrics (used by :mod:`attnlab.inspect.report`).

matplotlib is imported inside the functions, never at module level, so attnlab imports
without it; :func:`available` says whether it is installed. Figures use the object-oriented
API (``matplotlib.figure.Figure`` on the Agg canvas): pyplot's global state is never
touched and nothing is shown. Every function writes one PNG and returns its path.

- :func:`plot_heads`: one heatmap per head of a map ``(H, L, S)``, tokens on both axes;
- :func:`plot_grid`: an annotated heatmap of any matrix, e.g. a metric over (layer, head),
  a layer-by-layer similarity or a rollout (labels on both axes);
- :func:`plot_bars`: labelled bars, e.g. the attention each token receives (sinks) or the
  importance of the heads.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["available", "plot_heads", "plot_grid", "plot_bars"]

DPI = 100


def available() -> bool:
    """Whether matplotlib is installed (the plots need it)."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["matplotlib"] is None
        return False


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"{e}; the inspection plots need matplotlib (pip install matplotlib)") from e
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def _matrix(name: str, x: object, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != ndim or not (x.is_floating_point() or x.dtype == torch.bool):
        got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: got {got}, expected a floating tensor of rank {ndim}")
    return x.detach().to("cpu", torch.float64)


def _labels(name: str, labels: Sequence[str] | None, n: int) -> list[str] | None:
    if labels is None:
        return None
    labels = [str(t) for t in labels]
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} labels, expected {n}")
    return labels


def plot_heads(probs: torch.Tensor, path: str | Path, *, tokens: Sequence[str] | None = None,
               key_tokens: Sequence[str] | None = None, head_labels: Sequence[str] | None = None,
               title: str | None = None, cols: int = 4) -> Path:
    """Heatmaps of ``probs (H, L, S)``, one panel per head (rows: queries, columns: keys),
    with ``tokens`` (``L`` labels) and ``key_tokens`` (``S`` labels, default ``tokens`` when
    ``L == S``) on the axes, panels titled by ``head_labels`` (default ``head 0..``)."""
    p = _matrix("probs", probs, 3)
    H, L, S = p.shape
    tokens = _labels("tokens", tokens, L)
    key_tokens = _labels("key_tokens", key_tokens if key_tokens is not None else (tokens if L == S else None), S)
    head_labels = _labels("head_labels", head_labels, H) or [f"head {h}" for h in range(H)]
    cols = max(1, min(cols, H))
    rows = math.ceil(H / cols)
    side = min(6.0, max(2.4, 0.22 * max(L, S) + 1.2))
    fig = _figure(cols * side, rows * side + (0.4 if title else 0))
    axes = fig.subplots(rows, cols, squeeze=False)
    small = max(4, min(8, 160 // max(L, S, 1)))
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= H:
            ax.set_axis_off()
            continue
        im = ax.imshow(p[h].numpy(), cmap="viridis", vmin=0.0, vmax=max(1e-12, float(p[h].max())),
                       aspect="auto", interpolation="nearest")
        ax.set_title(head_labels[h], fontsize=9)
        if key_tokens is not None:
            ax.set_xticks(range(S))
            ax.set_xticklabels(key_tokens, rotation=90, fontsize=small)
        if tokens is not None:
            ax.set_yticks(range(L))
            ax.set_yticklabels(tokens, fontsize=small)
        fig.colorbar(im, ax=ax, shrink=0.7)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_grid(values: torch.Tensor, path: str | Path, *, title: str, row_labels: Sequence[str] | None = None,
              col_labels: Sequence[str] | None = None, xlabel: str = "head", ylabel: str = "layer",
              fmt: str = ".2f", cmap: str = "viridis", annotate: bool | None = None) -> Path:
    """An annotated heatmap of ``values (R, C)`` (NaN cells blank), e.g. a per-head metric over
    ``(layers, heads)``; ``annotate`` (default: when ``R * C <= 400``) prints each value with
    ``fmt``."""
    v = _matrix("values", values, 2)
    R, C = v.shape
    row_labels = _labels("row_labels", row_labels, R) or [str(i) for i in range(R)]
    col_labels = _labels("col_labels", col_labels, C) or [str(j) for j in range(C)]
    annotate = R * C <= 400 if annotate is None else annotate
    fig = _figure(min(16.0, max(3.5, 0.55 * C + 2.0)), min(14.0, max(2.5, 0.42 * R + 1.3)))
    ax = fig.subplots()
    finite = v[torch.isfinite(v)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    im = ax.imshow(v.numpy(), cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1e-12, aspect="auto",
                   interpolation="nearest")
    ax.set_xticks(range(C))
    ax.set_xticklabels(col_labels, rotation=90 if max(map(len, col_labels)) > 3 else 0, fontsize=8)
    ax.set_yticks(range(R))
    ax.set_yticklabels(row_labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if annotate:
        mid = (lo + hi) / 2
        for r in range(R):
            for c in range(C):
                x = float(v[r, c])
                if math.isfinite(x):
                    ax.text(c, r, format(x, fmt), ha="center", va="center", fontsize=7,
                            color="black" if x > mid else "white")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)


def plot_bars(values: torch.Tensor | Sequence[float], labels: Sequence[str], path: str | Path, *, title: str,
              ylabel: str, highlight: Sequence[int] = ()) -> Path:
    """Vertical bars of ``values (n,)`` labelled ``labels``; bars at ``highlight`` indices are
    drawn in a contrasting colour (e.g. detected sinks)."""
    v = _matrix("values", torch.as_tensor(values, dtype=torch.float64), 1)
    labels = _labels("labels", labels, v.shape[0])
    n = v.shape[0]
    fig = _figure(min(16.0, max(4.0, 0.32 * n + 1.5)), 3.6)
    ax = fig.subplots()
    colours = ["#d62728" if i in set(highlight) else "#1f4e9c" for i in range(n)]
    ax.bar(range(n), v.numpy(), color=colours)
    ax.set_xticks(range(n))
    ax.set_xticklabels(labels, rotation=90, fontsize=max(5, min(9, 300 // max(n, 1))))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
