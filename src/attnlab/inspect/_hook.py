"""The one hook :mod:`attnlab.inspect` installs in :func:`attnlab.attention`.

While a :func:`~attnlab.inspect.capture` or :func:`~attnlab.inspect.intervene` context is
active, ``attnlab.api.INSPECT_HOOK`` holds an immutable :class:`_State` listing the active
recorders and editors (innermost last); entering a context sets a new state, leaving it resets
the previous one (``contextvars``: per thread and per asyncio task). With no context active the
hook is ``None`` and ``attention`` pays one context-variable read.

Per call:

- no editor applies: the call runs its normal backend; each recorder then records the
  probabilities of the same problem (same ``q``, ``k``, resolved pattern, score mod and
  scale) by the reference computation that :func:`attnlab.attention_weights` runs, or a
  blockwise summary of them;
- some editor applies: the call runs on the dense path ``logits -> softmax -> edits -> P @ v``
  (differentiable), and the recorders record the *edited* probabilities.

Layer numbering: :func:`layer_scope` (which the Hugging Face route sets from the module's
``layer_idx``) names the layer of the calls inside it; outside any scope each context numbers
the calls it sees ``0, 1, 2, ...`` in call order.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..api import INSPECT_HOOK
from ..backends.base import Problem
from ..backends.reference import compute_dtype_for, reference_logits, safe_softmax_lse


@dataclass(frozen=True)
class Scope:
    """The layer and name that :func:`layer_scope` gives the calls inside it."""

    layer: int | None
    name: str | None


_SCOPE: ContextVar[Scope | None] = ContextVar("attnlab_inspect_scope", default=None)


@contextlib.contextmanager
def layer_scope(layer: int | None = None, name: str | None = None) -> Iterator[None]:
    """Calls of :func:`attnlab.attention` inside this block belong to ``layer`` (an int >= 0)
    and are called ``name`` in captures and in the ``layers=`` filter of interventions."""
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise ValueError(f"layer={layer!r}, expected an int >= 0 or None")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name={name!r}, expected a str or None")
    token = _SCOPE.set(Scope(layer, name))
    try:
        yield
    finally:
        _SCOPE.reset(token)


class Session:
    """One active capture or intervene context: it numbers the calls it sees."""

    def __init__(self) -> None:
        self.calls = 0

    def locate(self) -> tuple[int, str, int]:
        """``(layer, name, call)`` of the current call; advances the call counter."""
        call = self.calls
        self.calls += 1
        scope = _SCOPE.get()
        layer = scope.layer if scope is not None and scope.layer is not None else call
        name = scope.name if scope is not None and scope.name is not None else f"call{call}"
        return layer, name, call


@dataclass(frozen=True)
class _State:
    recorders: tuple[Any, ...] = ()
    editors: tuple[Any, ...] = ()

    def __call__(self, problem: Problem, run: Callable[[], Any]) -> Any:
        return _inspect_call(self, problem, run)


@contextlib.contextmanager
def activate(*, recorder: Any = None, editor: Any = None) -> Iterator[None]:
    """Add ``recorder`` and/or ``editor`` to the hook for the duration of the block."""
    state = INSPECT_HOOK.get()
    state = state if isinstance(state, _State) else _State()
    state = _State(state.recorders + ((recorder,) if recorder is not None else ()),
                   state.editors + ((editor,) if editor is not None else ()))
    token = INSPECT_HOOK.set(state)
    try:
        yield
    finally:
        INSPECT_HOOK.reset(token)


@dataclass
class DenseCall:
    """The dense view of one call: masked logits, visibility, probabilities (compute dtype)."""

    problem: Problem
    logits: torch.Tensor  # (B, Hq, L, S), -inf where masked
    visible: torch.Tensor  # (B, Hq, L, S) bool
    probs: torch.Tensor  # (B, Hq, L, S)


def dense_call(problem: Problem, max_elements: int) -> DenseCall:
    """Masked logits and probabilities of ``problem``, computed exactly as the reference
    backend (and so :func:`attnlab.attention_weights`) computes them."""
    g = problem.geometry
    n = g.batch * g.q_heads * g.q_len * g.kv_len
    if n > max_elements:
        raise ValueError(
            f"an intervention needs the dense probabilities, B*Hq*L*S = {g.batch}*{g.q_heads}*"
            f"{g.q_len}*{g.kv_len} = {n} elements, above max_elements={max_elements}; raise "
            "max_elements of intervene() or intervene on shorter inputs")
    cdt = compute_dtype_for(problem.q.dtype)
    logits = reference_logits(problem.q, problem.k, g, problem.pattern, problem.score_mod, problem.scale, cdt)
    probs, _ = safe_softmax_lse(logits)
    visible = torch.broadcast_to(torch.isfinite(logits), probs.shape)
    return DenseCall(problem, logits, visible, probs)


def probs_times_v(problem: Problem, probs: torch.Tensor) -> torch.Tensor:
    """``probs @ v`` with GQA heads expanded, in the shape and dtype ``attention`` returns."""
    g = problem.geometry
    v = problem.v.reshape(g.batch, g.kv_heads, g.kv_len, g.value_dim).to(probs.dtype)
    if g.q_heads != g.kv_heads:
        v = v.repeat_interleave(g.group_size, dim=1)
    return (probs @ v).to(problem.q.dtype).reshape(g.batch, g.q_heads, *g.q_shape, g.value_dim)


def _inspect_call(state: _State, problem: Problem, run: Callable[[], Any]) -> Any:
    rec_where = [(r, r.session.locate()) for r in state.recorders]
    plan = []
    for editor in state.editors:
        layer, name, _ = editor.session.locate()
        if editor.applies_to(layer, name):
            plan.append((editor, layer, name))
    if not plan:
        result = run()
        for recorder, (layer, name, call) in rec_where:
            recorder.record_call(problem, layer, name, call)
        return result
    if problem.return_lse:
        raise ValueError(
            "return_lse=True inside intervene(): the edited probabilities are not a softmax of "
            "logits, so they have no log-sum-exp; call attention without return_lse (or outside "
            "the intervention)")
    dense = dense_call(problem, min(e.max_elements for e, _, _ in plan))
    probs = dense.probs
    for editor, layer, name in plan:
        probs = editor.edit(probs, dense, layer, name)
    out = probs_times_v(problem, probs)
    for recorder, (layer, name, call) in rec_where:
        recorder.record_probs(problem, probs, dense.visible, layer, name, call, edited=True)
    return out
