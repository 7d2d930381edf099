"""The figures of the linear-attention issue, as ratios measured in one process.

    python -m attnlab.bench.linear_figures            # CPU, B=1 H=8 D=64 float32
    python -m attnlab.bench.linear_figures --quick    # shorter lengths, for a smoke run

Reports, for causal chunked linear attention (``linear_attention(..., causal=True)``; identity
features unnormalised, the semantics of flash-linear-attention's ``linear_attn``, and elu+1
normalised):

- linear scaling: time at ``2L`` over time at ``L``, forward and forward+backward (the two
  lengths timed interleaved);
- forward+backward against flash-linear-attention's reference code
  (``naive_recurrent_linear_attn``, same function) and against dense causal SDPA;
- recurrent decoding: the time of one token at position ~16 and at position ~16384 (median of
  64 steps each, the two positions' steps alternating), carrying the state;
- the peak resident memory of a fresh process running chunked forward+backward at the longest
  length (``VmHWM``: the whole process, torch included).

Times are medians of ``--repeats`` runs after one warm-up; backward passes use a fixed random
output gradient.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from attnlab.bench.timing import forward_backward, forward_only, measure, measure_pair, peak_rss_gib
from attnlab.linear import linear_attention

VARIANTS = {"identity": dict(feature_map="identity", normalize=False),
            "elu+1": dict(feature_map="elu+1", normalize=True)}


def _median_time(run, repeats: int) -> float:
    return measure(run, repeats).median


def _inputs(L: int, heads: int, dim: int, grad: bool, layout=None):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, heads, L, dim, generator=g) for _ in range(3)]
    if layout is not None:
        xs = [layout(x) for x in xs]
    return [x.requires_grad_(grad) for x in xs]


def _fwd(fn, L, heads, dim):
    return forward_only(fn, *_inputs(L, heads, dim, False))


def _fwd_bwd(fn, L, heads, dim, layout=None):
    return forward_backward(fn, *_inputs(L, heads, dim, True, layout))


def scaling(L: int, heads: int, dim: int, repeats: int) -> dict:
    """Time at ``L`` and at ``2L``, measured interleaved (``L, 2L, L, 2L, ...``) so that drift in
    the machine's speed affects both alike."""
    out = {}
    for name, kw in VARIANTS.items():
        def fn(q, k, v, kw=kw):
            return linear_attention(q, k, v, causal=True, **kw)

        row = {}
        for mode, make in (("fwd", _fwd), ("fwdbwd", _fwd_bwd)):
            t1, t2 = measure_pair(make(fn, L, heads, dim), make(fn, 2 * L, heads, dim), repeats)
            row[mode] = {"t_L_s": t1.median, "t_2L_s": t2.median, "ratio": t2.median / t1.median}
        out[name] = row
    return out


def against_fla(L: int, heads: int, dim: int, repeats: int) -> dict:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fla.ops.linear_attn.naive import naive_recurrent_linear_attn
    except ImportError as e:
        return {"status": f"not installed ({e}); pip install flash-linear-attention fla-core triton"}
    ours = _median_time(_fwd_bwd(lambda q, k, v: linear_attention(q, k, v, causal=True, **VARIANTS["identity"]),
                                 L, heads, dim), repeats)
    heads_last = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
    theirs = _median_time(_fwd_bwd(lambda q, k, v: naive_recurrent_linear_attn(q, k, v)[0], L, heads, dim,
                                   heads_last), 1)
    return {"L": L, "attnlab_s": ours, "fla_naive_s": theirs, "speedup": theirs / ours}


def against_sdpa(L: int, heads: int, dim: int, repeats: int) -> dict:
    ours = _median_time(_fwd_bwd(lambda q, k, v: linear_attention(q, k, v, causal=True, **VARIANTS["identity"]),
                                 L, heads, dim), repeats)
    dense = _median_time(_fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                  L, heads, dim), 1)
    return {"L": L, "attnlab_s": ours, "sdpa_causal_s": dense, "speedup": dense / ours}


def decoding(positions: tuple[int, int], heads: int, dim: int, window: int = 64) -> dict:
    """Per-token time of one-token ``linear_attention(..., form="recurrent")`` calls that carry
    the state, at two positions: two states are advanced to the positions, then ``window``
    steps of each are timed alternately (median of each), so that drift affects both alike."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, 1, dim, generator=g) for _ in range(3))

    def step(state):
        return linear_attention(q, k, v, causal=True, initial_state=state, return_state=True,
                                form="recurrent")[1]

    states, times = [None, None], ([], [])
    with torch.no_grad():
        for i, pos in enumerate(positions):
            for _ in range(pos):
                states[i] = step(states[i])
        for _ in range(window):
            for i in range(2):
                t0 = time.perf_counter()
                states[i] = step(states[i])
                times[i].append(time.perf_counter() - t0)
    a, b = (statistics.median(t) for t in times)
    return {f"token_{positions[0]}_us": a * 1e6, f"token_{positions[1]}_us": b * 1e6, "ratio": b / a}


def _peak_child(L: int, heads: int, dim: int) -> None:
    _fwd_bwd(lambda q, k, v: linear_attention(q, k, v, causal=True, **VARIANTS["elu+1"]), L, heads, dim)()
    print(peak_rss_gib())


def peak_memory(L: int, heads: int, dim: int) -> dict:
    code = (f"import torch; torch.set_num_threads({torch.get_num_threads()}); "
            f"from attnlab.bench.linear_figures import _peak_child; _peak_child({L}, {heads}, {dim})")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {"L": L, "process_peak_gib": float(res.stdout.strip().splitlines()[-1])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short lengths (a smoke run, not the figures)")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    heads, dim = 8, 64
    s = 4 if args.quick else 1
    figures = {
        "config": {"threads": torch.get_num_threads(), "torch": torch.__version__, "B": 1, "H": heads,
                   "D": dim, "dtype": "float32", "chunk_size": 64},
        "scaling_16384_to_32768": scaling(16384 // s, heads, dim, args.repeats),
        "vs_fla_naive": against_fla(8192 // s, heads, dim, args.repeats),
        "vs_sdpa_causal": against_sdpa(32768 // (4 * s if args.quick else 1), heads, dim, args.repeats),
        "decoding": decoding((16, 16384 // s), heads, dim),
        "peak_memory": peak_memory(65536 // s, heads, dim),
    }
    print(json.dumps(figures, indent=1, default=lambda x: round(x, 4) if isinstance(x, float) else x))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0 if all(math.isfinite(v) for v in _floats(figures)) else 1


def _floats(d):
    for v in d.values():
        if isinstance(v, dict):
            yield from _floats(v)
        elif isinstance(v, float):
            yield v


if __name__ == "__main__":
    raise SystemExit(main())
