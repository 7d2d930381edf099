"""The attnlab command."""

import json

import pytest

import attnlab as al
from attnlab import cli


def test_list_prints_every_mechanism(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for m in al.catalog():
        assert m.name in out
    assert f"{len(al.catalog())} mechanisms" in out


def test_list_json_and_family(capsys):
    assert cli.main(["list", "--json", "--family", "core"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == {m.name for m in al.catalog("core")}
    assert all(set(r) >= {"name", "family", "paper", "exact", "backends"} for r in rows)


def test_bench_passes_options_to_the_suite(monkeypatch, tmp_path, capsys):
    from attnlab.bench import suite

    seen = {}

    def fake_run(opts):
        seen["opts"] = opts
        return suite.BenchOutcome([], 0, tmp_path)

    monkeypatch.setattr(suite, "run_bench", fake_run)
    monkeypatch.setattr("attnlab.bench.report.summary_table", lambda records: "TABLE")
    argv = ["bench", "--suite", "efficiency", "--mechanisms", "full,causal", "--lengths", "64,128",
            "--peers", "", "--repeats", "5", "--out", str(tmp_path), "--resume", "--full"]
    assert cli.main(argv) == 0
    o = seen["opts"]
    assert (o.suite, o.preset, o.repeats, o.resume) == ("efficiency", "full", 5, True)
    assert o.mechanisms == ["full", "causal"] and o.lengths == [64, 128] and o.peers == []
    assert "TABLE" in capsys.readouterr().out


def test_bench_reports_bad_options_as_errors(capsys, tmp_path):
    assert cli.main(["bench", "--mechanisms", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown mechanism" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--lengths", "a,b"])


def test_unknown_command_exits():
    with pytest.raises(SystemExit):
        cli.main(["nope"])
