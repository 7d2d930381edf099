"""Cog attention: attention weights that can be negative.

"More Expressive Attention with Negative Weights" (Lv et al., 2024). The catalog's reading
of the released code: the weights are ``sign(s) * softmax(|s|)``.

Semantics implemented here, for query ``i`` over the keys ``P(i)`` of its pattern, with
logits ``s_ij = scale * q_i . k_j (+ score_mod)``::

    w_ij = sign(s_ij) * exp(|s_ij|) / sum_{j' in P(i), s_ij' != 0} exp(|s_ij'|)
    o_i  = sum_{j in P(i)} w_ij v_j

Logits that are exactly 0 (``sign = 0``) are left out of the denominator too: for real-valued
inputs that is a measure-zero difference from ``sign(s) * softmax(|s|)``, and it lets the
weights split into a positive and a negative softmax, each an ordinary :func:`attnlab.attention`
call with ``return_lse=True``::

    (o+, lse+) = attention over {j : s_ij > 0} with logits  s_ij
    (o-, lse-) = attention over {j : s_ij < 0} with logits -s_ij
    o_i = (exp(lse+) o+ - exp(lse-) o-) / (exp(lse+) + exp(lse-))

(the sign split is a score mod that sets the other half to ``-inf``), so Cog attention runs
on every pattern, score mod and backend, in the memory of two softmax attentions. Logits that
a score mod sets to ``-inf`` are hidden, as a mask would. A row with no visible (non-zero)
logit returns 0.
"""

from __future__ import annotations

from typing import Any

import torch

from ..api import attention
from ..backends.reference import reference_logits
from ..scores.base import ScoreContext, ScoreMod, as_score_mod
from ._common import (
    DEFAULT_MAX_ELEMENTS, check_qkv, check_scale, compute_dtype_for, expand_heads, size_guard,
    static_pattern,
)

__all__ = ["cog_attention", "cog_attention_reference", "SignedPart"]


class SignedPart(ScoreMod):
    """Score mod keeping one sign of the logits as ``|s|`` (the other half, zeros and
    ``-inf`` become ``-inf``), after an optional inner score mod."""

    def __init__(self, sign: int, inner: ScoreMod | None = None):
        super().__init__()
        if sign not in (1, -1):
            raise ValueError(f"sign must be +1 or -1, got sign={sign!r}")
        self.sign = sign
        self.inner = inner
        self.needs_query = bool(inner is not None and inner.needs_query)

    def modify(self, score: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        if self.inner is not None:
            score = self.inner.modify(score, ctx)
        signed = score * self.sign
        keep = (signed > 0) & torch.isfinite(signed)
        return torch.where(keep, signed, torch.full_like(signed, float("-inf")))

    def validate(self, geometry) -> None:
        if self.inner is not None:
            self.inner.validate(geometry)

    def differentiable_tensors(self) -> list[torch.Tensor]:
        return self.inner.differentiable_tensors() if self.inner is not None else []

    def extra_repr(self) -> str:
        return f"sign={self.sign:+d}"


def cog_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Any = None,
    score_mod: Any = None,
    *,
    scale: float | None = None,
    backend: str = "auto",
    options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Cog attention (signed weights, module docstring) through two :func:`attnlab.attention`
    calls. Layout and arguments as :func:`attnlab.attention`; returns ``(B, Hq, *L, Dv)``."""
    inner = as_score_mod(score_mod)
    kw = dict(scale=scale, return_lse=True, backend=backend, options=options)
    o_pos, l_pos = attention(q, k, v, pattern, SignedPart(+1, inner), **kw)
    o_neg, l_neg = attention(q, k, v, pattern, SignedPart(-1, inner), **kw)
    m = torch.maximum(l_pos, l_neg).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a, b = torch.exp(l_pos - m), torch.exp(l_neg - m)
    tot = a + b
    tot = torch.where(tot > 0, tot, torch.ones_like(tot))
    wa = (a / tot).to(o_pos.dtype)[..., None]
    wb = (b / tot).to(o_pos.dtype)[..., None]
    return o_pos * wa - o_neg * wb


def cog_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Any = None,
    score_mod: Any = None,
    *,
    scale: float | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Dense Cog attention: ``w = sign(s) exp(|s|) / sum exp(|s|)`` over the visible, non-zero
    logits, materialised ``(B, Hq, L, S)``."""
    g = check_qkv(q, k, v)
    pattern = static_pattern(pattern, g)
    score_mod = as_score_mod(score_mod)
    if score_mod is not None:
        score_mod.validate(g)
    scale = check_scale(scale, g.head_dim)
    size_guard("cog_attention_reference", g.batch * g.q_heads * g.q_len * g.kv_len, max_elements,
               "B*Hq*L*S")
    cdt = compute_dtype_for(q.dtype)
    s = reference_logits(q, k, g, pattern, score_mod, scale, cdt)
    counted = torch.isfinite(s) & (s != 0)
    a = torch.where(counted, s.abs(), torch.full_like(s, float("-inf")))
    m = a.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(a - m)
    den = e.sum(-1, keepdim=True)
    w = torch.sign(torch.where(counted, s, torch.zeros_like(s))) * e / torch.where(den > 0, den, torch.ones_like(den))
    vf = expand_heads(v.reshape(g.batch, g.kv_heads, g.kv_len, g.value_dim).to(cdt), g.group_size)
    return (w @ vf).to(q.dtype).reshape(g.batch, g.q_heads, *g.q_shape, g.value_dim)
