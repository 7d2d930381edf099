"""Catalog rows of the content-routing patterns of section C (k-means routing, region routing,
linear-estimate top-k, hierarchical top-k, expert choice), for :mod:`attnlab.registry`.

Each row is exact over the set it selects (the selection itself is a discrete, gradient-free
choice). ``example(token_shape, heads)`` returns ``(pattern, None)``.
"""

from __future__ import annotations

import math

import torch

from .base import Causal
from .expert_choice import ExpertChoice
from .hierarchical_topk import HierarchicalTopK
from .linear_estimate import LinearEstimateTopK
from .region_routing import RegionRouting
from .routing_kmeans import KMeansRouting


def example_block(shape: tuple[int, ...]) -> int:
    """A selection block for the examples: 64 tokens, smaller on short sequences."""
    return max(4, min(64, shape[-1] // 8))


def _quarter_of_blocks(shape: tuple[int, ...]) -> int:
    return max(1, -(-shape[-1] // example_block(shape)) // 4)


def _region(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per axis the largest divisor of its length that is at most 1/8 of it (1-D) or 1/2 of it
    (2-D, 3-D), so that the region grid has several regions per axis."""
    frac = 8 if len(shape) == 1 else 2
    return tuple(max(d for d in range(1, max(1, s // frac) + 1) if s % d == 0) for s in shape)


def query_norm_router(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """An untrained router for the examples: the norm of each query, ``(B, Hq, L)``."""
    return q.norm(dim=-1)


def _region_example(shape, heads):
    region = _region(shape)
    n = math.prod(s // r for s, r in zip(shape, region))
    return RegionRouting(region, max(1, n // 4)), None


def routing_mechanisms() -> tuple:
    """The ``Mechanism`` rows (family ``"adaptive"``, kind ``"pattern"``)."""
    from ..registry import Mechanism, Paper

    backends = ("block_flash", "tiled", "flex", "reference")  # the resolved masks are plain mask_mods for flex too
    nd = (1, 2, 3)
    return (
        Mechanism("kmeans_routing", "adaptive", "pattern",
                  (Paper("Efficient Content-Based Sparse Attention with Routing Transformers", 2021),),
                  True, True, True, nd, backends,
                  lambda s, h: (KMeansRouting(4) & Causal(), None),
                  "queries and keys routed to shared k-means centroids attend within their cluster "
                  "(optionally balanced; online centroids: KMeansRouter)"),
        Mechanism("region_routing", "adaptive", "pattern",
                  (Paper("BiFormer: Vision Transformer with Bi-Level Routing Attention", 2023),),
                  True, False, True, nd, backends, _region_example,
                  "region means, top-k key regions per query region, token attention in the kept regions"),
        Mechanism("linear_estimate_top_k", "adaptive", "pattern",
                  (Paper("SEA: Sparse Linear Attention with Estimated Attention Mask", 2024),),
                  True, True, True, (1,), backends,
                  lambda s, h: (LinearEstimateTopK(_quarter_of_blocks(s), example_block(s)) & Causal(), None),
                  "top-k key blocks by a linear-attention (elu+1) estimate of the attention mass"),
        Mechanism("hierarchical_top_k", "adaptive", "pattern",
                  (Paper("HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning", 2024),),
                  True, True, True, (1,), backends,
                  lambda s, h: (HierarchicalTopK(_quarter_of_blocks(s), example_block(s)) & Causal(), None),
                  "top-k key blocks by a tree search over key spans"),
        Mechanism("expert_choice", "adaptive", "pattern",
                  (Paper("Mixture of Sparse Attention: Content-Based Learnable Sparse Attention via Expert-Choice Routing", 2025),),
                  True, True, False, nd, backends,
                  lambda s, h: (ExpertChoice(max(1, math.prod(s) // 4), query_norm_router) & Causal(), None),
                  "each head keeps its top-k tokens by a router score; attention among them "
                  "(MixtureOfSparseAttention layer)"),
    )


__all__ = ["query_norm_router", "routing_mechanisms"]
