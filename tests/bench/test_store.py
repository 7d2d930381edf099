"""The append-only results store: append, read back, crash tolerance, resume, locking."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from attnlab.bench.store import (
    ResultStore, StoreLockedError, StoreWarning, environment, git_commit,
)

ENV = {"torch": "x", "note": "fixed env, so the tests need no git subprocess"}
CHILD_APPEND = (
    "import sys\n"
    "from attnlab.bench.store import ResultStore, StoreLockedError\n"
    "try:\n"
    "    with ResultStore(sys.argv[1]).open_for_write(env={}) as s:\n"
    "        s.append('from-child', {}, {'ok': True})\n"
    "except StoreLockedError as e:\n"
    "    print(e); sys.exit(3)\n"
)


def _lines(store: ResultStore) -> list[bytes]:
    return store.path.read_bytes().split(b"\n")


def test_append_then_read_back(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "out")
    assert store.records() == [] and not (tmp_path / "out").exists()  # reading creates nothing
    with store.open_for_write(env=ENV) as s:
        assert s.is_open
        first = s.append("a", {"L": 64}, {"median": 0.5})
        s.append("b", {"L": 128}, {"median": 1.5}, env={"other": 1})
    assert not store.is_open
    recs = store.records()
    assert [r["key"] for r in recs] == ["a", "b"]
    assert recs[0] == first
    assert recs[0]["config"] == {"L": 64} and recs[0]["result"] == {"median": 0.5}
    assert recs[0]["env"] == ENV and recs[1]["env"] == {"other": 1}
    assert set(recs[0]) == {"key", "config", "result", "env", "time"}
    assert datetime.fromisoformat(recs[0]["time"]).tzinfo is not None
    lines = _lines(store)
    assert lines[-1] == b"" and len(lines) == 3  # two complete lines, newline-terminated


def test_partial_last_line_is_skipped_reported_and_repaired(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    with store.open_for_write(env=ENV) as s:
        s.append("a", {}, {"t": 1})
        s.append("b", {}, {"t": 2})
    fragment = b'{"key": "c", "config": {}, "res'
    with open(store.path, "ab") as fh:  # a writer killed in the middle of its write
        fh.write(fragment)
    res = store.read()
    assert [r["key"] for r in res.records] == ["a", "b"]
    assert res.partial_tail and res.skipped == 1
    with pytest.warns(StoreWarning, match="skipped 1 line"):
        assert store.done_keys() == {"a", "b"}
    with pytest.warns(StoreWarning, match="partial last line"):
        store.open(env=ENV)
    try:
        assert store.repaired_bytes == len(fragment)
        store.append("c", {}, {"t": 3})
    finally:
        store.close()
    lines = _lines(store)
    assert lines[-1] == b""
    assert [json.loads(line)["key"] for line in lines[:-1]] == ["a", "b", "c"]
    res = store.read()
    assert res.skipped == 0 and not res.partial_tail


def test_complete_json_without_newline_is_not_committed(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    with store.open_for_write(env=ENV) as s:
        s.append("a", {}, {})
    with open(store.path, "ab") as fh:
        fh.write(json.dumps({"key": "b", "config": {}, "result": {}}).encode())
    assert store.read().skipped == 1
    with pytest.warns(StoreWarning):
        store.open(env=ENV).close()
    assert [r["key"] for r in store.read().records] == ["a"]


def test_corrupt_middle_line_is_skipped(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.folder.mkdir(exist_ok=True)
    store.path.write_bytes(b'{"key": "a"}\nnot json\n[1, 2]\n{"key": "b"}\n')
    res = store.read()
    assert [r["key"] for r in res.records] == ["a", "b"] and res.skipped == 2 and not res.partial_tail


def test_records_survive_a_killed_writer(tmp_path: Path) -> None:
    code = (
        "import sys\nfrom attnlab.bench.store import ResultStore\n"
        "s = ResultStore(sys.argv[1]).open(env={})\ni = 0\n"
        "while True:\n"
        "    s.append(f'k{i}', {'i': i}, {'pad': 'x' * 500}); print(i, flush=True); i += 1\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(20):
            assert proc.stdout is not None and proc.stdout.readline().strip() != ""
    finally:
        proc.kill()  # SIGKILL: no cleanup, no close, lock released only by the OS
        proc.wait(timeout=30)
    store = ResultStore(tmp_path)
    keys = [r["key"] for r in store.read().records]
    assert len(keys) >= 20 and keys == [f"k{i}" for i in range(len(keys))]
    with store.open_for_write(env=ENV) as s:  # the dead writer's lock is gone
        s.append("after", {}, {})
    assert all(json.loads(line) for line in _lines(store)[:-1])


def test_resume_with_done_keys(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    assert store.done_keys() == set()
    with store.open_for_write(env=ENV) as s:
        for key in ("x", "y", "x"):  # a re-measurement appends again
            s.append(key, {}, {"n": len(s.records())})
    assert store.done_keys() == {"x", "y"}
    assert store.latest()["x"]["result"] == {"n": 2}
    plan = ["x", "y", "z"]
    assert [k for k in plan if k not in store.done_keys()] == ["z"]


def test_second_writer_refused_in_process(tmp_path: Path) -> None:
    first, second = ResultStore(tmp_path), ResultStore(tmp_path)
    with first.open_for_write(env=ENV) as s:
        s.append("a", {}, {})
        with pytest.raises(StoreLockedError) as info:
            second.open(env=ENV)
        assert isinstance(info.value, RuntimeError)
        assert str(tmp_path) in str(info.value) and "another attnlab bench" in str(info.value)
        assert not second.is_open
        assert [r["key"] for r in second.records()] == ["a"]  # readers need no lock
        with pytest.raises(RuntimeError, match="already open"):
            first.open(env=ENV)
    with second.open_for_write(env=ENV) as s:
        s.append("b", {}, {})
    assert first.done_keys() == {"a", "b"}


def test_second_writer_refused_across_processes(tmp_path: Path) -> None:
    with ResultStore(tmp_path).open_for_write(env=ENV):
        res = subprocess.run([sys.executable, "-c", CHILD_APPEND, str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 3, res.stderr
        assert str(tmp_path) in res.stdout and "another attnlab bench" in res.stdout
    res = subprocess.run([sys.executable, "-c", CHILD_APPEND, str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert ResultStore(tmp_path).done_keys() == {"from-child"}


def test_append_validation_writes_nothing(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    with pytest.raises(RuntimeError, match="not open for writing"):
        store.append("a", {}, {})
    with pytest.raises(TypeError, match="folder"):
        ResultStore(42)  # type: ignore[arg-type]
    with store.open_for_write(env=ENV) as s:
        with pytest.raises(ValueError, match="key='nan'"):
            s.append("nan", {}, {"error": float("nan")})
        with pytest.raises(TypeError, match="key='obj'"):
            s.append("obj", {}, {"x": object()})
        with pytest.raises(TypeError, match="config"):
            s.append("cfg", [], {})  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="key"):
            s.append("", {}, {})
    assert store.path.read_bytes() == b""


def test_environment_keys_and_commit(tmp_path: Path) -> None:
    env = environment()
    assert set(env) == {"torch", "attnlab", "python", "platform", "device", "threads", "commit"}
    assert isinstance(env["threads"], int) and env["threads"] >= 1
    assert isinstance(env["device"], str) and env["device"]
    assert env["commit"] is None or re.fullmatch(r"[0-9a-f]{40}([0-9a-f]{24})?", env["commit"])
    assert git_commit(tmp_path) is None  # not a repository
    json.dumps(env, allow_nan=False)  # storable as is
    t0 = time.perf_counter()
    with ResultStore(tmp_path).open_for_write() as s:  # default env: environment()
        rec = s.append("a", {}, {})
    assert set(rec["env"]) == set(env) and time.perf_counter() - t0 < 10
