"""Run a function on every rank of a fresh gloo group in forked processes, with a bounded join.

Each rank returns a value (or its traceback) through a queue; the parent kills every rank
still alive at the deadline and fails, so a test never hangs.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import tempfile
import traceback

import torch
import torch.distributed as dist

GROUP_TIMEOUT_S = 30


def _entry(rank, world, store, fn, args, out):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        result = fn(rank, world, *args)
        out.put((rank, "ok", result))
        # the others may still be reading this rank's sends: leave the group together
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # also after its result, when leaving the group fails: the first wins
        out.put((rank, "error", traceback.format_exc()))
    finally:
        out.close()
        out.join_thread()  # flush the queue's feeder thread before the hard exit
        os._exit(0)


def run_world(world: int, fn, *args, deadline_s: float = 120.0) -> dict[int, tuple[str, object]]:
    """``{rank: ("ok", result) | ("error", traceback) | ("missing", reason)}`` of ``fn(rank,
    world, *args)`` on ``world`` forked ranks. Ranks alive after ``deadline_s`` are killed."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(r, world, store, fn, args, out), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        results: dict[int, tuple[str, object]] = {}
        end = datetime.datetime.now() + datetime.timedelta(seconds=deadline_s)
        while len(results) < world:
            left = (end - datetime.datetime.now()).total_seconds()
            if left <= 0:
                break
            try:
                rank, status, value = out.get(timeout=min(left, 1.0))
                results.setdefault(rank, (status, value))  # a rank's result, not its exit
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and out.empty():
                    break
        # results are in: give the ranks a moment to leave the group, then stop them
        grace = datetime.datetime.now() + datetime.timedelta(seconds=3)
        for p in procs:
            p.join(timeout=max(0.05, (grace - datetime.datetime.now()).total_seconds()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for r in range(world):
            results.setdefault(r, ("missing", f"rank {r} gave no result within {deadline_s} s"))
    return results


def expect_ok(results: dict[int, tuple[str, object]]) -> list[object]:
    """Every rank's result, in rank order; fails with the first rank's error otherwise."""
    bad = {r: v for r, (s, v) in results.items() if s != "ok"}
    if bad:
        rank = min(bad)
        raise AssertionError(f"rank {rank} failed:\n{bad[rank]}")
    return [results[r][1] for r in sorted(results)]
