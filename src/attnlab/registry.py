"""The catalog: every mechanism attnlab offers, with its paper, family and capabilities.

This is the one list that ``attnlab list``, the benchmark, the docs table and the
parametrised tests read: a mechanism shows up everywhere by being registered here once.
Each entry has an ``example`` factory that builds a representative instance for a token
shape, which the benchmark and the tests use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .patterns import (
    BlockSparse,
    Blocked,
    Causal,
    Document,
    Full,
    GlobalTokens,
    Grid,
    Halo,
    Neighborhood,
    PrefixLM,
    Radial,
    Sinks,
    SlidingWindow,
    Strided,
)
from .scores import ALiBi, RelativeBias, RelativeEmbedding, Softcap, Temperature


@dataclass(frozen=True)
class Paper:
    title: str
    year: int

    def __str__(self) -> str:
        return f"{self.title} ({self.year})"


@dataclass(frozen=True)
class Mechanism:
    """One catalog row.

    ``example(token_shape, heads)`` returns ``(pattern, score_mod)`` for a problem of that
    token shape (self-attention) and number of query heads. Mechanisms that are not a softmax
    pattern (linear, spectral, ...) have ``kind="operator"`` and an ``operator(L, S, heads,
    head_dim, causal)`` factory instead (:mod:`attnlab.operators`); ``noncausal`` says whether
    they have a non-causal form (``causal`` whether they have a causal one).

    ``exact``: the mechanism computes softmax attention exactly (over its pattern); linear and
    spectral mechanisms are their own functions ("approx"), each exact to its own reference.
    """

    name: str
    family: str  # "core" | "linear" | "spectral" | "adaptive" | ...
    kind: str  # "pattern" | "score_mod" | "operator" | "function"
    papers: tuple[Paper, ...]
    exact: bool
    causal: bool
    cross: bool
    ndims: tuple[int, ...]
    backends: tuple[str, ...]
    example: Callable[[tuple[int, ...], int], tuple[object, object]] = field(repr=False)
    summary: str = ""
    operator: Callable[..., object] | None = field(default=None, repr=False)
    noncausal: bool = True

    def as_row(self) -> dict[str, str]:
        return {
            "name": self.name,
            "family": self.family,
            "kind": self.kind,
            "paper": "; ".join(str(p) for p in self.papers) or "-",
            "exact": "exact" if self.exact else "approx",
            "causal": "yes" if self.causal else "no",
            "cross": "yes" if self.cross else "no",
            "ndim": ",".join(str(d) for d in self.ndims),
            "backends": ",".join(self.backends),
        }


_SPARSE = ("tiled", "flex", "reference")
_DENSE = ("sdpa", "tiled", "flex", "reference")
_SPARSE_PATTERN = ("block_flash",) + _SPARSE  # patterns without a score mod also run on the CPU flash kernel
_DENSE_PATTERN = ("sdpa", "block_flash", "tiled", "flex", "reference")
_ALL_ND = (1, 2, 3)


def _window_len(shape: tuple[int, ...], frac: float = 0.125) -> int:
    return max(1, int(shape[-1] * frac))


def _kernel(shape: tuple[int, ...]) -> tuple[int, ...]:
    """An odd kernel no larger than its axis: 7 per axis in 2-D/3-D, ~S/16 in 1-D."""
    def odd_at_most(want: int, size: int) -> int:
        k = min(want, size)
        return k if k % 2 == 1 else max(1, k - 1)

    want = 7 if len(shape) > 1 else None
    return tuple(odd_at_most(want or max(3, s // 16), s) for s in shape)


def _block_layout(shape: tuple[int, ...], heads: int) -> BlockSparse:
    n = -(-shape[-1] // 64) if len(shape) == 1 else -(-int(torch.tensor(shape).prod()) // 64)
    g = torch.Generator().manual_seed(0)
    layout = torch.rand(n, n, generator=g) < 0.25
    layout |= torch.eye(n, dtype=torch.bool)
    return BlockSparse(layout, 64)


def _doc_ids(shape: tuple[int, ...]) -> torch.Tensor:
    n = int(torch.tensor(shape).prod())
    return torch.arange(n) // max(1, n // 4)


_CORE_PAPER = Paper("Self-attention Does Not Need O(n^2) Memory", 2021)

MECHANISMS: tuple[Mechanism, ...] = (
    Mechanism("full", "core", "pattern", (_CORE_PAPER, Paper("Attention Is All You Need", 2017)),
              True, False, True, _ALL_ND, _DENSE_PATTERN, lambda s, h: (Full(), None),
              "dense softmax attention"),
    Mechanism("causal", "core", "pattern", (_CORE_PAPER,), True, True, True, _ALL_ND, _DENSE_PATTERN,
              lambda s, h: (Causal(), None), "causal, bottom-right aligned for L != S"),
    Mechanism("sliding_window", "core", "pattern",
              (Paper("Longformer: The Long-Document Transformer", 2020),), True, True, True, (1,),
              _SPARSE_PATTERN, lambda s, h: (SlidingWindow(left=_window_len(s), right=0), None),
              "causal or two-sided local window, optional dilation"),
    Mechanism("sliding_window+sinks", "core", "pattern",
              (Paper("Efficient Streaming Language Models with Attention Sinks", 2024),), True, True,
              True, (1,), _SPARSE_PATTERN,
              lambda s, h: (SlidingWindow(left=_window_len(s)) | Sinks(4), None),
              "sliding window plus always-visible first tokens"),
    Mechanism("neighborhood", "core", "pattern",
              (Paper("Neighborhood Attention Transformer", 2023),
               Paper("Dilated Neighborhood Attention Transformer", 2022),
               Paper("Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light", 2025)),
              True, True, False, _ALL_ND, _SPARSE_PATTERN,
              lambda s, h: (Neighborhood(kernel_size=_kernel(s)), None),
              "NATTEN semantics: fixed-size windows that shift at borders; dilation, stride, causal"),
    Mechanism("blocked", "core", "pattern",
              (Paper("MaxViT: Multi-Axis Vision Transformer", 2022),
               Paper("DaViT: Dual Attention Vision Transformers", 2022)),
              True, False, False, _ALL_ND, _SPARSE_PATTERN,
              lambda s, h: (Blocked(tuple(max(1, x // 8) for x in s)), None),
              "non-overlapping windows"),
    Mechanism("grid", "core", "pattern", (Paper("MaxViT: Multi-Axis Vision Transformer", 2022),),
              True, False, False, _ALL_ND, _SPARSE_PATTERN,
              lambda s, h: (Grid(tuple(_divisor(x) for x in s)), None),
              "tokens at equal offset in every block (dilated global)"),
    Mechanism("halo", "core", "pattern",
              (Paper("Scaling Local Self-Attention for Parameter Efficient Visual Backbones", 2021),),
              True, False, False, _ALL_ND, _SPARSE_PATTERN,
              lambda s, h: (Halo(tuple(max(1, x // 8) for x in s), tuple(max(1, x // 32) for x in s)), None),
              "blocks attend to their block plus a halo"),
    Mechanism("strided", "core", "pattern",
              (Paper("Generating Long Sequences with Sparse Transformers", 2019),), True, True, True,
              (1,), _SPARSE_PATTERN, lambda s, h: (Strided(max(2, s[-1] // 16)) & Causal(), None),
              "Sparse-Transformer strided head"),
    Mechanism("s2_shards", "core", "pattern",
              (Paper("S2-Attention: Hardware-Aware Context Sharding Among Attention Heads", 2024),),
              True, True, True, (1,), _SPARSE_PATTERN,
              lambda s, h: ((Strided(max(2, h), mode="shard") | SlidingWindow(_window_len(s, 1 / 32))) & Causal(), None),
              "per-head strided shards of the context plus a local window"),
    Mechanism("global_tokens", "core", "pattern",
              (Paper("Combiner: Full Attention Transformer with Sparse Computation Cost", 2021),),
              True, False, False, (1,), _SPARSE_PATTERN,
              lambda s, h: (SlidingWindow(_window_len(s), _window_len(s)) | GlobalTokens(8), None),
              "first tokens see and are seen by all"),
    Mechanism("document", "core", "pattern", (), True, True, True, (1,), _SPARSE_PATTERN,
              lambda s, h: (Document(_doc_ids(s)) & Causal(), None), "packed sequences"),
    Mechanism("prefix_lm", "core", "pattern", (), True, True, True, (1,), _SPARSE_PATTERN,
              lambda s, h: (PrefixLM(max(1, s[-1] // 4)), None), "bidirectional prefix, causal after"),
    Mechanism("block_sparse", "core", "pattern",
              (Paper("SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs", 2024),
               Paper("MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression", 2024)),
              True, True, True, (1,), _SPARSE_PATTERN, lambda s, h: (_block_layout(s, h), None),
              "any block layout"),
    Mechanism("radial", "core", "pattern",
              (Paper("Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation", 2025),),
              True, False, False, (1,), _SPARSE_PATTERN,
              lambda s, h: (Radial(frame_size=max(1, s[-1] // 16)), None),
              "spatio-temporal window that shrinks as temporal distance doubles"),
    Mechanism("alibi", "core", "score_mod",
              (Paper("Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation", 2022),),
              True, True, True, _ALL_ND, _SPARSE, lambda s, h: (Causal(), ALiBi(h)),
              "linear distance penalty per head"),
    Mechanism("relative_bias", "core", "score_mod",
              (Paper("Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer", 2020),),
              True, True, True, _ALL_ND, _SPARSE, lambda s, h: (Causal(), RelativeBias(h)),
              "T5 bucketed learned bias"),
    Mechanism("relative_embedding", "core", "score_mod",
              (Paper("Music Transformer: Generating Music with Long-Term Structure", 2018),),
              True, True, True, (1,), ("tiled", "reference"),
              lambda s, h: (Causal(), RelativeEmbedding(64, max_distance=min(512, s[-1]))),
              "learned q-dependent relative embeddings, memory-linear"),
    Mechanism("softcap", "core", "score_mod",
              (Paper("Gemma 2: Improving Open Language Models at a Practical Size", 2024),), True, True,
              True, _ALL_ND, _SPARSE, lambda s, h: (Causal(), Softcap(30.0)), "tanh soft-capping"),
    Mechanism("temperature", "core", "score_mod",
              (Paper("Length-Induced Embedding Collapse in Transformer-based Models", 2024),), True,
              True, True, _ALL_ND, _SPARSE, lambda s, h: (Full(), Temperature(0.5)),
              "softmax temperature"),
    Mechanism("merge_attentions", "core", "function",
              (Paper("Lean Attention: Hardware-Aware Scalable Attention Mechanism for the Decode-Phase of Transformers", 2024),),
              True, True, True, _ALL_ND, (), lambda s, h: (None, None),
              "exact merge of split-KV partial attentions by log-sum-exp"),
    Mechanism("ring_attention", "distributed", "function",
              (Paper("Sequence Parallelism: Long Sequence Training from System Perspective", 2021),
               Paper("Ring Attention with Blockwise Transformers for Near-Infinite Context", 2023)),
              True, True, True, (1,), ("tiled",), lambda s, h: (None, None),
              "context-parallel exact attention on torch.distributed (attnlab.distributed.ring_attention): "
              "pattern-aware key/value ring, zigzag causal balancing, exact backward from the global lse"),
    Mechanism("ring_linear_attention", "distributed", "function",
              (Paper("Sequence Parallelism: Long Sequence Training from System Perspective", 2021),),
              True, True, True, (1,), (), lambda s, h: (None, None),
              "linear attention over sharded sequences: each rank's recurrent state passed along the ranks "
              "(attnlab.distributed.ring_linear_attention), equal to the single-process chunked form"),
)


def _no_example(shape: tuple[int, ...], heads: int) -> tuple[None, None]:
    return None, None


_LINEAR_FORMS = ("chunked", "parallel", "recurrent")
_RNN = Paper("Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", 2020)
_LIGHTNING = (Paper("Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models", 2024),
              Paper("Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention", 2024),
              Paper("Short-Long Convolutions Help Hardware-Efficient Linear Attention to Focus on Long Sequences", 2024))
_DEVIL = Paper("The Devil in Linear Transformer", 2022)


def _op(name: str, family: str, papers: tuple[Paper, ...], factory, summary: str, *, causal: bool = True,
        noncausal: bool = True, cross: bool = True, exact: bool = False,
        backends: tuple[str, ...] = ("fast", "reference")) -> Mechanism:
    return Mechanism(name, family, "operator", papers, exact, causal, cross, (1,), backends, _no_example,
                     summary, operator=factory, noncausal=noncausal)


def _operators() -> tuple[Mechanism, ...]:
    from . import operators as op

    lin, spec = "linear", "spectral"
    return (
        _op("linear_attention", lin, (_RNN, *_LIGHTNING), op.linear_identity,
            "phi = identity, unnormalised (fla's linear attention); chunked, parallel, recurrent",
            backends=_LINEAR_FORMS),
        _op("linear_elu", lin, (_RNN,), op.linear_elu, "phi = elu + 1, normalised", backends=_LINEAR_FORMS),
        _op("performer", lin, (Paper("Rethinking Attention with Performers", 2021),), op.performer,
            "FAVOR+ positive orthogonal random features (approximates softmax)", backends=_LINEAR_FORMS),
        _op("cosformer", lin, (Paper("cosFormer: Rethinking Softmax in Attention", 2022),), op.cosformer,
            "ReLU features with cos re-weighting of the distance", backends=_LINEAR_FORMS),
        _op("based", lin, (Paper("Simple linear attention language models balance the recall-throughput tradeoff", 2024),),
            op.based, "2nd-order Taylor features of exp", backends=_LINEAR_FORMS),
        _op("hedgehog", lin, (Paper("The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry", 2024),),
            op.hedgehog, "learned softmax-MLP feature map", backends=_LINEAR_FORMS),
        _op("t2r", lin, (Paper("Finetuning Pretrained Transformers into RNNs", 2021),), op.t2r,
            "learned ReLU-MLP feature map", backends=_LINEAR_FORMS),
        _op("retention", lin, (Paper("Retentive Network: A Successor to Transformer for Large Language Models", 2023),),
            op.retention, "per-head exponential decay (RetNet)", noncausal=False, backends=_LINEAR_FORMS),
        _op("gla", lin, (Paper("Gated Linear Attention Transformers with Hardware-Efficient Training", 2024),
                         Paper("Lina-Speech: Gated Linear Attention is a Fast and Parameter-Efficient Learner for text-to-speech synthesis", 2024)),
            op.gla, "data-dependent per-feature forget gates", noncausal=False, cross=False,
            backends=_LINEAR_FORMS),
        _op("transnormer_llm", lin, (Paper("TransNormerLLM: A Faster and Better Large Language Model with Improved TransNormer", 2023),
                                     _LIGHTNING[1]),
            op.transnormer_llm, "NormAttention with TNL's per-head decay", noncausal=False, cross=False),
        _op("norm_attention", lin, (_DEVIL,), op.norm_attn, "output normalisation instead of a denominator",
            cross=False),
        _op("diag_attention", lin, (_DEVIL,), op.diag_attn, "softmax inside diagonal blocks", cross=False,
            exact=True),
        _op("efficient_attention", lin, (Paper("Efficient Attention: Attention with Linear Complexities", 2021),),
            op.efficient, "softmax(Q) (softmax(K)^T V)", causal=False),
        _op("agent_attention", lin, (Paper("Agent Attention: On the Integration of Softmax and Linear Attention", 2024),),
            op.agent, "pooled agent tokens between queries and keys", causal=False),
        _op("flow_attention", lin, (Paper("Flowformer: Linearizing Transformers with Conservation Flows", 2022),),
            op.flow, "flow-conservation normalisation (competition, allocation)", causal=False),
        _op("toeplitz_kernelized", lin,
            (Paper("Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding", 2021),),
            op.toeplitz, "kernelized attention times a Toeplitz RPE via the FFT"),
        _op("aaren", lin, (Paper("Attention as an RNN", 2024),), op.aaren_op,
            "causal softmax of one query over every prefix, by a parallel prefix scan", noncausal=False,
            cross=False, exact=True),
        Mechanism("mamba_implicit", lin, "function",
                  (Paper("The Hidden Attention of Mamba Models", 2024),
                   Paper("Understanding the differences in Foundation Models: Attention, State Space Models, and Recurrent Neural Networks", 2024)),
                  True, True, False, (1,), (), _no_example,
                  "the implicit attention matrix of a selective SSM (and linear_attention_weights)"),
        _op("fnet", spec, (Paper("FNet: Mixing Tokens with Fourier Transforms", 2022),), op.fnet,
            "Re(FFT(FFT(x))) token mixing", causal=False, cross=False),
        _op("global_filter", spec, (Paper("Global Filter Networks for Image Classification", 2021),), op.gfnet,
            "learned global filter in the frequency domain (GFNet)", causal=False, cross=False),
        _op("fftnet", spec, (Paper("The FFT Strikes Back: An Efficient Alternative to Self-Attention", 2025),),
            op.fftnet, "input-adaptive spectral filter with modReLU", causal=False, cross=False),
        _op("spectformer", spec,
            (Paper("SpectFormer: Frequency and Attention is what you need in a Vision Transformer", 2023),),
            op.spectformer, "spectral block: LN, global filter, LN, MLP", causal=False, cross=False),
    )


def _adaptive() -> tuple[Mechanism, ...]:
    """Section C: content-based selections (each exact over the set it selects)."""
    from .patterns import TopKBlocks, TopKPerQuery, TopPBlocks, TopTheta
    from .patterns.routing_catalog import example_block, routing_mechanisms

    moba = Paper("MoBA: Mixture of Block Attention for Long-Context LLMs", 2025)
    nsa = Paper("Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention", 2025)
    seer = Paper("SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs", 2024)
    flexprefill = Paper("FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence Inference", 2025)
    vmoba = Paper("VMoBA: Mixture-of-Block Attention for Video Diffusion Models", 2025)
    theta = Paper("Top-Theta Attention: Sparsifying Transformers by Compensated Thresholding", 2025)
    explicit = Paper("Explicit Sparse Transformer: Concentrated Attention Through Explicit Selection", 2019)

    def top_k_blocks(s, h):
        b = example_block(s)
        return TopKBlocks(max(1, -(-s[-1] // b) // 4), b) & Causal(), None

    def top_p_blocks(s, h):
        return TopPBlocks(0.9, example_block(s)) & Causal(), None

    rows = (
        ("top_k_blocks", (moba, nsa, seer), top_k_blocks,
         "top-k key blocks per query block by pooled q.k (or a learned SeerGate)"),
        ("top_p_blocks", (flexprefill, vmoba), top_p_blocks,
         "fewest key blocks reaching a share p of the pooled-score softmax"),
        ("top_k_per_query", (explicit, theta), lambda s, h: (TopKPerQuery(max(1, s[-1] // 8)) & Causal(), None),
         "each query's k largest logits, streamed over key chunks"),
        ("top_theta", (theta,), lambda s, h: (TopTheta(1.0, max(1, s[-1] // 4)) & Causal(), None),
         "logits above a calibrated per-head threshold (calibrate_thresholds)"),
    )
    return tuple(Mechanism(name, "adaptive", "pattern", papers, True, True, True, (1,), _SPARSE_PATTERN, example, summary)
                 for name, papers, example, summary in rows) + routing_mechanisms()


def _hybrids_and_variants() -> tuple[Mechanism, ...]:
    from .hybrids.catalog import hybrid_mechanisms
    from .variants.catalog import variant_mechanisms

    return hybrid_mechanisms() + variant_mechanisms()


def _inspection() -> tuple[Mechanism, ...]:
    """Section E: the analysis functions and interventions of :mod:`attnlab.inspect`."""
    rows = (
        ("head_mask", ("Are Sixteen Heads Really Better than One?", 2019),
         "scale chosen heads' maps; a float mask gives head importance by gradient (inspect.HeadMask)"),
        ("sink_calibration", ("Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language "
                              "Models without Training through Attention Calibration", 2024),
         "ACT: scale the mass on detected sinks and give it back to the other keys (inspect.SinkCalibration)"),
        ("redistribute_sink_mass", ("See What You Are Told: Visual Attention Sink in Large Multimodal Models", 2025),
         "VAR: move a share of the sink mass to target keys (inspect.RedistributeSinkMass)"),
        ("amplify_keys", ("Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large "
                          "Vision-Language Model", 2025),
         "head-wise gain on chosen keys, renormalised (inspect.AmplifyKeys)"),
        ("flatten", ("HICD: Hallucination-Inducing via Attention Dispersion for Contrastive Decoding to "
                     "Mitigate Hallucinations in Large Language Models", 2025),
         "mix the map toward uniform over the visible keys (inspect.Flatten)"),
        ("toward_identity", ("Fine-Grained Perturbation Guidance via Attention Head Selection", 2025),
         "SoftPAG: (1 - a) P + a I (inspect.TowardIdentity)"),
        ("attention_sinks", ("On the Existence and Behaviour of Secondary Attention Sinks", 2025),
         "first-token and secondary sink scores per head (inspect.sink_score, secondary_sinks)"),
        ("massive_activations", ("Massive Activations in Large Language Models", 2024),
         "hidden-state entries above 100 and 1000x the median (inspect.massive_activations)"),
        ("retrieval_heads", ("Retrieval Head Mechanistically Explains Long-Context Factuality", 2024),
         "share of copy steps whose top attention is the copied token (inspect.retrieval_score)"),
        ("head_importance", ("Are Sixteen Heads Really Better than One?", 2019),
         "head importance by masking and by the gradient of a head gate (inspect.head_importance_by_*)"),
        ("attention_rollout", ("Quantifying Attention Flow in Transformers", 2020),
         "residual-aware product of head-fused maps over layers (inspect.attention_rollout)"),
    )
    return tuple(Mechanism(name, "inspect", "function", (Paper(*paper),), True, True, True, _ALL_ND, (),
                           _no_example, summary) for name, paper, summary in rows)


MECHANISMS = MECHANISMS + _operators() + _adaptive() + _hybrids_and_variants() + _inspection()


def _divisor(n: int) -> int:
    for d in (8, 4, 2):
        if n % d == 0 and n // d >= 1:
            return d
    return 1


def catalog(family: str | None = None) -> list[Mechanism]:
    """Every registered mechanism (optionally of one family)."""
    if family is None:
        return list(MECHANISMS)
    return [m for m in MECHANISMS if m.family == family]


def get(name: str) -> Mechanism:
    """The mechanism called ``name``; ValueError listing the names otherwise."""
    for m in MECHANISMS:
        if m.name == name:
            return m
    raise ValueError(f"unknown mechanism {name!r}; known: {[m.name for m in MECHANISMS]}")


def format_table(rows: list[Mechanism], columns: tuple[str, ...] | None = None) -> str:
    """A plain-text table of catalog rows."""
    data = [m.as_row() for m in rows]
    cols = columns or ("name", "family", "kind", "exact", "causal", "cross", "ndim", "backends", "paper")
    widths = {c: max(len(c), *(len(d[c]) for d in data)) if data else len(c) for c in cols}
    limit = {"paper": 90}
    out = ["  ".join(c.ljust(min(widths[c], limit.get(c, 999))) for c in cols)]
    out.append("  ".join("-" * min(widths[c], limit.get(c, 999)) for c in cols))
    for d in data:
        cells = []
        for c in cols:
            text = d[c]
            lim = limit.get(c, 999)
            if len(text) > lim:
                text = text[: lim - 3] + "..."
            cells.append(text.ljust(min(widths[c], lim)))
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)
