"""Kernel benchmark: attnlab against its peers, as time ratios measured in one process.

    python -m attnlab.bench.kernels            # the figures of the core issue (a few minutes)
    python -m attnlab.bench.kernels --quick    # the same comparisons on smaller sizes

Every figure is ``attnlab time / baseline time`` (lower is better) for the same problem
in the same run, next to its target. Peers that are not installed or cannot run a problem
(NATTEN and FlexAttention have no backward on CPU) are reported as such, never raised.
Shapes follow the issue: B=1, H=8, D=64, float32.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import attnlab as al
from attnlab.testing import density

from .timing import Timing, forward_backward, forward_only, measure, measure_pair


@dataclass
class Figure:
    name: str
    measure: str  # what the ratio compares
    ours: float | None  # seconds, or GiB for memory figures
    baseline: float | None
    ratio: float | None
    target: float
    note: str = ""

    @property
    def passed(self) -> bool | None:
        return None if self.ratio is None else self.ratio <= self.target

    def row(self, verdict: bool = True) -> str:
        r = "n/a" if self.ratio is None else f"{self.ratio:.3f}"
        if not verdict:
            return f"{self.name:<44} {self.measure:<34} {r:>8}  {self.note}"
        mark = {None: "-", True: "ok", False: "MISS"}[self.passed]
        return f"{self.name:<44} {self.measure:<34} {r:>8}  <= {self.target:<6} {mark:<4} {self.note}"


def _qkv(shape: tuple[int, ...], grad: bool, heads: int = 8, dim: int = 64, device="cpu"):
    g = torch.Generator(device="cpu").manual_seed(0)
    return [
        torch.randn(1, heads, *shape, dim, generator=g).to(device).requires_grad_(grad)
        for _ in range(3)
    ]


def _ratio(ours: Timing | None, base: Timing | None) -> float | None:
    if ours is None or base is None:
        return None
    return ours.median / base.median


def visible_fraction(pattern, shape: tuple[int, ...]) -> float:
    """Exact density of a pattern (visible pairs / all pairs) on one head of ``shape``."""
    q = torch.zeros(1, 1, *shape, 1)
    return density(pattern, al.geometry.check_qkv(q, q, q))


def dense_figures(L: int, repeats: int, device: str) -> list[Figure]:
    out = []
    for causal in (False, True):
        pattern = al.Causal() if causal else None
        name = f"{'Causal' if causal else 'Dense'} L={L}"
        for mode in ("fwd", "fwd+bwd"):
            grad = mode != "fwd"
            q, k, v = _qkv((L,), grad, device=device)
            wrap = forward_backward if grad else forward_only
            ours, base = measure_pair(
                wrap(lambda a, b, c: al.attention(a, b, c, pattern), q, k, v),
                wrap(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal), q, k, v),
                repeats, device=device,
            )
            out.append(Figure(name, f"{mode} / SDPA", ours.median, base.median, _ratio(ours, base), 1.1))
    return out


def sliding_window_figures(L: int, left: int, repeats: int, device: str):
    pattern = al.SlidingWindow(left=left, right=0)
    name = f"SlidingWindow({left},0) L={L}"
    out = []
    q, k, v = _qkv((L,), True, device=device)
    i = torch.arange(L, device=device)
    bool_mask = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - left)
    ours_fb, sdpa_fb = measure_pair(
        forward_backward(lambda a, b, c: al.attention(a, b, c, pattern), q, k, v),
        forward_backward(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=bool_mask), q, k, v),
        max(1, repeats - 1), device=device,
    )
    out.append(Figure(name, "fwd+bwd / SDPA(bool mask)", ours_fb.median, sdpa_fb.median, _ratio(ours_fb, sdpa_fb), 0.25))
    ours_f = forward_only(lambda a, b, c: al.attention(a, b, c, pattern), q, k, v)
    ours_f, flex_t, compile_s, why = _flex_forward(ours_f, q, k, v, pattern, L, repeats, device)
    note = f"flex compile {compile_s:.1f}s (excluded)" if flex_t else why
    out.append(Figure(name, "fwd / compiled flex(BlockMask)", ours_f.median,
                      flex_t.median if flex_t else None, _ratio(ours_f, flex_t), 1.25, note))
    density = visible_fraction(pattern, (L,))
    ours_closure = forward_backward(lambda a, b, c: al.attention(a, b, c, pattern), q, k, v)
    return out, ours_closure, density


def _flex_forward(ours, q, k, v, pattern, L, repeats, device):
    """Time ``ours`` against compiled FlexAttention (interleaved); flex may be missing."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        return measure(ours, repeats, device=device), None, 0.0, f"flex not available: {e}"
    try:
        geom = al.geometry.check_qkv(q, k, v)
        mask_mod = pattern.as_mask_mod(geom)
        block_mask = create_block_mask(mask_mod, None, None, L, L, device=device)
        fn = torch.compile(flex_attention, dynamic=False)
        qd, kd, vd = (x.detach() for x in (q, k, v))
        t0 = time.perf_counter()
        with torch.no_grad():
            fn(qd, kd, vd, block_mask=block_mask)
        compile_s = time.perf_counter() - t0
        flex = forward_only(lambda a, b, c: fn(a, b, c, block_mask=block_mask), qd, kd, vd)
        t_ours, t_flex = measure_pair(ours, flex, repeats, device=device)
        return t_ours, t_flex, compile_s, ""
    except Exception as e:  # a peer failing is a result, not a crash
        return measure(ours, repeats, device=device), None, 0.0, f"flex failed: {type(e).__name__}: {str(e)[:120]}"


def neighborhood_figures(shape: tuple[int, ...], kernel: tuple[int, ...], repeats: int, device: str):
    pattern = al.Neighborhood(kernel_size=kernel)
    name = f"Neighborhood{kernel} on {shape}"
    q, k, v = _qkv(shape, True, device=device)
    ours_fb = forward_backward(lambda a, b, c: al.attention(a, b, c, pattern), q, k, v)
    ours_f = forward_only(lambda a, b, c: al.attention(a, b, c, pattern), q, k, v)
    nat, why = _natten_forward(q, k, v, kernel)
    figs = []
    for label, ours in (("fwd+bwd / NATTEN fwd", ours_fb), ("fwd / NATTEN fwd", ours_f)):
        if nat is None:
            figs.append(Figure(name, label, measure(ours, repeats, device=device).median, None, None, 0.05, why))
            continue
        t_ours, t_nat = measure_pair(ours, nat, repeats, device=device)
        note = "NATTEN has no CPU backward: its forward is the baseline" if "bwd" in label and device == "cpu" else ""
        figs.append(Figure(name, label, t_ours.median, t_nat.median, _ratio(t_ours, t_nat), 0.05, note))
    density = 1.0
    for kk, s in zip(kernel, shape):
        density *= kk / s
    return figs, ours_fb, density


def _natten_forward(q, k, v, kernel):
    """A closure running NATTEN's forward on heads-last copies, or (None, why)."""
    try:
        import natten
    except ImportError:
        return None, "NATTEN not installed"
    f = getattr(natten, {1: "na1d", 2: "na2d", 3: "na3d"}[len(kernel)])
    qh, kh, vh = (x.detach().movedim(1, -2).contiguous() for x in (q, k, v))
    call = forward_only(lambda a, b, c: f(a, b, c, kernel_size=kernel), qh, kh, vh)
    try:
        call()
    except Exception as e:  # a peer failing is a result, not a crash
        return None, f"NATTEN failed: {type(e).__name__}: {str(e)[:120]}"
    return call, ""


def density_figure(name: str, ours: Callable[[], None], density: float, shape, repeats: int, device: str) -> Figure:
    """``ours`` (a forward+backward closure) against ``density`` x dense SDPA forward+backward."""
    q, k, v = _qkv(shape, True, device=device)
    flat = [x.detach().flatten(2, -2).requires_grad_() for x in (q, k, v)]
    dense = forward_backward(lambda a, b, c: F.scaled_dot_product_attention(a, b, c), *flat)
    t_ours, t_dense = measure_pair(ours, dense, max(1, repeats - 1), device=device)
    budget = density * t_dense.median
    return Figure(name, "fwd+bwd / (density x dense SDPA)", t_ours.median, budget, t_ours.median / budget, 2.5,
                  f"density={density:.4f}, dense fwd+bwd {t_dense.median:.2f}s")


def memory_figure(L: int, left: int, device: str) -> Figure:
    """Peak RSS of a fresh process that runs SlidingWindow forward+backward at length L."""
    code = (
        "import torch, attnlab as al\n"
        "from attnlab.bench.timing import peak_rss_gib\n"
        f"q,k,v=[torch.randn(1,8,{L},64,device='{device}',requires_grad=True) for _ in range(3)]\n"
        f"o=al.attention(q,k,v,al.SlidingWindow(left={left},right=0)); o.backward(torch.ones_like(o))\n"
        "print(peak_rss_gib())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        return Figure(f"SlidingWindow({left},0) L={L}", "peak RSS GiB / 1", None, None, None, 2.5,
                      f"failed: {res.stderr.strip().splitlines()[-1][:120] if res.stderr else res.returncode}")
    gib = float(res.stdout.strip().splitlines()[-1])
    return Figure(f"SlidingWindow({left},0) L={L}", "peak process RSS (GiB)", gib, None, gib, 2.5)


SIZES = {
    "full": dict(dense_L=4096, sw_L=16384, sw_left=511, na1=((4096,), (255,)), na2=((64, 64), (13, 13)), mem_L=65536),
    "quick": dict(dense_L=1024, sw_L=4096, sw_left=127, na1=((1024,), (63,)), na2=((32, 32), (7, 7)), mem_L=16384),
}


def run(sizes: str = "full", repeats: int = 3, device: str = "cpu", progress: Callable[[str], None] = print) -> list[Figure]:
    s = SIZES[sizes]
    figs: list[Figure] = []
    progress(f"dense and causal, L={s['dense_L']}")
    figs += dense_figures(s["dense_L"], repeats, device)
    progress(f"sliding window, L={s['sw_L']}")
    sw, sw_fb, sw_density = sliding_window_figures(s["sw_L"], s["sw_left"], repeats, device)
    figs += sw
    for shape, kernel in (s["na1"], s["na2"]):
        progress(f"neighborhood {kernel} on {shape}")
        nf, ours_fb, density = neighborhood_figures(shape, kernel, repeats, device)
        figs += nf
        figs.append(density_figure(f"Neighborhood{kernel} on {shape}", ours_fb, density, shape, repeats, device))
    progress("sliding window density budget")
    figs.append(density_figure(sw[0].name, sw_fb, sw_density, (s["sw_L"],), repeats, device))
    progress(f"peak memory, L={s['mem_L']}")
    figs.append(memory_figure(s["mem_L"], s["sw_left"], device))
    return figs


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "attnlab": al.__version__,
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": sys.platform,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnlab.bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes (about a minute on 2 CPU cores)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    figs = run("quick" if a.quick else "full", a.repeats, a.device, lambda m: print(f"... {m}", flush=True))
    env = environment()
    print(f"\nattnlab {env['attnlab']}, torch {env['torch']}, {env['threads']} threads, device {a.device}")
    full = not a.quick
    print(f"{'problem':<44} {'ratio (attnlab / baseline)':<34} {'value':>8}  {'target' if full else 'note'}")
    for f in figs:
        print(f.row(verdict=full))
    if not full:
        print("\nQuick sizes, for a first look; the targets apply to the full sizes: python -m attnlab.bench.kernels")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"environment": env, "figures": [asdict(f) | {"passed": f.passed} for f in figs]}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
