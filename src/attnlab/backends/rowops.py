"""The elementwise row work of the tiled backend, eager or fused by ``torch.compile``.

Forward, per row of logits ``s`` with visibility ``m``::

    p = softmax(where(m, s, -inf)),   lse = logsumexp(where(m, s, -inf))

(rows with no visible key: ``p = 0``, ``lse = -inf``). Backward, with the forward's lse,
the upstream ``dp = dO @ V^T`` and ``delta = rowsum(dO * O) - dlse``::

    p = where(m, exp(s - lse), 0),    ds = p * (dp - delta)

The eager versions use PyTorch's fused softmax and in-place ops. The fused versions are
the same expressions compiled once with dynamic shapes (one pass over the logits instead
of several); they are used when ``torch.compile`` works on this machine and fall back to
eager with a warning otherwise.
"""

from __future__ import annotations

import warnings

import torch

_FUSED: dict[str, object] = {}
_FUSED_BROKEN: list[str] = []


def softmax_lse_eager(s: torch.Tensor, mask: torch.Tensor | None, empty: torch.Tensor | None):
    """``s`` (..., G, Tq, span) is overwritten; ``mask`` broadcasts to it; ``empty``
    (..., G, Tq) marks rows with no visible key (or None if there are none)."""
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    m = s.amax(-1)
    p = torch.softmax(s, -1)
    lse = m - torch.log(p.amax(-1))
    if empty is not None:
        p.masked_fill_(empty[..., None], 0.0)
        lse.masked_fill_(empty, float("-inf"))
    return p, lse


def _softmax_lse_math(s: torch.Tensor, mask: torch.Tensor):
    s = torch.where(mask, s, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), 0.0, m)
    e = torch.exp(s - m)
    total = e.sum(-1, keepdim=True)
    nonempty = total > 0
    p = e / torch.where(nonempty, total, 1.0)
    lse = torch.where(nonempty, m + torch.log(total), float("-inf"))
    return p, lse.squeeze(-1)


def probs_dscores_eager(s, mask, lse, dp, delta, inplace: bool):
    """``p`` and ``ds``; ``s`` and ``dp`` are overwritten when ``inplace``."""
    if not inplace:
        s = s.clone()
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    p = s.sub_(lse[..., None]).exp_()
    ds = dp.sub_(delta[..., None]).mul_(p)
    return p, ds


def _probs_dscores_math(s, mask, lse, dp, delta):
    p = torch.where(mask, torch.exp(s - lse[..., None]), 0.0)
    return p, p * (dp - delta[..., None])


def _compiled(name: str, fn):
    if name not in _FUSED:
        _FUSED[name] = torch.compile(fn, dynamic=True)
    return _FUSED[name]


def _try_fused(name: str, fn, *args):
    if name in _FUSED_BROKEN:
        return None
    try:
        return _compiled(name, fn)(*args)
    except Exception as e:  # inductor unavailable (no compiler, unsupported platform, ...)
        _FUSED_BROKEN.append(name)
        warnings.warn(
            f"attnlab: fused {name} could not be compiled ({type(e).__name__}: {str(e)[:200]}); "
            "using the eager path",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def softmax_lse(s, mask, empty, fused: bool):
    """Probabilities and lse of the masked logits (see module docstring)."""
    if fused:
        full_mask = mask if mask is not None else torch.ones((), dtype=torch.bool, device=s.device)
        out = _try_fused("softmax_lse", _softmax_lse_math, s, full_mask)
        if out is not None:
            return out
    return softmax_lse_eager(s, mask, empty)


def probs_dscores(s, mask, lse, dp, delta, fused: bool, inplace: bool):
    """Recomputed probabilities and the logit gradients (see module docstring)."""
    if fused:
        full_mask = mask if mask is not None else torch.ones((), dtype=torch.bool, device=s.device)
        out = _try_fused("probs_dscores", _probs_dscores_math, s, full_mask, lse, dp, delta)
        if out is not None:
            return out
    return probs_dscores_eager(s, mask, lse, dp, delta, inplace)
