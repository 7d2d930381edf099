"""Catalog rows of the hybrid mechanisms (family ``"adaptive"``, kind ``"operator"``).

Each row's ``operator(L, S, heads, head_dim, causal)`` factory builds a representative instance
on the benchmark's inputs ``q (B, H, L, D)``, ``k, v (B, H, S, D)``: ``fast`` is the mechanism's
fast path and ``reference`` its dense reference, with the same fixed-seed weights. The rows are
wired into :mod:`attnlab.registry` by the lead; this module imports the registry lazily.
"""

from __future__ import annotations

import math

import torch

__all__ = ["hybrid_mechanisms"]


def _grid(L: int) -> tuple[int, int]:
    """``(h, w)`` with ``h * w == L``, ``h`` the largest divisor of ``L`` that is ``<= sqrt(L)``."""
    h = max(d for d in range(1, math.isqrt(L) + 1) if L % d == 0)
    return h, L // h


def nsa_operator(L: int, S: int, heads: int, head_dim: int, causal: bool):
    from ..operators import Operator
    from .nsa import native_sparse_attention, native_sparse_attention_reference

    block = max(1, min(64, S // 8))
    nkb = math.ceil(S / block)
    n_sel = min(16, nkb)
    local = min(2, n_sel)
    kw = dict(block_size=block, num_selected=n_sel, window=max(1, min(512, S // 8)), num_local_blocks=local,
              include_first=n_sel > local)
    w = torch.randn(head_dim, 3, generator=torch.Generator().manual_seed(0)) / math.sqrt(head_dim)

    def bind(fn):
        return lambda q, k, v: fn(q, k, v, torch.sigmoid(q @ w.to(q.device, q.dtype)), **kw)

    return Operator(bind(native_sparse_attention), bind(native_sparse_attention_reference),
                    f"mean-pooled blocks of {block}, top-{n_sel} blocks, window {kw['window']}, gates "
                    "sigmoid(q W) from a fixed random W; q, k, v shared by the three branches")


def hilo_operator(L: int, S: int, heads: int, head_dim: int, causal: bool):
    from ..operators import Operator
    from .hilo import hilo_attention, hilo_attention_reference

    h, w = _grid(L)
    kw = dict(window=(min(2, h), min(2, w)), lo_heads=heads // 2)

    def bind(fn):
        def run(q, k, v):
            B, H, _, D = q.shape
            grid = lambda x: x.reshape(x.shape[0], x.shape[1], h, w, x.shape[-1])  # noqa: E731
            return fn(grid(q), grid(k), grid(v), **kw).reshape(B, H, L, -1)
        return run

    return Operator(bind(hilo_attention), bind(hilo_attention_reference),
                    f"tokens as a {h}x{w} grid, 2x2 windows, the last {heads // 2} heads Lo")


def combiner_operator(L: int, S: int, heads: int, head_dim: int, causal: bool):
    from ..operators import Operator
    from .combiner import combiner_attention, combiner_attention_reference

    kw = dict(region_size=max(1, math.isqrt(L)), causal=causal)
    return Operator(lambda q, k, v: combiner_attention(q, k, v, **kw),
                    lambda q, k, v: combiner_attention_reference(q, k, v, **kw),
                    f"Combiner-Fixed, regions of {kw['region_size']} tokens, max pooling")


def cca_operator(L: int, S: int, heads: int, head_dim: int, causal: bool):
    from ..operators import Operator
    from .cca import core_context_aware_attention, core_context_aware_attention_reference

    kw = dict(group_size=max(1, min(16, L // 16)), local_window=max(1, min(512, L // 8)))
    return Operator(lambda q, k, v: core_context_aware_attention(q, k, v, **kw),
                    lambda q, k, v: core_context_aware_attention_reference(q, k, v, **kw),
                    f"groups of {kw['group_size']}, local window {kw['local_window']}")


def landmark_operator(L: int, S: int, heads: int, head_dim: int, causal: bool):
    from ..operators import Operator
    from .landmark import landmark_attention, landmark_attention_reference

    block = max(1, min(63, S // 8))
    n_land = S // (block + 1)
    kw = dict(block_size=block, top_k=4 if n_land > 4 else None)
    return Operator(lambda q, k, v: landmark_attention(q, k, v, **kw),
                    lambda q, k, v: landmark_attention_reference(q, k, v, **kw),
                    f"every {block + 1}-th key is its block's landmark; "
                    + (f"top-{kw['top_k']} block retrieval" if kw["top_k"]
                       else "all blocks (grouped softmax)"))


def hybrid_mechanisms() -> tuple:
    """One :class:`attnlab.registry.Mechanism` row per hybrid mechanism."""
    from ..registry import Paper, _op

    fam = "adaptive"
    nsa = Paper("Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention", 2025)
    nsa_opt = Paper("Optimizing Native Sparse Attention with Latent Attention and Local Global "
                    "Alternating Strategies", 2025)
    hilo = Paper("Fast Vision Transformers with HiLo Attention", 2022)
    combiner = Paper("Combiner: Full Attention Transformer with Sparse Computation Cost", 2021)
    cca = Paper("Core Context Aware Attention for Long Context Language Modeling", 2024)
    landmark = Paper("Landmark Attention: Random-Access Infinite Context Length for Transformers", 2023)
    return (
        _op("nsa", fam, (nsa, nsa_opt), nsa_operator,
            "compressed + top-n selected blocks + sliding window, sigmoid-gated", noncausal=False),
        _op("hilo", fam, (hilo,), hilo_operator,
            "Hi heads in local windows, Lo heads on window-averaged keys/values", causal=False, cross=False),
        _op("combiner", fam, (combiner,), combiner_operator,
            "Combiner-Fixed: local region plus one abstraction per other region, one softmax", cross=False),
        _op("cca", fam, (cca,), cca_operator,
            "significance-weighted core tokens plus a local window, one softmax", noncausal=False,
            cross=False),
        _op("landmark", fam, (landmark,), landmark_operator,
            "landmark tokens gate their blocks (grouped softmax), top-k block retrieval", noncausal=False),
    )
