"""Per-head metrics of attention maps: entropy, mean attention distance, focus, and the
similarity of maps across layers. Sinks and massive activations are in
:mod:`attnlab.inspect.metrics_sinks`, the retrieval-head score in
:mod:`attnlab.inspect.metrics_retrieval`, head importance in
:mod:`attnlab.inspect.importance`, attention rollout in :mod:`attnlab.inspect.rollout`.

Every metric takes a map ``probs (..., H, L, S)`` (rows sum to 1, or 0 for a query that
sees no key; float32 or float64, computed in the input dtype) and returns one value per
head, shape ``(..., H)``: the mean over queries of a per-query quantity. Queries that see no
key never count; ``query_mask`` (bool, broadcastable to ``(..., H, L)``) restricts the mean
further (e.g. to real tokens of a padded batch). A head with no counted query gets 0.

The metrics marked "summary" also accept the summary dict of a summarised
:class:`attnlab.inspect.AttentionRecord` (long inputs captured without an ``L x S`` map) in
place of ``probs``, and give the same value as on the dense map.

    from attnlab.inspect import capture, head_entropy
    with capture() as rec:
        model(x)
    head_entropy(rec.probs(0))          # (B, H)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .metrics_checks import check_probs, check_query_mask, check_summary, is_summary, query_mean, row_weights

__all__ = ["head_entropy", "mean_attention_distance", "head_max_prob", "token_distances",
           "cross_layer_similarity"]


def _plogp(p: torch.Tensor) -> torch.Tensor:
    tiny = torch.finfo(p.dtype).tiny
    return torch.where(p > 0, p * torch.log(p.clamp_min(tiny)), torch.zeros((), dtype=p.dtype, device=p.device))


def _summary_weights(summary: Mapping, query_mask: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    counts = summary["visible_keys"]
    qm = check_query_mask(query_mask, counts.shape)
    w = (counts > 0).to(summary["entropy"].dtype)
    return (w if qm is None else w * qm.to(w.dtype)), qm


def head_entropy(probs: torch.Tensor | Mapping, *, query_mask: torch.Tensor | None = None,
                 visible: torch.Tensor | None = None, normalize: bool = False) -> torch.Tensor:
    """Per-head attention entropy ``(..., H)`` (summary).

    ``H_h = mean_i ( -sum_j p_ij log p_ij )`` in nats (terms with ``p_ij = 0`` count 0). With
    ``normalize=True`` each query's entropy is divided by ``log n_i``, ``n_i`` the number of
    keys it may see, so the value lies in ``[0, 1]`` (1: uniform over the visible keys; a query
    with ``n_i <= 1`` counts 0): ``n_i`` is ``S`` unless ``visible`` (bool, broadcastable to
    ``(..., H, L, S)``) says which keys each query may see; for a summary it is the summary's
    ``visible_keys``. A uniform head over ``S`` keys has entropy ``log S``, a head that puts
    all mass on one key 0.
    """
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize={normalize!r}, expected a bool")
    if is_summary(probs):
        check_summary(probs, ("entropy", "visible_keys"))
        if visible is not None:
            raise ValueError("visible= applies to a dense map; a summary carries its own visible_keys")
        w, _ = _summary_weights(probs, query_mask)
        ent = probs["entropy"]
        if normalize:
            n = probs["visible_keys"].to(ent.dtype)
            ent = torch.where(n > 1, ent / torch.log(n.clamp_min(2)), torch.zeros_like(ent))
        return query_mean(ent, w)
    probs = check_probs(probs)
    qm = check_query_mask(query_mask, probs.shape[:-1])
    ent = -_plogp(probs).sum(-1)
    if normalize:
        if visible is None:
            n = torch.full_like(ent, float(probs.shape[-1]))
        else:
            if not isinstance(visible, torch.Tensor) or visible.dtype != torch.bool:
                raise TypeError(f"visible={type(visible).__name__}, expected None or a bool tensor "
                                f"broadcastable to {tuple(probs.shape)}")
            n = torch.broadcast_to(visible, probs.shape).sum(-1).to(ent.dtype)
        ent = torch.where(n > 1, ent / torch.log(n.clamp_min(2)), torch.zeros_like(ent))
    return query_mean(ent, row_weights(probs.sum(-1), qm))


def token_distances(L: int, S: int, token_shape: tuple[int, ...] | None = None, *,
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """``(L, S)`` distances ``d(i, j)`` between query ``i`` and key ``j``.

    Sequences: ``|i + S - L - j|`` (queries bottom-right aligned with the keys, as
    :class:`attnlab.Causal` is; ``|i - j|`` for self-attention). ``token_shape`` with several
    axes (an image ``(X, Y)``, a video ``(T, X, Y)``) and ``L == S == prod(token_shape)``: the
    Euclidean distance between the grid coordinates of the flat indices ``i`` and ``j``
    (row-major). This is the distance of the capture's summaries.
    """
    if token_shape is not None and len(token_shape) > 1:
        if L != S or math.prod(token_shape) != L:
            raise ValueError(f"token_shape={token_shape} needs L == S == {math.prod(token_shape)}, got L={L}, S={S}")
        idx = torch.arange(L, device=device)
        coords = []
        for size in reversed(token_shape):
            coords.append(idx % size)
            idx = idx // size
        c = torch.stack(coords[::-1], -1).to(dtype)
        return torch.cdist(c, c)
    i = torch.arange(L, device=device, dtype=dtype)[:, None]
    j = torch.arange(S, device=device, dtype=dtype)[None, :]
    return (i + (S - L) - j).abs()


def mean_attention_distance(probs: torch.Tensor | Mapping, *, query_mask: torch.Tensor | None = None,
                            token_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Per-head mean attention distance ``(..., H)`` in tokens (summary).

    ``D_h = mean_i sum_j p_ij d(i, j)`` with ``d`` of :func:`token_distances` (``|i - j|`` for
    self-attention over a sequence; grid distance for ``token_shape`` with several axes), the
    "attention distance" of ViT analyses ("An Image is Worth 16x16 Words", 2020). A diagonal
    head (``p_ii = 1``) has distance 0; a head that attends to key 0 from every query ``i``
    has distance ``mean_i i``.
    """
    if is_summary(probs):
        check_summary(probs, ("distance", "visible_keys"))
        if token_shape is not None:
            raise ValueError("token_shape= applies to a dense map; a summary's distance is already computed")
        w, _ = _summary_weights(probs, query_mask)
        return query_mean(probs["distance"], w)
    probs = check_probs(probs)
    qm = check_query_mask(query_mask, probs.shape[:-1])
    L, S = probs.shape[-2:]
    d = token_distances(L, S, token_shape, dtype=probs.dtype, device=probs.device)
    return query_mean((probs * d).sum(-1), row_weights(probs.sum(-1), qm))


def head_max_prob(probs: torch.Tensor | Mapping, *, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head focus ``(..., H)``: ``mean_i max_j p_ij`` (summary); 1 for a head whose every
    query puts all its mass on one key, ``1 / S`` for a uniform head."""
    if is_summary(probs):
        check_summary(probs, ("max_prob", "visible_keys"))
        w, _ = _summary_weights(probs, query_mask)
        return query_mean(probs["max_prob"], w)
    probs = check_probs(probs)
    qm = check_query_mask(query_mask, probs.shape[:-1])
    return query_mean(probs.amax(-1), row_weights(probs.sum(-1), qm))


def stack_maps(maps: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-layer maps as one checked ``(layers, ..., H, L, S)`` tensor (a tensor or a list)."""
    if isinstance(maps, torch.Tensor):
        stack = maps
    elif isinstance(maps, Sequence) and maps and all(isinstance(m, torch.Tensor) for m in maps):
        shapes = {tuple(m.shape) for m in maps}
        if len(shapes) > 1:
            raise ValueError(f"maps have different shapes {sorted(shapes)}, expected one shape for every layer")
        stack = torch.stack(list(maps))
    else:
        raise TypeError(f"maps={type(maps).__name__}, expected a tensor (layers, ..., H, L, S) or a non-empty "
                        "list of (..., H, L, S) tensors")
    return check_probs(stack, "maps", min_dims=4)


def cross_layer_similarity(maps: torch.Tensor | Sequence[torch.Tensor], *, measure: str = "cosine",
                           per_head: bool = False) -> torch.Tensor:
    """How alike the attention maps of every pair of layers are.

    Args:
        maps: ``(layers, ..., H, L, S)`` (e.g. :meth:`Recording.stack`) or a list of
            ``(..., H, L, S)`` maps, one per layer.
        measure: ``"cosine"``: the cosine similarity of the two maps flattened over
            ``(L, S)``; ``"jsd"``: ``1 - mean_i JSD(p_i, q_i)`` with the Jensen-Shannon
            divergence in bits (in ``[0, 1]``), over the queries whose rows are non-empty in
            both maps.
        per_head: False compares the head-averaged maps (``mean_h``); True compares head
            ``h`` of one layer with head ``h`` of the other.

    Returns:
        ``(..., layers, layers)`` (``per_head=False``) or ``(..., H, layers, layers)``;
        symmetric, 1 on the diagonal for non-empty maps. Identical maps give 1; maps with
        disjoint supports give 0 under both measures.
    """
    if measure not in ("cosine", "jsd"):
        raise ValueError(f"measure={measure!r}, expected 'cosine' or 'jsd'")
    if not isinstance(per_head, bool):
        raise TypeError(f"per_head={per_head!r}, expected a bool")
    stack = stack_maps(maps)
    if not per_head:
        stack = stack.mean(-3, keepdim=True)
    x = stack.movedim(0, -3)  # (..., H', layers, L, S)
    if measure == "cosine":
        flat = x.flatten(-2)
        norm = flat.norm(dim=-1, keepdim=True)
        unit = flat / norm.clamp_min(torch.finfo(flat.dtype).tiny)
        sim = unit @ unit.transpose(-1, -2)
    else:
        a, b = x.unsqueeze(-3), x.unsqueeze(-4)  # (..., layers, 1, L, S), (..., 1, layers, L, S)
        m = 0.5 * (a + b)
        kl = lambda p: (_plogp(p) - torch.where(p > 0, p * torch.log(m.clamp_min(torch.finfo(m.dtype).tiny)),
                                                 torch.zeros((), dtype=p.dtype, device=p.device))).sum(-1)
        jsd = 0.5 * (kl(a) + kl(b)) / math.log(2.0)
        both = (a.sum(-1) > 0.5) & (b.sum(-1) > 0.5)
        sim = query_mean(1 - jsd.clamp(0, 1), both.to(jsd.dtype))
    return sim if per_head else sim.squeeze(-3)
