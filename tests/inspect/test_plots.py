"""Inspection plots write PNGs (skipped without matplotlib); the HTML view is self-contained."""

from __future__ import annotations

import base64
import re

import pytest
import torch

from attnlab.inspect import html as ihtml
from attnlab.inspect import plots

PNG = b"\x89PNG\r\n\x1a\n"


def _maps(H=3, L=5):
    torch.manual_seed(0)
    return torch.softmax(torch.randn(H, L, L), -1)


def test_plots_write_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    tokens = ["[CLS]", "a", "cat", "sat", "[SEP]"]
    p = plots.plot_heads(_maps(), tmp_path / "heads.png", tokens=tokens, title="layer 0")
    g = plots.plot_grid(torch.rand(6, 12), tmp_path / "sub" / "grid.png", title="entropy")
    nan_grid = torch.rand(2, 3)
    nan_grid[0, 1] = float("nan")
    g2 = plots.plot_grid(nan_grid, tmp_path / "grid_nan.png", title="with a missing cell")
    b = plots.plot_bars(torch.tensor([0.5, 0.1, 0.2, 0.1, 0.1]), tokens, tmp_path / "bars.png", title="sinks",
                        ylabel="attention", highlight=[0])
    for path in (p, g, g2, b):
        assert path.exists() and path.read_bytes().startswith(PNG) and path.stat().st_size > 2000


def test_plot_argument_errors(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="tokens has 2 labels, expected 5"):
        plots.plot_heads(_maps(), tmp_path / "x.png", tokens=["a", "b"])
    with pytest.raises(ValueError, match="rank 3"):
        plots.plot_heads(torch.rand(4, 4), tmp_path / "x.png")


def test_available_matches_the_import():
    try:
        import matplotlib  # noqa: F401
        found = True
    except ImportError:
        found = False
    assert plots.available() is found


def test_html_is_self_contained(tmp_path):
    png = PNG + b"fake image body"
    blocks = [ihtml.table_html(["layer", "head", "entropy", "token"], [[0, 1, 0.25, "<s>"], [1, 0, float("nan"), "x"]],
                               caption="metrics"),
              ihtml.grid_html(torch.tensor([[0.0, 1.0], [0.5, float("nan")]]), caption="grid"),
              ihtml.image_html(png, "a <plot>")]
    path = ihtml.write_html(tmp_path / "r.html", "title & more", [("Section", blocks)], intro=["text: a < b"])
    text = path.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"<(script|link|iframe)\b", text)
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert base64.b64decode(srcs[0].split(",", 1)[1]) == png
    assert "&lt;s&gt;" in text and "title &amp; more" in text and "a &lt; b" in text  # escaped
    assert "background:#ffffff" in text and "background:#1f4e9c" in text  # grid min white, max blue
    with pytest.raises(ValueError, match="not a PNG"):
        ihtml.image_html(b"GIF89a", "x")
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        ihtml.table_html(["a", "b"], [[1]])
