"""Attention sinks and massive activations.

An attention sink is a key that receives far more attention than its content warrants,
typically the first token ("Efficient Streaming Language Models with Attention Sinks",
Xiao et al., 2023). Secondary sinks are other tokens that become sinks in middle layers,
with a smaller share of the mass ("On the Existence and Behaviour of Secondary Attention
Sinks", 2025). Sinks coincide with massive activations: a few hidden-state entries whose
magnitude is orders of magnitude above the median ("Massive Activations in Large Language
Models", Sun et al., 2024), and secondary sinks form when a token's hidden state aligns with
the primary sink's direction.

Attention metrics take a map ``probs (..., H, L, S)`` (see :mod:`attnlab.inspect.metrics`);
the hidden-state metrics take ``hidden (..., T, E)`` (``T`` tokens, ``E`` features, e.g. one
entry of a ``transformers`` model's ``hidden_states``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .metrics_checks import check_probs, check_query_mask, check_summary, is_summary, row_weights

__all__ = ["key_attention", "sink_score", "secondary_sinks", "MassiveActivations", "massive_activations",
           "sink_alignment"]


def key_attention(probs: torch.Tensor | Mapping, *, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean attention each key receives, ``(..., H, S)``: ``a_hj = mean_i p_ij`` over the
    counted queries (those that see a key, and ``query_mask``). Sums to 1 over ``j`` for a
    head with a counted query. Accepts a summary (``key_mass / number of non-empty queries``;
    ``query_mask`` is then refused, since a summary's ``key_mass`` sums every query)."""
    if is_summary(probs):
        check_summary(probs, ("key_mass", "visible_keys"))
        if query_mask is not None:
            raise ValueError("query_mask= cannot restrict a summary's key_mass (it sums over every query); "
                             "capture a dense map, or pass query_mask=None")
        n = (probs["visible_keys"] > 0).sum(-1, keepdim=True).to(probs["key_mass"].dtype)
        return probs["key_mass"] / n.clamp_min(1)
    probs = check_probs(probs)
    qm = check_query_mask(query_mask, probs.shape[:-1])
    w = row_weights(probs.sum(-1), qm)  # (..., H, L)
    return (probs * w[..., None]).sum(-2) / w.sum(-1, keepdim=True).clamp_min(1)


def _key_selector(keys: object, S: int) -> torch.Tensor:
    """``keys`` (an int, a sequence of ints, or a bool ``(S,)`` tensor) as a bool ``(S,)``."""
    if isinstance(keys, torch.Tensor) and keys.dtype == torch.bool:
        if keys.shape != (S,):
            raise ValueError(f"keys has shape {tuple(keys.shape)}, expected ({S},) (one flag per key)")
        return keys
    items = [keys] if isinstance(keys, int) else keys
    if (isinstance(keys, bool) or not isinstance(items, Sequence) or not items
            or not all(isinstance(k, int) and not isinstance(k, bool) for k in items)):
        raise TypeError(f"keys={keys!r}, expected a key index, a non-empty list of key indices or a bool ({S},) tensor")
    bad = [k for k in items if not -S <= k < S]
    if bad:
        raise ValueError(f"keys={list(items)} has {bad} outside the S={S} keys")
    sel = torch.zeros(S, dtype=torch.bool)
    sel[list(items)] = True
    return sel


def sink_score(probs: torch.Tensor | Mapping, keys: int | Sequence[int] | torch.Tensor = 0, *,
               query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head sink score ``(..., H)``: the mean attention mass the queries put on ``keys``
    (default the first token, the primary sink), ``sum_{j in keys} mean_i p_ij`` (summary).
    1 for a pure sink head (every query attends only to the sink), ``|keys| / S`` for a
    uniform head."""
    a = key_attention(probs, query_mask=query_mask)
    sel = _key_selector(keys, a.shape[-1]).to(a.device)
    return (a * sel.to(a.dtype)).sum(-1)


def secondary_sinks(probs: torch.Tensor | Mapping, k: int = 1, *, exclude: int | Sequence[int] = 0,
                    query_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` keys other than ``exclude`` (default the first token, the primary sink; ``[]``
    excludes nothing) that receive the most attention, per head (summary).

    Returns:
        ``(scores, indices)``, both ``(..., H, k)``, best first: ``scores`` the mean
        attention the key receives (:func:`key_attention`), ``indices`` its key position
        (int64). Ties go to the earlier key.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}, expected an int >= 1")
    a = key_attention(probs, query_mask=query_mask)
    S = a.shape[-1]
    no_exclusion = isinstance(exclude, Sequence) and len(exclude) == 0
    skip = torch.zeros(S, dtype=torch.bool) if no_exclusion else _key_selector(exclude, S)
    skip = skip.to(a.device)
    n = S - int(skip.sum())
    if k > n:
        raise ValueError(f"k={k} but only {n} keys remain after excluding {exclude!r} (S={S})")
    masked = a.masked_fill(skip, -1.0)
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :k]
    return a.gather(-1, order), order


@dataclass(frozen=True)
class MassiveActivations:
    """The result of :func:`massive_activations` for ``hidden (..., T, E)``.

    Attributes:
        magnitude: ``(..., T)`` the largest ``|h_te|`` of each token over its features.
        feature: ``(..., T)`` int64, the feature ``e`` where it occurs.
        ratio: ``(..., T)`` ``magnitude`` over the median ``|h|`` of the whole ``(T, E)``
            hidden state (of the same leading index).
        median: ``(...)`` that median.
        massive: ``(..., T)`` bool, ``magnitude > min_magnitude`` and ``ratio > min_ratio``.
    """

    magnitude: torch.Tensor
    feature: torch.Tensor
    ratio: torch.Tensor
    median: torch.Tensor
    massive: torch.Tensor

    def tokens(self) -> list[tuple[int, ...]]:
        """Indices ``(..., t)`` of the tokens with a massive activation."""
        return [tuple(int(i) for i in idx) for idx in self.massive.nonzero()]


def _check_hidden(hidden: object, name: str = "hidden") -> torch.Tensor:
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise TypeError(f"{name}={type(hidden).__name__}, expected a floating tensor (..., T, E)")
    if hidden.ndim < 2 or hidden.shape[-1] == 0 or hidden.shape[-2] == 0:
        raise ValueError(f"{name} has shape {tuple(hidden.shape)}, expected (..., T, E) with T, E >= 1")
    return hidden


def massive_activations(hidden: torch.Tensor, *, min_magnitude: float = 100.0,
                        min_ratio: float = 1000.0) -> MassiveActivations:
    """Find massive activations in a hidden state ``hidden (..., T, E)``.

    "Massive Activations in Large Language Models" (Sun et al., 2024) calls an activation
    massive when its magnitude exceeds about 100 and is about 1,000 times the median
    magnitude of the hidden state; those are the defaults. A token is flagged when its
    largest activation is massive (:class:`MassiveActivations`).
    """
    hidden = _check_hidden(hidden)
    for name, value in (("min_magnitude", min_magnitude), ("min_ratio", min_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name}={value!r}, expected a number >= 0")
    mag = hidden.abs()
    top, feature = mag.max(dim=-1)
    median = mag.flatten(-2).median(dim=-1).values
    ratio = top / median[..., None].clamp_min(torch.finfo(mag.dtype).tiny)
    return MassiveActivations(top, feature, ratio, median, (top > min_magnitude) & (ratio > min_ratio))


def sink_alignment(hidden: torch.Tensor, sink: int = 0) -> torch.Tensor:
    """``(..., T)``: the cosine similarity of every token's hidden state with that of the
    token ``sink`` (the primary sink, default the first token). Tokens close to 1 share the
    primary sink's direction, the mechanism by which "On the Existence and Behaviour of
    Secondary Attention Sinks" (2025) finds secondary sinks form."""
    hidden = _check_hidden(hidden)
    T = hidden.shape[-2]
    if isinstance(sink, bool) or not isinstance(sink, int) or not -T <= sink < T:
        raise ValueError(f"sink={sink!r}, expected a token index in [-{T}, {T})")
    ref = hidden[..., sink, :].unsqueeze(-2)
    return torch.nn.functional.cosine_similarity(hidden, ref.expand_as(hidden), dim=-1)
