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


def test_bench_passes_options_to_the_kernel_benchmark(monkeypatch):
    seen = {}
    monkeypatch.setattr("attnlab.bench.kernels.main", lambda argv: seen.setdefault("argv", argv) and 0)
    cli.main(["bench", "--repeats", "5"])
    assert seen["argv"] == ["--repeats", "5", "--device", "cpu", "--quick"]


def test_unknown_command_exits():
    with pytest.raises(SystemExit):
        cli.main(["nope"])
