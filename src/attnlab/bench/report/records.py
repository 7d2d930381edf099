"""The benchmark records as the report reads them: loading, parsing into typed rows, and
grouping the efficiency rows by (dtype, device) into series.

Two suites are understood:

- efficiency records (``config["suite"] == "efficiency"``): one mechanism on one of CAB's
  four patterns at ``L`` queries, measured either by attnlab itself (``impl == "attnlab"``)
  or by a peer: the two baselines ``"sdpa_dense"`` (torch SDPA with a dense boolean mask of
  the same pattern: the same function) and ``"sdpa_fast"`` (torch SDPA without the pattern:
  what ignoring the sparsity costs, not the same function), or ``"flex_compiled"``,
  ``"natten"``, ... (unknown names are shown as they are);
- quality records (``config["suite"] == "quality"``): one model variant trained on a task
  with one seed.

Records of another suite (or without the fields a suite needs) are skipped and counted in
the notes. Records without ``suite`` are classified by their fields (``task``: quality;
``pattern`` and ``L``: efficiency) and records without ``impl`` count as attnlab.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..store import ResultStore

ATTNLAB = "attnlab"
DENSE = "sdpa_dense"  # SDPA with the pattern as a dense mask: the same function
FAST = "sdpa_fast"  # SDPA without the pattern: what ignoring the sparsity costs
BASELINES: tuple[str, ...] = (DENSE, FAST)
BASELINE_SHORT = {DENSE: "dense", FAST: "flash"}  # in column names: t/dense, t/flash
EFFICIENCY = "efficiency"
QUALITY = "quality"
FIDELITY = "fidelity"
PATTERNS: tuple[str, ...] = ("noncausal-self", "causal-self", "noncausal-cross", "causal-cross")
HIGH_SPREAD = 0.25  # timings whose (max-min)/median over the repeats exceeds this are flagged

SeriesKey = tuple[str, str, str, str]  # (mechanism, pattern, dtype, device)


# --------------------------------------------------------------------------- loading


def load_records(folder: str | Path) -> list[dict[str, Any]]:
    """The records of the results folder ``folder``: the last record of every key of its
    ``results.jsonl``, in file order of those last records (an empty list when the folder
    or the file does not exist)."""
    return list(ResultStore(folder).latest().values())


# --------------------------------------------------------------------------- parsing


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def _str(v: Any, default: str | None = None) -> str | None:
    if v is None:
        return default
    return v if isinstance(v, str) else str(v)


@dataclass(frozen=True)
class _Eff:
    """One efficiency record, flattened and type-checked (missing/invalid values: None)."""

    mechanism: str
    pattern: str
    L: int
    S: int | None
    dtype: str
    device: str
    shape: tuple[Any, Any, Any]  # (batch, heads, head_dim)
    impl: str
    status: str
    reason: str | None
    backend: str | None
    fwd_ms: float | None
    fwd_spread: float | None
    fwdbwd_ms: float | None
    fwdbwd_spread: float | None
    peak_mib: float | None
    compile_s: float | None
    err_out: float | None
    err_grad: float | None
    density: float | None
    env: Mapping[str, Any]
    time: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def time_ms(self) -> float | None:
        """fwd+bwd when measured, else forward (None unless ok)."""
        if not self.ok:
            return None
        return self.fwdbwd_ms if self.fwdbwd_ms is not None else self.fwd_ms

    def metric(self, name: str) -> float | None:
        """``"fwdbwd"`` or ``"fwd"`` time in ms (None unless ok)."""
        if not self.ok:
            return None
        return self.fwdbwd_ms if name == "fwdbwd" else self.fwd_ms

    def spread(self, name: str) -> float | None:
        return self.fwdbwd_spread if name == "fwdbwd" else self.fwd_spread

    @property
    def status_label(self) -> str:
        """The status, with ``(fwd only)`` for an ok record without a backward time."""
        if self.ok and self.fwdbwd_ms is None and self.fwd_ms is not None:
            return "ok (fwd only)"
        return self.status


@dataclass(frozen=True)
class _Qual:
    task: str
    variant: str
    mechanism: str | None
    seed: Any
    config: Mapping[str, Any]
    status: str
    reason: str | None
    metric: str
    value: float | None
    higher_is_better: bool | None
    train_s: float | None
    params: int | None
    final_train_loss: float | None
    env: Mapping[str, Any]
    time: str


@dataclass
class _Data:
    eff: list[_Eff] = field(default_factory=list)
    qual: list[_Qual] = field(default_factory=list)
    fidelity: list[dict[str, Any]] = field(default_factory=list)  # rows of bench.fidelity_suite
    records: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _suite(config: Mapping[str, Any]) -> str | None:
    suite = config.get("suite")
    if suite is not None:
        return _str(suite)
    if "task" in config:
        return QUALITY
    if "pattern" in config and "L" in config:
        return EFFICIENCY
    return None


def _parse(records: Iterable[Mapping[str, Any]]) -> _Data:
    data = _Data()
    skipped: Counter[str] = Counter()
    for rec in records:
        if not isinstance(rec, Mapping):
            skipped["not a dict"] += 1
            continue
        data.records.append(dict(rec))
        config, result = rec.get("config"), rec.get("result")
        if not isinstance(config, Mapping) or not isinstance(result, Mapping):
            skipped["no config/result dict"] += 1
            continue
        env = rec.get("env") if isinstance(rec.get("env"), Mapping) else {}
        when = _str(rec.get("time"), "") or ""
        suite = _suite(config)
        status = _str(result.get("status"), "unknown") or "unknown"
        if suite == EFFICIENCY:
            L = _int(config.get("L"))
            mech, pattern = config.get("mechanism"), config.get("pattern")
            if L is None or not isinstance(mech, str) or not isinstance(pattern, str):
                skipped["efficiency without mechanism/pattern/L"] += 1
                continue
            data.eff.append(
                _Eff(
                    mechanism=mech,
                    pattern=pattern,
                    L=L,
                    S=_int(config.get("S")),
                    dtype=_str(config.get("dtype"), "?") or "?",
                    device=_str(config.get("device"), "?") or "?",
                    shape=(config.get("batch"), config.get("heads"), config.get("head_dim")),
                    impl=_str(config.get("impl"), ATTNLAB) or ATTNLAB,
                    status=status,
                    reason=_str(result.get("reason")),
                    backend=_str(result.get("backend")),
                    fwd_ms=_num(result.get("fwd_ms")),
                    fwd_spread=_num(result.get("fwd_spread")),
                    fwdbwd_ms=_num(result.get("fwdbwd_ms")),
                    fwdbwd_spread=_num(result.get("fwdbwd_spread")),
                    peak_mib=_num(result.get("peak_mib")),
                    compile_s=_num(result.get("compile_s")),
                    err_out=_num(result.get("err_out")),
                    err_grad=_num(result.get("err_grad")),
                    density=_num(result.get("density")),
                    env=env,
                    time=when,
                )
            )
        elif suite == QUALITY:
            task = config.get("task")
            if not isinstance(task, str):
                skipped["quality without task"] += 1
                continue
            mech = _str(config.get("mechanism"))
            hib = result.get("higher_is_better")
            data.qual.append(
                _Qual(
                    task=task,
                    variant=_str(config.get("variant"), mech or "?") or "?",
                    mechanism=mech,
                    seed=config.get("seed"),
                    config=config,
                    status=status,
                    reason=_str(result.get("reason")),
                    metric=_str(result.get("metric"), "value") or "value",
                    value=_num(result.get("value")),
                    higher_is_better=hib if isinstance(hib, bool) else None,
                    train_s=_num(result.get("train_s")),
                    params=_int(result.get("params")),
                    final_train_loss=_num(result.get("final_train_loss")),
                    env=env,
                    time=when,
                )
            )
        elif suite == FIDELITY and isinstance(result.get("rows"), list):
            data.fidelity.extend(r for r in result["rows"] if isinstance(r, Mapping) and "status" in r)
        else:
            skipped[f"suite {suite!r}" if suite else "unknown suite"] += 1
    for why, n in skipped.items():
        data.notes.append(f"skipped {n} record(s): {why}")
    return data


def _pattern_order(patterns: Iterable[str]) -> list[str]:
    ps = set(patterns)
    return [p for p in PATTERNS if p in ps] + sorted(ps - set(PATTERNS))


def _unique_order(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


# --------------------------------------------------------------------------- sections


@dataclass
class _Section:
    """The efficiency records of one (dtype, device): ``series[(mechanism, pattern)][impl][L]``."""

    dtype: str
    device: str
    series: dict[tuple[str, str], dict[str, dict[int, _Eff]]] = field(default_factory=dict)
    shapes: Counter[Any] = field(default_factory=Counter)

    @property
    def mechanisms(self) -> list[str]:
        return _unique_order(m for m, _ in self.series)

    @property
    def patterns(self) -> list[str]:
        return _pattern_order(p for _, p in self.series)

    @property
    def impls(self) -> list[str]:
        return _impl_order(i for by_impl in self.series.values() for i in by_impl)

    def lengths(self, pattern: str | None = None) -> list[int]:
        return sorted(
            {
                L
                for (_, p), by_impl in self.series.items()
                if pattern in (None, p)
                for rows in by_impl.values()
                for L in rows
            }
        )

    def get(self, mech: str, pattern: str, impl: str) -> dict[int, _Eff]:
        return self.series.get((mech, pattern), {}).get(impl, {})

    @property
    def label(self) -> str:
        return f"{self.dtype} · {self.device}"

    @property
    def shape_label(self) -> str:
        if not self.shapes:
            return ""
        shape = self.shapes.most_common(1)[0][0]
        if not isinstance(shape, tuple) or all(x is None for x in shape):
            return ""
        return " ".join(f"{k}{'?' if x is None else x}" for k, x in zip("BHD", shape))


def _sections(data: _Data) -> list[_Section]:
    """Group the efficiency records by (dtype, device). A (mechanism, pattern) measured at
    several (batch, heads, head_dim) keeps only the shape with the most records (noted)."""
    groups: dict[tuple[str, str], list[_Eff]] = {}
    for r in data.eff:
        groups.setdefault((r.dtype, r.device), []).append(r)
    out = []
    for (dtype, device), rows in groups.items():
        sec = _Section(dtype, device)
        by_mp: dict[tuple[str, str], list[_Eff]] = {}
        for r in rows:
            by_mp.setdefault((r.mechanism, r.pattern), []).append(r)
        for (mech, pattern), mp_rows in by_mp.items():
            shapes = Counter(_hashable(r.shape) for r in mp_rows)
            shape = shapes.most_common(1)[0][0]
            if len(shapes) > 1:
                note = (
                    f"{mech} {pattern} {dtype} {device}: measured with {len(shapes)} shapes "
                    f"(batch, heads, head_dim); the report shows {shape} only"
                )
                if note not in data.notes:
                    data.notes.append(note)
            by_impl: dict[str, dict[int, _Eff]] = {}
            for r in sorted(mp_rows, key=lambda r: r.time):  # the newest wins on a duplicate
                if _hashable(r.shape) == shape:
                    by_impl.setdefault(r.impl, {})[r.L] = r
            sec.series[(mech, pattern)] = {i: dict(sorted(by_impl[i].items())) for i in by_impl}
            sec.shapes[shape] += len(mp_rows)
        out.append(sec)
    return out


def _hashable(v: Any) -> Any:
    try:
        hash(v)
        return v
    except TypeError:
        return json.dumps(v, sort_keys=True, default=str)


def _impl_order(impls: Iterable[str]) -> list[str]:
    found = set(impls)
    first = (ATTNLAB, *BASELINES)
    return [i for i in first if i in found] + sorted(found - set(first))


def _baselines(sec: _Section) -> list[str]:
    """The baselines the report compares attnlab with in ``sec``: sdpa_dense always, sdpa_fast
    where it was measured."""
    return [b for b in BASELINES if b == DENSE or b in sec.impls]
