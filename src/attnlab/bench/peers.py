"""The implementations the efficiency suite times: attnlab itself and its peers.

Every implementation turns a :class:`Case` (one attention problem of the sweep) into a
:class:`Prepared` forward, or says why it cannot:

- :meth:`Impl.missing` -- the package is not installed (status ``"not installed"``);
- :meth:`Impl.applies` -- False when the peer has nothing to do with this mechanism (NATTEN
  with a sliding window): no record at all;
- :meth:`Impl.prepare` raises :class:`Unsupported` (status ``"unsupported"``, e.g. NATTEN on
  cross attention) or :class:`Skipped` (status ``"skipped"``, e.g. a dense baseline that would
  need more memory than the limit); any other exception is recorded as ``"error"``.

Peers compute the same function as attnlab on the same inputs, except where their
``Prepared.note`` says otherwise. A peer without a backward on this device (FlexAttention and
NATTEN on CPU) sets ``Prepared.backward`` to the reason and is timed forward only.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..api import attention, explain
from ..geometry import Geometry, index_grid
from ..patterns import Neighborhood, SlidingWindow
from ..patterns.base import Pattern
from ..registry import Mechanism
from ..scores.base import ScoreContext, ScoreMod
from .planner import Measurement

Tensor = torch.Tensor


class Unsupported(Exception):
    """The implementation cannot compute this problem (recorded as ``"unsupported"``)."""


class Skipped(Exception):
    """The implementation could, but is not run here (recorded as ``"skipped"``)."""


@dataclass
class Case:
    """One problem of the sweep: leaf inputs (no grad), the pattern and score mod built from the
    mechanism's catalog example, and the memory a dense peer may use."""

    measurement: Measurement
    mechanism: Mechanism
    q: Tensor
    k: Tensor
    v: Tensor
    pattern: Pattern
    score_mod: ScoreMod | None
    geometry: Geometry
    memory_limit_bytes: int
    operator: Any = None  # the mechanism's Operator (kind "operator"), built for this problem

    @property
    def is_operator(self) -> bool:
        return self.operator is not None

    @property
    def device(self) -> torch.device:
        return self.q.device


@dataclass
class Prepared:
    """``forward(*convert(q, k, v))`` computes the attention output. ``convert`` runs once,
    outside the timed region (layout changes a user of that library would not pay for).
    ``backward`` is None when gradients work, else why not. ``compile_s``: one-off compile time."""

    forward: Callable[..., Tensor]
    convert: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, ...]] = field(default=lambda q, k, v: (q, k, v))
    backward: str | None = None
    compile_s: float | None = None
    backend: str | None = None
    note: str | None = None


class Impl:
    name = "impl"
    package: str | None = None  # importable module that must be present
    pip: str | None = None  # what to pip install

    def missing(self) -> str | None:
        if self.package is None or importlib.util.find_spec(self.package) is not None:
            return None
        return f"{self.package} is not installed (pip install {self.pip or self.package})"

    def applies(self, case: Case) -> bool:
        return True

    def prepare(self, case: Case) -> Prepared:
        raise NotImplementedError(f"{type(self).__name__}.prepare")


class Attnlab(Impl):
    """attnlab's own :func:`attnlab.attention` with the automatic backend choice."""

    name = "attnlab"

    def prepare(self, case: Case) -> Prepared:
        if case.is_operator:
            return Prepared(case.operator.fast, backend="operator", note=case.operator.note or None)
        pattern, score_mod = case.pattern, case.score_mod
        backend = explain(case.q, case.k, case.v, pattern, score_mod).backend
        return Prepared(lambda q, k, v: attention(q, k, v, pattern, score_mod), backend=backend)


def _dense_bytes(case: Case, per_element: int) -> int:
    m = case.measurement
    return m.batch * m.heads * m.L * m.S * per_element


def _check_memory(case: Case, nbytes: int, what: str) -> None:
    if nbytes > case.memory_limit_bytes:
        raise Skipped(f"{what} needs about {nbytes / 2**30:.1f} GiB, over the "
                      f"{case.memory_limit_bytes / 2**30:.1f} GiB memory limit")


def _probe_grid(case: Case, size: int):
    """:func:`~attnlab.geometry.index_grid` of the first ``size`` queries and keys."""
    b, h, q_idx, kv_idx = index_grid(case.geometry)
    return b, h, q_idx[:, :, :size], kv_idx[..., :size]


def _is_additive(score_mod: ScoreMod, case: Case) -> bool:
    """Whether ``modify(s) == s + modify(0)`` on a probe block (ALiBi, RelativeBias: yes)."""
    if score_mod.needs_query:
        return False
    b, h, qi, kv = _probe_grid(case, 64)
    with torch.no_grad():
        zero = torch.zeros(qi.shape[2], kv.shape[3], device=case.device).expand(1, h.shape[1], -1, -1)
        ctx = ScoreContext(b, h, qi, kv, case.geometry)
        base = score_mod.modify(zero, ctx)
        shifted = score_mod.modify(zero + 3.0, ctx)
    return bool(torch.allclose(shifted - base, torch.full_like(base, 3.0), atol=1e-5))


class SDPADense(Impl):
    """``torch.nn.functional.scaled_dot_product_attention`` with the pattern as a dense
    ``(L, S)`` boolean mask (``(B, H, L, S)`` when the pattern depends on the head): the dense
    baseline every mechanism is compared with. An additive score mod (ALiBi, T5 bias) is
    folded into a float mask, which is exact; another score mod is left out (the note says so),
    so the time is that of dense attention with the same mask."""

    name = "sdpa_dense"

    def applies(self, case: Case) -> bool:
        return not case.is_operator  # no mask to densify: sdpa_fast is the cost baseline

    def prepare(self, case: Case) -> Prepared:
        per_element = 4 if case.device.type == "cuda" else 16  # CPU math path keeps probabilities
        _check_memory(case, _dense_bytes(case, per_element), "dense SDPA")
        grid = index_grid(case.geometry)
        mask = case.pattern.mask(*grid, case.geometry)
        note = None
        if case.score_mod is not None:
            if _is_additive(case.score_mod, case):
                with torch.no_grad():
                    ctx = ScoreContext(*grid, case.geometry)
                    zero = torch.zeros(mask.shape[-2:], device=case.device)
                    bias = case.score_mod.modify(zero.expand(1, case.geometry.q_heads, -1, -1), ctx)
                mask = bias.to(case.q.dtype).masked_fill(~mask, float("-inf"))
            else:
                note = f"{type(case.score_mod).__name__} not applied: dense attention with the same mask"
        if mask.dtype == torch.bool and mask.shape[:2] == (1, 1):
            mask = mask[0, 0]
        return Prepared(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), note=note)


class SDPADenseFast(Impl):
    """``scaled_dot_product_attention`` *without* the pattern: no mask, or ``is_causal=True``
    for causal self attention. For linear and spectral mechanisms it is softmax attention on
    the same inputs. This is what ignoring the sparsity costs with PyTorch's fastest
    dense kernels (FlashAttention-2 on CUDA, "FlashAttention-2: Faster Attention with Better
    Parallelism and Work Partitioning", 2023). It does not compute the mechanism's function:
    a cost baseline only. Causal cross attention runs unmasked (SDPA's ``is_causal`` aligns
    top-left, attnlab bottom-right)."""

    name = "sdpa_fast"

    def prepare(self, case: Case) -> Prepared:
        causal = case.measurement.pattern == "causal-self"
        return Prepared(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                        note="dense, without the pattern: cost baseline")


def _cpu_has_no_backward(case: Case) -> str | None:
    """The ``Prepared.backward`` of FlexAttention and NATTEN, which have none on CPU."""
    return "no backward on CPU" if case.device.type == "cpu" else None


def _head_dependent(case: Case) -> bool:
    b, h, qi, kv = _probe_grid(case, 256)
    m = case.pattern.mask(b, h, qi, kv, case.geometry)
    return m.shape[1] > 1 and bool((m != m[:, :1]).any())


class _Flex(Impl):
    package = "torch.nn.attention.flex_attention"
    pip = "torch>=2.5"
    compiled = False

    def applies(self, case: Case) -> bool:
        return not case.is_operator

    def prepare(self, case: Case) -> Prepared:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if not self.compiled:
            _check_memory(case, _dense_bytes(case, 12), "eager FlexAttention (dense scores)")
        g = case.geometry
        heads = g.q_heads if _head_dependent(case) else 1
        _check_memory(case, g.q_len * g.kv_len * heads * 8, "create_block_mask")
        score_fn = None
        if case.score_mod is not None:
            if case.score_mod.needs_query:
                raise Unsupported(f"{type(case.score_mod).__name__} needs the query vectors; "
                                  "a FlexAttention score_mod sees only (score, b, h, q_idx, kv_idx)")
            score_fn = case.score_mod.as_score_mod(g)
        block_mask = create_block_mask(case.pattern.as_mask_mod(g), None, heads if heads > 1 else None,
                                       g.q_len, g.kv_len, device=str(case.device))
        if self.compiled:
            torch._dynamo.reset()  # a fresh compile per problem: no recompile limit, comparable compile_s
        fn = torch.compile(flex_attention, dynamic=False) if self.compiled else flex_attention
        backward = _cpu_has_no_backward(case)

        def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return fn(q, k, v, score_mod=score_fn, block_mask=block_mask)

        compile_s = None
        if self.compiled:
            t0 = time.perf_counter()
            with torch.no_grad():
                forward(case.q, case.k, case.v)
            if case.device.type == "cuda":
                torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
        return Prepared(forward, backward=backward, compile_s=compile_s)


class FlexEager(_Flex):
    """``flex_attention`` without ``torch.compile`` (PyTorch's reference path)."""

    name = "flex_eager"


class FlexCompiled(_Flex):
    """``torch.compile(flex_attention)`` with a ``create_block_mask`` BlockMask ("FlexAttention:
    A Programming Model for Generating Optimized Attention Kernels", 2024). The first call's
    compile time is reported as ``compile_s``, outside the timings."""

    name = "flex_compiled"
    compiled = True


class Natten(Impl):
    """NATTEN's ``na1d`` (heads-last layout) for the ``neighborhood`` mechanism."""

    name = "natten"
    package = "natten"
    pip = "--no-build-isolation natten"

    def applies(self, case: Case) -> bool:
        return case.mechanism.name == "neighborhood" and not case.is_operator

    def prepare(self, case: Case) -> Prepared:
        import natten

        p, m = case.pattern, case.measurement
        if not isinstance(p, Neighborhood):
            raise Unsupported(f"NATTEN's causal neighborhood is another pattern than {p!r}")
        if m.L != m.S:
            raise Unsupported("NATTEN computes self attention only (L == S)")
        kwargs = dict(kernel_size=p.kernel_size, dilation=p.dilation, stride=p.stride, is_causal=p.is_causal)
        backward = _cpu_has_no_backward(case)
        return Prepared(lambda q, k, v: natten.na1d(q, k, v, **kwargs),
                        convert=lambda q, k, v: tuple(x.transpose(1, 2).contiguous() for x in (q, k, v)),
                        backward=backward)


class LocalAttention(Impl):
    """lucidrains' ``local-attention`` (``LocalAttention(window_size=w, exact_windowsize=True)``,
    look one window back, and forward when non-causal) for sliding windows, where it computes
    the same function: query ``i`` sees ``i - w <= j <= i`` (causal) or ``|i - j| <= w``."""

    name = "local_attention"
    package = "local_attention"
    pip = "local-attention"

    def applies(self, case: Case) -> bool:
        return isinstance(case.pattern, SlidingWindow)

    def prepare(self, case: Case) -> Prepared:
        from local_attention import LocalAttention as LA

        p, m = case.pattern, case.measurement
        if m.L != m.S:
            raise Unsupported("local-attention computes self attention only (L == S)")
        if p.dilation != 1 or p.right not in (0, p.left):
            raise Unsupported(f"local-attention needs right == 0 or right == left without dilation, got {p!r}")
        module = LA(window_size=p.left, causal=p.right == 0, look_backward=1, look_forward=int(p.right > 0),
                    exact_windowsize=True, autopad=True, use_rotary_pos_emb=False).to(case.device)
        # without a key mask, autopad's zero keys past the end would be attended to
        keep = torch.ones(m.batch, m.S, dtype=torch.bool, device=case.device)
        return Prepared(lambda q, k, v: module(q, k, v, mask=keep))


@dataclass(frozen=True)
class FlaKernel:
    """One reference function of flash-linear-attention: ``module.function(q, k, v)`` with
    ``heads_last`` inputs ``(B, T, H, D)`` (else ``(B, H, T, D)``); a tuple result's first item
    is the output."""

    module: str
    function: str
    heads_last: bool


FLA_KERNELS: dict[str, FlaKernel] = {
    "linear_attention": FlaKernel("fla.ops.linear_attn.naive", "naive_recurrent_linear_attn", True),
    "retention": FlaKernel("fla.ops.retention.naive", "naive_retention", False),
}
"""attnlab mechanism name -> flash-linear-attention reference function ("Gated Linear Attention
Transformers with Hardware-Efficient Training", 2024; fla 0.6 layouts). It applies to the
linear mechanisms of the catalog that bear these names, whose semantics must be the same
(unnormalised causal linear attention; RetNet's multi-scale retention)."""


class FlaNaive(Impl):
    """flash-linear-attention's reference implementations (``fla/ops/*/naive.py``) for the
    linear mechanisms named in :data:`FLA_KERNELS`."""

    name = "fla_naive"
    package = "fla"
    pip = "flash-linear-attention triton"

    def applies(self, case: Case) -> bool:
        return case.mechanism.name in FLA_KERNELS

    def prepare(self, case: Case) -> Prepared:
        kernel = FLA_KERNELS[case.mechanism.name]
        if case.measurement.L != case.measurement.S:
            raise Unsupported("flash-linear-attention's reference code computes self attention only")
        fn = getattr(importlib.import_module(kernel.module), kernel.function)

        def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            out = fn(q, k, v)
            return out[0] if isinstance(out, tuple) else out

        if kernel.heads_last:
            return Prepared(forward, convert=lambda q, k, v: tuple(x.transpose(1, 2).contiguous() for x in (q, k, v)))
        return Prepared(forward)


def default_impls() -> list[Impl]:
    """attnlab first, then every peer, in the order the report lists them."""
    return [Attnlab(), SDPADense(), SDPADenseFast(), FlexEager(), FlexCompiled(), Natten(), LocalAttention(), FlaNaive()]


PEER_NAMES: tuple[str, ...] = tuple(i.name for i in default_impls()[1:])


def select_impls(peers: Any) -> list[Impl]:
    """attnlab plus the named peers (``None``: all of :data:`PEER_NAMES`; ``[]``: none)."""
    impls = default_impls()
    if peers is None:
        return impls
    names = list(peers)
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; expected some of {list(PEER_NAMES)}")
    return [impls[0]] + [i for i in impls[1:] if i.name in names]
