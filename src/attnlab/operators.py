"""How the catalog runs the mechanisms that are not a softmax pattern (linear, spectral, ...).

Each such catalog row has an ``operator(L, S, heads, head_dim, causal) -> Operator`` factory:
a representative instance of the mechanism on inputs ``q (B, H, L, D)``, ``k, v (B, H, S, D)``
(the benchmark's problem), with any parameters it needs (random features, learned maps, filters)
drawn from a fixed seed. ``Operator.fast`` is attnlab's fast path, ``Operator.reference`` the
exact reference it is checked against (run in float64), ``Operator.note`` says how the inputs
are used when that is not obvious (token mixers mix ``v``; Aaren reads one query).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .linear.aaren import aaren, aaren_reference
from .linear.agent import agent_attention, agent_attention_reference
from .linear.api import linear_attention
from .linear.decays import retnet_decay, tnl_decay
from .linear.efficient import efficient_attention, efficient_attention_reference
from .linear.feature_maps import CosFormer, PerformerRandomFeatures, TaylorExp
from .linear.flow import flow_attention, flow_attention_reference
from .linear.learned_maps import T2R, Hedgehog
from .linear.toeplitz import toeplitz_kernelized_attention, toeplitz_kernelized_attention_reference
from .linear.transnormer import diag_attention, diag_attention_reference, norm_attention, norm_attention_reference
from .mixers import (
    adaptive_spectral_filter_reference,
    fnet_mixing,
    fnet_mixing_reference,
    global_filter,
    global_filter_reference,
    spectformer_block_reference,
)

Fn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Operator:
    """A mechanism instance: ``fast(q, k, v)`` and ``reference(q, k, v)`` compute the same
    ``(B, H, L, Dv)`` output (the reference exactly, in the inputs' dtype)."""

    fast: Fn
    reference: Fn
    note: str = ""


def _seeded():
    return torch.random.fork_rng(devices=[])


def _per_dtype(module: torch.nn.Module) -> Callable[[torch.dtype], torch.nn.Module]:
    """A copy of ``module`` per dtype (never cast in place: a graph built with one dtype's
    parameters must keep them for its backward)."""
    copies: dict[torch.dtype, torch.nn.Module] = {}

    def get(dtype: torch.dtype) -> torch.nn.Module:
        if dtype not in copies:
            copies[dtype] = copy.deepcopy(module).to(dtype)
        return copies[dtype]

    return get


def _linear(feature_map, *, normalize: bool = True, decay=None, causal: bool, prep=None, note: str = ""):
    maps = _per_dtype(feature_map) if isinstance(feature_map, torch.nn.Module) else None

    def run(q, k, v, form):
        if prep is not None:
            q, k = prep(q), prep(k)
        fm = maps(q.dtype) if maps is not None else feature_map
        return linear_attention(q, k, v, feature_map=fm, causal=causal, decay=decay, normalize=normalize,
                                form=form)

    return Operator(lambda q, k, v: run(q, k, v, "chunked"), lambda q, k, v: run(q, k, v, "parallel"), note)


def linear_identity(L, S, heads, head_dim, causal):
    return _linear("identity", normalize=False, causal=causal)


def linear_elu(L, S, heads, head_dim, causal):
    return _linear("elu+1", causal=causal)


def performer(L, S, heads, head_dim, causal):
    return _linear(PerformerRandomFeatures(head_dim, 256, seed=0, orthogonal=True), causal=causal)


def cosformer(L, S, heads, head_dim, causal):
    return _linear(CosFormer(), causal=causal)


def based(L, S, heads, head_dim, causal):
    d = min(16, head_dim)
    return _linear(TaylorExp(), causal=causal, prep=lambda x: x[..., :d],
                   note=f"Taylor features of the first {d} query/key dims (Based's projected feature dim)")


def hedgehog(L, S, heads, head_dim, causal):
    with _seeded():
        torch.manual_seed(0)
        return _linear(Hedgehog(head_dim, num_heads=heads).requires_grad_(False), causal=causal)


def t2r(L, S, heads, head_dim, causal):
    with _seeded():
        torch.manual_seed(0)
        return _linear(T2R(head_dim, head_dim).requires_grad_(False), causal=causal)


def retention(L, S, heads, head_dim, causal):
    return _linear("identity", normalize=False, decay=retnet_decay(heads), causal=True)


def _gla_gate(k: Tensor, proj: Tensor) -> Tensor:
    return torch.exp(torch.nn.functional.logsigmoid(k @ proj.to(k.dtype)) / 16)


def gla(L, S, heads, head_dim, causal):
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(head_dim, head_dim, generator=g) / head_dim ** 0.5

    def run(q, k, v, form):
        return linear_attention(q, k, v, feature_map="identity", causal=True, normalize=False,
                                gate=_gla_gate(k, proj), form=form)

    return Operator(lambda q, k, v: run(q, k, v, "chunked"), lambda q, k, v: run(q, k, v, "parallel"),
                    "per-feature gates sigmoid(k W)^(1/16) from a fixed random W")


def transnormer_llm(L, S, heads, head_dim, causal):
    decay = tnl_decay(heads, 0, 2)
    return Operator(lambda q, k, v: norm_attention(q, k, v, causal=True, decay=decay),
                    lambda q, k, v: norm_attention_reference(q, k, v, causal=True, decay=decay))


def norm_attn(L, S, heads, head_dim, causal):
    return Operator(lambda q, k, v: norm_attention(q, k, v, causal=causal),
                    lambda q, k, v: norm_attention_reference(q, k, v, causal=causal))


def diag_attn(L, S, heads, head_dim, causal):
    block = max(1, min(64, L // 8))
    return Operator(lambda q, k, v: diag_attention(q, k, v, block_size=block, causal=causal),
                    lambda q, k, v: diag_attention_reference(q, k, v, block_size=block, causal=causal))


def efficient(L, S, heads, head_dim, causal):
    return Operator(efficient_attention, efficient_attention_reference)


def agent(L, S, heads, head_dim, causal):
    n = min(49, L)
    return Operator(lambda q, k, v: agent_attention(q, k, v, num_agents=n),
                    lambda q, k, v: agent_attention_reference(q, k, v, num_agents=n))


def flow(L, S, heads, head_dim, causal):
    return Operator(flow_attention, flow_attention_reference)


def toeplitz(L, S, heads, head_dim, causal):
    g = torch.Generator().manual_seed(0)
    bias = 0.1 * torch.randn(heads, L + S - 1, generator=g)

    def bind(fn):
        return lambda q, k, v: fn(q, k, v, bias.to(q.dtype), causal=causal)

    return Operator(bind(toeplitz_kernelized_attention), bind(toeplitz_kernelized_attention_reference))


def aaren_op(L, S, heads, head_dim, causal):
    return Operator(lambda q, k, v: aaren(q[:, :, 0], k, v), lambda q, k, v: aaren_reference(q[:, :, 0], k, v),
                    "the first query of each head is Aaren's (learned) query; outputs at every prefix")


def _as_tokens(v: Tensor) -> Tensor:
    B, H, S, D = v.shape
    return v.transpose(1, 2).reshape(B, S, H * D)


def _as_heads(x: Tensor, heads: int) -> Tensor:
    B, S, C = x.shape
    return x.reshape(B, S, heads, C // heads).transpose(1, 2)


def _mixer(fn: Callable[[Tensor], Tensor], ref: Callable[[Tensor], Tensor], heads: int) -> Operator:
    return Operator(lambda q, k, v: _as_heads(fn(_as_tokens(v)), heads),
                    lambda q, k, v: _as_heads(ref(_as_tokens(v)), heads),
                    "token mixer applied to v as (B, S, H*D) tokens; q and k unused")


def fnet(L, S, heads, head_dim, causal):
    return _mixer(fnet_mixing, fnet_mixing_reference, heads)


def gfnet(L, S, heads, head_dim, causal):
    g = torch.Generator().manual_seed(0)
    w = 0.02 * torch.randn(S // 2 + 1, heads * head_dim, 2, generator=g)
    return _mixer(lambda x: global_filter(x, w.to(x.dtype)), lambda x: global_filter_reference(x, w.to(x.dtype)),
                  heads)


def fftnet(L, S, heads, head_dim, causal):
    from .nn.spectral import FFTNetMixer

    with _seeded():
        torch.manual_seed(0)
        mod = _per_dtype(FFTNetMixer(heads * head_dim, S, hidden=4).requires_grad_(False))

    def ref(x):
        m = mod(x.dtype)
        return adaptive_spectral_filter_reference(x, m.base_filter, m.mlp, m.modrelu_bias)

    return _mixer(lambda x: mod(x.dtype)(x), ref, heads)


def spectformer(L, S, heads, head_dim, causal):
    from .nn.spectral import SpectFormerBlock

    with _seeded():
        torch.manual_seed(0)
        mod = _per_dtype(SpectFormerBlock(heads * head_dim, S).requires_grad_(False))

    def ref(x):
        m = mod(x.dtype)
        return spectformer_block_reference(x, m.filter.complex_weight, m.norm1, m.norm2, m.mlp)

    return _mixer(lambda x: mod(x.dtype)(x), ref, heads)
