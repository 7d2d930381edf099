"""ring_linear_attention equals the single-process chunked form (outputs, final state and
gradients), and ContextParallelAttention equals attnlab.nn.MultiheadAttention (outputs and
parameter gradients summed over the ranks); on 2 and 4 gloo ranks in one forked group each."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import attnlab as al
from attnlab.distributed import ContextParallelAttention, context_parallel, ring_linear_attention, shard, unshard
from attnlab.nn import MultiheadAttention
from _ring_harness import expect_ok, run_world

B, HQ, HKV, D = 1, 4, 2, 8


def _err(a, b) -> float:
    return (a - b).abs().max().item()


def _linear_cases(L):
    g = torch.Generator().manual_seed(5)
    gate = torch.rand(B, HQ, L, generator=g, dtype=torch.float64) * 0.5 + 0.5
    return [
        ("causal_elu", dict(causal=True), None),
        ("causal_decay_unnormalised", dict(causal=True, decay=torch.tensor([0.9, 0.8, 0.95, 0.7]),
                                           normalize=False, feature_map="identity"), None),
        ("causal_gate", dict(causal=True, feature_map="relu"), gate),
        ("noncausal", dict(causal=False), None),
    ]


def _linear(rank, world, L):
    res = {}
    for name, kw, gate in _linear_cases(L):
        g = torch.Generator().manual_seed(len(name))
        q, do = (torch.randn(B, HQ, L, D, generator=g, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(B, HKV, L, D, generator=g, dtype=torch.float64) for _ in range(2))
        inputs = [q, k, v] + ([gate.clone()] if gate is not None else [])
        for t in inputs:
            t.requires_grad_()
        extra = {"gate": inputs[3]} if gate is not None else {}
        ref, ref_state = al.linear_attention(q, k, v, chunk_size=4, form="chunked", return_state=True,
                                             **kw, **extra)
        ref_grads = torch.autograd.grad((ref * do).sum() + ref_state.S.sum(), inputs)

        def cut(x):
            return shard(x.detach(), rank=rank, world_size=world)

        local = [cut(t).requires_grad_() for t in inputs]
        lextra = {"gate": local[3]} if gate is not None else {}
        out, state = ring_linear_attention(local[0], local[1], local[2], chunk_size=4, return_state=True,
                                           timeout=20, **kw, **lextra)
        # the final state is replicated: its loss is counted once, by rank 0
        loss = (out * cut(do)).sum() + (state.S.sum() if rank == 0 else 0 * state.S.sum())
        grads = torch.autograd.grad(loss, local)
        res[name] = {"out": _err(out, cut(ref)), "state": _err(state.S, ref_state.S),
                     **{f"d{i}": _err(a, cut(b)) for i, (a, b) in enumerate(zip(grads, ref_grads))}}
    return res


def _module(rank, world, L):
    torch.manual_seed(0)
    E = HQ * D
    mha = MultiheadAttention(E, HQ, num_kv_heads=HKV, pattern=al.SlidingWindow(5, 2), dtype=torch.float64)
    x = torch.randn(B, L, E, dtype=torch.float64)
    ref = mha(x, x, x, need_weights=False, is_causal=True)[0]
    ref.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in mha.named_parameters()}
    mha.zero_grad()
    model = context_parallel(nn.Sequential(nn.Identity(), mha), layout="zigzag", timeout=20)
    cp = model[1]
    xl = shard(x, rank=rank, world_size=world, layout="zigzag", dim=1)
    out = cp(xl, xl, xl, is_causal=True)[0]
    out.square().sum().backward()
    grad_err = 0.0
    for n, p in mha.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        grad_err = max(grad_err, _err(g, ref_grads[n]))
    gathered = unshard(out.detach(), layout="zigzag", dim=1, timeout=20)
    return {"wrapped": isinstance(cp, ContextParallelAttention), "embed_dim": cp.embed_dim,
            "out": _err(out, shard(ref.detach(), rank=rank, world_size=world, layout="zigzag", dim=1)),
            "unshard": _err(gathered, ref.detach()), "param_grads": grad_err}


def _worker(rank, world):
    L = 16 if world == 2 else 32
    return {"linear": _linear(rank, world, L), "module": _module(rank, world, L)}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def results(request):
    return request.param, expect_ok(run_world(request.param, _worker, deadline_s=120))


@pytest.mark.parametrize("case", [c[0] for c in _linear_cases(16)])
def test_ring_linear_attention_equals_chunked_form(results, case):
    world, per_rank = results
    for rank, res in enumerate(per_rank):
        for key, err in res["linear"][case].items():
            assert err < 1e-10, f"world={world} rank={rank} {case}: {key} differs by {err:.3g}"


def test_context_parallel_multihead_equals_single_process(results):
    world, per_rank = results
    for rank, res in enumerate(per_rank):
        m = res["module"]
        assert m["wrapped"] and m["embed_dim"] == HQ * D
        for key in ("out", "unshard", "param_grads"):
            assert m[key] < 1e-10, f"world={world} rank={rank}: {key} differs by {m[key]:.3g}"
