"""Interventions: composable edits of attention probabilities inside :func:`attnlab.attention`.

    from attnlab.inspect import intervene, HeadMask, Flatten
    with intervene(HeadMask(mask), Flatten(0.5), layers=[2, 3]):
        model(x)

While :func:`intervene` is active, every :func:`attnlab.attention` call of the chosen layers
runs on the dense path ``logits -> softmax -> edits -> P @ v`` (whatever the backend), which is
differentiable in ``q``, ``k``, ``v`` and in tensor parameters of the edits (a float
:class:`HeadMask` gives head importance by gradient). Edits apply in the order given; nested
``intervene`` blocks apply the outer block's edits first. :func:`attnlab.inspect.capture`
records the edited probabilities. Edits act on the probabilities ``P (B, Hq, L, S)`` (flat
token indices) of each call; "visible" keys are those the call's pattern (and masks) let a
query see. Unless an edit says otherwise it keeps every hidden key at probability 0 and every
row's total mass. Calls with ``return_lse=True`` raise inside an intervention.

Key positions (``keys=``, ``sinks=``, ``targets=``) are given as a list of flat key indices, a
boolean tensor ``(S,)`` or ``(B, S)``, or an integer index tensor ``(n,)``.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

import torch

from ..geometry import Geometry
from ._hook import DenseCall, Session, activate

__all__ = ["Edit", "HeadMask", "SinkCalibration", "RedistributeSinkMass", "AmplifyKeys", "Flatten",
           "TowardIdentity", "Temperature", "intervene"]


class Edit:
    """Base class of the edits: ``apply(probs, call, layer)`` returns the edited
    ``(B, Hq, L, S)`` probabilities; ``call`` is the :class:`DenseCall` (its ``visible``
    mask, ``logits`` before any edit, ``problem.geometry``)."""

    def apply(self, probs: torch.Tensor, call: DenseCall, layer: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not define apply()")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={_short(v)}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _short(v: object) -> str:
    return f"tensor{tuple(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name}={value!r}, expected a number in [0, 1]")
    return float(value)


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}={value!r}, expected a number > 0")
    return float(value)


def _keys_arg(name: str, keys: object) -> torch.Tensor | list[int]:
    """Validate a key-position argument; returns a bool tensor or a list of ints."""
    if isinstance(keys, torch.Tensor):
        if keys.dtype == torch.bool:
            if keys.ndim not in (1, 2):
                raise ValueError(f"{name}.shape={tuple(keys.shape)}, expected a bool (S,) or (B, S)")
            return keys.detach()
        if keys.dtype in (torch.int32, torch.int64) and keys.ndim == 1:
            return [int(i) for i in keys.tolist()]
        raise TypeError(f"{name} tensor must be bool (S,)/(B, S) or int (n,), got dtype={keys.dtype}, "
                        f"shape={tuple(keys.shape)}")
    if isinstance(keys, (list, tuple, range)) and all(isinstance(i, int) and not isinstance(i, bool) for i in keys):
        if any(i < 0 for i in keys):
            raise ValueError(f"{name}={list(keys)!r}, expected flat key indices >= 0")
        return list(keys)
    raise TypeError(f"{name}={keys!r}, expected a list of key indices, or a bool (S,)/(B, S) tensor")


def _key_mask(name: str, keys: torch.Tensor | list[int], g: Geometry, device: torch.device) -> torch.Tensor:
    """``(B|1, 1, 1, S)`` bool: the listed keys."""
    S = g.kv_len
    if isinstance(keys, list):
        if keys and max(keys) >= S:
            raise ValueError(f"{name} lists key {max(keys)}, but this call has S={S} keys")
        m = torch.zeros(S, dtype=torch.bool, device=device)
        m[torch.tensor(keys, dtype=torch.long, device=device)] = True
        return m.view(1, 1, 1, S)
    if keys.shape[-1] != S or (keys.ndim == 2 and keys.shape[0] not in (1, g.batch)):
        raise ValueError(f"{name}.shape={tuple(keys.shape)}, expected ({S},) or ({g.batch}, {S}) for this call")
    return keys.to(device).reshape(-1, 1, 1, S)


def _per_head(name: str, value: torch.Tensor, layer: int, g: Geometry, dtype: torch.dtype) -> torch.Tensor:
    """A ``(Hq,)`` or ``(layers, Hq)`` tensor -> ``(1, Hq, 1, 1)`` for ``layer``."""
    if value.ndim == 2:
        if layer >= value.shape[0]:
            raise ValueError(f"{name}.shape={tuple(value.shape)} has no row for layer {layer}")
        value = value[layer]
    if value.ndim != 1 or value.shape[0] != g.q_heads:
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected (Hq,) or (layers, Hq) with "
                         f"Hq={g.q_heads}")
    return value.to(dtype).view(1, -1, 1, 1)


def _rescale_into(probs: torch.Tensor, target: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Add ``budget (..., 1)`` to the keys of ``target`` in proportion to their probabilities;
    rows whose target keys hold no mass are left unchanged (their budget is not moved)."""
    mass = (probs * target).sum(-1, keepdim=True)
    ok = mass > 0
    factor = torch.where(ok, budget / torch.where(ok, mass, torch.ones_like(mass)), torch.zeros_like(mass))
    return probs + probs * target * factor, ok


class HeadMask(Edit):
    """Scale each head's probabilities by a mask value: ``P'[b, h] = mask[h] * P[b, h]``, so
    the head's output is ``mask[h]`` times its output (0 removes the head).

    "Are Sixteen Heads Really Better than One?" (Michel et al., 2019) gates every head by
    ``xi_h`` and scores head importance by ``|d loss / d xi_h|`` at ``xi = 1``: pass a float
    ``mask`` with ``requires_grad=True`` (all ones) and read ``mask.grad``.

    Args:
        mask: ``(Hq,)`` (the same for every layer the intervention covers) or
            ``(layers, Hq)`` (row ``layer`` for each call), bool or float.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        if not isinstance(mask, torch.Tensor) or mask.ndim not in (1, 2):
            raise TypeError(f"mask={_short(mask) if isinstance(mask, torch.Tensor) else mask!r}, "
                            "expected a bool or float tensor (Hq,) or (layers, Hq)")
        if not (mask.dtype == torch.bool or mask.is_floating_point()):
            raise TypeError(f"mask.dtype={mask.dtype}, expected torch.bool or a float dtype")
        self.mask = mask

    def apply(self, probs, call, layer):
        m = self.mask.to(probs.device)
        return probs * _per_head("mask", m if m.is_floating_point() else m.to(probs.dtype), layer,
                                 call.problem.geometry, probs.dtype)


class SinkCalibration(Edit):
    """ACT, the attention calibration of "Unveiling and Harnessing Hidden Attention Sinks:
    Enhancing Large Language Models without Training through Attention Calibration" (Yu et
    al., 2024): find the sink keys of each head on the fly and lower the attention they get,
    giving the removed mass back to the other keys.

    Exact semantics, per batch element and head: key ``j`` is a sink when the mean, over the
    queries that see it, of ``P[i, j] * n_i`` exceeds ``threshold`` (``n_i`` the number of keys
    query ``i`` sees, so uniform attention scores 1: ACT's "more than ``alpha / N``" criterion,
    made exact for causal and sparse maps). With ``keep_first`` key 0 is never calibrated (ACT
    keeps the initial sink, which the model needs). Then every row gets
    ``P'[i, j] = beta * P[i, j]`` on the sinks, and the removed ``(1 - beta) * sum_sinks P[i, j]``
    is added to the row's visible non-sink keys in proportion to their probabilities (rows whose
    non-sink keys hold no mass are unchanged). Row sums are preserved.

    Args:
        threshold: ``alpha``, sink level as a multiple of uniform attention (> 0; default 5).
        beta: the factor kept on sink attention, in ``[0, 1]`` (default 0.4).
        keep_first: never calibrate key 0 (default True).
    """

    def __init__(self, threshold: float = 5.0, beta: float = 0.4, keep_first: bool = True) -> None:
        self.threshold = _check_positive("threshold", threshold)
        self.beta = _check_fraction("beta", beta)
        if not isinstance(keep_first, bool):
            raise TypeError(f"keep_first={keep_first!r}, expected a bool")
        self.keep_first = keep_first

    def sinks(self, probs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """``(B, Hq, 1, S)`` bool: the sink keys of each head (detection only)."""
        with torch.no_grad():
            vis = visible.to(probs.dtype)
            n = vis.sum(-1, keepdim=True)
            score = (probs * n * vis).sum(-2, keepdim=True)
            seen_by = vis.sum(-2, keepdim=True)
            mean = torch.where(seen_by > 0, score / seen_by.clamp_min(1), torch.zeros_like(score))
            sink = mean > self.threshold
            if self.keep_first and sink.shape[-1]:
                sink[..., 0] = False
        return sink

    def apply(self, probs, call, layer):
        sink = self.sinks(probs, call.visible)
        budget = ((1 - self.beta) * probs * sink).sum(-1, keepdim=True)
        others = call.visible & ~sink
        moved, ok = _rescale_into(probs, others, budget)
        return torch.where(ok, torch.where(sink, self.beta * probs, moved), probs)


class RedistributeSinkMass(Edit):
    """VAR, the visual attention redistribution of "See What You Are Told: Visual Attention
    Sink in Large Multimodal Models" (Kang et al., 2025): take a share of the attention on
    given sink keys and give it to given target keys.

    Exact semantics, per row ``i`` (only rows in ``queries``, if given): the budget
    ``Omega_i = fraction * sum_{j in sinks} P[i, j]`` is removed from the sinks
    (``P'[i, j] = (1 - fraction) P[i, j]``) and added to the visible target keys in proportion
    to their probabilities, ``P'[i, j] = P[i, j] + Omega_i P[i, j] / sum_{t in targets} P[i, t]``.
    Targets are the visible keys of ``targets`` that are not sinks (default: every visible
    non-sink key). A row whose targets hold no mass is unchanged. Row sums are preserved.
    VAR finds the sinks from massive hidden-state activations and applies this in image-centric
    heads to text queries: pass those as ``sinks``, ``targets`` (the image tokens), ``queries``
    and the ``heads=`` of :func:`intervene`.

    Args:
        sinks: the sink keys (module docstring for the forms).
        fraction: the share of sink attention moved, in ``[0, 1]`` (VAR's ``p``; default 0.6).
        targets: the keys that receive it, or None (every visible non-sink key).
        queries: the query rows edited (same forms, over flat query indices), or None (all).
    """

    def __init__(self, sinks, fraction: float = 0.6, targets=None, queries=None) -> None:
        self.sinks = _keys_arg("sinks", sinks)
        self.fraction = _check_fraction("fraction", fraction)
        self.targets = None if targets is None else _keys_arg("targets", targets)
        self.queries = None if queries is None else _keys_arg("queries", queries)

    def apply(self, probs, call, layer):
        g = call.problem.geometry
        sink = _key_mask("sinks", self.sinks, g, probs.device)
        target = call.visible & ~sink
        if self.targets is not None:
            target = target & _key_mask("targets", self.targets, g, probs.device)
        budget = (self.fraction * probs * sink).sum(-1, keepdim=True)
        moved, ok = _rescale_into(probs, target, budget)
        edited = torch.where(ok, torch.where(sink, (1 - self.fraction) * probs, moved), probs)
        if self.queries is None:
            return edited
        qg = Geometry(g.batch, g.q_heads, g.kv_heads, g.kv_shape, g.q_shape, g.head_dim, g.value_dim, g.device)
        rows = _key_mask("queries", self.queries, qg, probs.device).transpose(-1, -2)
        return torch.where(rows, edited, probs)


class AmplifyKeys(Edit):
    """Head-wise amplification of chosen keys, after "Fixing Imbalanced Attention to Mitigate
    In-Context Hallucination of Large Vision-Language Model" (2025), which amplifies the
    attention of each head to selected visual tokens in proportion to the head's visual
    sensitivity.

    Exact semantics, per row: ``P'[i, j] = gain_h P[i, j] / Z_i`` for the chosen keys and
    ``P[i, j] / Z_i`` for the others, ``Z_i = sum_{j chosen} gain_h P[i, j] + sum_{j other}
    P[i, j]``, rescaled to the row's original mass: the same as adding ``log gain_h`` to the
    chosen keys' logits. Hidden keys stay 0; rows with no mass are unchanged.

    Args:
        keys: the amplified keys (module docstring for the forms).
        gain: a number >= 0, or a tensor ``(Hq,)`` / ``(layers, Hq)`` of per-head gains (e.g.
            ``1 + alpha * sensitivity_h``); differentiable.
    """

    def __init__(self, keys, gain: float | torch.Tensor = 2.0) -> None:
        self.keys = _keys_arg("keys", keys)
        if isinstance(gain, torch.Tensor):
            if not gain.is_floating_point() or gain.ndim not in (1, 2):
                raise TypeError(f"gain tensor must be float (Hq,) or (layers, Hq), got dtype={gain.dtype}, "
                                f"shape={tuple(gain.shape)}")
            if bool((gain.detach() < 0).any()):
                raise ValueError("gain must be >= 0 everywhere")
        elif isinstance(gain, bool) or not isinstance(gain, (int, float)) or gain < 0:
            raise ValueError(f"gain={gain!r}, expected a number >= 0 or a per-head tensor")
        self.gain = gain

    def apply(self, probs, call, layer):
        g = call.problem.geometry
        chosen = _key_mask("keys", self.keys, g, probs.device)
        gain = (_per_head("gain", self.gain.to(probs.device), layer, g, probs.dtype)
                if isinstance(self.gain, torch.Tensor) else self.gain)
        scaled = torch.where(chosen, probs * gain, probs)
        mass = probs.sum(-1, keepdim=True)
        z = scaled.sum(-1, keepdim=True)
        ok = z > 0
        return torch.where(ok, scaled * (mass / torch.where(ok, z, torch.ones_like(z))), probs)


class Flatten(Edit):
    """Attention dispersion of "HICD: Hallucination-Inducing via Attention Dispersion for
    Contrastive Decoding to Mitigate Hallucinations in Large Language Models" (2025), which
    flattens the maps of selected ("inducing") heads.

    Exact semantics: ``P' = (1 - alpha) P + alpha m_i U``, ``U[i, j] = 1 / n_i`` on the ``n_i``
    keys query ``i`` sees (0 elsewhere), ``m_i`` the row's mass; ``alpha = 1`` (default) is
    uniform attention over the visible keys. Rows that see no key stay 0.
    """

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = _check_fraction("alpha", alpha)

    def apply(self, probs, call, layer):
        vis = call.visible.to(probs.dtype)
        n = vis.sum(-1, keepdim=True)
        uniform = vis / n.clamp_min(1) * probs.sum(-1, keepdim=True)
        return (1 - self.alpha) * probs + self.alpha * uniform


class TowardIdentity(Edit):
    """SoftPAG of "Fine-Grained Perturbation Guidance via Attention Head Selection" (2025):
    interpolate a head's map toward the identity, ``P' = (1 - alpha) P + alpha I``.

    ``I[i, j] = 1`` iff ``j = i + S - L`` (the key at the query's own position, bottom-right
    aligned as :class:`attnlab.Causal`; ``j = i`` in self-attention). As in the paper, the
    identity puts its mass on that key even where the pattern hides it (on a causal or
    windowed map it is always visible). Needs ``S >= L``.
    """

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = _check_fraction("alpha", alpha)

    def apply(self, probs, call, layer):
        g = call.problem.geometry
        if g.kv_len < g.q_len:
            raise ValueError(f"TowardIdentity needs S >= L (a key at every query's position), got "
                             f"L={g.q_len}, S={g.kv_len}")
        eye = torch.zeros(g.q_len, g.kv_len, dtype=probs.dtype, device=probs.device)
        rows = torch.arange(g.q_len, device=probs.device)
        eye[rows, rows + g.kv_len - g.q_len] = 1
        return (1 - self.alpha) * probs + self.alpha * eye


class Temperature(Edit):
    """Softmax temperature applied to the map: ``P'[i, j] = m_i P[i, j]^(1/t) / sum_k
    P[i, k]^(1/t)`` over the keys with ``P > 0`` (``m_i`` the row's mass). On an unedited
    map this is ``softmax(logits / t)`` over the visible keys: ``t < 1`` sharpens, ``t > 1``
    flattens. (:class:`attnlab.Temperature` is the score mod that divides the logits before the
    softmax; this edit composes with the other edits.)
    """

    def __init__(self, t: float) -> None:
        self.t = _check_positive("t", t)

    def apply(self, probs, call, layer):
        tiny = torch.finfo(probs.dtype).tiny
        pos = probs > 0
        logp = torch.where(pos, torch.log(probs.clamp_min(tiny)) / self.t, torch.full_like(probs, float("-inf")))
        m = logp.detach().amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.where(pos, torch.exp(logp - m), torch.zeros_like(probs))
        z = e.sum(-1, keepdim=True)
        ok = z > 0
        return torch.where(ok, e * (probs.sum(-1, keepdim=True) / torch.where(ok, z, torch.ones_like(z))), probs)


class Editor:
    """One active :func:`intervene` block."""

    def __init__(self, edits: Sequence[Edit], layers: set[int] | None, names: set[str] | None,
                 heads: object, max_elements: int) -> None:
        self.edits, self.layers, self.names, self.heads = tuple(edits), layers, names, heads
        self.max_elements = max_elements
        self.session = Session()

    def applies_to(self, layer: int, name: str) -> bool:
        if self.layers is None and self.names is None:
            return True
        return (self.layers is not None and layer in self.layers) or (self.names is not None and name in self.names)

    def edit(self, probs: torch.Tensor, call: DenseCall, layer: int, name: str) -> torch.Tensor:
        edited = probs
        for e in self.edits:
            edited = e.apply(edited, call, layer)
        if self.heads is None:
            return edited
        H = call.problem.geometry.q_heads
        sel = torch.zeros(H, dtype=torch.bool, device=probs.device)
        if isinstance(self.heads, torch.Tensor):
            if self.heads.shape != (H,):
                raise ValueError(f"heads has shape {tuple(self.heads.shape)}, expected ({H},) for this call")
            sel = self.heads.to(probs.device)
        else:
            if self.heads and max(self.heads) >= H:
                raise ValueError(f"heads={sorted(self.heads)} names head {max(self.heads)}, but this call has Hq={H}")
            sel[list(self.heads)] = True
        return torch.where(sel.view(1, H, 1, 1), edited, probs)


def _check_layers(layers) -> tuple[set[int] | None, set[str] | None]:
    if layers is None:
        return None, None
    if isinstance(layers, (int, str)) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, Iterable):
        raise TypeError(f"layers={layers!r}, expected None, an int, a str or an iterable of them")
    items = list(layers)
    ints = {i for i in items if isinstance(i, int) and not isinstance(i, bool) and i >= 0}
    names = {s for s in items if isinstance(s, str)}
    if len(ints) + len(names) != len(set(items)):
        raise ValueError(f"layers={items!r}, expected layer indices (ints >= 0) or layer names (str)")
    return ints, names


def _check_heads(heads):
    if heads is None:
        return None
    if isinstance(heads, torch.Tensor):
        if heads.dtype != torch.bool or heads.ndim != 1:
            raise TypeError(f"heads tensor must be bool (Hq,), got dtype={heads.dtype}, shape={tuple(heads.shape)}")
        return heads.detach()
    if isinstance(heads, int) and not isinstance(heads, bool):
        heads = [heads]
    items = list(heads) if isinstance(heads, Iterable) else None
    if items is None or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in items):
        raise ValueError(f"heads={heads!r}, expected None, head indices (ints >= 0) or a bool (Hq,) tensor")
    return sorted(set(items))


@contextlib.contextmanager
def intervene(*edits: Edit, layers=None, heads=None, max_elements: int = 1 << 27) -> Iterator[Editor]:
    """Apply ``edits`` (in order) to the attention probabilities of the calls inside the block.

    Args:
        edits: :class:`Edit` instances (:class:`HeadMask`, :class:`SinkCalibration`,
            :class:`RedistributeSinkMass`, :class:`AmplifyKeys`, :class:`Flatten`,
            :class:`TowardIdentity`, :class:`Temperature`).
        layers: None (every call), or layer indices and/or layer names (from
            :func:`attnlab.inspect.layer_scope`; outside a scope a call's layer is its index
            among the calls this block sees).
        heads: None (all), query-head indices, or a bool ``(Hq,)`` tensor: other heads keep
            their unedited probabilities.
        max_elements: refuse calls whose dense map ``B * Hq * L * S`` is larger.
    """
    for e in edits:
        if not isinstance(e, Edit):
            raise TypeError(f"intervene() takes Edit instances, got {type(e).__name__}")
    if isinstance(max_elements, bool) or not isinstance(max_elements, int) or max_elements < 1:
        raise ValueError(f"max_elements={max_elements!r}, expected an int >= 1")
    ints, names = _check_layers(layers)
    editor = Editor(edits, ints, names, _check_heads(heads), max_elements)
    with activate(editor=editor):
        yield editor
