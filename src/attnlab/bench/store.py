"""Append-only benchmark results store: ``results.jsonl`` in an output folder.

One JSON object per line, one line per finished measurement::

    {"key": "...", "config": {...}, "result": {...}, "env": {...}, "time": "2025-01-01T12:00:00.000+00:00"}

Crash safety. A record is *committed* exactly when its line, newline included, is in the
file. :meth:`ResultStore.append` writes the whole line with ONE ``os.write`` on an
``O_APPEND`` descriptor, then ``fsync`` s: a run killed at any moment leaves every earlier
record intact and at most one partial line at the end (no newline). Readers ignore it and
report it (``ReadResult.partial_tail``/``skipped``); the next writer *truncates* it when it
opens the store (under the lock, before any append). Truncating rather than terminating
the line leaves no corrupt line mid-file; the bytes belong to an unfinished measurement,
which ``--resume`` runs again.

Concurrency. One writer at a time: :meth:`ResultStore.open_for_write` takes an exclusive,
non-blocking ``fcntl.flock`` on ``results.lock`` in the folder (a second writer, in this or
another process, gets :class:`StoreLockedError`); the lock is released by ``close()`` /
leaving the ``with`` block, or by the OS when the process dies. The lock file is never
deleted. Readers take no lock.

Written for the efficiency suite of ``attnlab bench``, after CAB ("CAB: Comprehensive
Attention Benchmarking on Long Sequence Modeling", 2023).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

RESULTS_FILE = "results.jsonl"
LOCK_FILE = "results.lock"
_HEX_COMMIT = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")


class StoreLockedError(RuntimeError):
    """Another writer (another ``attnlab bench``) holds the results folder's lock."""


class StoreWarning(UserWarning):
    """Lines of ``results.jsonl`` were skipped while reading (partial tail or corrupt line)."""


@dataclass
class ReadResult:
    """``records``: committed records in file order. ``skipped``: lines not returned (the
    partial tail plus complete lines that are not a JSON object with a string ``key``).
    ``partial_tail``: the file does not end with a newline (an interrupted or ongoing write)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    partial_tail: bool = False


class ResultStore:
    """The results of one output folder. ``ResultStore(folder)`` touches nothing on disk;
    :meth:`open_for_write` creates the folder and the files."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        if not isinstance(folder, (str, os.PathLike)):
            raise TypeError(f"folder must be a str or os.PathLike, got folder={folder!r}")
        self.folder = Path(folder)
        self.path, self.lock_path = self.folder / RESULTS_FILE, self.folder / LOCK_FILE
        self.repaired_bytes = 0  # bytes of partial tail removed by the last open()
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._env: dict[str, Any] | None = None

    @property
    def is_open(self) -> bool:
        """Whether this instance holds the lock and can :meth:`append`."""
        return self._fd is not None

    def open(self, env: dict[str, Any] | None = None) -> "ResultStore":
        """Lock the folder for writing and repair a partial last line; return ``self``.

        ``env`` is stored in every record appended without its own (default:
        :func:`environment`, computed once here). Raises :class:`StoreLockedError` when
        another writer holds the lock, ``RuntimeError`` when this instance is already open."""
        if self._fd is not None:
            raise RuntimeError(f"result store {str(self.folder)!r} is already open for writing")
        if fcntl is None:  # pragma: no cover
            raise RuntimeError("ResultStore needs fcntl.flock (a POSIX system) to write")
        self.folder.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(lock_fd, 32, 0).decode(errors="replace").strip()
            os.close(lock_fd)
            raise StoreLockedError(
                f"results folder {str(self.folder)!r} is locked: another attnlab bench "
                f"(pid {holder or 'unknown'}) is writing to it; wait for it to finish or "
                "choose another output folder"
            ) from None
        fd: int | None = None
        try:
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            self.repaired_bytes = _truncate_partial_tail(fd)
            if created:
                _fsync_dir(self.folder)
            self._env = dict(env) if env is not None else environment()
        except BaseException:
            if fd is not None:
                os.close(fd)
            os.close(lock_fd)
            raise
        if self.repaired_bytes:
            warnings.warn(f"{self.path}: removed a partial last line ({self.repaired_bytes} bytes) "
                          "left by an interrupted run", StoreWarning, stacklevel=2)
        self._fd, self._lock_fd = fd, lock_fd
        return self

    def close(self) -> None:
        """Close the file and release the lock (idempotent)."""
        fd, lock_fd, self._fd, self._lock_fd = self._fd, self._lock_fd, None, None
        if fd is not None:
            os.close(fd)
        if lock_fd is not None:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.close(lock_fd)

    @contextmanager
    def open_for_write(self, env: dict[str, Any] | None = None) -> Iterator["ResultStore"]:
        """``with store.open_for_write() as s: s.append(...)``: :meth:`open`, then :meth:`close`."""
        self.open(env)
        try:
            yield self
        finally:
            self.close()

    def append(self, key: str, config: dict[str, Any], result: dict[str, Any],
               env: dict[str, Any] | None = None) -> dict[str, Any]:
        """Commit one record and return it; durable (fsync'ed) when this returns.

        The line is written with one ``os.write``; if the OS writes only part of it (disk
        full), the file is truncated back to its previous size and ``OSError`` is raised.
        Values must be JSON-serialisable without NaN/Infinity (strict JSON, readable by the
        report's JavaScript): ``TypeError``/``ValueError`` naming the key otherwise, with
        nothing written. A key may be appended again (a re-measurement); see :meth:`latest`."""
        if self._fd is None:
            raise RuntimeError(f"result store {str(self.folder)!r} is not open for writing; use open_for_write()")
        if not isinstance(key, str) or not key:
            raise TypeError(f"key must be a non-empty str, got key={key!r}")
        for name, value in (("config", config), ("result", result)):
            if not isinstance(value, dict):
                raise TypeError(f"{name} must be a dict, got {name}={value!r} for key={key!r}")
        record = {"key": key, "config": config, "result": result,
                  "env": self._env if env is None else env,
                  "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
        try:
            line = json.dumps(record, allow_nan=False, ensure_ascii=True) + "\n"
        except (TypeError, ValueError) as e:
            raise type(e)(f"record for key={key!r} is not strict JSON: {e}") from None
        data = line.encode("ascii")
        start = os.fstat(self._fd).st_size
        written = os.write(self._fd, data)
        if written != len(data):
            os.ftruncate(self._fd, start)
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes; "
                          "the record was not committed")
        os.fsync(self._fd)
        return record

    def read(self) -> ReadResult:
        """All committed records, without locking; a missing file reads as empty."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return ReadResult()
        lines = data.split(b"\n")
        out = ReadResult(partial_tail=lines[-1] != b"")
        out.skipped = int(out.partial_tail)
        for raw in lines[:-1]:
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError:  # includes UnicodeDecodeError
                rec = None
            if isinstance(rec, dict) and isinstance(rec.get("key"), str):
                out.records.append(rec)
            else:
                out.skipped += 1
        return out

    def records(self) -> list[dict[str, Any]]:
        """:meth:`read`'s records; a :class:`StoreWarning` says how many lines were skipped."""
        res = self.read()
        if res.skipped:
            what = " (an unfinished last line)" if res.partial_tail else ""
            warnings.warn(f"{self.path}: skipped {res.skipped} line(s){what}", StoreWarning, stacklevel=2)
        return res.records

    def done_keys(self) -> set[str]:
        """The keys with at least one committed record (what ``--resume`` skips)."""
        return {r["key"] for r in self.records()}

    def latest(self) -> dict[str, dict[str, Any]]:
        """key -> its last committed record (later lines are newer re-measurements)."""
        return {r["key"]: r for r in self.records()}


def _truncate_partial_tail(fd: int) -> int:
    """Cut the file after its last newline (everything, if it has none); bytes removed."""
    size = os.fstat(fd).st_size
    keep = os.pread(fd, size, 0).rfind(b"\n") + 1
    if keep != size:
        os.ftruncate(fd, keep)
        os.fsync(fd)
    return size - keep


def _fsync_dir(folder: Path) -> None:
    """Make a newly created file's directory entry durable (best effort)."""
    with suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def git_commit(cwd: str | os.PathLike[str] | None = None, timeout: float = 5.0) -> str | None:
    """``git rev-parse HEAD`` in ``cwd`` (default: the current directory): the commit as
    lowercase hex (40 digits, 64 for SHA-256 repositories), or None when git is missing,
    times out, or ``cwd`` is not in a repository."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = res.stdout.strip()
    return commit if res.returncode == 0 and _HEX_COMMIT.fullmatch(commit) else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine() or "unknown CPU"


def environment(device: str | torch.device = "cpu", cwd: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Where a measurement ran: ``torch``, ``attnlab``, ``python`` versions, ``platform``
    (``platform.platform()``), ``device`` (the CUDA device name for a CUDA ``device``, else
    the CPU model), ``threads`` (``torch.get_num_threads()``) and ``commit``
    (:func:`git_commit` of ``cwd``, None if unavailable)."""
    from attnlab import __version__

    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev) if torch.cuda.is_available() else f"{dev} (CUDA unavailable)"
    else:
        name = _cpu_model()
    return {"torch": torch.__version__, "attnlab": __version__, "python": sys.version.split()[0],
            "platform": platform.platform(), "device": name, "threads": torch.get_num_threads(),
            "commit": git_commit(cwd)}
