"""The efficiency suite: one planned problem, every implementation, one record each.

For a :class:`~attnlab.bench.planner.Measurement` (a mechanism on one of CAB's four patterns
at ``L`` queries) :func:`run_measurement` builds the problem once
(:func:`~attnlab.bench.planner.build_problem`) and, for attnlab and each peer of
:mod:`attnlab.bench.peers` that applies, yields ``(key, config, result)`` where

- ``key`` is ``f"{measurement.key}|{impl}"``;
- ``config`` is the measurement's fields plus ``"suite": "efficiency"`` and ``"impl"``;
- ``result`` holds ``status`` (``"ok"``, ``"not installed"``, ``"unsupported"``,
  ``"skipped"``, ``"error"``), ``reason``, ``backend`` (attnlab's choice), ``fwd_ms`` /
  ``fwd_spread`` (median over ``repeats`` timed forward passes without autograd, after one
  warm-up, and ``(max - min) / median``), ``fwdbwd_ms`` / ``fwdbwd_spread`` (forward plus
  backward of a fixed random output gradient; None with the reason when the implementation
  has no backward here), ``repeats``, ``peak_mib`` (peak memory allocated during one
  forward+backward, or forward, beyond the inputs: :mod:`attnlab.bench.memory`),
  ``compile_s``, ``density`` (visible fraction of the ``L * S`` pairs), and for attnlab
  ``err_out`` / ``err_grad``: :func:`scaled_error` of the output and of the
  gradients (worst of dq, dk, dv and learned score-mod tables) against the float64
  reference backend, where its ``(B, H, L, S)`` logits fit in ``error_limit_bytes``.

A failure is a record, never an exception: the sweep goes on.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import torch

from ..api import attention
from ..geometry import check_qkv
from .._checks import SizeLimitError
from ..patterns.base import as_pattern
from ..patterns.content import resolve_pattern
from ..registry import Mechanism
from ..scores.base import as_score_mod
from ..testing import density, rel_error
from .memory import peak_memory_mib
from .peers import Case, Impl, Prepared, Skipped, Unsupported
from .planner import Measurement, build_problem
from .timing import forward_backward, forward_only, measure

RESULT_FIELDS = ("status", "reason", "backend", "fwd_ms", "fwd_spread", "fwdbwd_ms", "fwdbwd_spread",
                 "repeats", "peak_mib", "compile_s", "density", "err_out", "err_grad")


def record_key(measurement: Measurement, impl: str) -> str:
    return f"{measurement.key}|{impl}"


def empty_result(status: str, reason: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = dict.fromkeys(RESULT_FIELDS)
    out.update(status=status, reason=reason)
    return out


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def _timings(prep: Prepared, case: Case, repeats: int) -> dict[str, Any]:
    device = case.device
    fwd_inputs = prep.convert(case.q, case.k, case.v)
    t_fwd = measure(forward_only(prep.forward, *fwd_inputs), repeats, device=device)
    out: dict[str, Any] = {"fwd_ms": t_fwd.median * 1e3, "fwd_spread": t_fwd.spread, "repeats": repeats}
    if prep.backward is None:
        grad_inputs = [x.detach().clone().requires_grad_() for x in fwd_inputs]
        step = forward_backward(prep.forward, *grad_inputs)
        t_fb = measure(step, repeats, device=device)
        out.update(fwdbwd_ms=t_fb.median * 1e3, fwdbwd_spread=t_fb.spread)
        out["peak_mib"] = peak_memory_mib(step, device)
    else:
        out["peak_mib"] = peak_memory_mib(forward_only(prep.forward, *fwd_inputs), device)
    return out


def scaled_error(fast: torch.Tensor, exact: torch.Tensor) -> float:
    """``max |fast - exact| / max(max |exact|, 1e-3)`` (the floor keeps gradients that are
    exactly zero in the reference, e.g. one visible key per row, from dividing by zero)."""
    return rel_error(fast, exact, floor=1e-3)


def reference_error(case: Case) -> tuple[float, float]:
    """``(err_out, err_grad)`` of :func:`attnlab.attention` (or the operator's fast path) in the
    case's dtype against the float64 reference backend (the operator's reference), for the same
    inputs and output gradient."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    leaves = [x.detach().clone().requires_grad_() for x in (case.q, case.k, case.v)]
    exact_leaves = [x.detach().double().requires_grad_() for x in (case.q, case.k, case.v)]
    if case.is_operator:
        out = case.operator.fast(*leaves)
        grad = torch.randn(out.shape, generator=gen).to(out)
        ref = case.operator.reference(*exact_leaves)
        fast = torch.autograd.grad(out, leaves, grad, allow_unused=True)
        exact = torch.autograd.grad(ref, exact_leaves, grad.double(), allow_unused=True)
        errs = [scaled_error(a, b) for a, b in zip(fast, exact) if a is not None and b is not None]
        return scaled_error(out, ref), max(errs, default=0.0)
    params = list(case.score_mod.parameters()) if case.score_mod is not None else []
    out = attention(*leaves, case.pattern, case.score_mod)
    grad = torch.randn(out.shape, generator=gen).to(out)
    fast = torch.autograd.grad(out, leaves + params, grad, allow_unused=True)
    ref = attention(*exact_leaves, case.pattern, case.score_mod, backend="reference")
    exact = torch.autograd.grad(ref, exact_leaves + params, grad.double(), allow_unused=True)
    errs = [scaled_error(a, b) for a, b in zip(fast, exact) if a is not None and b is not None]
    return scaled_error(out, ref), max(errs, default=0.0)


def measure_impl(impl: Impl, case: Case, repeats: int, error_limit_bytes: int) -> dict[str, Any]:
    """The result of one implementation on one case (never raises; the implementation's own
    warnings, e.g. FlexAttention's advice to compile, are silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _measure_impl(impl, case, repeats, error_limit_bytes)


def _measure_impl(impl: Impl, case: Case, repeats: int, error_limit_bytes: int) -> dict[str, Any]:
    missing = impl.missing()
    if missing:
        return empty_result("not installed", missing)
    try:
        prep = impl.prepare(case)
        res = empty_result("ok", prep.note)
        res.update(backend=prep.backend, compile_s=prep.compile_s)
        res.update(_timings(prep, case, repeats))
        if prep.backward is not None:
            res["reason"] = "; ".join(r for r in (prep.backward, prep.note) if r)
        if impl.name == "attnlab":
            res["density"] = None if case.is_operator else density(case.pattern, case.geometry)
            m = case.measurement
            if m.batch * m.heads * m.L * m.S * 8 * 3 <= error_limit_bytes:
                res["err_out"], res["err_grad"] = reference_error(case)
        return res
    except (Unsupported, SizeLimitError) as e:
        return empty_result("unsupported", str(e))
    except Skipped as e:
        return empty_result("skipped", str(e))
    except Exception as e:  # a failing implementation is a result, not a crash
        if case.device.type == "cuda":
            torch.cuda.empty_cache()
        return empty_result("error", _short(e))


def make_case(measurement: Measurement, mechanism: Mechanism, memory_limit_bytes: int, seed: int = 0) -> Case:
    q, k, v, pattern, score_mod = build_problem(measurement, mechanism, seed=seed)
    operator = None
    if mechanism.kind == "operator":
        m = measurement
        operator = mechanism.operator(m.L, m.S, m.heads, m.head_dim, m.causal)
    score_mod = as_score_mod(score_mod)
    # a content pattern's selection is made once per case, so that attnlab and every peer run
    # the same selected set (its own cost is measured by attnlab.bench.adaptive_figures)
    pattern = resolve_pattern(as_pattern(pattern), q, k, score_mod=score_mod)
    return Case(measurement, mechanism, q, k, v, pattern, score_mod, check_qkv(q, k, v),
                memory_limit_bytes, operator)


def run_measurement(measurement: Measurement, mechanism: Mechanism, impls: list[Impl], *,
                    repeats: int = 3, memory_limit_bytes: int = 4 << 30, error_limit_bytes: int = 1 << 30,
                    done_keys: frozenset[str] | set[str] = frozenset(), seed: int = 0
                    ) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``(key, config, result)`` for each implementation that applies and is not in ``done_keys``."""
    todo = [i for i in impls if record_key(measurement, i.name) not in done_keys]
    if not todo:
        return
    config = measurement.config() | {"suite": "efficiency"}
    try:
        case = make_case(measurement, mechanism, memory_limit_bytes, seed)
    except Exception as e:  # the catalog example itself failed: one error record per impl
        for impl in todo:
            yield record_key(measurement, impl.name), config | {"impl": impl.name}, empty_result("error", _short(e))
        return
    for impl in todo:
        try:
            applies = impl.applies(case)
        except Exception as e:
            yield record_key(measurement, impl.name), config | {"impl": impl.name}, empty_result("error", _short(e))
            continue
        if applies:
            yield record_key(measurement, impl.name), config | {"impl": impl.name}, measure_impl(
                impl, case, repeats, error_limit_bytes)
