"""Peak memory of one call, on CPU and CUDA, for the efficiency suite.

``peak_memory_mib(fn, device)`` is the peak of the bytes allocated *during* ``fn()`` above
what was allocated when it started (inputs and earlier tensors excluded), in MiB:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
- CPU: the allocator's allocation and free events recorded by ``torch.profiler`` with
  ``profile_memory=True``, summed in time order. The process's resident-set high-water
  mark cannot be reset, so it would only ever report the largest problem run so far.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import torch


@contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence what C++ code writes to file descriptor 2 (the profiler's start/stop lines)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. captured by a test runner)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def _cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - start)


def peak_memory_mib(fn: Callable[[], object], device: str | torch.device = "cpu") -> float:
    """Peak extra memory allocated while ``fn()`` runs, in MiB (see the module docstring)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return _cuda_peak_bytes(fn, dev) / (1 << 20)
    if dev.type != "cpu":
        raise ValueError(f"peak memory is measured on 'cpu' or 'cuda', got device={str(device)!r}")
    return _cpu_peak_bytes(fn) / (1 << 20)
