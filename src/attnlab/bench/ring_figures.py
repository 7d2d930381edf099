"""The figures of the context-parallel (ring attention) issue.

    python -m attnlab.bench.ring_figures                  # 1, 2 and 4 gloo ranks on this machine
    python -m attnlab.bench.ring_figures --quick          # shorter sequence, one repeat
    python -m attnlab.bench.ring_figures --json out.json  # also write every figure as JSON

Measured, for 1, 2 and 4 ranks (forked processes, one thread each, gloo over loopback), for
Full, Causal (contiguous and zigzag shards) and a causal sliding window, one
``ring_attention`` forward+backward per repeat:

- bytes each rank sends and receives (forward and backward; the largest over the ranks);
- hidden fraction of the forward's communication: ``1 - wait / comm``, with ``wait`` the time
  blocked on transfers while computing and ``comm`` the time the same transfers take with no
  compute in between (median over repeats, mean over ranks);
- load imbalance: the slowest rank's compute time over the mean.

Modelled, for 8 to 64 ranks of a long-context layer (``--model-*`` options): bytes per rank
from the ring schedule (exact), the load imbalance of causal sharding with and without
balancing (exact: visible pairs per rank), and the hidden fraction with compute and
communication times from an assumed attention throughput and link bandwidth.

On a machine with fewer cores than ranks the measured times (not the bytes) are those of
oversubscribed processes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from attnlab.geometry import Geometry
from attnlab.patterns import Causal, Full, SlidingWindow
from attnlab.patterns.layout import Tiling

CASES = {  # name: (pattern factory from the global length, layout)
    "full": (lambda L: Full(), "contiguous"),
    "causal": (lambda L: Causal(), "contiguous"),
    "causal_zigzag": (lambda L: Causal(), "zigzag"),
    "sliding_window": (lambda L: SlidingWindow(max(1, L // 16) - 1), "contiguous"),
}


def _comm_only_seconds(call, k, v) -> float:
    """The forward's transfers of ``call`` with nothing computed in between."""
    from attnlab.distributed.ring import _post_kv

    steps = call.sched.steps
    t0 = time.perf_counter()
    pending = _post_kv(call, k, v, steps[0]) if steps else None
    for i in range(len(steps)):
        nxt = _post_kv(call, k, v, steps[i + 1]) if i + 1 < len(steps) else None
        pending.finish(call.info, None)
        pending = nxt
    return time.perf_counter() - t0


def _rank_main(rank, world, store, cfg, out):
    from attnlab.distributed import CommStats, ring_attention
    from attnlab.distributed.ring import _setup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    L, H, D, reps = cfg["L"], cfg["heads"], cfg["head_dim"], cfg["repeats"]
    n = L // world
    res = {}
    for name, (make, layout) in CASES.items():
        pattern = make(L)
        g = torch.Generator().manual_seed(rank)
        q, k, v, do = (torch.randn(1, H, n, D, generator=g) for _ in range(4))
        rows = []
        for _ in range(reps + 1):  # the first is a warm-up
            dist.barrier()
            fwd = CommStats()
            with torch.no_grad():
                ring_attention(q, k, v, pattern=pattern, layout=layout, stats=fwd, check_ranks=False)
            dist.barrier()
            call = _setup(q, k, v, pattern, None, None, layout, None, None, None, None, False, None)
            comm = _comm_only_seconds(call, k, v)
            dist.barrier()
            both = CommStats()
            ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
            out_ = ring_attention(ql, kl, vl, pattern=pattern, layout=layout, stats=both, check_ranks=False)
            torch.autograd.grad(out_, (ql, kl, vl), do)
            rows.append({"fwd_wait": fwd.wait_seconds, "fwd_compute": fwd.compute_seconds, "comm_only": comm,
                         "compute": both.compute_seconds, "sent": both.bytes_sent,
                         "received": both.bytes_received, "fwd_sent": fwd.bytes_sent})
        rows = rows[1:]
        res[name] = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    out.put((rank, res))
    dist.barrier()
    dist.destroy_process_group()


def measure_world(world: int, cfg: dict) -> dict:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank_main, args=(r, world, os.path.join(tmp, "store"), cfg, out))
                 for r in range(world)]
        for p in procs:
            p.start()
        per_rank = dict(out.get(timeout=cfg["deadline"]) for _ in range(world))
        for p in procs:
            p.join(timeout=30)
    figures = {}
    for name in CASES:
        ranks = [per_rank[r][name] for r in range(world)]
        compute = [r["compute"] for r in ranks]
        hidden = [max(0.0, min(1.0, 1 - r["fwd_wait"] / r["comm_only"])) for r in ranks if r["comm_only"] > 0
                  and r["fwd_sent"] + r["fwd_wait"] > 0 and world > 1]
        figures[name] = {
            "bytes_sent_max": max(r["sent"] for r in ranks),
            "bytes_received_max": max(r["received"] for r in ranks),
            "hidden_fraction": statistics.mean(hidden) if hidden else None,
            "imbalance": max(compute) / statistics.mean(compute) if min(compute) > 0 else None,
        }
    return figures


# -- the analytic model ---------------------------------------------------------------------
def causal_pairs(rank: int, world: int, layout: str, L: int) -> int:
    """Visible (query, key) pairs of rank ``rank``'s queries under a causal mask."""
    from attnlab.distributed.sharding import chunk_ranges

    total = 0
    n = L // world
    c = n // (2 if layout == "zigzag" else 1)
    for start, _ in chunk_ranges(rank, world, layout, n):
        total += (start + c) * (start + c + 1) // 2 - start * (start + 1) // 2  # sum of (i + 1)
    return total


def causal_imbalance(world: int, layout: str, L: int) -> float:
    work = [causal_pairs(r, world, layout, L) for r in range(world)]
    return max(work) / statistics.mean(work)


def _schedule(pattern, world, layout, L):
    from attnlab.distributed import RingSchedule, chunk_visibility

    g = Geometry(1, 1, 1, (L,), (L,), 1, 1, torch.device("cpu"))
    c = L // (world * (2 if layout == "zigzag" else 1))
    return RingSchedule(chunk_visibility(pattern, g, world, layout, c, c), world, layout), g, c


def _pair_work(pattern, g: Geometry, c: int, tile: int) -> torch.Tensor:
    """Approximate visible pairs of every (query chunk, key chunk): whole tiles count fully,
    partial tiles half."""
    t = Tiling(g, (tile,), (tile,))
    lay = pattern.block_layout(t)
    any_, full = lay.any[0, 0].float(), lay.full[0, 0].float()
    per_tile = (full + 0.5 * (any_ - full)) * tile * tile
    m, k = g.q_len // c, c // tile
    return per_tile.view(m, k, m, k).sum((1, 3))


def model(world: int, name: str, args) -> dict:
    make, layout = CASES[name]
    L = args.model_len
    pattern = make(L)
    sched, g, c = _schedule(pattern, world, layout, L)
    n = L // world
    elem = args.model_bytes
    kv_bytes = 2 * args.model_kv_heads * n * args.model_head_dim * elem
    grad_bytes = 2 * args.model_kv_heads * n * args.model_head_dim * 4  # partials in float32
    tile = max(1, min(c, L // 1024))
    work = _pair_work(pattern, g, c, tile)
    flop = 4 * args.model_heads * args.model_head_dim  # QK^T and PV per visible pair, forward
    hidden, sent = [], []
    from attnlab.distributed.sharding import rank_chunks

    for r in range(world):
        recv = sched.shards_received(r)
        sent.append(sched.shards_sent(r) * (2 * kv_bytes + grad_bytes))
        comp, comm = [], []
        for s in sched.steps:
            src = sched.source(r, s)
            pairs = 0.0
            if src is not None:
                for ia, ib in sched.needs[r][src]:
                    pairs += float(work[rank_chunks(r, world, layout)[ia], rank_chunks(src, world, layout)[ib]])
            comp.append(pairs * flop / (args.model_tflops * 1e12))
            comm.append(kv_bytes / (args.model_gbps * 1e9) if s and src is not None else 0.0)
        total = sum(comm)
        if total and recv:
            hidden.append(sum(min(comm[i + 1], comp[i]) for i in range(len(comm) - 1)) / total)
    return {"bytes_sent_max": max(sent),
            "hidden_fraction": statistics.mean(hidden) if hidden else None}


def _fmt_bytes(n) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--len", type=int, default=2048, help="global sequence length (measured)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--quick", action="store_true", help="--len 512 --repeats 1")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--model-len", type=int, default=131072)
    ap.add_argument("--model-heads", type=int, default=32)
    ap.add_argument("--model-kv-heads", type=int, default=8)
    ap.add_argument("--model-head-dim", type=int, default=128)
    ap.add_argument("--model-bytes", type=int, default=2, help="bytes per k/v element (2: bf16)")
    ap.add_argument("--model-tflops", type=float, default=300.0, help="assumed attention TFLOP/s per rank")
    ap.add_argument("--model-gbps", type=float, default=50.0, help="assumed GB/s per rank and direction")
    ap.add_argument("--model-worlds", type=int, nargs="+", default=[8, 16, 32, 64])
    args = ap.parse_args(argv)
    if args.quick:
        args.len, args.repeats = 512, 1
    cfg = {"L": args.len, "heads": args.heads, "head_dim": args.head_dim, "repeats": args.repeats,
           "deadline": 1800}
    report = {"config": vars(args), "measured": {}, "model": {}, "imbalance": {}}
    print(f"measured: L={args.len} B=1 H={args.heads} D={args.head_dim} float32, gloo, "
          f"{os.cpu_count()} CPU cores, forward+backward, median of {args.repeats}")
    print(f"{'ranks':>5} {'case':<15} {'sent/rank':>11} {'recv/rank':>11} {'hidden':>7} {'imbalance':>9}")
    for w in args.worlds:
        figs = measure_world(w, cfg)
        report["measured"][w] = figs
        for name, f in figs.items():
            imb = "-" if f["imbalance"] is None else f"{f['imbalance']:.2f}"
            print(f"{w:>5} {name:<15} {_fmt_bytes(f['bytes_sent_max']):>11} "
                  f"{_fmt_bytes(f['bytes_received_max']):>11} {_pct(f['hidden_fraction']):>7} {imb:>9}")
    print(f"\nmodel: L={args.model_len} Hq={args.model_heads} Hkv={args.model_kv_heads} "
          f"D={args.model_head_dim}, {args.model_bytes}-byte k/v, assumed {args.model_tflops:g} TFLOP/s "
          f"and {args.model_gbps:g} GB/s per rank (forward hidden fraction; bytes forward+backward)")
    print(f"{'ranks':>5} {'case':<15} {'sent/rank':>11} {'hidden':>7}")
    for w in args.model_worlds:
        report["model"][w] = {}
        for name in CASES:
            f = model(w, name, args)
            report["model"][w][name] = f
            print(f"{w:>5} {name:<15} {_fmt_bytes(f['bytes_sent_max']):>11} {_pct(f['hidden_fraction']):>7}")
    print("\ncausal load imbalance (busiest rank's visible pairs / mean), exact")
    print(f"{'ranks':>5} {'contiguous':>11} {'zigzag':>7}")
    for w in sorted(set(args.worlds + args.model_worlds)):
        L = args.model_len
        row = {lay: causal_imbalance(w, lay, L) for lay in ("contiguous", "zigzag")}
        report["imbalance"][w] = row
        print(f"{w:>5} {row['contiguous']:>11.3f} {row['zigzag']:>7.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
    return report


if __name__ == "__main__":
    main()
