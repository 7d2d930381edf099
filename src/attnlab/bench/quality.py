"""The quality suite: tiny transformers trained from scratch on a CPU, one per attention variant.

Every run trains a :class:`~attnlab.bench.models.TinyTransformer` ("Attention Is All You
Need", 2017) whose attention is ``attnlab.attention`` with a variant's pattern and score mod,
then scores it on the task's test split. Within a task, every variant of a preset has the
same data, model size, optimiser and steps; only the attention (and whether learned absolute
positions are added) differs. Tasks and their default variants:

* ``mqar`` (multi-query associative recall, causal LM; test accuracy on the queried values):
  ``full`` (Causal + absolute positions), ``sliding_window`` (a causal window of
  ``seq_len // 16`` keys, far shorter than most key-to-query distances, + absolute
  positions), ``alibi`` (Causal + ALiBi, no absolute positions);
* ``selective_copy`` (causal LM; test accuracy on the copied tokens): same three variants;
* ``digits`` (8x8 images as 64 pixel tokens, mean-pooled classification; test accuracy per
  image), attention on the ``(8, 8)`` grid: ``full``, ``neighborhood`` (3x3 neighborhood),
  ``blocked`` (4x4 blocks); all with absolute positions;
* ``bach_chorales`` (next-event prediction; mean test NLL in nats per predicted token, lower
  is better), the comparison of Huang et al., "Music Transformer: Generating Music with
  Long-Term Structure" (2018): ``absolute`` (Causal + learned absolute positions) and
  ``relative`` (Causal + learned relative embeddings, no absolute positions).

Presets: ``"tiny"`` (tests: 4 steps on tiny data), ``"quick"`` (one seed; all four tasks with
their default variants in about a minute on a CPU) and ``"full"`` (3 seeds, longer contexts,
all chorales; a few minutes per task when the machine is idle). Measured on this project's
2-core CPU with ``torch.set_num_threads(2)`` (see :data:`QUICK_TIMING`), quick preset, seed
0: MQAR full 1.00 / sliding window 0.05 / ALiBi 0.54 (chance 1/32); selective copy 0.76 /
0.12 / 0.42 (chance 1/8); digits full 0.74 / neighborhood 0.77 / blocked 0.79; chorales NLL
absolute 1.01 / relative 1.22 (relative needs longer training: at the full preset, seed 0,
it is 0.59 against 0.67). Quick MQAR sits at a phase transition: a few seeds stay on the
plateau at ~1/num_kv_pairs, which is why the full preset runs 3 seeds.

Seeds: a run's ``seed`` is the data seed (task generation / train-test split), the model
initialisation seed (``torch.manual_seed(seed)`` in a forked RNG, the global RNG is left
untouched); ``seed + 1`` seeds the batch order.

Usage::

    for run in plan_quality(preset="quick"):
        print(run.key, run_quality(run))
"""

from __future__ import annotations

import functools
import importlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .._checks import check_int
from ..patterns import Blocked, Causal, Full, Neighborhood, SlidingWindow
from ..scores import ALiBi, RelativeEmbedding
from . import tasks as task_data
from .models import TinyTransformer
from .tasks import TaskData

PRESETS: tuple[str, ...] = ("tiny", "quick", "full")
QUICK_TIMING = "60 s: the quick preset (11 runs, 1.4 s of imports included) on 2 idle slow CPU cores"
"""Measured wall time of the quick preset (all tasks, default variants and seeds)."""


@dataclass(frozen=True)
class Preset:
    """Training settings of one task at one preset.

    ``data`` holds the task function's extra keyword arguments (``seq_len`` is passed as the
    task's length argument where it has one); ``seeds`` are the default seeds.
    """

    steps: int
    layers: int
    dim: int
    heads: int
    seq_len: int
    batch_size: int
    lr: float
    seeds: tuple[int, ...]
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Variant:
    """One attention variant of a task: ``name``, the catalog ``mechanism`` it exercises,
    factories ``pattern(preset)`` and ``score_mod(preset)`` (called once per layer; None for
    no score mod), whether learned absolute positions are added, and the token shape the
    attention sees (``grid``; None for a 1-D sequence)."""

    name: str
    mechanism: str
    pattern: Callable[[Preset], Any]
    score_mod: Callable[[Preset], Any] | None = None
    absolute_positions: bool = True
    grid: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A task: how to load its data for a preset and seed, its variants, presets and metric.
    ``requires`` is ``(import name, pip name)`` of an optional package it needs."""

    name: str
    load: Callable[[Preset, int], TaskData]
    variants: tuple[Variant, ...]
    presets: Mapping[str, Preset]
    metric: str  # "accuracy" | "nll"
    requires: tuple[str, str] | None = None

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ValueError(
            f"unknown variant {name!r} for task {self.name!r}; valid: {[v.name for v in self.variants]}"
        )


def _window(p: Preset) -> int:
    return max(1, p.seq_len // 16)


_RECALL_VARIANTS = (
    Variant("full", "causal", lambda p: Causal()),
    Variant("sliding_window", "sliding_window", lambda p: SlidingWindow(left=_window(p))),
    Variant("alibi", "alibi", lambda p: Causal(), lambda p: ALiBi(p.heads), absolute_positions=False),
)
_GRID = (8, 8)
_DIGITS_VARIANTS = (
    Variant("full", "full", lambda p: Full(), grid=_GRID),
    Variant("neighborhood", "neighborhood", lambda p: Neighborhood(kernel_size=(3, 3)), grid=_GRID),
    Variant("blocked", "blocked", lambda p: Blocked((4, 4)), grid=_GRID),
)
_CHORALE_VARIANTS = (
    Variant("absolute", "causal", lambda p: Causal()),
    Variant(
        "relative", "relative_embedding", lambda p: Causal(),
        lambda p: RelativeEmbedding(p.dim // p.heads, max_distance=p.seq_len, num_heads=p.heads),
        absolute_positions=False,
    ),
)

# Preset(steps, layers, dim, heads, seq_len, batch_size, lr, seeds, data). Quick presets are
# sized for ~1 minute in all: MQAR needs ~270 steps of 64 sequences at width 64 to leave its
# plateau (width 32, batch 32 or GPT-style 0.02 embeddings stayed on it); chorales use 64
# tokens, where the relative embedding costs ~1.5x the absolute model's step.
TASKS: dict[str, TaskSpec] = {
    "mqar": TaskSpec(
        "mqar",
        lambda p, seed: task_data.mqar(seq_len=p.seq_len, seed=seed, **p.data),
        _RECALL_VARIANTS,
        {
            "tiny": Preset(4, 1, 16, 2, 16, 8, 3e-3, (0,), dict(num_examples=16, num_kv_pairs=2, vocab_size=16)),
            "quick": Preset(270, 2, 64, 4, 32, 64, 3e-3, (0,), dict(num_examples=4000, num_kv_pairs=4, vocab_size=64)),
            "full": Preset(600, 2, 64, 4, 64, 64, 3e-3, (0, 1, 2), dict(num_examples=20000, num_kv_pairs=4, vocab_size=64)),
        },
        "accuracy",
    ),
    "selective_copy": TaskSpec(
        "selective_copy",
        lambda p, seed: task_data.selective_copy(seq_len=p.seq_len, seed=seed, **p.data),
        _RECALL_VARIANTS,
        {
            "tiny": Preset(4, 1, 16, 2, 16, 8, 3e-3, (0,), dict(num_examples=16, num_tokens=2, vocab_size=8)),
            "quick": Preset(150, 2, 64, 4, 32, 32, 3e-3, (0,), dict(num_examples=4000, num_tokens=4, vocab_size=10)),
            "full": Preset(700, 2, 64, 4, 64, 32, 3e-3, (0, 1, 2), dict(num_examples=20000, num_tokens=8, vocab_size=16)),
        },
        "accuracy",
    ),
    "digits": TaskSpec(
        "digits",
        lambda p, seed: task_data.digits(seed=seed, **p.data),
        _DIGITS_VARIANTS,
        {
            "tiny": Preset(4, 1, 16, 2, 64, 8, 3e-3, (0,)),
            "quick": Preset(120, 2, 64, 4, 64, 32, 5e-3, (0,)),
            "full": Preset(800, 2, 64, 4, 64, 32, 3e-3, (0, 1, 2)),
        },
        "accuracy",
        ("sklearn", "scikit-learn"),
    ),
    "bach_chorales": TaskSpec(
        "bach_chorales",
        lambda p, seed: task_data.bach_chorales(seed=seed, max_len=p.seq_len, **p.data),
        _CHORALE_VARIANTS,
        {
            "tiny": Preset(4, 1, 16, 2, 32, 8, 3e-3, (0,), dict(max_pieces=4)),
            "quick": Preset(120, 2, 32, 4, 64, 16, 3e-3, (0,), dict(max_pieces=40)),
            "full": Preset(1000, 2, 64, 4, 128, 16, 2e-3, (0, 1, 2)),
        },
        "nll",
        ("music21", "music21"),
    ),
}


def _spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {list(TASKS)}")
    return TASKS[task]


def _check_preset(preset: object) -> str:
    if not isinstance(preset, str):
        raise TypeError(f"preset must be a str, got preset={preset!r}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset={preset!r}; valid: {list(PRESETS)}")
    return preset


@dataclass(frozen=True)
class QualityRun:
    """One training run: a task's variant at one seed and preset."""

    task: str
    variant: str
    mechanism: str
    seed: int
    preset: str

    @property
    def key(self) -> str:
        """Stable id, e.g. ``quality|mqar|full|seed=0|quick``."""
        return f"quality|{self.task}|{self.variant}|seed={self.seed}|{self.preset}"

    def config(self) -> dict[str, Any]:
        """JSON-ready description: the run and the training settings of its preset."""
        p = _spec(self.task).presets[_check_preset(self.preset)]
        return {
            "suite": "quality", "task": self.task, "variant": self.variant,
            "mechanism": self.mechanism, "seed": self.seed, "preset": self.preset,
            "steps": p.steps, "layers": p.layers, "dim": p.dim, "heads": p.heads,
            "seq_len": p.seq_len, "batch_size": p.batch_size, "lr": p.lr,
        }


def _names(arg: str, value: Iterable[str] | str | None, valid: list[str]) -> list[str] | None:
    """``value`` as a list of distinct names from ``valid`` (None stays None)."""
    if value is None:
        return None
    names = [value] if isinstance(value, str) else list(value)
    for name in names:
        if name not in valid:
            raise ValueError(f"unknown {arg[:-1]} {name!r} in {arg}={value!r}; valid: {valid}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{arg} must be distinct and non-empty, got {arg}={value!r}")
    return names


def plan_quality(
    tasks: Iterable[str] | str | None = None,
    variants: Iterable[str] | str | None = None,
    seeds: Iterable[int] | None = None,
    preset: str = "quick",
) -> list[QualityRun]:
    """The runs of the quality suite, ordered by task, seed, variant.

    ``tasks``: task names (None: all of :data:`TASKS`). ``variants``: variant names (None:
    every variant of each task); a task runs those of the names it has, and a name that no
    selected task has is an error. ``seeds``: None for each task's default seeds at
    ``preset``. Unknown names raise ``ValueError`` listing the valid choices.
    """
    preset = _check_preset(preset)
    chosen = _names("tasks", tasks, list(TASKS)) or list(TASKS)
    offered = list(dict.fromkeys(v.name for t in chosen for v in TASKS[t].variants))
    wanted = _names("variants", variants, offered)
    if seeds is not None:
        seeds = [check_int("seeds", s, 0) for s in seeds]
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got seeds={seeds!r}")
    runs = []
    for task in chosen:
        spec = TASKS[task]
        for seed in seeds if seeds is not None else spec.presets[preset].seeds:
            for v in spec.variants:
                if wanted is None or v.name in wanted:
                    runs.append(QualityRun(task, v.name, v.mechanism, seed, preset))
    return runs


@functools.lru_cache(maxsize=16)
def load_data(task: str, preset: str, seed: int) -> TaskData:
    """The (cached, shared: do not modify) data of ``task`` at ``preset`` and ``seed``."""
    spec = _spec(task)
    return spec.load(spec.presets[_check_preset(preset)], seed)


def build_model(task: str, variant: str, preset: str, data: TaskData) -> TinyTransformer:
    """The model of a run, freshly initialised from the global torch RNG."""
    spec = _spec(task)
    p, v = spec.presets[_check_preset(preset)], spec.variant(variant)
    return TinyTransformer(
        data.vocab_size, data.seq_len, dim=p.dim, heads=p.heads, layers=p.layers,
        num_classes=data.num_classes, pattern=v.pattern(p),
        make_score_mod=(lambda: v.score_mod(p)) if v.score_mod else None,
        absolute_positions=v.absolute_positions, grid=v.grid,
    )


def _loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str = "mean"):
    if logits.dim() == 3:
        logits, targets = logits.flatten(0, 1), targets.flatten()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


def train(
    model: torch.nn.Module, data: TaskData, *, steps: int, batch_size: int, lr: float,
    seed: int, device: str | torch.device = "cpu",
) -> list[float]:
    """Train ``model`` in place with AdamW (weight decay 0.01, gradient norm clipped to 1,
    linear warm-up over the first 10% of steps, then cosine decay to ``lr / 10``) on batches
    of shuffled training examples (epoch by epoch, order seeded by ``seed``). Returns every
    step's training loss; a non-finite loss raises ``FloatingPointError``."""
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
    )
    n = len(data.train_inputs)
    order, pos, losses = torch.randperm(n, generator=gen), 0, []
    model.train()
    for step in range(steps):
        if pos + batch_size > n and pos > 0:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        x, y = data.train_inputs[idx].to(device), data.train_targets[idx].to(device)
        loss = _loss(model(x), y, data.ignore_index)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: TaskData, metric: str, *, device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> float:
    """Test ``metric`` of ``model``: ``"accuracy"`` (per image for classification, per
    predicted token otherwise, skipping ``ignore_index``) or ``"nll"`` (mean negative
    log-likelihood in nats per predicted token)."""
    if metric not in ("accuracy", "nll"):
        raise ValueError(f"unknown metric={metric!r}; valid: ['accuracy', 'nll']")
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data.test_inputs), batch_size):
        x = data.test_inputs[i : i + batch_size].to(device)
        y = data.test_targets[i : i + batch_size].to(device)
        logits = model(x)
        scored = y != data.ignore_index
        if metric == "nll":
            total += float(_loss(logits, y, data.ignore_index, reduction="sum"))
        else:
            total += int(((logits.argmax(-1) == y) & scored).sum())
        count += int(scored.sum())
    if count == 0:
        raise ValueError(f"the test split of {data.name} has no target to score")
    return total / count


def _result(status: str, reason: str | None, metric: str, value: float | None = None,
            train_s: float = 0.0, params: int = 0, final: float | None = None) -> dict[str, Any]:
    return {
        "status": status, "reason": reason, "metric": metric, "value": value,
        "higher_is_better": metric == "accuracy", "train_s": round(float(train_s), 3),
        "params": int(params), "final_train_loss": final,
    }


def run_quality(run: QualityRun, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Train and evaluate one run; never raises for a failing run.

    Returns the JSON-ready result ``{"status": "ok" | "error" | "not installed", "reason",
    "metric": "accuracy" | "nll", "value", "higher_is_better", "train_s", "params",
    "final_train_loss"}``: ``value`` is the test metric, ``final_train_loss`` the mean
    training loss of the last ``min(10, steps)`` steps, ``train_s`` the training time (data
    loading and evaluation excluded). A missing optional package gives ``"not installed"``
    with a pip hint, any other exception (a non-finite loss or metric included) ``"error"``
    with ``"ExceptionType: message"`` and ``value`` None. Raises ``TypeError`` only if
    ``run`` is not a :class:`QualityRun`.
    """
    if not isinstance(run, QualityRun):
        raise TypeError(f"run must be a QualityRun, got run={run!r}")
    metric = TASKS[run.task].metric if run.task in TASKS else "accuracy"
    params, train_s = 0, 0.0
    try:
        spec = _spec(run.task)
        if spec.requires is not None:
            module, pip_name = spec.requires
            try:
                importlib.import_module(module)
            except ImportError:
                return _result("not installed", f"needs {pip_name}: pip install {pip_name}", metric)
        p = spec.presets[_check_preset(run.preset)]
        data = load_data(run.task, run.preset, run.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(run.seed)
            model = build_model(run.task, run.variant, run.preset, data).to(device)
        params = sum(t.numel() for t in model.parameters())
        start = time.perf_counter()
        losses = train(model, data, steps=p.steps, batch_size=p.batch_size, lr=p.lr,
                       seed=run.seed + 1, device=device)
        train_s = time.perf_counter() - start
        value = evaluate(model, data, spec.metric, device=device)
        if not math.isfinite(value):
            raise FloatingPointError(f"test {spec.metric} is {value}")
        final = sum(losses[-10:]) / len(losses[-10:])
        return _result("ok", None, metric, float(value), train_s, params, float(final))
    except Exception as e:  # noqa: BLE001 - a failing run is a result, not a crash
        return _result("error", f"{type(e).__name__}: {e}", metric, None, train_s, params)
