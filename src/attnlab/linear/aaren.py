r"""Aaren: attention as a many-to-many RNN, computed with a parallel prefix scan.

"Attention as an RNN" (Feng et al., 2024). One query per head (Aaren's learned query)
attends causally over the tokens; every prefix ``t`` gets its own output

    o_t = sum_{j <= t} softmax_j(s_j) v_j,        s_j = scale * (q . k_j),   0 <= j <= t.

The paper writes the prefix softmax as a scan of the associative operator on triples
``(m, u, w)`` (running max, sum of exponentials, exponential-weighted sum of values)::

    (m_a, u_a, w_a) (+) (m_b, u_b, w_b) = (m, u_a e^(m_a - m) + u_b e^(m_b - m),
                                              w_a e^(m_a - m) + w_b e^(m_b - m)),
    m = max(m_a, m_b);   token j is the triple (s_j, 1, v_j);   o_t = w_t / u_t

(every exponent is ``<= 0``: no overflow, whatever the logits).

* :func:`aaren`: Hillis-Steele inclusive scan, ``ceil(log2 S)`` vectorised steps.
* :func:`aaren_step` / :class:`AarenState`: the RNN form, ``O(1)`` per token.
* :func:`aaren_reference`: the dense causal softmax written straight from the formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnlab.geometry import check_qkv, check_scale

__all__ = ["AarenState", "aaren", "aaren_reference", "aaren_step"]

_HALF = (torch.float16, torch.bfloat16)


@dataclass
class AarenState:
    """Scan state after a prefix: running max ``m (B, H)``, ``u = sum_j exp(s_j - m)`` ``(B, H)``
    and ``w = sum_j exp(s_j - m) v_j`` ``(B, H, Dv)``; the prefix output is ``w / u``."""

    m: torch.Tensor
    u: torch.Tensor
    w: torch.Tensor

    def output(self) -> torch.Tensor:
        """``w / u``: the attention output of the prefix, ``(B, H, Dv)``."""
        return self.w / self.u[..., None]


def _combine(a, b):
    """``a (+) b`` on ``(m, u, w)`` triples (``w`` has one more trailing dim than ``m``, ``u``)."""
    m_a, u_a, w_a = a
    m_b, u_b, w_b = b
    m = torch.maximum(m_a, m_b)
    ea, eb = torch.exp(m_a - m), torch.exp(m_b - m)
    return m, u_a * ea + u_b * eb, w_a * ea[..., None] + w_b * eb[..., None]


def _check_query(q: object, k: torch.Tensor, name: str = "q") -> torch.Tensor:
    """``q`` as ``(B, H, D)``: ``(H, D)`` is broadcast over the batch of ``k``."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() == 2:
        q = q.expand(k.shape[0], *q.shape)
    elif q.dim() != 3:
        raise ValueError(
            f"{name} must have shape (B, H, D) or (H, D) (one query per head), got "
            f"{name}.shape={tuple(q.shape)}"
        )
    return q


def _prepare(q, k, v, scale):
    """Checked inputs in the compute dtype: scores ``s (B, H, S)``, ``v (B, H, S, Dv)`` (kv heads
    repeated for GQA), the scale and the output dtype."""
    for name, x in (("k", k), ("v", v)):
        if isinstance(x, torch.Tensor) and x.dim() != 4:
            raise ValueError(
                f"{name} must have shape (B, Hkv, S, {'D' if name == 'k' else 'Dv'}), got "
                f"{name}.shape={tuple(x.shape)}"
            )
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"k must be a torch.Tensor, got {type(k).__name__}")
    q = _check_query(q, k)
    g = check_qkv(q[:, :, None, :], k, v)
    scale = check_scale(scale, g.head_dim)
    out_dtype = q.dtype
    dtype = torch.float32 if q.dtype in _HALF else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if g.group_size > 1:
        k = k.repeat_interleave(g.group_size, dim=1)
        v = v.repeat_interleave(g.group_size, dim=1)
    s = (k @ q[..., None]).squeeze(-1) * scale  # (B, H, S)
    return s, v, out_dtype


def _as_state(state: object, like_s: torch.Tensor, dv: int, name: str):
    if not isinstance(state, AarenState):
        raise TypeError(f"{name} must be an AarenState or None, got {type(state).__name__}")
    bh = tuple(like_s.shape[:2])
    for field, t, shape in (("m", state.m, bh), ("u", state.u, bh), ("w", state.w, bh + (dv,))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}.{field} must have shape {shape}, got {got}")
    return tuple(t.to(device=like_s.device, dtype=like_s.dtype) for t in (state.m, state.u,
                                                                           state.w))


def aaren_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Dense reference: the ``(B, H, S, S)`` causal softmax of ``s_j`` over ``j <= t`` for every
    prefix ``t``, times ``v``. Same arguments and result as :func:`aaren` (no state)."""
    s, v, out_dtype = _prepare(q, k, v, scale)
    S = s.shape[-1]
    t = torch.arange(S, device=s.device)
    logits = s[..., None, :].expand(*s.shape[:2], S, S)
    logits = logits.masked_fill(t[None, :] > t[:, None], -math.inf)
    return (torch.softmax(logits, dim=-1) @ v).to(out_dtype)


def aaren(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: AarenState | None = None,
    return_state: bool = False,
):
    """Aaren ("Attention as an RNN", 2024): every prefix's single-query softmax attention.

    Args:
        q: ``(B, H, D)`` one query per head, or ``(H, D)`` (a learned query) broadcast over
            the batch.
        k: ``(B, Hkv, S, D)``; v: ``(B, Hkv, S, Dv)``; ``H`` a multiple of ``Hkv`` (GQA: head
            ``h`` uses kv head ``h // (H // Hkv)``).
        scale: logit scale, ``1/sqrt(D)`` when None.
        initial_state: an :class:`AarenState` of earlier tokens (``(B, H)``/``(B, H, Dv)``),
            combined in front of every prefix; None for none.
        return_state: also return the :class:`AarenState` after the last token.

    Returns ``o (B, H, S, Dv)`` with ``o[:, :, t] = sum_{j<=t} softmax_j(scale q.k_j) v_j`` (the
    softmax over ``j <= t`` and the tokens of ``initial_state``), or ``(o, state)``. Computed
    with an inclusive Hillis-Steele scan of the ``(m, u, w)`` operator of the module
    docstring: ``ceil(log2 S)`` vectorised steps, ``O(S log S Dv)`` work, no ``S x S`` tensor.
    Half precision is computed in float32 and cast back.
    """
    if not isinstance(return_state, bool):
        raise TypeError(f"return_state must be a bool, got return_state={return_state!r}")
    s, v, out_dtype = _prepare(q, k, v, scale)
    S = s.shape[-1]
    m, u, w = s, torch.ones_like(s), v
    d = 1
    while d < S:
        cm, cu, cw = _combine(
            (m[..., :-d], u[..., :-d], w[..., :-d, :]), (m[..., d:], u[..., d:], w[..., d:, :])
        )
        m = torch.cat([m[..., :d], cm], dim=-1)
        u = torch.cat([u[..., :d], cu], dim=-1)
        w = torch.cat([w[..., :d, :], cw], dim=-2)
        d *= 2
    if initial_state is not None:
        m0, u0, w0 = _as_state(initial_state, s, v.shape[-1], "initial_state")
        m, u, w = _combine((m0[..., None], u0[..., None], w0[..., None, :]), (m, u, w))
    out = (w / u[..., None]).to(out_dtype)
    if return_state:
        return out, AarenState(m[..., -1], u[..., -1], w[..., -1, :])
    return out


def aaren_step(
    state: AarenState | None,
    q: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    *,
    scale: float | None = None,
):
    """One RNN step of Aaren: fold token ``t`` into ``state`` in ``O(Dv)`` per head.

    ``q (B, H, D)`` or ``(H, D)``, ``k_t (B, Hkv, D)``, ``v_t (B, Hkv, Dv)``; ``state`` the
    :class:`AarenState` of tokens ``< t`` or None (``t = 0``). With ``s = scale q.k_t`` and
    ``m' = max(m, s)``: ``u' = u e^(m - m') + e^(s - m')``, ``w' = w e^(m - m') + v_t e^(s - m')``.
    Returns ``(o_t (B, H, Dv), new state)``, ``o_t = w' / u'`` (equal to ``aaren(...)[:, :, t]``).
    """
    for name, x in (("k_t", k_t), ("v_t", v_t)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(
                f"{name} must have shape (B, Hkv, {'D' if name == 'k_t' else 'Dv'}), got "
                f"{name}.shape={tuple(x.shape)}"
            )
    s, v, out_dtype = _prepare(q, k_t[:, :, None, :], v_t[:, :, None, :], scale)
    new = (s, torch.ones_like(s), v)
    if state is not None:
        m0, u0, w0 = _as_state(state, s, v.shape[-1], "state")
        new = _combine((m0[..., None], u0[..., None], w0[..., None, :]), new)
    m, u, w = new[0].squeeze(-1), new[1].squeeze(-1), new[2].squeeze(-2)
    out = (w / u[..., None]).to(out_dtype)
    return out, AarenState(m, u, w)
