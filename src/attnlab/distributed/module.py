"""Context-parallel :class:`attnlab.nn.MultiheadAttention`: the same module, its attention
run by :func:`attnlab.distributed.ring_attention` over the sequence shards of a group."""

from __future__ import annotations

import functools
import operator
from typing import Any

from torch import nn

from ..nn.multihead import MultiheadAttention
from ..patterns.base import Causal
from .._checks import check_bool
from .comm import CommStats
from .ring import ring_attention
from .sharding import check_layout


class ContextParallelAttention(nn.Module):
    """Wraps an :class:`attnlab.nn.MultiheadAttention` (self-attention over a sharded sequence).

    Inputs are this rank's shards ``(B, L_r, E)`` (:func:`attnlab.distributed.shard` with
    ``dim=1``); projections run locally, attention runs over the whole sequence with
    :func:`~attnlab.distributed.ring_attention`, with the wrapped module's pattern and score
    mod on global positions. The parameters are the wrapped module's (``self.inner``), so a
    state_dict loads unchanged; their gradients are this rank's part: sum them over the group
    (DDP/FSDP over the context-parallel ranks do, up to their averaging).

    Same call as the wrapped module, ``forward(query, key, value, key_padding_mask=None,
    need_weights=False, attn_mask=None, average_attn_weights=True, is_causal=False)``, minus
    what needs the whole sequence on one rank: ``key_padding_mask``, ``attn_mask``,
    ``need_weights=True``, dropout in training and ``add_bias_kv`` / ``add_zero_attn`` raise
    ``ValueError``. ``is_causal=True`` intersects :class:`attnlab.Causal`. Returns
    ``(out (B, L_r, E), None)``.
    """

    def __init__(self, inner: MultiheadAttention, *, group: Any = None, layout: str = "contiguous",
                 seq_len: int | None = None, timeout: Any = None, stats: CommStats | None = None) -> None:
        super().__init__()
        if not isinstance(inner, MultiheadAttention):
            raise TypeError(f"inner must be an attnlab.nn.MultiheadAttention, got {type(inner).__name__}")
        if inner.bias_k is not None or inner.add_zero_attn:
            raise ValueError("add_bias_kv / add_zero_attn append keys seen by every query; "
                             "ContextParallelAttention does not support them")
        self.inner = inner
        self.group, self.layout = group, check_layout(layout)
        self.seq_len, self.timeout, self.stats = seq_len, timeout, stats

    def __getattr__(self, name: str):
        # attributes of the wrapped module (embed_dim, batch_first, in_proj_weight, ...) read
        # through, as torch.nn.TransformerEncoderLayer does on its self_attn
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = False,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        m = self.inner
        check_bool("need_weights", need_weights)
        check_bool("is_causal", is_causal)
        for name, x in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if x is not None:
                raise ValueError(f"{name} is not supported by ContextParallelAttention (it spans the "
                                 "whole sequence); express it as a pattern on global positions")
        if need_weights:
            raise ValueError("need_weights=True would materialise the whole L x S weights; pass "
                             "need_weights=False")
        if m.training and m.dropout > 0:
            raise ValueError(f"dropout={m.dropout} on attention probabilities is not supported "
                             "context-parallel; set dropout=0 or call .eval()")
        m._check_inputs(query, key, value)
        if query.dim() != 3:
            raise ValueError(f"query.shape={tuple(query.shape)}, expected batched (B, L_r, E)")
        B, L, S = query.shape[0], query.shape[1], key.shape[1]
        H, Hkv, D = m.num_heads, m.num_kv_heads, m.head_dim
        q, k, v = m._project(query, key, value)
        q = q.view(B, L, H, D).transpose(1, 2)
        k = k.view(B, S, Hkv, D).transpose(1, 2)
        v = v.view(B, S, Hkv, D).transpose(1, 2)
        parts = ([] if m.pattern is None else [m.pattern]) + ([Causal()] if is_causal else [])
        pattern = functools.reduce(operator.and_, parts) if parts else None
        out = ring_attention(q, k, v, pattern=pattern, score_mod=m.score_mod, group=self.group,
                             layout=self.layout, seq_len=self.seq_len, timeout=self.timeout,
                             stats=self.stats)
        return m.out_proj(out.transpose(1, 2).reshape(B, L, m.embed_dim)), None

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}, seq_len={self.seq_len}"


def context_parallel(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Replace (in place) every :class:`attnlab.nn.MultiheadAttention` inside ``model`` by a
    :class:`ContextParallelAttention` around it (``kwargs`` as for that class); returns
    ``model``. A model that is itself one is returned wrapped."""
    if isinstance(model, MultiheadAttention):
        return ContextParallelAttention(model, **kwargs)
    for name, child in list(model.named_children()):
        if isinstance(child, MultiheadAttention):
            setattr(model, name, ContextParallelAttention(child, **kwargs))
        else:
            context_parallel(child, **kwargs)
    return model


__all__ = ["ContextParallelAttention", "context_parallel"]
