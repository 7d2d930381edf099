"""The report of ``attnlab bench``: aggregation of the stored records, a terminal summary,
crossover lengths, and a self-contained ``report.html``.

Input: the records of a results folder (:func:`load_records`, the last record per key of
``results.jsonl``, see :mod:`attnlab.bench.store`). Two suites are understood:

- efficiency records (``config["suite"] == "efficiency"``): one mechanism on one of CAB's
  four patterns at ``L`` queries, measured either by attnlab itself (``impl == "attnlab"``)
  or by a peer (``"sdpa_dense"``, the dense baseline: torch SDPA with a dense boolean mask of
  the same pattern; ``"flex_compiled"``, ``"natten"``, ...; unknown names are shown as they
  are);
- quality records (``config["suite"] == "quality"``): one model variant trained on a task
  with one seed; they are aggregated over seeds (mean, sample standard deviation, n).

Records of another suite (or without the fields a suite needs) are skipped and counted in
the report's notes. Records without ``suite`` are classified by their fields (``task``:
quality; ``pattern`` and ``L``: efficiency) and records without ``impl`` count as attnlab.

Times compared with a baseline are fwd+bwd where both sides have it, else forward: the
*time ratio* ``t/dense`` is attnlab's time divided by ``sdpa_dense``'s at the same length
(below 1: attnlab is faster). See :func:`crossovers` for the crossover length.

The public functions take the list of record dicts; nothing here needs matplotlib, which
:mod:`attnlab.bench.plots` imports lazily for the PNGs of :func:`write_report`.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .store import ResultStore

ATTNLAB = "attnlab"
DENSE = "sdpa_dense"
EFFICIENCY = "efficiency"
QUALITY = "quality"
PATTERNS: tuple[str, ...] = ("noncausal-self", "causal-self", "noncausal-cross", "causal-cross")
HIGH_SPREAD = 0.25  # timings whose (max-min)/median over the repeats exceeds this are flagged
REPORT_FILE = "report.html"

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


# --------------------------------------------------------------------------- crossovers


def _pair(a: _Eff | None, d: _Eff | None) -> tuple[float, float, str] | None:
    """(attnlab ms, dense ms, metric) at one length: fwd+bwd where both have it, else fwd."""
    if a is None or d is None or not a.ok or not d.ok:
        return None
    if a.fwdbwd_ms is not None and d.fwdbwd_ms is not None:
        return a.fwdbwd_ms, d.fwdbwd_ms, "fwd+bwd"
    if a.fwd_ms is not None and d.fwd_ms is not None:
        return a.fwd_ms, d.fwd_ms, "fwd"
    return None


@dataclass(frozen=True)
class Crossover:
    """How an attnlab series compares with ``sdpa_dense`` over the sweep.

    ``compared``: the lengths where both were measured (ok, with a common metric), in
    increasing order; ``faster``: those where attnlab was strictly faster; ``length``: the
    crossover length (see :func:`crossovers`), None when attnlab is not faster at the largest
    compared length. ``metrics``: the time metrics used (``"fwd+bwd"``, ``"fwd"``)."""

    length: int | None
    compared: tuple[int, ...]
    faster: tuple[int, ...]
    metrics: tuple[str, ...] = ("fwd+bwd",)

    @property
    def from_start(self) -> bool:
        """attnlab is faster from the smallest compared length on: the true crossover lies at
        or below it (the sweep did not measure where it happens)."""
        return self.length is not None and self.length == self.compared[0]

    @property
    def lost_again(self) -> bool:
        """attnlab was faster at some length but slower again at the largest ones."""
        return self.length is None and bool(self.faster)

    def label(self, ascii: bool = False) -> str:
        """``"≤ 256"`` (from the start), ``"4096"``, ``"never"``, or ``"never*"`` (faster at
        some lengths only, then slower again: see :attr:`faster`)."""
        if self.length is None:
            return "never*" if self.lost_again else "never"
        if self.from_start:
            return f"<={self.length}" if ascii else f"≤ {self.length}"
        return str(self.length)


def _crossover(att: Mapping[int, _Eff], dense: Mapping[int, _Eff]) -> Crossover | None:
    points = []
    for L in sorted(att.keys() & dense.keys()):
        p = _pair(att[L], dense[L])
        if p is not None:
            points.append((L, p[0] < p[1], p[2]))
    if not points:
        return None
    length = None
    for L, faster, _ in reversed(points):
        if not faster:
            break
        length = L
    return Crossover(
        length,
        tuple(L for L, _, _ in points),
        tuple(L for L, f, _ in points if f),
        tuple(_unique_order(m for _, _, m in points)),
    )


def crossover_details(records: Iterable[Mapping[str, Any]]) -> dict[SeriesKey, Crossover]:
    """:class:`Crossover` of every attnlab series ``(mechanism, pattern, dtype, device)``
    that has at least one length also measured by ``sdpa_dense``."""
    return _crossovers_of(_sections(_parse(records)))


def _crossovers_of(sections: Sequence[_Section]) -> dict[SeriesKey, Crossover]:
    out = {}
    for sec in sections:
        for (mech, pattern), by_impl in sec.series.items():
            if ATTNLAB in by_impl and DENSE in by_impl:
                c = _crossover(by_impl[ATTNLAB], by_impl[DENSE])
                if c is not None:
                    out[(mech, pattern, sec.dtype, sec.device)] = c
    return out


def crossovers(records: Iterable[Mapping[str, Any]]) -> dict[SeriesKey, int | None]:
    """Crossover length of every attnlab series, keyed ``(mechanism, pattern, dtype, device)``.

    The crossover length is the smallest ``L`` of the sweep from which attnlab's time is
    strictly below ``sdpa_dense``'s at that ``L`` and at every larger ``L`` where both were
    measured (status ok; fwd+bwd times where both have one at that ``L``, else forward).
    Lengths where either side failed or was not measured are ignored.

    - attnlab faster at every compared length: the *smallest compared length* is returned;
      the real crossover lies at or below it (the report writes ``"≤ L"``;
      :attr:`Crossover.from_start` of :func:`crossover_details` tells this case apart);
    - attnlab faster at some lengths but slower at the largest one(s) ("overtakes, then
      loses again"): only the last run of faster lengths counts; if attnlab is slower at the
      largest compared length, the value is None;
    - never faster: None.

    Series without any length compared with ``sdpa_dense`` are absent."""
    return {k: c.length for k, c in crossover_details(records).items()}


# --------------------------------------------------------------------------- quality


@dataclass(frozen=True)
class QualityRow:
    """One quality configuration aggregated over its seeds. ``n``: seeds with a value;
    ``failed``: seeds whose status is not ok (or that have no value); ``std``: the sample
    standard deviation (None when n < 2)."""

    task: str
    variant: str
    mechanism: str | None
    preset: str | None
    steps: int | None
    metric: str
    higher_is_better: bool | None
    values: tuple[float, ...]
    seeds: tuple[Any, ...]
    failed: int
    reasons: tuple[str, ...]
    train_s: float | None
    params: int | None
    extra: str  # other distinguishing config entries, "k=v, ..."

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def min(self) -> float | None:
        return min(self.values) if self.values else None

    @property
    def max(self) -> float | None:
        return max(self.values) if self.values else None


_QUAL_SHOWN = {"suite", "task", "variant", "mechanism", "seed", "preset", "steps"}


def aggregate_quality(records: Iterable[Mapping[str, Any]]) -> list[QualityRow]:
    """The quality records grouped by their config without the seed (and by metric), in
    order of first appearance, aggregated over the seeds."""
    return _aggregate_quality(_parse(records).qual)


def _aggregate_quality(rows: Sequence[_Qual]) -> list[QualityRow]:
    groups: dict[str, list[_Qual]] = {}  # by config without the seed; failed seeds included
    for q in rows:
        cfg = {k: v for k, v in q.config.items() if k != "seed"}
        groups.setdefault(json.dumps(cfg, sort_keys=True, default=str), []).append(q)
    # "other": the config entries besides task/variant/preset/steps that vary within a task
    # (entries fixed by the preset, e.g. layers or lr, would only repeat on every row)
    values: dict[tuple[str, str], set[str]] = {}
    for q in rows:
        for k in set(q.config) - _QUAL_SHOWN:
            values.setdefault((q.task, k), set()).add(json.dumps(q.config[k], default=str))
    tasks_keys: dict[str, set[str]] = {}
    for (task, k), vs in values.items():
        present = all(k in q.config for q in rows if q.task == task)
        if len(vs) > 1 or not present:
            tasks_keys.setdefault(task, set()).add(k)
    out = []
    for qs in groups.values():
        ok = [q for q in qs if q.status == "ok" and q.value is not None]
        bad = [q for q in qs if q not in ok]
        for metric in _unique_order(q.metric for q in ok) or [qs[0].metric]:
            vals = [q for q in ok if q.metric == metric]
            first = (vals or qs)[0]
            cfg = first.config
            varying = tasks_keys.get(first.task, set())
            extra = ", ".join(f"{k}={v}" for k, v in sorted(cfg.items()) if k in varying)
            train = [q.train_s for q in vals if q.train_s is not None]
            hib = [q.higher_is_better for q in vals + bad if q.higher_is_better is not None]
            reasons = _unique_order(
                f"{q.status}: {q.reason}" if q.reason else q.status for q in bad
            )
            out.append(
                QualityRow(
                    task=first.task,
                    variant=first.variant,
                    mechanism=first.mechanism,
                    preset=_str(cfg.get("preset")),
                    steps=_int(cfg.get("steps")),
                    metric=metric,
                    higher_is_better=hib[0] if hib else None,
                    values=tuple(q.value for q in vals if q.value is not None),
                    seeds=tuple(q.seed for q in vals),
                    failed=len(bad),
                    reasons=tuple(reasons),
                    train_s=statistics.fmean(train) if train else None,
                    params=next((q.params for q in vals if q.params is not None), None),
                    extra=extra,
                )
            )
    return out


def _best_quality(rows: Sequence[QualityRow]) -> dict[tuple[str, str], QualityRow]:
    """The best row (by mean) of every (task, metric) whose direction is known."""
    best: dict[tuple[str, str], QualityRow] = {}
    for r in rows:
        if r.mean is None or r.higher_is_better is None:
            continue
        k = (r.task, r.metric)
        b = best.get(k)
        if b is None or (r.mean > b.mean if r.higher_is_better else r.mean < b.mean):  # type: ignore[operator]
            best[k] = r
    return best


# --------------------------------------------------------------------------- formatting


def fmt_sig(x: float | None, digits: int = 3, missing: str = "—") -> str:
    """``x`` with ``digits`` significant digits, fixed-point for 1e-3 <= |x| < 1e5 (``12.3``,
    ``0.0123``, ``1234``), else scientific (``1.23e-04``)."""
    if x is None:
        return missing
    if x == 0:
        return "0"
    ax = abs(x)
    if ax < 1e-3 or ax >= 1e5:
        return f"{x:.{digits - 1}e}"
    decimals = max(0, digits - 1 - math.floor(math.log10(ax)))
    r = round(x, decimals)
    if r != 0 and abs(r) >= 10 ** (math.floor(math.log10(ax)) + 1):  # 9.996 -> 10.0
        decimals = max(0, decimals - 1)
    return f"{x:.{decimals}f}"


def fmt_err(x: float | None, missing: str = "—") -> str:
    """A relative error: ``3.1e-07``."""
    return missing if x is None else f"{x:.1e}"


def fmt_ratio(x: float | None, missing: str = "—", times: str = "×") -> str:
    """A time ratio: 2 decimals from 0.1 to 10 (``0.96×``, ``1.03×``), else 2 significant
    digits below (``0.072×``) and 3 above (``12.3×``)."""
    if x is None:
        return missing
    if 0.1 <= abs(x) < 10:
        return f"{x:.2f}{times}"
    return fmt_sig(x, 2 if abs(x) < 0.1 else 3) + times


def _shorten(s: str | None, n: int, ellipsis: str = "…") -> str:
    if not s:
        return ""
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - len(ellipsis)] + ellipsis


def _env_summary(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(field, value) for the header: the most common value, with the others counted."""
    envs = [r.get("env") for r in records if isinstance(r.get("env"), Mapping)]
    out = []
    for key in ("torch", "attnlab", "python", "device", "threads", "platform", "commit"):
        vals = Counter(str(e.get(key)) for e in envs if e.get(key) is not None)  # type: ignore[union-attr]
        if not vals:
            continue
        ordered = [v for v, _ in vals.most_common()]
        if key == "commit":
            ordered = [v[:12] for v in ordered]
        text = ordered[0] + (
            f" (and {', '.join(ordered[1:3])}{', …' if len(ordered) > 3 else ''})"
            if len(ordered) > 1
            else ""
        )
        out.append((key, text))
    dtypes = _unique_order(
        _str(r["config"].get("dtype"))
        for r in records
        if isinstance(r.get("config"), Mapping) and r["config"].get("dtype")
    )
    if dtypes:
        out.append(("dtype", ", ".join(dtypes)))
    times = sorted(t for r in records if isinstance(t := r.get("time"), str) and t)
    if times:
        first, last = _fmt_time(times[0]), _fmt_time(times[-1])
        out.append(("when", first if first == last else f"{first} – {last}"))
    return out


def _fmt_time(t: str) -> str:
    try:
        d = datetime.fromisoformat(t)
    except ValueError:
        return t
    if d.tzinfo is not None:
        d = d.astimezone(timezone.utc)
        return d.strftime("%Y-%m-%d %H:%M UTC")
    return d.strftime("%Y-%m-%d %H:%M")


def _counts_text(data: _Data) -> str:
    parts = []
    if data.eff:
        parts.append(f"{len(data.eff)} efficiency")
    if data.qual:
        parts.append(f"{len(data.qual)} quality")
    return f"{len(data.records)} records" + (f" ({', '.join(parts)})" if parts else "")


# --------------------------------------------------------------------------- summary rows


@dataclass(frozen=True)
class _Summary:
    """attnlab's record at the largest measured length of a (mechanism, pattern); ``ratio``:
    time / sdpa_dense time at ``ratio_L`` (the largest length both measured, usually ``L``);
    ``err_out``/``err_grad``: the largest over the lengths."""

    mechanism: str
    pattern: str
    L: int
    row: _Eff
    ratio: float | None
    ratio_L: int | None
    metric: str | None
    err_out: float | None
    err_grad: float | None
    crossover: Crossover | None
    failed_above: tuple[_Eff, ...] = ()  # attnlab's failures at larger lengths


def _max(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def _summary_rows(sec: _Section, xo: Mapping[SeriesKey, Crossover]) -> list[_Summary]:
    """Per mechanism × pattern: attnlab at its largest length with an ok record (else its
    largest length)."""
    out = []
    for mech in sec.mechanisms:
        for pattern in sec.patterns:
            att = sec.get(mech, pattern, ATTNLAB)
            if not att:
                continue
            ok = [L for L, r in att.items() if r.time_ms is not None]
            L = max(ok) if ok else max(att)
            dense = sec.get(mech, pattern, DENSE)
            ratio = ratio_L = metric = None
            for Lc in sorted(att, reverse=True):
                p = _pair(att[Lc], dense.get(Lc)) if Lc <= L else None
                if p is not None:
                    ratio, ratio_L, metric = p[0] / p[1], Lc, p[2]
                    break
            out.append(
                _Summary(
                    mech,
                    pattern,
                    L,
                    att[L],
                    ratio,
                    ratio_L,
                    metric,
                    _max(r.err_out for r in att.values()),
                    _max(r.err_grad for r in att.values()),
                    xo.get((mech, pattern, sec.dtype, sec.device)),
                    tuple(r for Lf, r in att.items() if Lf > L and not r.ok),
                )
            )
    return out


def _impl_order(impls: Iterable[str]) -> list[str]:
    found = set(impls)
    return [i for i in (ATTNLAB, DENSE) if i in found] + sorted(found - {ATTNLAB, DENSE})


def _peer_lines(data: _Data) -> list[str]:
    """One line per implementation: its records counted by status (and the commonest reason)."""
    lines = []
    for impl in _impl_order(r.impl for r in data.eff):
        counts: Counter[str] = Counter()
        reasons: dict[str, Counter[str]] = {}
        for r in data.eff:
            if r.impl == impl:
                counts[r.status_label] += 1
                if not r.ok and r.reason:
                    reasons.setdefault(r.status_label, Counter())[r.reason] += 1
        parts = []
        for label, n in sorted(
            counts.items(), key=lambda kv: (not kv[0].startswith("ok"), -kv[1])
        ):
            rs = reasons.get(label)
            text = label
            if rs:
                reason = rs.most_common(1)[0][0]
                more = f"; +{len(rs) - 1} other reason{'s' * (len(rs) > 2)}" if len(rs) > 1 else ""
                text += f" ({_shorten(reason, 48, '...')}{more})"
            parts.append(
                text if len(counts) == 1 and not label.startswith("ok") else f"{text} {n}"
            )
        lines.append(f"{impl}: " + ", ".join(parts))
    return lines


# --------------------------------------------------------------------------- terminal table


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Aligned plain-text columns; columns empty in every row are left out."""
    keep = (
        [i for i in range(len(headers)) if any(r[i] for r in rows)]
        if rows
        else list(range(len(headers)))
    )
    widths = {
        i: max(len(headers[i]), *(len(r[i]) for r in rows)) if rows else len(headers[i])
        for i in keep
    }

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cells[i].rjust(widths[i]) if i in right else cells[i].ljust(widths[i]) for i in keep
        ).rstrip()

    return [line(headers), line(["-" * widths.get(i, 0) for i in range(len(headers))])] + [
        line(r) for r in rows
    ]


def summary_table(records: Iterable[Mapping[str, Any]]) -> str:
    """A plain-text summary (at most about 120 columns): per (dtype, device), every attnlab
    mechanism × pattern at its largest measured length (backend, forward and fwd+bwd ms, time
    ratio to sdpa_dense, peak MiB, the largest relative errors over the lengths, crossover
    length); the records per implementation and status; the quality results (mean ± sd over
    seeds). Sections without records are omitted; no records at all gives a one-line message."""
    data = _parse(records)
    if not data.records:
        return (
            "attnlab bench: no records (run `attnlab bench` first, or check the results folder)\n"
        )
    sections = _sections(data)
    xo = _crossovers_of(sections)
    env = dict(_env_summary(data.records))
    out = [f"attnlab bench: {_counts_text(data)}"]
    head_env = " · ".join(
        f"{k} {env[k]}" for k in ("torch", "device", "threads", "commit") if k in env
    )
    if head_env:
        out.append(head_env)
    if not data.eff and not data.qual:
        out.append("no efficiency or quality records")

    for sec in sections:
        rows = _summary_rows(sec, xo)
        if not rows:
            continue
        out += [
            "",
            f"Efficiency, {sec.dtype} on {sec.device}"
            + (f" ({sec.shape_label})" if sec.shape_label else "")
            + ": attnlab at the largest measured L; t/dense = time / sdpa_dense time",
        ]
        cells, prev, flagged, lost, other_L, failed = [], None, False, False, False, False
        for s in rows:
            r = s.row
            flag = ""
            if any((r.spread(m) or 0) > HIGH_SPREAD for m in ("fwd", "fwdbwd")):
                flag, flagged = "~", True
            if s.crossover is not None and s.crossover.lost_again:
                lost = True
            ratio = fmt_ratio(s.ratio, "-", "x") + ("f" if s.metric == "fwd" else "")
            if s.ratio_L is not None and s.ratio_L != s.L:
                ratio, other_L = f"{ratio}@{_short_len(s.ratio_L)}", True
            timing = r.ok and r.time_ms is not None
            failed = failed or bool(s.failed_above)
            cells.append(
                [
                    s.mechanism if s.mechanism != prev else "",
                    s.pattern,
                    str(s.L) + ("!" if s.failed_above else ""),
                    (r.backend or "") if timing else _shorten(r.status_label, 13, "..."),
                    fmt_sig(r.fwd_ms, missing="-") + (flag if r.fwd_ms is not None else ""),
                    fmt_sig(r.fwdbwd_ms, missing="-") + (flag if r.fwdbwd_ms is not None else ""),
                    ratio,
                    fmt_sig(r.peak_mib, missing="-"),
                    fmt_err(s.err_out, "-"),
                    fmt_err(s.err_grad, "-"),
                    s.crossover.label(ascii=True) if s.crossover else "-",
                ]
            )
            prev = s.mechanism
        out += _table(
            [
                "mechanism",
                "pattern",
                "L",
                "backend",
                "fwd ms",
                "f+b ms",
                "t/dense",
                "peak MiB",
                "err out",
                "err grad",
                "crossover",
            ],
            cells,
            right={2, 4, 5, 6, 7, 8, 9, 10},
        )
        notes = []
        if any(s.crossover for s in rows):
            notes.append(
                "crossover: smallest L from which attnlab stays faster than sdpa_dense ('<=L': "
                "already at the smallest L)"
            )
        if any(s.err_out is not None or s.err_grad is not None for s in rows):
            notes.append(
                "err: largest relative error vs the float64 reference over the measured lengths"
            )
        if lost:
            notes.append("never*: faster at some shorter L only, slower again at the largest")
        if other_L:
            notes.append("t/dense@L: at the largest L that sdpa_dense measured too")
        if any(s.metric == "fwd" for s in rows):
            notes.append("t/dense ending in f: forward times (no fwd+bwd on one side)")
        if flagged:
            notes.append(f"~: timing spread above {HIGH_SPREAD:.0%} of the median")
        if failed:
            notes.append("L!: attnlab failed at a larger L (see Implementations)")
        out += ["  " + n for n in notes]

    if data.eff:
        out += ["", "Implementations (records by status)"] + [
            "  " + ln for ln in _peer_lines(data)
        ]

    qrows = _aggregate_quality(data.qual)
    if qrows:
        best = _best_quality(qrows)
        out += ["", "Quality (mean ± sd over n seeds; * best of its task)"]
        cells = []
        prev_task = None
        for q in qrows:
            direction = (
                ""
                if q.higher_is_better is None
                else (" (higher better)" if q.higher_is_better else " (lower better)")
            )
            value = _quality_value(q, "-") + (" *" if best.get((q.task, q.metric)) is q else "")
            cells.append(
                [
                    q.task if q.task != prev_task else "",
                    q.variant,
                    q.mechanism if q.mechanism and q.mechanism != q.variant else "",
                    " ".join(
                        x for x in (q.preset or "", f"{q.steps} steps" if q.steps else "") if x
                    ),
                    q.metric + direction,
                    value,
                    str(q.n) + (f" ({q.failed} failed)" if q.failed else ""),
                    fmt_sig(q.train_s, missing="-"),
                    _shorten(q.extra, 30, "..."),
                ]
            )
            prev_task = q.task
        out += _table(
            [
                "task",
                "variant",
                "mechanism",
                "preset",
                "metric",
                "mean ± sd",
                "n",
                "train s",
                "other",
            ],
            cells,
            right={7},
        )
    if data.notes:
        out += [""] + [f"note: {n}" for n in data.notes]
    return "\n".join(out).rstrip() + "\n"


def _short_len(L: int) -> str:
    return f"{L // 1024}k" if L >= 1024 and L % 1024 == 0 else str(L)


def _quality_value(q: QualityRow, missing: str = "—") -> str:
    """``0.912 ± 0.013``: the mean with 3 significant digits, the sd with as many decimals
    (more when it would round to zero)."""
    if q.mean is None:
        return missing
    text = fmt_sig(q.mean, 3)
    if q.std is None:
        return text
    decimals = len(text.split(".")[1]) if "." in text and "e" not in text else None
    if decimals is None:
        return f"{text} ± {fmt_sig(q.std, 2)}"
    if q.std > 0:
        decimals = max(decimals, -math.floor(math.log10(q.std)))
    return f"{q.mean:.{decimals}f} ± {q.std:.{decimals}f}"


# --------------------------------------------------------------------------- findings


def _findings_table(sec: _Section, xo: Mapping[SeriesKey, Crossover]) -> str | None:
    """Per pattern: the fastest and slowest attnlab mechanism at the largest length, and the
    crossover lengths grouped by length."""
    e = html.escape
    rows = []
    for pattern in sec.patterns:
        cand = [
            (L, mech, r)
            for mech in sec.mechanisms
            for L, r in sec.get(mech, pattern, ATTNLAB).items()
            if r.time_ms is not None
        ]
        xs = [
            (mech, c)
            for (mech, p, dt, dev), c in xo.items()
            if (p, dt, dev) == (pattern, sec.dtype, sec.device)
        ]
        if not cand and not xs:
            continue
        fastest = slowest = ""
        Lmax_text = ""
        if cand:
            Lmax = max(L for L, _, _ in cand)
            at = sorted(
                ((r.time_ms, mech, r) for L, mech, r in cand if L == Lmax), key=lambda t: t[0]
            )
            t, mech, r = at[0]
            metric = "fwd+bwd" if r.fwdbwd_ms is not None else "fwd"
            ratio = ""
            att, dense = sec.get(mech, pattern, ATTNLAB), sec.get(mech, pattern, DENSE)
            for Lc in sorted(att, reverse=True):
                p = _pair(att[Lc], dense.get(Lc))
                if p is not None:
                    where = "" if Lc == Lmax else f" at L={Lc}"
                    ratio = _ratio_span(p[0] / p[1], f" sdpa_dense{where}")
                    break
            fastest = f"<b>{e(mech)}</b> {e(fmt_sig(t))} ms {metric}{ratio}"
            if len(at) > 1:
                slowest = f"{e(at[-1][1])} {e(fmt_sig(at[-1][0]))} ms"
            Lmax_text = (
                f'{Lmax} <span class="muted">({len(at)} mechanism{"s" * (len(at) > 1)})</span>'
            )
        groups: dict[str, list[str]] = {}
        for mech, c in sorted(xs, key=lambda mc: (mc[1].length is None, mc[1].length or 0)):
            groups.setdefault(c.label() if c.length is not None else "never", []).append(
                mech + ("*" if c.lost_again else "")
            )
        cross = "<br>".join(
            f"<b>{e(label)}</b>: {e(', '.join(ms))}" for label, ms in groups.items()
        )
        rows.append(
            "<tr>"
            + _td(pattern)
            + _td(Lmax_text, "n", raw=True)
            + _td(fastest, raw=True)
            + _td(slowest, raw=True)
            + _td(cross, "w", raw=True)
            + "</tr>"
        )
    if not rows:
        return None
    head = (
        "<tr>"
        + _th("pattern")
        + _th("largest L", "n")
        + _th("fastest attnlab mechanism")
        + _th("slowest")
        + _th("crossover length vs sdpa_dense: mechanisms")
        + "</tr>"
    )
    return f'<table class="findings-t"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _findings(data: _Data, sections: Sequence[_Section], qrows: Sequence[QualityRow]) -> list[str]:
    """Key findings besides the per-pattern table, as HTML fragments (strings escaped)."""
    e = html.escape
    out = []
    multi = len(sections) > 1
    for sec in sections:
        pre = f"<b>{e(sec.label)}</b>: " if multi else ""
        # per peer: on how many (mechanism, pattern) it beats attnlab at their largest common L
        beats: dict[str, list[tuple[float, str, str, int, str]]] = {}
        compared: Counter[str] = Counter()
        for (mech, pattern), by_impl in sec.series.items():
            att = by_impl.get(ATTNLAB, {})
            for impl, rows in by_impl.items():
                if impl in (ATTNLAB, DENSE):
                    continue
                common = [L for L in sorted(att.keys() & rows.keys()) if _pair(att[L], rows[L])]
                if common:
                    compared[impl] += 1
                    a, peer, m = _pair(att[common[-1]], rows[common[-1]])  # type: ignore[misc]
                    if peer < a:
                        beats.setdefault(impl, []).append((peer / a, mech, pattern, common[-1], m))
        for impl in _impl_order(compared):
            if impl not in beats:
                out.append(
                    f"{pre}<b>{e(impl)}</b> is slower than attnlab on all {compared[impl]} "
                    "(mechanism, pattern) pairs it ran, at their largest common length"
                )
                continue
            bs = sorted(beats[impl])
            r, mech, pattern, L, m = bs[0]
            out.append(
                f"{pre}<b>{e(impl)}</b> is faster than attnlab on {len(bs)} of {compared[impl]} "
                f"(mechanism, pattern) pairs at their largest common length; most on {e(mech)} "
                f"{e(pattern)} L={L}: {e(fmt_ratio(r))} attnlab's {m} time"
            )
        errs = [
            (max(v for v in (r.err_out, r.err_grad) if v is not None), r)
            for by_impl in sec.series.values()
            for r in by_impl.get(ATTNLAB, {}).values()
            if r.err_out is not None or r.err_grad is not None
        ]
        if errs:
            v, r = max(errs, key=lambda t: t[0])
            which = "gradients" if r.err_grad == v else "output"
            out.append(
                f"{pre}largest relative error vs the float64 reference: <b>{fmt_err(v)}</b> "
                f"({e(r.mechanism)} {e(r.pattern)} L={r.L}, {which})"
            )
        failed = [
            r
            for by_impl in sec.series.values()
            for r in by_impl.get(ATTNLAB, {}).values()
            if not r.ok
        ]
        if failed:
            shown = ", ".join(
                f"{r.mechanism} {r.pattern} L={r.L} ({r.status})" for r in failed[:4]
            )
            more = f" and {len(failed) - 4} more" if len(failed) > 4 else ""
            out.append(
                f'{pre}<span class="slow">attnlab did not complete {len(failed)} '
                "measurement(s)</span>: "
                f"{e(shown)}{more}"
            )
    for (task, metric), q in _best_quality(qrows).items():
        n_variants = sum(
            1 for r in qrows if r.task == task and r.metric == metric and r.mean is not None
        )
        out.append(
            f"quality, <b>{e(task)}</b>: best <b>{e(q.variant)}</b>, {e(metric)} "
            f"{e(_quality_value(q))} (n={q.n}; {n_variants} variants)"
        )
    return out


# --------------------------------------------------------------------------- html


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 color:#1d232a;margin:0;background:#f6f7f9}
main{max-width:1320px;margin:0 auto;padding:24px 28px 48px;background:#fff}
h1{font-size:26px;margin:0 0 4px}
h2{font-size:20px;margin:32px 0 8px;border-bottom:2px solid #e3e6ea;padding-bottom:4px}
h3{font-size:16px;margin:20px 0 6px}
.sub{color:#5b6570;margin:0 0 14px}
table{border-collapse:collapse;margin:6px 0 14px;font-variant-numeric:tabular-nums}
th,td{padding:3px 9px;border-bottom:1px solid #e6e8eb;text-align:left;vertical-align:top;
 white-space:nowrap}
td.w{white-space:normal}
.tw{max-width:100%;overflow-x:auto}
th{background:#f0f2f5;font-weight:600;white-space:nowrap}
td.n,th.n{text-align:right;white-space:nowrap}
tbody tr:hover{background:#f7fafc}
tr.peer td{color:#5b6570;font-size:13px}
tr.peer td:first-child{padding-left:22px}
tr.grp td{border-top:2px solid #d5d9de}
.env td:first-child{color:#5b6570;padding-right:18px}
.findings{background:#f3f8ff;border:1px solid #cfe0f5;border-radius:6px;
 padding:10px 18px 10px 34px}
.findings li{margin:3px 0}
.findings-t td{padding:5px 10px}.findings-t td:nth-child(5){max-width:560px}
nav.toc{margin:10px 0 4px;font-size:14px}nav.toc a{color:#2456a6;text-decoration:none}
a{color:#2456a6}
.fast{color:#17733a}.slow{color:#b3261e}
.r{display:block;font-size:11.5px}
.st{font-size:12px;color:#8a5300}.st.err{color:#b3261e}.st.ni{color:#6b7480}
.flag{color:#b36b00;cursor:help}
.notes{color:#8a5300}
.muted{color:#6b7480;font-size:13px}
figure{margin:16px 0 28px}figure img{max-width:100%;border:1px solid #eceef1}
figcaption{color:#5b6570;font-size:13px;margin-top:4px}
details>summary{cursor:pointer;color:#2456a6;margin:6px 0}
code{background:#f0f2f5;padding:0 3px;border-radius:3px}
"""


def _td(text: str, cls: str = "", title: str | None = None, raw: bool = False) -> str:
    attrs = f' class="{cls}"' if cls else ""
    if title:
        attrs += f' title="{html.escape(title)}"'
    return f"<td{attrs}>{text if raw else html.escape(text)}</td>"


def _th(text: str, cls: str = "") -> str:
    return f"<th{f' class={chr(34)}{cls}{chr(34)}' if cls else ''}>{html.escape(text)}</th>"


def _status_span(r: _Eff) -> str:
    cls = "st err" if r.status == "error" else "st ni" if r.status == "not installed" else "st"
    return f'<span class="{cls}">{html.escape(r.status)}</span>'


def _ratio_span(ratio: float, suffix: str = "", block: bool = True) -> str:
    """A time or memory ratio, green below 1, red from 1 (``block``: on its own line)."""
    cls = ("r " if block else "") + ("fast" if ratio < 1 else "slow")
    return f'<span class="{cls}">{html.escape(fmt_ratio(ratio) + suffix)}</span>'


def _time_cell(r: _Eff | None, metric: str, dense: _Eff | None, show_ratio: bool = True) -> str:
    if r is None:
        return _td("", "n")
    t = r.metric(metric)
    if t is None:
        if r.ok:  # e.g. a forward-only peer in a fwd+bwd table
            return _td("—", "n muted", r.reason or "not measured")
        return _td(_status_span(r), "n", r.reason or r.status, raw=True)
    text = html.escape(fmt_sig(t))
    spread = r.spread(metric)
    if spread is not None and spread > HIGH_SPREAD:
        text += f'<span class="flag" title="timing spread {spread:.0%} of the median">~</span>'
    d = dense.metric(metric) if dense is not None else None
    if show_ratio and d:
        ratio = t / d
        text += _ratio_span(ratio)
    return _td(text, "n", raw=True)


def _time_table(sec: _Section, pattern: str, metric: str) -> str | None:
    lengths = sec.lengths(pattern)
    mechs = [m for m in sec.mechanisms if (m, pattern) in sec.series]
    if not any(
        r.metric(metric) is not None
        for m in mechs
        for rows in sec.series[(m, pattern)].values()
        for r in rows.values()
    ):
        return None
    head = "<tr>" + _th("mechanism") + "".join(_th(f"L={L}", "n") for L in lengths) + "</tr>"
    body = []
    for mech in mechs:
        by_impl = sec.series[(mech, pattern)]
        dense = by_impl.get(DENSE, {})
        impls = [i for i in sec.impls if i in by_impl]
        impls = [
            i
            for i in impls
            if i == ATTNLAB
            or any(r.metric(metric) is not None or not r.ok for r in by_impl[i].values())
        ]
        for k, impl in enumerate(impls):
            rows = by_impl[impl]
            name = mech if impl == ATTNLAB else f"{mech} · {impl}"
            cls = ' class="grp"' if k == 0 else ""
            if impl != ATTNLAB:
                cls = ' class="peer grp"' if k == 0 else ' class="peer"'
            cells = "".join(
                _time_cell(
                    rows.get(L),
                    metric,
                    dense.get(L) if impl != DENSE else None,
                    show_ratio=impl != DENSE,
                )
                for L in lengths
            )
            body.append(f"<tr{cls}>{_td(name)}{cells}</tr>")
    return f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def _memory_table(sec: _Section, pattern: str) -> str | None:
    lengths = sec.lengths(pattern)
    mechs = [m for m in sec.mechanisms if (m, pattern) in sec.series]
    rows_html = []
    any_value = False
    for mech in mechs:
        by_impl = sec.series[(mech, pattern)]
        for impl in (i for i in sec.impls if i in by_impl):
            rows = by_impl[impl]
            if not any(r.ok and r.peak_mib is not None for r in rows.values()):
                continue
            any_value = True
            dense = by_impl.get(DENSE, {})
            cells = []
            for L in lengths:
                r = rows.get(L)
                if r is None or not r.ok or r.peak_mib is None:
                    cells.append(
                        _td("", "n")
                        if r is None
                        else _td(_status_span(r) if not r.ok else "—", "n", r.reason, raw=True)
                    )
                    continue
                text = html.escape(fmt_sig(r.peak_mib))
                d = dense.get(L)
                if impl != DENSE and d is not None and d.ok and d.peak_mib:
                    ratio = r.peak_mib / d.peak_mib
                    text += _ratio_span(ratio)
                cells.append(_td(text, "n", raw=True))
            name = mech if impl == ATTNLAB else f"{mech} · {impl}"
            cls = "grp" if impl == ATTNLAB else "peer"
            rows_html.append(f'<tr class="{cls}">{_td(name)}{"".join(cells)}</tr>')
    if not any_value:
        return None
    head = "<tr>" + _th("mechanism") + "".join(_th(f"L={L}", "n") for L in lengths) + "</tr>"
    return f"<table><thead>{head}</thead><tbody>{''.join(rows_html)}</tbody></table>"


def _error_table(sec: _Section) -> str | None:
    patterns = sec.patterns
    rows_html = []
    for mech in sec.mechanisms:
        cells = []
        have = False
        for pattern in patterns:
            att = [
                r
                for r in sec.get(mech, pattern, ATTNLAB).values()
                if r.err_out is not None or r.err_grad is not None
            ]
            if not att:
                cells += [_td("", "n"), _td("", "n")]
                continue
            have = True
            for attr in ("err_out", "err_grad"):
                vals = [(getattr(r, attr), r.L) for r in att if getattr(r, attr) is not None]
                if vals:
                    v, L = max(vals)
                    cells.append(
                        _td(
                            fmt_err(v),
                            "n",
                            f"largest at L={L}; measured at L="
                            + ", ".join(str(x) for x in sorted(x for _, x in vals)),
                        )
                    )
                else:
                    cells.append(_td("—", "n"))
        if have:
            rows_html.append(f"<tr>{_td(mech)}{''.join(cells)}</tr>")
    if not rows_html:
        return None
    head1 = (
        "<tr>"
        + _th("")
        + "".join(f'<th colspan="2" class="n">{html.escape(p)}</th>' for p in patterns)
        + "</tr>"
    )
    head2 = (
        "<tr>"
        + _th("mechanism")
        + "".join(_th("output", "n") + _th("grad", "n") for _ in patterns)
        + "</tr>"
    )
    return f"<table><thead>{head1}{head2}</thead><tbody>{''.join(rows_html)}</tbody></table>"


def _summary_html(sec: _Section, rows: Sequence[_Summary]) -> str:
    heads = [
        "mechanism",
        "pattern",
        "L",
        "backend",
        "fwd ms",
        "fwd+bwd ms",
        "t / dense",
        "peak MiB",
        "max err out",
        "max err grad",
        "visible",
        "crossover",
    ]
    head = (
        "<tr>"
        + "".join(_th(h, "" if h in ("mechanism", "pattern", "backend") else "n") for h in heads)
        + "</tr>"
    )
    body = []
    prev = None
    for s in rows:
        r = s.row
        ratio = ""
        if s.ratio is not None:
            ratio = _ratio_span(s.ratio, block=False)
            if s.ratio_L != s.L:
                why = f"sdpa_dense has no time at L={s.L}"
                ratio += f' <span class="muted" title="{why}">at L={s.ratio_L}</span>'
            if s.metric == "fwd":
                ratio += (
                    ' <span class="muted" title="forward times: no fwd+bwd on one side">fwd</span>'
                )
        backend = html.escape(r.backend or "") if r.time_ms is not None else _status_span(r)
        xo = s.crossover
        xo_title = None
        if xo is not None:
            xo_title = (
                f"compared at L={', '.join(map(str, xo.compared))} ({'/'.join(xo.metrics)}); "
                f"attnlab faster at {', '.join(map(str, xo.faster)) or 'none'}"
            )
        cls = ' class="grp"' if s.mechanism != prev else ""
        L_cell = _td(str(s.L), "n")
        if s.failed_above:
            why = "; ".join(
                f"L={f.L}: {f.status}" + (f" ({f.reason})" if f.reason else "")
                for f in s.failed_above
            )
            larger = ", ".join(str(f.L) for f in s.failed_above)
            fail = f'<span class="r st err" title="{html.escape(why)}">failed at {larger}</span>'
            L_cell = _td(f"{s.L}{fail}", "n", raw=True)
        body.append(
            f"<tr{cls}>"
            + _td(s.mechanism if s.mechanism != prev else "")
            + _td(s.pattern)
            + L_cell
            + _td(backend, "", r.reason if not r.ok else None, raw=True)
            + _time_cell(r, "fwd", None, False)
            + _time_cell(r, "fwdbwd", None, False)
            + _td(ratio, "n", raw=True)
            + _td(fmt_sig(r.peak_mib), "n")
            + _td(fmt_err(s.err_out), "n")
            + _td(fmt_err(s.err_grad), "n")
            + _td(fmt_sig(r.density, 2), "n")
            + _td(
                xo.label() if xo else "—",
                "n " + ("" if xo is None else "fast" if xo.length is not None else "slow"),
                xo_title,
            )
            + "</tr>"
        )
        prev = s.mechanism
    return f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def _peers_html(data: _Data) -> str | None:
    if not data.eff:
        return None
    groups: dict[tuple[str, str, str], list[_Eff]] = {}
    for r in data.eff:
        groups.setdefault((r.impl, r.status_label, r.reason or ""), []).append(r)
    impl_order = {i: k for k, i in enumerate(_impl_order(r.impl for r in data.eff))}
    # peer time / attnlab time at the same (mechanism, pattern, L, dtype, device)
    att = {
        (r.mechanism, r.pattern, r.L, r.dtype, r.device): r for r in data.eff if r.impl == ATTNLAB
    }
    body = []
    for (impl, label, reason), rs in sorted(
        groups.items(),
        key=lambda kv: (impl_order[kv[0][0]], not kv[0][1].startswith("ok"), -len(kv[1])),
    ):
        mechs = _unique_order(r.mechanism for r in rs)
        pats = _pattern_order(r.pattern for r in rs)
        Ls = sorted({r.L for r in rs})
        ratios = []
        if impl != ATTNLAB:
            for r in rs:
                p = _pair(att.get((r.mechanism, r.pattern, r.L, r.dtype, r.device)), r)
                if p is not None:
                    ratios.append(p[1] / p[0])
        compile_s = [r.compile_s for r in rs if r.compile_s is not None]
        cls = (
            "st err"
            if label == "error"
            else "st ni"
            if label == "not installed"
            else "st"
            if not label.startswith("ok")
            else ""
        )
        mech_text = ", ".join(mechs[:8]) + (f", … ({len(mechs)} in all)" if len(mechs) > 8 else "")
        extra = []
        if ratios:
            extra.append(
                f"median time {fmt_ratio(statistics.median(ratios))} attnlab's "
                f"(faster in {sum(x < 1 for x in ratios)} of {len(ratios)})"
            )
        if compile_s:
            extra.append(f"compile {fmt_sig(statistics.median(compile_s))} s (median)")
        body.append(
            "<tr>"
            + _td(impl)
            + _td(f'<span class="{cls}">{html.escape(label)}</span>', raw=True)
            + _td(str(len(rs)), "n")
            + _td(_shorten(reason, 160), "w", reason if len(reason) > 160 else None)
            + _td(mech_text, "w")
            + _td("all four" if set(pats) == set(PATTERNS) else ", ".join(pats), "w")
            + _td(f"{Ls[0]}–{Ls[-1]}" if len(Ls) > 1 else str(Ls[0]))
            + _td("; ".join(extra), "w")
            + "</tr>"
        )
    head = (
        "<tr>"
        + "".join(
            _th(h, "n" if h == "records" else "")
            for h in [
                "implementation",
                "status",
                "records",
                "reason",
                "mechanisms",
                "patterns",
                "L",
                "vs attnlab",
            ]
        )
        + "</tr>"
    )
    return f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def _quality_html(qrows: Sequence[QualityRow]) -> str | None:
    if not qrows:
        return None
    best = _best_quality(qrows)
    show_mech = any(q.mechanism and q.mechanism != q.variant for q in qrows)
    show_extra = any(q.extra for q in qrows)
    body = []
    prev = None
    for q in qrows:
        direction = "" if q.higher_is_better is None else (" ↑" if q.higher_is_better else " ↓")
        value = html.escape(_quality_value(q))
        if best.get((q.task, q.metric)) is q:
            value = f"<b>{value}</b>"
        rng = f"{fmt_sig(q.min)} – {fmt_sig(q.max)}" if q.n > 1 else ""
        n_text = str(q.n) + (
            f' <span class="st err">+{q.failed} failed</span>' if q.failed else ""
        )
        cls = ' class="grp"' if q.task != prev else ""
        body.append(
            f"<tr{cls}>"
            + _td(q.task if q.task != prev else "")
            + _td(q.variant)
            + (_td(q.mechanism or "") if show_mech else "")
            + _td(q.preset or "")
            + _td(str(q.steps) if q.steps else "", "n")
            + _td(q.metric + direction)
            + _td(value, "n", raw=True)
            + _td(rng, "n")
            + _td(n_text, "n", "; ".join(q.reasons) or None, raw=True)
            + _td(fmt_sig(q.train_s), "n")
            + _td(f"{q.params:,}" if q.params else "—", "n")
            + (_td(q.extra, "muted w") if show_extra else "")
            + "</tr>"
        )
        prev = q.task
    heads = (
        ["task", "variant"]
        + (["mechanism"] if show_mech else [])
        + ["preset", "steps", "metric", "mean ± sd", "min – max", "n", "train s", "params"]
        + (["other"] if show_extra else [])
    )
    numeric = ("steps", "mean ± sd", "min – max", "n", "train s", "params")
    head = "<tr>" + "".join(_th(h, "n" if h in numeric else "") for h in heads) + "</tr>"
    return f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)} (<code>{html.escape(path.name)}</code>)"
        "</figcaption></figure>"
    )


def write_report(
    records: Iterable[Mapping[str, Any]], out_dir: str | Path, *, title: str = "attnlab bench"
) -> Path:
    """Write ``out_dir/report.html`` (and the PNG plots beside it) and return its path.

    The HTML is self-contained: inline CSS, the plots embedded as base64 ``data:`` URIs (the
    PNG files are kept beside it too), no external resource and no JavaScript. Contents: the
    environment; key findings (per pattern the fastest and slowest mechanism at the largest
    length and the crossover lengths; peers that beat attnlab; the largest error; failures;
    the best quality variant per task); per (dtype, device) a summary at the largest length,
    per-pattern time tables (mechanism × L with the ratio to sdpa_dense; fwd+bwd, forward in
    a folded section), memory (folded) and error tables; the implementations/peers table
    (status and reason); the quality table; the plots. Without matplotlib the report is
    written without plots and says so; an empty record list gives a report saying so."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = _parse(records)
    sections = _sections(data)
    xo = _crossovers_of(sections)
    qrows = _aggregate_quality(data.qual)
    e = html.escape
    multi = len(sections) > 1

    plot_paths: list[tuple[Path, str]] = []
    plot_note = None
    if data.eff or data.qual:
        from . import plots

        if not plots.available():
            plot_note = (
                "matplotlib is not installed: this report has no plots "
                "(pip install matplotlib, then write the report again)"
            )
        else:
            plot_paths, failures = plots.write_plots(data, out_dir)
            data.notes.extend(failures)

    body: list[str] = []
    toc: list[tuple[str, str]] = []

    def section(anchor: str, heading: str) -> None:
        toc.append((anchor, heading))
        body.append(f'<h2 id="{anchor}">{e(heading)}</h2>')

    tables = [(sec, _findings_table(sec, xo)) for sec in sections]
    bullets = _findings(data, sections, qrows)
    if any(t for _, t in tables) or bullets:
        section("findings", "Key findings")
        for sec, t in tables:
            if t:
                body.append((f"<h3>{e(sec.label)}</h3>" if multi else "") + t)
        if bullets:
            body.append(
                '<ul class="findings">' + "".join(f"<li>{b}</li>" for b in bullets) + "</ul>"
            )
    notes = list(data.notes) + ([plot_note] if plot_note else [])
    if notes:
        body.append('<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")

    for k, sec in enumerate(sections):
        section(
            f"eff{k}",
            f"Efficiency: {sec.dtype} on {sec.device}"
            + (f" ({sec.shape_label})" if sec.shape_label else ""),
        )
        body.append(
            '<p class="muted">Times in ms, the median of the repeats '
            f'(<span class="flag">~</span>: spread above {HIGH_SPREAD:.0%} of the median). '
            "t / dense and the small numbers below the times: attnlab's time over "
            "<code>sdpa_dense</code>'s (torch SDPA with a dense boolean mask of the same "
            'pattern) at the same L, <span class="fast">green</span> when faster. Crossover: '
            "the smallest L from which attnlab stays faster than sdpa_dense at every larger L "
            "both measured (≤ L: already at the smallest L measured; never*: faster at some "
            "shorter L only).</p>"
        )
        rows = _summary_rows(sec, xo)
        if rows:
            body.append("<h3>At the largest measured length</h3>" + _summary_html(sec, rows))
        for metric, name in (("fwdbwd", "forward + backward"), ("fwd", "forward")):
            tabs = [(p, t) for p in sec.patterns if (t := _time_table(sec, p, metric))]
            if not tabs:
                continue
            inner = "".join(f"<h3>{e(p)} · {name} time (ms)</h3>{t}" for p, t in tabs)
            if metric == "fwd" and any(_time_table(sec, p, "fwdbwd") for p in sec.patterns):
                body.append(
                    f"<details><summary>Forward times, per pattern</summary>{inner}</details>"
                )
            else:
                body.append(inner)
        mem = [(p, t) for p in sec.patterns if (t := _memory_table(sec, p))]
        if mem:
            body.append(
                "<h3>Peak memory</h3><details><summary>Peak extra memory of one forward+backward "
                "(MiB; below: ratio to sdpa_dense), per pattern</summary>"
                + "".join(f"<h3>{e(p)}</h3>{t}" for p, t in mem)
                + "</details>"
            )
        err = _error_table(sec)
        if err:
            body.append(
                "<h3>Relative error vs the float64 reference (largest over the lengths)</h3>" + err
            )

    peers = _peers_html(data)
    if peers:
        section("peers", "Implementations and peers")
        body.append(
            '<p class="muted">Records per implementation and status. vs attnlab: the peer\'s time '
            "over attnlab's for the same mechanism, pattern and length.</p>" + peers
        )
    qt = _quality_html(qrows)
    if qt:
        section("quality", "Quality")
        body.append(
            '<p class="muted">Mean ± sample standard deviation over seeds (n: seeds with a '
            "result); the best of each task in bold; ↑ higher is better, ↓ lower.</p>" + qt
        )
    if plot_paths or plot_note:
        section("plots", "Plots")
        body.append(
            "".join(_img(p, cap) for p, cap in plot_paths)
            if plot_paths
            else f"<p>{e(plot_note)}</p>"
        )

    head = [
        f"<h1>{e(title)}</h1>",
        f'<p class="sub">{e(_counts_text(data))} · report written '
        f"{e(datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}</p>",
    ]
    env = _env_summary(data.records)
    if env:
        head.append(
            '<table class="env"><tbody>'
            + "".join(f"<tr>{_td(k)}{_td(v)}</tr>" for k, v in env)
            + "</tbody></table>"
        )
    if not data.records:
        head.append(
            "<p><b>No records.</b> The results folder holds no benchmark results yet: run "
            "<code>attnlab bench</code> first, or check the folder.</p>"
        )
    elif not data.eff and not data.qual:
        head.append("<p><b>No efficiency or quality records</b> among the records read.</p>")
    if len(toc) > 1:
        head.append(
            '<nav class="toc">'
            + " · ".join(f'<a href="#{a}">{e(h)}</a>' for a, h in toc)
            + "</nav>"
        )

    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title>"
        f"<style>{_CSS}</style></head><body><main>\n"
        + "\n".join(head + body)
        + "\n</main></body></html>\n"
    )
    doc = doc.replace("<table", '<div class="tw"><table').replace("</table>", "</table></div>")
    path = out_dir / REPORT_FILE
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(path)
    return path
