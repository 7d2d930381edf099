"""Softmax+1 ("off-by-one" softmax, softmax_1): attention with an implicit extra key whose
logit is 0 and whose value is 0, so a head can attend to nothing.

Evan Miller, "Attention Is Off By One" (2023, blog post); the same "no-op" key as the
attention-sink / null-key fixes in "Quantizable Transformers: Removing Outliers by Helping
Attention Heads Do Nothing" (Bondarenko et al., 2023).

Semantics, for query ``i`` over the keys ``P(i)`` its pattern lets it see, with logits
``s_ij = scale * q_i . k_j + score_mod``::

    o_i = sum_{j in P(i)}  exp(s_ij) / (1 + sum_{j' in P(i)} exp(s_ij'))  v_j

Since ``sum_j exp(s_ij) = exp(lse_i)``, this is ordinary softmax attention times a gate::

    o_i = softmax-attention_i * exp(lse_i) / (1 + exp(lse_i)) = attention_i * sigmoid(lse_i)

so :func:`softmax1_attention` is one call of :func:`attnlab.attention` with
``return_lse=True`` and inherits every pattern, score mod and backend (gradients reach
``lse`` on the tiled and reference backends: the tiled backward folds ``dlse`` into its
``delta``). A row with no visible key has ``lse = -inf``, gate 0, output 0.
"""

from __future__ import annotations

from typing import Any

import torch

from ..api import attention
from ..backends.reference import reference_logits
from ._common import (
    DEFAULT_MAX_ELEMENTS, check_qkv, check_scale, compute_dtype_for, expand_heads, size_guard,
    static_pattern,
)
from ..scores.base import as_score_mod

__all__ = ["softmax1_attention", "softmax1_attention_reference"]


def softmax1_attention(
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
    """Softmax+1 attention ``attention(q, k, v) * sigmoid(lse)`` (module docstring).

    Args and layout as :func:`attnlab.attention` (``q (B, Hq, *L, D)``, ``k (B, Hkv, *S, D)``,
    ``v (B, Hkv, *S, Dv)``, any pattern, score mod and backend that can return the
    log-sum-exp). Returns ``(B, Hq, *L, Dv)`` in ``q``'s dtype.
    """
    out, lse = attention(q, k, v, pattern, score_mod, scale=scale, return_lse=True,
                         backend=backend, options=options)
    return out * torch.sigmoid(lse).to(out.dtype)[..., None]


def softmax1_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Any = None,
    score_mod: Any = None,
    *,
    scale: float | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Dense softmax+1 straight from the formula: ``exp(s_ij) / (1 + sum_j' exp(s_ij'))``
    (shifted by ``m = max(0, max_j s_ij)`` for stability), masked pairs excluded."""
    g = check_qkv(q, k, v)
    pattern = static_pattern(pattern, g)
    score_mod = as_score_mod(score_mod)
    if score_mod is not None:
        score_mod.validate(g)
    scale = check_scale(scale, g.head_dim)
    size_guard("softmax1_attention_reference", g.batch * g.q_heads * g.q_len * g.kv_len, max_elements,
               "B*Hq*L*S")
    cdt = compute_dtype_for(q.dtype)
    s = reference_logits(q, k, g, pattern, score_mod, scale, cdt)  # -inf where hidden
    m = s.detach().amax(-1, keepdim=True).clamp(min=0.0)  # the implicit zero logit joins the max
    e = torch.exp(s - m)
    p = e / (torch.exp(-m) + e.sum(-1, keepdim=True))
    vf = expand_heads(v.reshape(g.batch, g.kv_heads, g.kv_len, g.value_dim).to(cdt), g.group_size)
    return (p @ vf).to(q.dtype).reshape(g.batch, g.q_heads, *g.q_shape, g.value_dim)
