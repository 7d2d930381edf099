"""Timing and memory measurement shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median: float
    spread: float  # (max - min) / median over the repeats
    repeats: int

    def __str__(self) -> str:
        return f"{self.median * 1e3:.1f} ms (+-{self.spread * 50:.0f}%)"


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], repeats: int = 3, warmup: int = 1, device="cpu") -> Timing:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return Timing(med, (max(times) - min(times)) / med if med > 0 else 0.0, repeats)


def measure_pair(
    fn_a: Callable[[], object],
    fn_b: Callable[[], object],
    repeats: int = 3,
    warmup: int = 1,
    device="cpu",
) -> tuple[Timing, Timing]:
    """Time two functions interleaved (a, b, a, b, ...) so that drift in the machine's
    speed affects both alike; returns their timings."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    _sync(device)
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((fn_a, ta), (fn_b, tb)):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            acc.append(time.perf_counter() - t0)

    def summary(times: list[float]) -> Timing:
        med = statistics.median(times)
        return Timing(med, (max(times) - min(times)) / med if med > 0 else 0.0, repeats)

    return summary(ta), summary(tb)


def forward_backward(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Callable[[], None]:
    """A closure that runs ``fn(*inputs)`` and backpropagates a fixed random gradient."""
    grad = None

    def run() -> None:
        nonlocal grad
        for x in inputs:
            x.grad = None
        out = fn(*inputs)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)

    return run


def forward_only(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            fn(*inputs)

    return run


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far, in GiB.

    On Linux this is ``VmHWM`` of ``/proc/self/status``: ``getrusage``'s ``ru_maxrss``
    survives ``execve``, so a child started from a large parent would report the parent's
    size at fork time."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1 << 30) if sys.platform == "darwin" else kb / (1 << 20)
