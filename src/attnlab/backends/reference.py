"""The reference backend: materialise the logits, the ground truth of every test.

Equivalent PyTorch code (``expand`` repeats each key/value head ``Hq // Hkv`` times)::

    logits = scale * q @ k.transpose(-1, -2)                      # (B, Hq, L, S)
    logits = score_mod(logits, b, h, q_idx, kv_idx)               # optional
    logits = logits.masked_fill(~pattern.mask(b, h, q_idx, kv_idx), -inf)
    lse = logsumexp(logits, -1)                                   # -inf for empty rows
    out = exp(logits - lse) @ v                                   # 0 for empty rows

Token axes are flattened row-major. Gradients flow through plain autograd, to q, k, v and
to the parameters of the score mod. Above ``max_elements`` logits the backend refuses with
an error instead of exhausting memory.
"""

from __future__ import annotations

import torch

from ..geometry import Geometry, check_qkv, check_scale, index_grid
from ..patterns.base import Pattern, as_pattern
from ..scores.base import ScoreContext, ScoreMod, as_score_mod

DEFAULT_MAX_ELEMENTS = 1 << 27


def compute_dtype_for(dtype: torch.dtype, requested: torch.dtype | None = None) -> torch.dtype:
    """float64 stays float64, everything else is computed in float32 unless requested."""
    if requested is not None:
        if requested not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {requested}")
        return requested
    return torch.float64 if dtype == torch.float64 else torch.float32


def safe_softmax_lse(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and log-sum-exp over the last axis; rows whose logits are all
    ``-inf`` give probabilities 0 and ``lse = -inf`` with finite (zero) gradients."""
    m = logits.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(logits - m)
    s = e.sum(-1, keepdim=True)
    nonempty = s > 0
    s_safe = torch.where(nonempty, s, torch.ones_like(s))
    p = e / s_safe
    lse = torch.where(nonempty, m + torch.log(s_safe), torch.full_like(s, float("-inf")))
    return p, lse.squeeze(-1)


def reference_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    geometry: Geometry,
    pattern: Pattern,
    score_mod: ScoreMod | None,
    scale: float,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """Masked logits ``(B, Hq, L, S)`` in ``compute_dtype`` (``-inf`` where masked)."""
    g = geometry
    B, Hq, Hkv = g.batch, g.q_heads, g.kv_heads
    qf = q.reshape(B, Hq, g.q_len, g.head_dim).to(compute_dtype)
    kf = k.reshape(B, Hkv, g.kv_len, g.head_dim).to(compute_dtype)
    if Hq != Hkv:
        kf = kf.repeat_interleave(Hq // Hkv, dim=1)
    logits = scale * (qf @ kf.transpose(-1, -2))
    b, h, qi, ki = index_grid(g)
    if score_mod is not None:
        ctx = ScoreContext(b, h, qi, ki, g, query=qf if score_mod.needs_query else None)
        logits = score_mod.modify(logits, ctx)
    mask = pattern.mask(b, h, qi, ki, g)
    return logits.masked_fill(~mask, float("-inf"))


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: object = None,
    score_mod: object = None,
    scale: float | None = None,
    return_lse: bool = False,
    compute_dtype: torch.dtype | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    return_weights: bool = False,
):
    """Dense softmax attention over ``pattern`` with ``score_mod`` (see module docstring).

    Args:
        q, k, v: ``(B, Hq, *L, D)``, ``(B, Hkv, *S, D)``, ``(B, Hkv, *S, Dv)``.
        pattern: a Pattern, a mask_mod callable, or None (Full).
        score_mod: a ScoreMod, a score_mod callable, a list of them, or None.
        scale: logit scale, ``1/sqrt(D)`` when None.
        return_lse: also return the log-sum-exp ``(B, Hq, *L)`` (float32, float64 for
            float64 compute).
        compute_dtype: float32 or float64; default float64 for float64 inputs, else float32.
        max_elements: refuse problems with more than this many logits (B * Hq * L * S).
        return_weights: return the probabilities ``(B, Hq, L, S)`` instead of the output.

    Returns:
        ``out`` of shape ``(B, Hq, *L, Dv)`` in the input dtype, or ``(out, lse)``.
    """
    g = check_qkv(q, k, v)
    pattern = as_pattern(pattern)
    pattern.validate(g)
    score_mod = as_score_mod(score_mod)
    if score_mod is not None:
        score_mod.validate(g)
    scale = check_scale(scale, g.head_dim)
    n = g.batch * g.q_heads * g.q_len * g.kv_len
    if n > max_elements:
        raise ValueError(
            f"the reference backend would materialise B*Hq*L*S = {g.batch}*{g.q_heads}*"
            f"{g.q_len}*{g.kv_len} = {n} logits, above its guard max_elements={max_elements}; "
            "use backend='tiled', or raise the guard with options={'max_elements': ...}"
        )
    cdt = compute_dtype_for(q.dtype, compute_dtype)
    logits = reference_logits(q, k, g, pattern, score_mod, scale, cdt)
    p, lse = safe_softmax_lse(logits)
    if return_weights:
        return p
    vf = v.reshape(g.batch, g.kv_heads, g.kv_len, g.value_dim).to(cdt)
    if g.q_heads != g.kv_heads:
        vf = vf.repeat_interleave(g.group_size, dim=1)
    out = (p @ vf).to(q.dtype).reshape(g.batch, g.q_heads, *g.q_shape, g.value_dim)
    if return_lse:
        return out, lse.reshape(g.batch, g.q_heads, *g.q_shape)
    return out
