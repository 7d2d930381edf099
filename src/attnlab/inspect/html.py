"""A self-contained HTML view: one ``.html`` file with inline CSS, tables, colour-coded
grids and PNG images embedded as base64 ``data:`` URIs; no scripts, no external assets, so
the file can be mailed or archived as is.

    blocks = [table_html(["layer", "head", "entropy"], rows), image_html("grid_entropy.png", "entropy")]
    write_html("report.html", "attnlab inspect", [("Metrics", blocks)])

Every text is escaped (:func:`html.escape`).
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["image_html", "table_html", "grid_html", "write_html"]

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 1.5em auto;
       max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .85em; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: .3em 0; }
figure { margin: .6em 0 1.4em; } figcaption { font-size: .85em; color: #555; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
p.note { color: #555; font-size: .9em; } code { background: #f6f6f6; padding: 0 3px; }
"""


def image_html(image: str | Path | bytes, caption: str) -> str:
    """``<figure>`` with a PNG (a file path or the PNG's bytes) embedded as base64."""
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    if not data.startswith(b"\x89PNG"):
        raise ValueError(f"image={str(image)[:60]!r} is not a PNG (embedded images must be PNG)")
    b64 = base64.b64encode(data).decode("ascii")
    cap = html.escape(caption)
    return f'<figure><img alt="{cap}" src="data:image/png;base64,{b64}"><figcaption>{cap}</figcaption></figure>'


def _cell(x: object, fmt: str) -> str:
    if isinstance(x, float):
        return "" if math.isnan(x) else format(x, fmt)
    return html.escape(str(x))


def table_html(headers: Sequence[str], rows: Sequence[Sequence[object]], *, caption: str | None = None,
               fmt: str = ".4g") -> str:
    """A ``<table>``: floats formatted with ``fmt`` (NaN blank), other values as text; the
    first column and columns of text are left-aligned."""
    width = len(headers)
    for i, r in enumerate(rows):
        if len(r) != width:
            raise ValueError(f"row {i} has {len(r)} cells, expected {width} (one per header)")
    text_cols = {j for j in range(width) if any(isinstance(r[j], str) for r in rows)} | {0}
    cls = lambda j: ' class="l"' if j in text_cols else ""
    head = "".join(f"<th{cls(j)}>{html.escape(str(h))}</th>" for j, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{cls(j)}>{_cell(x, fmt)}</td>" for j, x in enumerate(r)) + "</tr>"
                   for r in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _colour(t: float) -> str:
    """A white-to-blue ramp for ``t`` in [0, 1]."""
    t = min(1.0, max(0.0, t))
    r, g, b = (int(round(255 + (c - 255) * t)) for c in (31, 78, 156))
    return f"#{r:02x}{g:02x}{b:02x}"


def grid_html(values: torch.Tensor, *, caption: str, row_labels: Sequence[str] | None = None,
              col_labels: Sequence[str] | None = None, fmt: str = ".2f", corner: str = "layer \\ head") -> str:
    """A colour-coded ``<table>`` of ``values (R, C)`` (e.g. a metric over layers x heads):
    each cell's background goes from white (the minimum) to blue (the maximum); readable
    without images."""
    if not isinstance(values, torch.Tensor) or values.ndim != 2:
        raise ValueError(f"values: expected a (rows, cols) tensor, got {type(values).__name__}")
    v = values.detach().to("cpu", torch.float64)
    R, C = v.shape
    rl = list(row_labels) if row_labels is not None else [str(i) for i in range(R)]
    cl = list(col_labels) if col_labels is not None else [str(j) for j in range(C)]
    if len(rl) != R or len(cl) != C:
        raise ValueError(f"labels: got {len(rl)} row and {len(cl)} column labels for a {R} x {C} grid")
    finite = v[torch.isfinite(v)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    head = f'<th class="l">{html.escape(corner)}</th>' + "".join(f"<th>{html.escape(c)}</th>" for c in cl)
    rows = []
    for r in range(R):
        cells = []
        for c in range(C):
            x = float(v[r, c])
            if not math.isfinite(x):
                cells.append("<td></td>")
                continue
            t = (x - lo) / span
            fg = "#fff" if t > 0.6 else "#222"
            cells.append(f'<td style="background:{_colour(t)};color:{fg}">{format(x, fmt)}</td>')
        rows.append(f'<tr><th class="l">{html.escape(rl[r])}</th>{"".join(cells)}</tr>')
    return (f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def write_html(path: str | Path, title: str, sections: Sequence[tuple[str, Sequence[str]]], *,
               intro: Sequence[str] = ()) -> Path:
    """Write the page: ``title``, the paragraphs ``intro`` (plain text, escaped), then each
    ``(heading, blocks)`` section, where ``blocks`` are HTML fragments from
    :func:`table_html`, :func:`grid_html` and :func:`image_html`."""
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f'<p class="note">{html.escape(p)}</p>' for p in intro]
    for heading, blocks in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.extend(blocks)
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
