"""``MultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention`` that runs on attnlab.

Same parameters, state_dict keys, forward signature and return convention as
``torch.nn.MultiheadAttention(..., batch_first=True)`` ("Attention Is All You Need", 2017),
plus a sparsity ``pattern``, a ``score_mod``, grouped-query attention (``num_kv_heads``,
"GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints",
2023) and a ``backend`` choice.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ..api import attention, attention_weights
from ..geometry import Geometry
from ..patterns.base import Causal, MaskMod, Pattern, as_pattern
from ..scores.base import ScoreContext, ScoreMod, as_score_mod
from .._checks import check_bool, check_int






def check_dropout(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r}, expected a float in [0, 1)")
    if not 0 <= value < 1:
        raise ValueError(f"{name}={value!r}, expected a float in [0, 1)")
    return float(value)


def check_heads(embed_dim: object, num_heads: object, backend: object) -> None:
    """``embed_dim`` a multiple of ``num_heads`` (positive ints), ``backend`` a string."""
    if check_int("embed_dim", embed_dim, 1) % check_int("num_heads", num_heads, 1):
        raise ValueError(f"embed_dim={embed_dim!r}, expected a multiple of num_heads={num_heads}")
    if not isinstance(backend, str):
        raise TypeError(f"backend={backend!r}, expected a string such as 'auto'")


def dropout_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Any, score_mod: Any, p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with dropout ``p`` on the probabilities (training): the reference path.

    Materialises the ``(B, Hq, L, S)`` probabilities with :func:`attnlab.attention_weights`
    (subject to its size guard), drops them like ``torch.nn.MultiheadAttention`` does and
    multiplies by ``v``. Returns ``(out (B, Hq, L, Dv), dropped weights (B, Hq, L, S))``.
    """
    w = F.dropout(attention_weights(q, k, v, pattern, score_mod), p, training=True)
    if q.shape[1] != v.shape[1]:
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return w @ v, w


def _lookup(t: Tensor, idx: tuple[Tensor, ...]) -> Tensor:
    """``t[b, h, q_idx, kv_idx]`` for a 4-D ``t`` whose size-1 axes broadcast."""
    zero = torch.zeros((), dtype=torch.long, device=t.device)
    return t[tuple(i if n > 1 else zero for i, n in zip(idx, t.shape))]


def mask_pattern(allowed: torch.Tensor, name: str) -> MaskMod:
    """A pattern reading a materialised boolean ``allowed`` tensor ``(B|1, H|1, L|1, S)``."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        out = _lookup(allowed, (b, h, q_idx, kv_idx))
        # the full (q, kv) extent, as the built-in patterns return (backends may view it)
        return out.expand(torch.broadcast_shapes(out.shape, q_idx.shape, kv_idx.shape))

    return MaskMod(mask_mod, name=name)


class TensorBias(ScoreMod):
    """Adds a materialised float ``bias`` ``(B|1, H|1, L|1, S)`` to the logits."""

    def __init__(self, bias: torch.Tensor, name: str = "bias") -> None:
        super().__init__()
        self.bias, self.name = bias, name

    def modify(self, score: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        return score + _lookup(self.bias, (ctx.b, ctx.h, ctx.q_idx, ctx.kv_idx)).to(score.dtype)

    def extra_repr(self) -> str:
        return f"{self.name}, shape={tuple(self.bias.shape)}"


def _with_extra_keys(base: Pattern, g: Geometry) -> MaskMod:
    """``base`` on the ``g.kv_len`` real keys (in geometry ``g``); appended keys always visible."""
    base.validate(g)
    s = g.kv_len

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        inside = kv_idx < s
        return torch.where(inside, base.mask(b, h, q_idx, kv_idx.clamp(max=s - 1), g), True)

    return MaskMod(mask_mod, name=f"({base!r}) + extra keys")


class MultiheadAttention(nn.Module):
    """Multi-head attention on attnlab, a drop-in for ``torch.nn.MultiheadAttention``.

    ``load_state_dict`` works both ways with ``torch.nn.MultiheadAttention`` of the same
    arguments (``in_proj_weight (3E, E)``, or ``q/k/v_proj_weight`` when ``kdim``/``vdim``
    differ; ``in_proj_bias``, ``out_proj``, ``bias_k``/``bias_v``) when ``num_kv_heads`` is
    None (or ``num_heads``) and ``score_mod`` has no parameters. With ``num_kv_heads``
    (GQA), projections are separate: ``q_proj_weight (E, E)``, ``k_proj_weight (Hkv * D,
    kdim)``, ``v_proj_weight (Hkv * D, vdim)``, ``in_proj_bias (E + 2 * Hkv * D)``,
    ``bias_k``/``bias_v (1, 1, Hkv * D)``: no torch counterpart.

    Args:
        embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
        device, dtype: as in torch. ``batch_first`` must be True (inputs ``(B, L, E)``).
        pattern: an attnlab pattern (or ``mask_mod`` callable) every call is restricted to.
        score_mod: an attnlab score mod (or ``score_mod`` callable) applied in every call;
            an ``nn.Module``, so its parameters join this module's state_dict.
        num_kv_heads: number of key/value heads (GQA/MQA), dividing ``num_heads``.
        backend: passed to :func:`attnlab.attention` (``"auto"``, ``"tiled"``, ...).

    Masks: a boolean mask (``True`` = not allowed, torch's convention) becomes a pattern
    intersected (``&``) with ``pattern``, read by index on the generic ``MaskMod`` path
    (which evaluates every (query, key) pair: fine for a mask already materialised); a
    float mask is added to the logits by a score mod. ``is_causal=True`` intersects
    :class:`attnlab.Causal` (bottom-right aligned when ``L != S``; no ``attn_mask`` needed).
    The keys added by ``add_bias_kv`` / ``add_zero_attn`` (positions ``S``, ``S + 1``) are
    visible to every query. A query that sees no key returns 0 (torch: NaN).

    ``need_weights=True`` (torch's default) also computes the probabilities with
    :func:`attnlab.attention_weights`, which materialises ``L x S``; ``need_weights=False``
    is the memory-efficient path. ``dropout > 0`` in training mode falls back to that
    materialised reference computation, with dropout on the probabilities as in torch;
    otherwise attention always runs through :func:`attnlab.attention`.

    ``_qkv_same_embed_dim`` is always False so that ``torch.nn.TransformerEncoderLayer``'s
    fused inference path, which reads the weights and would bypass this module's pattern,
    score mod and backend, is never taken when this module replaces its ``self_attn``.
    """

    __constants__ = ["batch_first"]
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        pattern: Any = None,
        score_mod: Any = None,
        num_kv_heads: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_heads(embed_dim, num_heads, backend)
        kdim = embed_dim if kdim is None else check_int("kdim", kdim, 1)
        vdim = embed_dim if vdim is None else check_int("vdim", vdim, 1)
        if batch_first is not True:
            raise ValueError(
                f"batch_first={batch_first!r}, expected True: attnlab.nn.MultiheadAttention "
                "only supports batch_first=True, inputs (B, L, E); transpose (L, B, E) inputs"
            )
        kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if check_int("num_kv_heads", kv_heads, 1) and num_heads % kv_heads:
            raise ValueError(
                f"num_kv_heads={num_kv_heads!r}, expected a divisor of num_heads={num_heads}"
            )
        self.embed_dim, self.kdim, self.vdim = embed_dim, kdim, vdim
        self.num_heads, self.num_kv_heads = num_heads, kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = check_dropout("dropout", dropout)
        self.add_zero_attn = check_bool("add_zero_attn", add_zero_attn)
        self.batch_first = True
        self.pattern = None if pattern is None else as_pattern(pattern)
        self.score_mod = as_score_mod(score_mod)
        self.backend = backend
        self._packed = kdim == embed_dim and vdim == embed_dim and kv_heads == num_heads
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        E, kv_out = embed_dim, kv_heads * self.head_dim
        shapes = {"in_proj_weight": (3 * E, E)} if self._packed else {"q_proj_weight": (E, E)}
        if not self._packed:
            shapes.update(k_proj_weight=(kv_out, kdim), v_proj_weight=(kv_out, vdim))
        shapes["in_proj_bias"] = (E + 2 * kv_out,) if check_bool("bias", bias) else None
        add_bias_kv = check_bool("add_bias_kv", add_bias_kv)
        shapes["bias_k"] = shapes["bias_v"] = (1, 1, kv_out) if add_bias_kv else None
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                     "in_proj_bias", "bias_k", "bias_v"):
            shape = shapes.get(name)
            param = None if shape is None else nn.Parameter(torch.empty(shape, **fk))
            self.register_parameter(name, param)
        self.out_proj = NonDynamicallyQuantizableLinear(E, E, bias=bias, **fk)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch's init: Xavier-uniform projections, zero biases, Xavier-normal bias_k/v."""
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        for b in (self.bias_k, self.bias_v):
            if b is not None:
                nn.init.xavier_normal_(b)

    def _project(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        E, kv_out = self.embed_dim, self.num_kv_heads * self.head_dim
        if self._packed:
            wq, wk, wv = self.in_proj_weight.split([E, E, E])
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.split([E, kv_out, kv_out])
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _check_inputs(self, query: Any, key: Any, value: Any) -> bool:
        """Validate the inputs; return whether they are unbatched ``(L, E)``."""
        xs = {"query": query, "key": key, "value": value}
        for (name, x), dim in zip(xs.items(), (self.embed_dim, self.kdim, self.vdim)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}={type(x).__name__}, expected a torch.Tensor")
            if x.dim() != query.dim() or x.dim() not in (2, 3) or x.shape[-1] != dim:
                raise ValueError(
                    f"{name}.shape={tuple(x.shape)}, expected (B, *, {dim}) (batch_first) or "
                    f"unbatched (*, {dim}), like query.shape={tuple(query.shape)}"
                )
        if key.shape[:-1] != value.shape[:-1] or key.shape[:-2] != query.shape[:-2]:
            raise ValueError(
                f"key.shape={tuple(key.shape)}, value.shape={tuple(value.shape)}, expected the "
                f"same batch and length, and the batch of query.shape={tuple(query.shape)}"
            )
        return query.dim() == 2

    def _attention_args(
        self, q: torch.Tensor, key_padding_mask: Any, attn_mask: Any, is_causal: Any, S: int,
        extra: int,
    ) -> tuple[Pattern | None, Any]:
        """The pattern and the score mod of one call (the masks mapped onto attnlab)."""
        B, H, L, D = q.shape
        masks = []
        if key_padding_mask is not None:
            masks.append(("key_padding_mask", key_padding_mask, [(B, S)], (B, 1, 1, S)))
        if attn_mask is not None:
            ok = [(L, S), (B * H, L, S)]
            view = (B, H, L, S) if getattr(attn_mask, "ndim", 0) == 3 else (1, 1, L, S)
            masks.append(("attn_mask", attn_mask, ok, view))
        parts = [] if self.pattern is None else [self.pattern]
        parts += [Causal()] if check_bool("is_causal", is_causal) else []
        mods = [] if self.score_mod is None else [self.score_mod]
        for name, mask, ok, view in masks:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"{name}={type(mask).__name__}, expected a torch.Tensor or None")
            if tuple(mask.shape) not in ok:
                raise ValueError(f"{name}.shape={tuple(mask.shape)}, expected one of {ok}")
            if mask.dtype != torch.bool and not mask.is_floating_point():
                raise TypeError(f"{name}.dtype={mask.dtype}, expected torch.bool or a float dtype")
            mask = mask.to(q.device).reshape(view)
            if mask.dtype == torch.bool:
                parts.append(mask_pattern(~mask, name))
            else:
                mods.append(TensorBias(F.pad(mask, (0, extra)), name))
        pattern = functools.reduce(operator.and_, parts) if parts else None
        if extra and pattern is not None:
            g = Geometry(B, H, self.num_kv_heads, (L,), (S,), D, D, q.device)
            pattern = _with_extra_keys(pattern, g)
        return pattern, (mods[0] if len(mods) == 1 else (mods or None))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``query (B, L, E)`` over ``key (B, S, kdim)`` / ``value (B, S, vdim)``.

        ``key_padding_mask``: ``(B, S)``; ``attn_mask``: ``(L, S)`` or ``(B * num_heads, L, S)``;
        each boolean (``True`` = not allowed) or float (added to the logits).

        Returns ``(attn_output (B, L, E), attn_weights)``; ``attn_weights`` is None unless
        ``need_weights``, then ``(B, L, S')`` averaged over heads or ``(B, num_heads, L, S')``
        (``S' = S`` plus one for ``add_bias_kv`` and one for ``add_zero_attn``). Unbatched
        ``(L, E)`` inputs give unbatched outputs.
        """
        check_bool("need_weights", need_weights)
        check_bool("average_attn_weights", average_attn_weights)
        unbatched = self._check_inputs(query, key, value)
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if getattr(key_padding_mask, "ndim", None) == 1:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        B, L, S = query.shape[0], query.shape[1], key.shape[1]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        q = q.view(B, L, H, D).transpose(1, 2)
        k = k.view(B, S, Hkv, D).transpose(1, 2)
        v = v.view(B, S, Hkv, D).transpose(1, 2)
        extra = [(self.bias_k, self.bias_v)] if self.bias_k is not None else []
        extra += [(k.new_zeros(1, 1, Hkv * D),) * 2] if self.add_zero_attn else []
        for bk, bv in extra:  # torch's order: bias_k/bias_v at key S, then the zero key
            k = torch.cat([k, bk.view(1, Hkv, 1, D).expand(B, -1, -1, -1)], 2)
            v = torch.cat([v, bv.view(1, Hkv, 1, D).expand(B, -1, -1, -1)], 2)
        pattern, score_mod = self._attention_args(
            q, key_padding_mask, attn_mask, is_causal, S, len(extra)
        )
        weights = None
        if self.training and self.dropout > 0:
            out, weights = dropout_attention(q, k, v, pattern, score_mod, self.dropout)
        else:
            out = attention(q, k, v, pattern, score_mod, backend=self.backend)
            if need_weights:
                weights = attention_weights(q, k, v, pattern, score_mod)
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))
        if not need_weights:
            weights = None
        elif average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if self.num_kv_heads != self.num_heads:
            s += f", num_kv_heads={self.num_kv_heads}"
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        s += f", dropout={self.dropout}, batch_first=True"
        if self.bias_k is not None or self.add_zero_attn:
            s += f", add_bias_kv={self.bias_k is not None}, add_zero_attn={self.add_zero_attn}"
        return (
            f"{s}, pattern={self.pattern!r}, score_mod={self.score_mod!r}, "
            f"backend={self.backend!r}"
        )


__all__ = ["MultiheadAttention", "TensorBias", "mask_pattern", "dropout_attention"]
