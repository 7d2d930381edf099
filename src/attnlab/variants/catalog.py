"""Catalog rows of the softmax variants (section D): one :class:`attnlab.registry.Mechanism`
per variant, family ``"adaptive"``, kind ``"operator"``, each with an ``operator(L, S, heads,
head_dim, causal)`` factory returning an :class:`attnlab.operators.Operator` whose ``fast``
and ``reference`` take ``q (B, H, L, D)``, ``k, v (B, H, S, D)``.

Learned variants get fixed parameters drawn from seed 0 (near their identity initialisation
plus noise, so the test sees a non-trivial instance), one copy per dtype (never cast in
place). ``registry`` and ``operators`` are imported inside the functions: they import the
whole package, which may import this module.
"""

from __future__ import annotations

import math

import torch

from .cog import cog_attention, cog_attention_reference
from .context_broadcast import uniform_attention, uniform_attention_reference
from .gaussian import gaussian_adaptive_attention, gaussian_adaptive_attention_reference
from .mixture_of_heads import (
    mixture_of_heads_attention, mixture_of_heads_attention_reference, moh_gates, moh_gates_reference,
)
from .multi_token import multi_token_attention, multi_token_attention_reference
from .reversed import reversed_attention, reversed_attention_reference
from .selective import selective_attention, selective_attention_reference
from .sigmoid import sigmoid_attention, sigmoid_attention_reference
from .softmax_one import softmax1_attention, softmax1_attention_reference
from .talking_heads import talking_heads_attention, talking_heads_attention_reference
from .tensor import tensor_attention, tensor_attention_reference

__all__ = ["variant_mechanisms"]


def _op(fast, reference, note: str = ""):
    from ..operators import Operator

    return Operator(fast, reference, note)


def _pattern(causal: bool):
    from ..patterns.base import Causal, Full

    return Causal() if causal else Full()


def _params(*shapes_and_init):
    """Seed-0 tensors, cached per dtype (and device)."""
    g = torch.Generator().manual_seed(0)
    base = [init(torch.randn(*shape, generator=g, dtype=torch.float64)) for shape, init in shapes_and_init]
    cache: dict = {}

    def get(like: torch.Tensor):
        key = (like.dtype, like.device)
        if key not in cache:
            cache[key] = [t.to(like.dtype).to(like.device) for t in base]
        return cache[key]

    return get


def _bind(fn, pattern, **kw):
    return lambda q, k, v: fn(q, k, v, pattern, **kw)


def selective_op(L, S, heads, head_dim, causal):
    chunk = max(1, min(128, L // 3))
    return _op(lambda q, k, v: selective_attention(q, k, v, chunk_size=chunk),
               selective_attention_reference,
               f"causal self-attention only; head 0 selects; chunks of {chunk} queries")


def cog_op(L, S, heads, head_dim, causal):
    p = _pattern(causal)
    return _op(_bind(cog_attention, p), _bind(cog_attention_reference, p),
               "two softmax attentions (positive and negative logits) through attnlab.attention")


def multi_token_op(L, S, heads, head_dim, causal):
    cq, ck = 3, 5
    group = 2 if heads % 2 == 0 else 1

    def kernel_init(t):
        t = 0.1 * t
        t[:, 0, ck // 2] += 1.0
        return t

    def mix_init(t):
        return torch.eye(group) + 0.1 * t

    params = _params(((heads, cq, ck), kernel_init), ((heads // group, group, group), mix_init))
    p = _pattern(causal)
    chunk = max(1, min(64, L // 3))

    def fast(q, k, v):
        w, m = params(q)
        return multi_token_attention(q, k, v, w, p, head_mix=m, chunk_size=chunk)

    def ref(q, k, v):
        w, m = params(q)
        return multi_token_attention_reference(q, k, v, w, p, head_mix=m)

    return _op(fast, ref, f"seeded {cq}x{ck} kernels near identity, head mixing in groups of {group} (post-softmax)")


def talking_heads_op(L, S, heads, head_dim, causal):
    params = _params(((heads, heads), lambda t: torch.eye(heads) + 0.3 * t),
                     ((heads, heads), lambda t: torch.eye(heads) + 0.3 * t))
    p = _pattern(causal)

    def fast(q, k, v):
        a, b = params(q)
        return talking_heads_attention(q, k, v, a, b, p)

    def ref(q, k, v):
        a, b = params(q)
        return talking_heads_attention_reference(q, k, v, a, b, p)

    return _op(fast, ref, "seeded head-mixing matrices I + 0.3 N(0, 1), one lifted attnlab.attention call")


def moh_op(L, S, heads, head_dim, causal):
    shared = 1 if heads >= 2 else 0
    routed = heads - shared
    top_k = max(1, routed // 2)
    E = heads * head_dim
    shapes = [((E, routed), lambda t: t / math.sqrt(E))]
    if shared:
        shapes += [((E, shared), lambda t: t / math.sqrt(E)), ((E, 2), lambda t: t / math.sqrt(E))]
    params = _params(*shapes)
    p = _pattern(causal)

    def gates(q, gate_fn):
        B, H, n, D = q.shape
        x = q.transpose(1, 2).reshape(B, n, H * D)  # the router reads the query tokens
        ws = params(q)
        logits = [x @ w for w in ws]
        return gate_fn(logits[0], top_k, *logits[1:])

    return _op(lambda q, k, v: mixture_of_heads_attention(q, k, v, gates(q, moh_gates), p),
               lambda q, k, v: mixture_of_heads_attention_reference(q, k, v, gates(q, moh_gates_reference), p),
               f"router on the query tokens (B, L, H*D), seeded weights; {shared} shared head(s), "
               f"top-{top_k} of {routed} routed; gated head outputs (before out_proj)")


def gaussian_op(L, S, heads, head_dim, causal):
    params = _params(((heads, 2), lambda t: 0.5 * t), ((heads, 2), lambda t: torch.exp(0.3 * t)))

    def run(fn):
        def f(q, k, v):
            m, c = params(v)
            return fn(v, m, c, axis="tokens")
        return f

    return _op(run(gaussian_adaptive_attention), run(gaussian_adaptive_attention_reference),
               "GAAM applied to v per head (2 seeded Gaussians per head, statistics over tokens); q and k unused")


def sigmoid_op(L, S, heads, head_dim, causal):
    p = _pattern(causal)
    return _op(_bind(sigmoid_attention, p), _bind(sigmoid_attention_reference, p), "b = -log(S)")


def softmax1_op(L, S, heads, head_dim, causal):
    p = _pattern(causal)
    return _op(_bind(softmax1_attention, p), _bind(softmax1_attention_reference, p),
               "attnlab.attention(..., return_lse=True) * sigmoid(lse)")


def uniform_op(L, S, heads, head_dim, causal):
    p = _pattern(causal)
    return _op(_bind(uniform_attention, p), _bind(uniform_attention_reference, p),
               "the uniform-attention term of context broadcasting (mean of the visible v); q and k unused")


def reversed_op(L, S, heads, head_dim, causal):
    p = _pattern(causal)
    return _op(_bind(reversed_attention, p), _bind(reversed_attention_reference, p),
               "two attnlab.attention calls: column log-normalisers of the transposed problem, then a key bias")


def tensor_op(L, S, heads, head_dim, causal):
    p = _pattern(causal)
    return _op(lambda q, k, v: tensor_attention(q, k, v, pattern=p),
               lambda q, k, v: tensor_attention_reference(q, k, v, pattern=p),
               "k2 = k, v2 = v; cubic in the length (refuses large problems with ValueError)")


def _no_example(shape, heads):
    return None, None


def variant_mechanisms() -> tuple:
    """One catalog row per softmax variant (see the module docstring)."""
    from ..registry import Mechanism, Paper

    def row(name, papers, factory, summary, *, causal=True, noncausal=True, cross=True):
        return Mechanism(name, "adaptive", "operator", tuple(Paper(t, y) for t, y in papers), False, causal,
                         cross, (1,), ("fast", "reference"), _no_example, summary, operator=factory,
                         noncausal=noncausal)

    return (
        row("selective_attention", [("Selective Attention Improves Transformer", 2024)], selective_op,
            "causal; head 0's ReLU'd logits, summed over earlier queries, subtracted from every head's logits",
            noncausal=False, cross=False),
        row("cog_attention", [("More Expressive Attention with Negative Weights", 2024)], cog_op,
            "signed weights sign(s) softmax(|s|), as two softmax attentions"),
        row("multi_token_attention", [("Multi-Token Attention", 2025)], multi_token_op,
            "learned per-head conv over the (query, key) logits, masked before and after; head mixing"),
        row("talking_heads", [("Talking-Heads Attention", 2020)], talking_heads_op,
            "learned head mixing of the logits and of the probabilities"),
        row("mixture_of_heads", [("MoH: Multi-Head Attention as Mixture-of-Head Attention", 2024)], moh_op,
            "per-token router: shared heads plus top-k routed heads, router-weighted sum"),
        row("gaussian_adaptive", [("Gaussian Adaptive Attention is All You Need: Robust Contextual "
                                   "Representations Across Multiple Modalities", 2024)], gaussian_op,
            "per-head learned Gaussian reweighting of normalised features (GAAM)", causal=False, cross=False),
        row("sigmoid_attention", [("Theory, Analysis, and Best Practices for Sigmoid Self-Attention", 2024)],
            sigmoid_op, "sigmoid(scale q.k - log S) v over any pattern, block-sparse"),
        row("softmax_one", [("Attention Is Off By One", 2023)], softmax1_op,
            "softmax with an implicit zero logit and zero value: attention * sigmoid(lse)"),
        row("context_broadcasting", [("Scratching Visual Transformer's Back with Uniform Attention", 2023)],
            uniform_op, "uniform attention (mean of the visible tokens), added to every token"),
        row("reversed_attention", [("Visual Dependency Transformers: Dependency Tree Emerges from Reversed "
                                    "Attention", 2023)], reversed_op,
            "weights normalised over the queries: each token distributes itself over those that see it"),
        row("tensor_attention", [("How to Capture Higher-order Correlations? Generalizing Matrix Softmax "
                                  "Attention to Kronecker Computation", 2024),
                                 ("Tensor Attention Training: Provably Efficient Learning of Higher-order "
                                  "Transformers", 2024)], tensor_op,
            "softmax over key pairs of <q_i, k_j * k'_l>, values v_j * v'_l (cubic, small n)"),
    )
