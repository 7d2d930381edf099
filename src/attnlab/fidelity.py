"""How far an approximate or content-selected attention is from dense softmax attention.

:func:`attention_fidelity` is the one function every approximate mechanism reports through
(the tests, the adaptive figures and the benchmark call it):

* ``mass_recall``: for a pattern, the share of each query's dense attention probability that
  falls on the pairs the pattern keeps, averaged over queries that see any key densely
  (1.0 for an exact superset of the dense pattern);
* ``rel_error``: ``max|out - dense| / max|dense|`` (float64, :func:`attnlab.testing.rel_error`)
  of the mechanism's output against dense attention ``softmax(scale q k^T + mod, base) v``;
* ``density``: the fraction of the base pattern's visible pairs that the pattern keeps.

It materialises the dense ``L x S`` probabilities, so it is for evaluation on modest inputs
(a size guard raises above ``max_elements``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .api import attention, attention_weights
from .geometry import check_qkv
from .patterns.base import Intersection, as_pattern
from .patterns.content import resolve_pattern
from .testing import dense_mask, rel_error


def attention_fidelity(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: Any = None,
                       output: Optional[torch.Tensor] = None, base: Any = None, score_mod: Any = None,
                       scale: float | None = None, max_elements: int = 1 << 27) -> dict[str, float]:
    """Mass recall, output error and density of ``pattern`` (and/or of a given ``output``)
    against dense attention over ``base`` (``None``: Full; e.g. ``Causal()``).

    ``pattern`` is intersected with ``base`` (a content pattern selects among ``base``'s pairs);
    when ``output`` is ``None`` it is ``attention(q, k, v, pattern & base, score_mod)``. Pass
    ``output`` alone for a mechanism that is not a pattern (linear, pooled, hybrid): only
    ``rel_error`` is reported then. Runs without autograd."""
    if pattern is None and output is None:
        raise ValueError("attention_fidelity needs a pattern, an output, or both")
    g = check_qkv(q, k, v)
    n = g.batch * g.q_heads * g.q_len * g.kv_len
    if n > max_elements:
        raise ValueError(f"attention_fidelity would build {n} dense probabilities (B={g.batch}, "
                         f"Hq={g.q_heads}, L={g.q_len}, S={g.kv_len}), over max_elements={max_elements}")
    base = as_pattern(base, "base")
    with torch.no_grad():
        q64, k64, v64 = (x.double() for x in (q, k, v))
        dense_out = attention(q64, k64, v64, pattern=base, score_mod=score_mod, scale=scale, backend="reference")
        result: dict[str, float] = {}
        if pattern is not None:
            selected = Intersection(as_pattern(pattern), base)
            static = resolve_pattern(selected, q64, k64, scale=scale, score_mod=score_mod)
            static.validate(g)
            p = attention_weights(q64, k64, v64, pattern=base, score_mod=score_mod, scale=scale,
                                  max_elements=max_elements).reshape(g.batch, g.q_heads, g.q_len, g.kv_len)
            keep = torch.broadcast_to(dense_mask(static, g), p.shape)
            seen = p.sum(-1) > 0
            recall = (p * keep).sum(-1)[seen]
            result["mass_recall"] = recall.mean().item() if recall.numel() else 1.0
            base_pairs = torch.broadcast_to(dense_mask(base, g), p.shape).sum().item()
            result["density"] = keep.sum().item() / base_pairs if base_pairs else 0.0
            if output is None:
                output = attention(q64, k64, v64, pattern=static, score_mod=score_mod, scale=scale)
        result["rel_error"] = rel_error(output.double(), dense_out)
    return result
