"""``attention``, ``attention_weights`` and ``explain``: the public entry points.

Softmax attention of query ``i`` over the keys ``P(i)`` that the pattern lets it see::

    o_i = sum_{j in P(i)} softmax_j(scale * q_i . k_j + s(i, j, q_i)) v_j

with ``s`` the score mod. Layout is SDPA's: ``q`` ``(B, Hq, *L, D)``, ``k`` ``(B, Hkv, *S, D)``,
``v`` ``(B, Hkv, *S, Dv)``, ``Hq`` a multiple of ``Hkv``. A query that sees no key returns 0
and ``lse = -inf``.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Callable

import torch

from .backends.base import Backend, Problem
from .backends.registry import TiledBackend, all_backends, check_option_values
from .geometry import check_qkv, check_scale
from .patterns.base import as_pattern
from .patterns.content import has_content, resolve_pattern
from .patterns.layout import Tiling
from .scores.base import as_score_mod

AUTO = "auto"

# Set by ``attnlab.inspect`` (capture, interventions) to ``hook(problem, run)``, which returns
# what ``attention`` returns; ``run()`` is the normal dispatch. None: nothing is inspected.
INSPECT_HOOK: ContextVar[Callable[[Problem, Callable[[], Any]], Any] | None] = ContextVar(
    "attnlab_inspect_hook", default=None)


def _problem(q, k, v, pattern, score_mod, scale, return_lse, options) -> Problem:
    g = check_qkv(q, k, v)
    pattern = as_pattern(pattern)
    pattern.validate(g)
    score_mod = as_score_mod(score_mod)
    if score_mod is not None:
        score_mod.validate(g)
        mod_device = next((p.device for p in score_mod.parameters()), None)
        if mod_device is not None and mod_device != g.device:
            raise ValueError(
                f"score_mod parameters are on {mod_device} but q is on {g.device}; move the "
                "score mod with .to(device)"
            )
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict or None, got {type(options).__name__}")
    scale = check_scale(scale, g.head_dim)
    if has_content(pattern):
        pattern = resolve_pattern(pattern, q, k, g, scale, score_mod)
        pattern.validate(g)
    return Problem(q, k, v, g, pattern, score_mod, scale, return_lse, options)


class BackendUnavailable(ValueError):
    """No backend (or not the forced one) can run a valid problem."""


def _check_options(problem: Problem, backends: list[Backend]) -> None:
    known = {name for b in backends for name in b.options}
    unknown = sorted(set(problem.options) - known)
    if unknown:
        raise ValueError(
            f"unknown options {unknown} for backend(s) {[b.name for b in backends]}; "
            f"accepted: {sorted(known)}"
        )
    check_option_values(problem.options)
    if "q_tile" in problem.options or "kv_tile" in problem.options:
        TiledBackend().tiling(problem)  # raises ValueError naming a malformed tile option


def _select(problem: Problem, backend: str) -> tuple[Backend, dict[str, list[str]]]:
    backends = all_backends()
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend != AUTO and backend not in backends:
        raise ValueError(f"unknown backend={backend!r}; expected one of {[AUTO, *backends]}")
    candidates = list(backends.values()) if backend == AUTO else [backends[backend]]
    _check_options(problem, candidates)
    reasons: dict[str, list[str]] = {}
    for b in candidates:  # in priority order; later backends are not asked
        reasons[b.name] = b.not_supported_reasons(problem) or (b.declines(problem) if backend == AUTO else [])
        if not reasons[b.name]:
            return b, reasons
    if backend != AUTO:
        raise BackendUnavailable(
            f"backend={backend!r} cannot run this problem: " + "; ".join(reasons[backend])
            + f". Problem: {problem.describe()}"
        )
    detail = "\n".join(f"  {name}: {'; '.join(r)}" for name, r in reasons.items())
    raise BackendUnavailable(f"no backend can run this problem ({problem.describe()}):\n{detail}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Any = None,
    score_mod: Any = None,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = AUTO,
    options: dict[str, Any] | None = None,
):
    """Exact softmax attention over a sparsity pattern, with an optional score mod.

    Args:
        q: ``(B, Hq, *L, D)`` queries; ``*L`` is 1, 2 or 3 token axes.
        k: ``(B, Hkv, *S, D)`` keys, ``Hq`` a multiple of ``Hkv`` (GQA/MQA).
        v: ``(B, Hkv, *S, Dv)`` values.
        pattern: which pairs interact: an :class:`attnlab.Pattern` (``Causal()``,
            ``SlidingWindow(511) | Sinks(4)``, ``Neighborhood((7, 7))``, ...), a FlexAttention
            ``mask_mod(b, h, q_idx, kv_idx)`` callable on flat token indices, or None (Full).
        score_mod: what is added to the logits: an :class:`attnlab.ScoreMod` (``ALiBi``,
            ``RelativeBias``, ``Softcap``, ...), a ``score_mod(score, b, h, q_idx, kv_idx)``
            callable, a list of them, or None.

    Other Parameters:
        scale: logit scale, ``1/sqrt(D)`` when None.
        return_lse: also return the log-sum-exp ``(B, Hq, *L)`` in float32 (float64 for
            float64 inputs); ``-inf`` for queries that see no key.
        backend: ``"auto"`` (default), ``"sdpa"``, ``"flex"``, ``"tiled"`` or
            ``"reference"``. A forced backend that cannot run the problem raises
            ``ValueError`` saying why; :func:`explain` shows every backend's reasons.
        options: backend knobs, e.g. ``{"q_tile": 64, "kv_tile": 16}`` (tiled),
            ``{"allow_cpu": True}`` (flex), ``{"compute_dtype": torch.float64}`` (reference).

    Returns:
        ``out`` ``(B, Hq, *L, Dv)`` in the dtype of ``q``, or ``(out, lse)``.

    Equivalent PyTorch code (see :func:`attnlab.backends.reference.reference_attention`)::

        logits = scale * q @ k.transpose(-1, -2) + bias        # bias from score_mod
        logits = logits.masked_fill(~mask, -inf)               # mask from pattern
        out = softmax(logits, -1) @ v                          # rows with no key -> 0
    """
    problem = _problem(q, k, v, pattern, score_mod, scale, return_lse, options)
    hook = INSPECT_HOOK.get()
    if hook is not None:
        return hook(problem, lambda: _dispatch(problem, backend))
    return _dispatch(problem, backend)


def _dispatch(problem: Problem, backend: str):
    chosen, _ = _select(problem, backend)
    out, lse = chosen.run(problem)
    return (out, lse) if problem.return_lse else out


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Any = None,
    score_mod: Any = None,
    *,
    scale: float | None = None,
    max_elements: int = 1 << 27,
) -> torch.Tensor:
    """Dense attention probabilities ``(B, Hq, *L, *S)`` for inspection (small inputs).

    Rows of queries that see no key are all zero. ``v`` is only validated. Differentiable.
    """
    from .backends.reference import reference_attention

    problem = _problem(q, k, v, pattern, score_mod, scale, False, None)
    g = problem.geometry
    p = reference_attention(
        q, k, v, pattern=problem.pattern, score_mod=problem.score_mod, scale=problem.scale,
        max_elements=max_elements, return_weights=True,
    )
    return p.to(q.dtype).reshape(g.batch, g.q_heads, *g.q_shape, *g.kv_shape)


class Explanation(str):
    """The text :func:`explain` returns; ``.backend`` is the backend that would run,
    ``.reasons`` why each backend cannot run the problem (empty: it can) and ``.declined``
    why automatic selection passes over a backend that could (it would be slower)."""

    backend: str | None
    reasons: dict[str, list[str]]
    declined: dict[str, list[str]]


def explain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Any = None,
    score_mod: Any = None,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = AUTO,
    options: dict[str, Any] | None = None,
) -> Explanation:
    """Which backend :func:`attention` would run for these arguments, and why each other
    backend would not. Nothing is computed except the pattern's block layout."""
    problem = _problem(q, k, v, pattern, score_mod, scale, return_lse, options)
    try:
        chosen_name = _select(problem, backend)[0].name
        header = f"backend: {chosen_name}"
    except BackendUnavailable as e:
        chosen_name, header = None, f"cannot run: {e}"
    lines = [header, f"problem: {problem.describe()}"]
    reasons: dict[str, list[str]] = {}
    declined: dict[str, list[str]] = {}
    for b in all_backends().values():
        reasons[b.name] = why = b.not_supported_reasons(problem)
        declined[b.name] = [] if why or backend != AUTO else b.declines(problem)
        mark = "*" if b.name == chosen_name else " "
        status = "; ".join(why) if why else ("can run, passed over: " + "; ".join(declined[b.name])
                                             if declined[b.name] else "can run")
        lines.append(f" {mark} {b.name:<11} {status}")
    if chosen_name in ("tiled", "block_flash"):
        lines.append(_layout_summary(problem))
    if chosen_name == "block_flash":
        lines.append(all_backends()["block_flash"].kernel_summary(problem))
    text = Explanation("\n".join(lines))
    text.backend = chosen_name
    text.reasons = reasons
    text.declined = declined
    return text


def _layout_summary(problem: Problem) -> str:
    tiling: Tiling = TiledBackend().tiling(problem)
    layout = problem.pattern.block_layout(tiling)
    touched = layout.any.float().mean().item()
    full = layout.full.float().mean().item()
    return (
        f"layout: {tiling}; tile pairs touched {touched:.1%}, of them fully visible "
        f"{(full / touched if touched else 0):.1%}"
    )
