"""Run a Hugging Face ``transformers`` model's attention through attnlab.

    from attnlab.inspect import use_attnlab, capture
    with use_attnlab(model, pattern=al.SlidingWindow(8, 8)):   # training-free
        with capture() as rec:
            model(**batch)

:func:`register` adds the attention function ``"attnlab"`` to ``transformers``'
``AttentionInterface`` (and, for its masks, ``sdpa_mask`` to ``AttentionMaskInterface``, so the
model builds the boolean ``(B, 1, L, S)`` masks SDPA gets). :func:`use_attnlab` registers it,
switches the model with ``model.set_attn_implementation("attnlab")`` and chooses the pattern,
score mod, backend (or a non-softmax operator) every attention call runs with;
:meth:`AttnlabRoute.restore` (or leaving the ``with`` block) puts the previous implementation
back. Every call then goes through :func:`attnlab.attention`, so
:func:`~attnlab.inspect.capture` and :func:`~attnlab.inspect.intervene` see it, named by the
module's path and numbered by its ``layer_idx``.

What a call computes, for ``query (B, Hq, L, D)``, ``key``/``value (B, Hkv, S, D)`` (GQA
passed through, no ``repeat_kv``):

- the model's mask becomes an attnlab pattern: key padding only -> a :class:`attnlab.Document`
  over the keys (per batch element, exact block layout), causal plus key padding ->
  ``Causal() & Document(...)``, any other boolean mask -> a pattern reading the mask
  (generic path); a float (additive) mask: entries at or below half the dtype's minimum
  (``-inf`` included) are masked, other non-zero entries are added to the logits. No mask and
  the module's ``is_causal`` (HF's ``sdpa`` rule: ``L > 1``) -> :class:`attnlab.Causal`
  (bottom-right aligned);
- that pattern is intersected with the user's (an attnlab pattern restricts the model's own
  mask; content patterns such as :class:`attnlab.TopKBlocks` select within it); the user's
  score mod is applied after the model's ``softcap`` (if any) and before the mask's bias;
- ``scaling`` is the logit scale; dropout (``module.training`` and ``dropout > 0``) runs on the
  materialised probabilities as eager attention does, and is refused while a capture or an
  intervention is active (call ``model.eval()``); attention sinks passed as ``s_aux`` are
  refused (not expressible as softmax over a pattern);
- the output is returned in HF's ``(B, L, Hq, D)`` layout, with the probabilities when the
  call asks for ``output_attentions`` (else None).

``transformers`` is imported only when these functions run.
"""

from __future__ import annotations

import functools
import operator as _op
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from .. import api
from ..api import attention, attention_weights
from ..patterns.base import Causal, Pattern, as_pattern
from ..patterns.document import Document
from ..scores.base import ScoreMod, as_score_mod
from ..scores.softcap import Softcap
from ._hook import layer_scope

__all__ = ["IMPLEMENTATION", "AttnlabRoute", "attnlab_attention_forward", "hf_mask_to_attnlab", "register",
           "use_attnlab"]

IMPLEMENTATION = "attnlab"
_ATTR = "_attnlab_route"
_MISSING = object()


@dataclass(frozen=True)
class RouteSettings:
    """What the attnlab attention function runs for one module (set by :func:`use_attnlab`)."""

    pattern: Pattern | None = None
    score_mod: ScoreMod | None = None
    backend: str = "auto"
    options: dict | None = None
    layers: frozenset[int] | None = None
    operator: Callable[..., torch.Tensor] | None = None
    name: str | None = None

    def applies(self, layer: int | None) -> bool:
        return self.layers is None or (layer is not None and layer in self.layers)


_DEFAULT = RouteSettings()


def register() -> None:
    """Register ``"attnlab"`` with ``transformers``' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, attnlab_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def _key_padding(keys: torch.Tensor, L: int) -> Pattern | None:
    """``keys (Bm, 1, 1, S)`` bool (True: a real key) -> a Document pattern, or None if all real."""
    if bool(keys.all()):
        return None
    kv_ids = (~keys).to(torch.int64).reshape(keys.shape[0], keys.shape[-1])
    return Document(torch.zeros(L, dtype=torch.int64, device=keys.device), kv_ids)


def hf_mask_to_attnlab(mask: torch.Tensor | None, L: int, S: int, is_causal: bool
                       ) -> tuple[Pattern | None, ScoreMod | None]:
    """The pattern (None: Full) and additive-bias score mod (or None) equivalent to a
    ``transformers`` attention mask (module docstring), for ``L`` queries and ``S`` keys."""
    if mask is None:
        return (Causal() if is_causal else None), None
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or tuple(mask.shape[-2:]) != (L, S):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask={got}, expected a tensor (B or 1, H or 1, L={L}, S={S}) or None")
    bias = None
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        allowed = mask > torch.finfo(mask.dtype).min / 2
        values = torch.where(allowed, mask, torch.zeros((), dtype=mask.dtype, device=mask.device))
        if bool((values != 0).any()):
            from ..nn.multihead import TensorBias

            bias = TensorBias(values, "attention_mask")
    else:
        raise TypeError(f"attention_mask.dtype={mask.dtype}, expected torch.bool or a float dtype")
    from ..nn.multihead import mask_pattern

    if allowed.shape[1] == 1:
        keys = allowed.any(-2, keepdim=True)
        if bool((allowed == keys).all()):
            return _key_padding(keys, L), bias
        i = torch.arange(L, device=mask.device).view(-1, 1)
        j = torch.arange(S, device=mask.device).view(1, -1)
        last = allowed[..., -1:, :]
        if bool((allowed == ((j <= i + S - L) & last)).all()):
            pad = _key_padding(last, L)
            return (Causal() if pad is None else Causal() & pad), bias
    return mask_pattern(allowed, "attention_mask"), bias


def _and(parts: list[Pattern | None]) -> Pattern | None:
    parts = [p for p in parts if p is not None]
    return functools.reduce(_op.and_, parts) if parts else None


def attnlab_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None = None,
                              dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``"attnlab"`` attention function of ``transformers``' ``AttentionInterface``
    (module docstring). Returns ``(attn_output (B, L, Hq, D), attn_weights or None)``."""
    settings: RouteSettings = getattr(module, _ATTR, None) or _DEFAULT
    if kwargs.get("s_aux") is not None:
        raise ValueError("attnlab cannot run this model's attention sinks (s_aux logits); use its eager attention")
    L, S = query.shape[-2], key.shape[-2]
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    is_causal = bool(L > 1 and attention_mask is None and is_causal)
    mask_pat, bias = hf_mask_to_attnlab(attention_mask, L, S, is_causal)
    layer = getattr(module, "layer_idx", None)
    layer = layer if isinstance(layer, int) and not isinstance(layer, bool) else None
    mine = settings.applies(layer)
    mods = [Softcap(kwargs["softcap"])] if kwargs.get("softcap") else []
    if mine and settings.score_mod is not None:
        mods.append(settings.score_mod)
    if bias is not None:
        mods.append(bias)
    pattern = _and([settings.pattern if mine else None, mask_pat])
    score_mod = mods or None
    training = module.training and dropout > 0
    if training and api.INSPECT_HOOK.get() is not None:
        raise ValueError(f"dropout={dropout} in training mode cannot be captured or edited; call model.eval() "
                         "(or set the attention dropout to 0) inside capture()/intervene()")
    with layer_scope(layer, settings.name or type(module).__name__):
        if mine and settings.operator is not None:
            out = _run_operator(settings.operator, query, key, value, mask_pat, bias, training, mods)
        elif training:
            w = F.dropout(attention_weights(query, key, value, pattern, score_mod, scale=scaling), dropout)
            v = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
            out = w @ v
        else:
            out = attention(query, key, value, pattern, score_mod, scale=scaling, backend=settings.backend,
                            options=settings.options)
    weights = None
    if kwargs.get("output_attentions"):
        weights = attention_weights(query, key, value, pattern, score_mod, scale=scaling)
    return out.transpose(1, 2).contiguous(), weights


def _run_operator(fn, query, key, value, mask_pat, bias, training, mods) -> torch.Tensor:
    if mask_pat is not None or bias is not None or mods:
        raise ValueError(
            "an operator (use_attnlab(operator=...)) cannot honour this call's attention mask, causal flag "
            "or score mods; run it on unpadded inputs of a non-causal model (batch of one sentence)")
    if training:
        raise ValueError("an operator route does not apply attention dropout; call model.eval()")
    group = query.shape[1] // key.shape[1]
    if group > 1:
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    return fn(query, key, value)


class AttnlabRoute:
    """A model switched to attnlab by :func:`use_attnlab`; :meth:`restore` (or the end of a
    ``with`` block) puts back its previous attention implementation and settings."""

    def __init__(self, model: torch.nn.Module, previous: Any, saved: list[tuple[torch.nn.Module, Any]],
                 settings: RouteSettings) -> None:
        self.model, self.previous, self._saved, self.settings = model, previous, saved, settings
        self.active = True

    def restore(self) -> None:
        if not self.active:
            return
        for mod, old in self._saved:
            if old is _MISSING:
                mod.__dict__.pop(_ATTR, None)
            else:
                mod.__dict__[_ATTR] = old
        if self.previous is not None:
            self.model.set_attn_implementation(self.previous)
        self.active = False

    def __enter__(self) -> "AttnlabRoute":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def __repr__(self) -> str:
        s = self.settings
        what = (f"operator={s.operator!r}" if s.operator is not None
                else f"pattern={s.pattern!r}, score_mod={s.score_mod!r}")
        return f"AttnlabRoute({type(self.model).__name__}, {what}, backend={s.backend!r}, active={self.active})"


def _check_layers(layers: Iterable[int] | None) -> frozenset[int] | None:
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    items = list(layers) if isinstance(layers, Iterable) else None
    if items is None or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise ValueError(f"layers={layers!r}, expected None or layer indices (ints >= 0)")
    return frozenset(items)


def use_attnlab(model: torch.nn.Module, pattern: Any = None, score_mod: Any = None, *, backend: str = "auto",
                options: dict | None = None, layers: Iterable[int] | None = None,
                operator: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                ) -> AttnlabRoute:
    """Route ``model``'s attention through attnlab (module docstring); usable as a context manager.

    Args:
        model: a ``transformers`` ``PreTrainedModel`` whose attention follows the
            ``AttentionInterface`` (most models of transformers 5).
        pattern: an attnlab pattern (or ``mask_mod``) every routed call is restricted to,
            intersected with the model's own mask; None: the model's mask alone.
        score_mod: an attnlab score mod (or callable, or list) added to every routed call.
        backend, options: passed to :func:`attnlab.attention`.
        layers: only these layers (``module.layer_idx``) get ``pattern``, ``score_mod`` or
            ``operator``; the others run the model's own mask through attnlab. None: all.
        operator: instead of softmax attention, ``operator(q, k, v) -> (B, Hq, L, Dv)`` (e.g.
            a catalog row's ``Operator.fast``); it sees no mask, so calls with padding or a
            causal flag raise. Exclusive with ``pattern`` and ``score_mod``.

    Returns:
        an :class:`AttnlabRoute`; ``restore()`` undoes the switch.
    """
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise TypeError(f"model={type(model).__name__}, expected a transformers PreTrainedModel "
                        "(with set_attn_implementation)")
    if not isinstance(backend, str):
        raise TypeError(f"backend={backend!r}, expected a string such as 'auto'")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options={options!r}, expected a dict or None")
    if operator is not None and (not callable(operator) or pattern is not None or score_mod is not None):
        raise ValueError("operator must be a callable (q, k, v) -> out, and excludes pattern and score_mod")
    settings = RouteSettings(None if pattern is None else as_pattern(pattern), as_score_mod(score_mod), backend,
                             options, _check_layers(layers), operator)
    register()
    previous = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation(IMPLEMENTATION)
    if getattr(model.config, "_attn_implementation", None) != IMPLEMENTATION:
        raise ValueError(f"{type(model).__name__} did not switch to attn_implementation={IMPLEMENTATION!r}: it "
                         "does not dispatch its attention through transformers' AttentionInterface")
    saved = []
    for name, mod in model.named_modules():
        saved.append((mod, mod.__dict__.get(_ATTR, _MISSING)))
        mod.__dict__[_ATTR] = replace(settings, name=name or type(mod).__name__)
    return AttnlabRoute(model, previous if previous != IMPLEMENTATION else None, saved, settings)
