"""ring_attention on 2 and 4 gloo ranks equals single-process attention on the whole sequence:
outputs, log-sum-exps and gradients (q, k, v and score-mod parameters), for Full, Causal
(contiguous and load-balanced), SlidingWindow, Document, composed patterns, a plain mask_mod,
score mods, GQA and padded lengths; pattern-aware runs send fewer bytes than full rings.
Every case of one world size runs inside one forked group."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.distributed as dist

import attnlab as al
from attnlab.distributed import CommStats, ring_attention, shard
from _ring_harness import expect_ok, run_world

B, HQ, HKV, D = 1, 4, 2, 8
LENGTHS = {2: 24, 4: 32}


def _every_third(b, h, q_idx, kv_idx):
    return ((q_idx - kv_idx) % 3 == 0) | (kv_idx == 0)


def _cases(L: int):
    ids = torch.arange(L) * 3 // L  # three packed documents
    ids2 = (torch.arange(L) * 5 // L).flip(0)
    torch.manual_seed(1)
    bias = al.RelativeBias(HQ, num_buckets=8, max_distance=16, init_std=0.5).double()
    return [
        # name, pattern, layout, score_mod, true length
        ("full", None, "contiguous", None, L),
        ("causal", al.Causal(), "contiguous", None, L),
        ("causal_zigzag", al.Causal(), "zigzag", None, L),
        ("sliding_window", al.SlidingWindow(3), "contiguous", None, L),
        ("sliding_window_two_sided_zigzag", al.SlidingWindow(2, 3), "zigzag", None, L),
        ("document", al.Document(ids), "zigzag", None, L),
        ("composed", (al.SlidingWindow(4, 2) | al.Sinks(2)) & al.Document(ids2), "contiguous", None, L),
        ("mask_mod", _every_third, "contiguous", None, L),
        ("alibi_causal_zigzag", al.Causal(), "zigzag", al.ALiBi(HQ), L),
        ("relative_bias", al.SlidingWindow(5, 1), "contiguous", bias, L),
        ("padded_causal_zigzag", al.Causal(), "zigzag", None, L - 3),
        ("padded_document", al.Document(torch.arange(L - 1) * 2 // (L - 1)), "contiguous", None, L - 1),
    ]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def _worker(rank: int, world: int) -> dict:
    L = LENGTHS[world]
    results = {}
    for name, pattern, layout, score_mod, n in _cases(L):
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        q, do = (torch.randn(B, HQ, n, D, generator=g, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(B, HKV, n, D, generator=g, dtype=torch.float64) for _ in range(2))
        for t in (q, k, v):
            t.requires_grad_()
        params = score_mod.differentiable_tensors() if score_mod is not None else []
        ref, ref_lse = al.attention(q, k, v, pattern, score_mod, return_lse=True, backend="reference")
        ref_grads = torch.autograd.grad(ref, [q, k, v, *params], do)

        def cut(x):
            return shard(x.detach(), rank=rank, world_size=world, layout=layout, pad=n != L)

        ql, kl, vl = (cut(t).requires_grad_() for t in (q, k, v))
        stats = CommStats()
        out, lse = ring_attention(ql, kl, vl, pattern=pattern, score_mod=score_mod, layout=layout,
                                  seq_len=n, return_lse=True, timeout=20, stats=stats)
        grads = torch.autograd.grad(out, [ql, kl, vl, *params], cut(do))
        param_grads = [p.clone() for p in grads[3:]]
        for p in param_grads:  # each rank holds its part of the parameter gradient
            dist.all_reduce(p)
        real = cut(torch.ones_like(ref_lse)).bool()  # False on padding
        finite = torch.isfinite(cut(ref_lse)) & real
        results[name] = {
            "out": _max_err(out, cut(ref)),
            "lse": _max_err(lse[finite], cut(ref_lse)[finite]),
            "lse_inf_match": bool((torch.isfinite(lse) == finite).all()),
            "dq": _max_err(grads[0], cut(ref_grads[0])),
            "dk": _max_err(grads[1], cut(ref_grads[1])),
            "dv": _max_err(grads[2], cut(ref_grads[2])),
            "dparams": max([_max_err(a, b) for a, b in zip(param_grads, ref_grads[3:])], default=0.0),
            "n_params": len(params),
            "bytes_sent": stats.bytes_sent,
            "bytes_received": stats.bytes_received,
        }
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def world_results(request):
    world = request.param
    return world, expect_ok(run_world(world, _worker, deadline_s=150))


CASE_NAMES = [c[0] for c in _cases(24)]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_outputs_and_gradients_equal_single_process(world_results, case):
    world, per_rank = world_results
    for rank, res in enumerate(per_rank):
        r = res[case]
        for key in ("out", "lse", "dq", "dk", "dv", "dparams"):
            assert r[key] < 1e-12, f"world={world} rank={rank} {case}: {key} differs by {r[key]:.3g}"
        assert r["lse_inf_match"], f"world={world} rank={rank} {case}: rows with no key differ"


def test_score_mod_parameters_get_gradients(world_results):
    _, per_rank = world_results
    assert per_rank[0]["relative_bias"]["n_params"] >= 1


def test_pattern_aware_rings_send_fewer_bytes(world_results):
    world, per_rank = world_results

    def total(case):
        return sum(r[case]["bytes_sent"] for r in per_rank)

    assert sum(r["full"]["bytes_sent"] for r in per_rank) == sum(r["full"]["bytes_received"] for r in per_rank)
    assert total("causal") < total("full")
    assert total("sliding_window") < total("full")
    if world == 4:  # a window of 3 tokens over shards of 8 only reaches the previous rank
        assert total("sliding_window") * 2 < total("full")
