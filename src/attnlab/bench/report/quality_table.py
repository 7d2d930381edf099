"""Quality records aggregated over seeds (mean, sample standard deviation, n)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .formatting import fmt_sig
from .records import _int, _parse, _Qual, _str, _unique_order


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
