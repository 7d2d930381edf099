r"""TransNormer's two token mixers: NormAttention and DiagAttention.

Qin, Han, Sun, Li, Kong, Barnes, Zhong, "The Devil in Linear Transformer", EMNLP 2022.

**NormAttention** drops linear attention's denominator (the "scaling" the paper blames for
unbounded gradients) and normalises the output instead, per head over the ``Dv`` channels::

    non-causal:  o_i = Norm( sum_j (phi(q_i) . phi(k_j)) v_j ),  i.e.  Norm(phi(Q) (phi(K)^T V))
    causal:      o_i = Norm( sum_{j <= i} gamma^(i-j) (phi(q_i) . phi(k_j)) v_j )

with ``gamma`` an optional per-head decay (causal only; ``gamma = 1`` without it) and
``Norm`` either RMSNorm ``x / sqrt(mean(x^2) + eps)`` or LayerNorm
``(x - mean(x)) / sqrt(var(x) + eps)`` (biased variance), both without affine parameters.
The default feature map ``phi`` is :class:`~attnlab.linear.feature_maps.EluPlusOne`
(``elu(x) + 1``): the paper's kernel could not be confirmed here, so this is an assumption.

**DiagAttention** is exact softmax attention ``softmax(q_i . k_j / sqrt(D))`` restricted to
non-overlapping diagonal blocks of ``block_size`` tokens (``i // block_size == j // block_size``;
the last block is shorter when ``block_size`` does not divide ``L``), optionally causal within
the block. The paper uses it in the early layers to keep attention local.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from attnlab._checks import check_int
from attnlab.api import attention
from attnlab.geometry import check_qkv
from attnlab.linear.feature_maps import EluPlusOne
from attnlab.linear.forms import chunked_form
from attnlab.linear.reference import naive_recurrence
from attnlab.patterns import Blocked, Causal

__all__ = [
    "norm_attention",
    "norm_attention_reference",
    "diag_attention",
    "diag_attention_reference",
]

NORMS = ("rms", "layer")


def _sequence_geometry(q, k, v, what: str, same_length: bool):
    g = check_qkv(q, k, v)
    if g.ndim != 1:
        raise ValueError(
            f"{what} needs one token axis: q (B, H, L, D), got q.shape={tuple(q.shape)}"
        )
    if same_length and g.q_len != g.kv_len:
        raise ValueError(
            f"{what} needs as many keys as queries (L == S), got q.shape={tuple(q.shape)} and "
            f"k.shape={tuple(k.shape)}"
        )
    return g


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


# --------------------------------------------------------------------------- NormAttention


def _check_norm_args(causal, norm, eps, feature_map) -> Callable:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got causal={causal!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got norm={norm!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float > 0, got eps={eps!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite float > 0, got eps={eps!r}")
    if feature_map is None:
        return EluPlusOne()
    if not callable(feature_map):
        raise TypeError(
            f"feature_map must be a callable (..., D) -> (..., F) such as EluPlusOne(), got "
            f"{type(feature_map).__name__}"
        )
    return feature_map


def _features(q, k, v, g, phi):
    """``phi(q)``, ``phi(k)``, ``v`` in the compute dtype with key/value heads repeated."""
    dt = _compute_dtype(q)
    G = g.group_size
    phi_q = phi(q.to(dt))
    phi_k = phi(k.to(dt)).repeat_interleave(G, dim=1)
    return phi_q, phi_k, v.to(dt).repeat_interleave(G, dim=1)


def norm_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    decay=None,
    feature_map: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    norm: str = "rms",
    eps: float = 1e-6,
    chunk_size: int = 64,
) -> torch.Tensor:
    """TransNormer's NormAttention ``Norm(phi(Q) (phi(K)^T V))`` (Qin et al., 2022); see the
    module docstring for the exact formula.

    Args:
        q: ``(B, Hq, L, D)`` queries.
        k: ``(B, Hkv, L, D)`` keys (as many as queries), ``Hq`` a multiple of ``Hkv`` (GQA:
            query head ``h`` uses key/value head ``h // (Hq // Hkv)``).
        v: ``(B, Hkv, L, Dv)`` values.
        causal: sum over ``j <= i`` only (the cumulative product) instead of all ``j``.
        decay: per-head decay ``gamma`` in ``(0, 1]``, a float or a tensor broadcastable to
            ``(Hq,)``; causal only (``ValueError`` otherwise). Key ``j`` is weighted
            ``gamma^(i-j)``.
        feature_map: ``phi``, applied to ``q`` and ``k`` (``(..., D) -> (..., F)``);
            :class:`~attnlab.linear.feature_maps.EluPlusOne` when None.
        norm: ``"rms"`` (RMSNorm) or ``"layer"`` (LayerNorm), over ``Dv``, no affine
            parameters.
        eps: added to the mean square (RMSNorm) or the variance (LayerNorm).
        chunk_size: chunk length of :func:`~attnlab.linear.forms.chunked_form` (causal).

    Returns:
        ``(B, Hq, L, Dv)`` in the dtype of ``q`` (float16/bfloat16 computed in float32).
        Memory ``O(L C + F Dv)`` per head (``C = chunk_size``), never ``L x L``.
    """
    g = _sequence_geometry(q, k, v, "norm_attention", same_length=True)
    phi = _check_norm_args(causal, norm, eps, feature_map)
    check_int("chunk_size", chunk_size, 1)
    phi_q, phi_k, vf = _features(q, k, v, g, phi)
    x = chunked_form(
        phi_q, phi_k, vf, causal=causal, decay=decay, normalize=False, chunk_size=chunk_size
    )
    if norm == "rms":
        out = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    else:
        out = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return out.to(q.dtype)


def norm_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    decay=None,
    feature_map: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    norm: str = "rms",
    eps: float = 1e-6,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Reference for :func:`norm_attention`: the token loop
    :func:`~attnlab.linear.reference.naive_recurrence` (``normalize=False``) followed by the
    norm written out. ``chunk_size`` is validated and otherwise unused."""
    g = _sequence_geometry(q, k, v, "norm_attention", same_length=True)
    phi = _check_norm_args(causal, norm, eps, feature_map)
    check_int("chunk_size", chunk_size, 1)
    phi_q, phi_k, vf = _features(q, k, v, g, phi)
    x = naive_recurrence(phi_q, phi_k, vf, causal=causal, decay=decay, normalize=False)
    if norm == "layer":
        x = x - x.mean(dim=-1, keepdim=True)
    out = x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps)
    return out.to(q.dtype)


# --------------------------------------------------------------------------- DiagAttention


def diag_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    causal: bool = False,
) -> torch.Tensor:
    """TransNormer's DiagAttention (Qin et al., 2022): softmax attention within diagonal blocks.

    Query ``i`` attends to keys ``j`` with ``i // block_size == j // block_size`` (and
    ``j <= i`` when ``causal``), weights ``softmax(q_i . k_j / sqrt(D))``. The last block is
    shorter when ``block_size`` does not divide ``L``; ``block_size >= L`` is full (causal)
    attention and ``block_size == 1`` returns ``v`` (each token sees itself only).

    Args:
        q: ``(B, Hq, L, D)``; k: ``(B, Hkv, L, D)``; v: ``(B, Hkv, L, Dv)``; ``Hq`` a multiple
            of ``Hkv`` (GQA).
        block_size: tokens per block, an int ``>= 1``.
        causal: also mask keys after the query inside its block.

    Returns:
        ``(B, Hq, L, Dv)`` in the dtype of ``q`` (float16/bfloat16 computed in float32). Runs
        :func:`attnlab.attention` with ``Blocked(min(block_size, L))`` (``& Causal()``), so
        only the diagonal blocks are computed.
    """
    g = _sequence_geometry(q, k, v, "diag_attention", same_length=True)
    check_int("block_size", block_size, 1)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got causal={causal!r}")
    pattern = Blocked(min(block_size, g.q_len))
    if causal:
        pattern = pattern & Causal()
    dt = _compute_dtype(q)
    return attention(q.to(dt), k.to(dt), v.to(dt), pattern).to(q.dtype)


def diag_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    causal: bool = False,
) -> torch.Tensor:
    """Reference for :func:`diag_attention`: the dense ``(B, Hq, L, L)`` logits with the
    block-diagonal (causal) mask, softmax, times ``V`` (key/value heads repeated for GQA)."""
    g = _sequence_geometry(q, k, v, "diag_attention", same_length=True)
    check_int("block_size", block_size, 1)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got causal={causal!r}")
    dt = _compute_dtype(q)
    kf = k.to(dt).repeat_interleave(g.group_size, dim=1)
    vf = v.to(dt).repeat_interleave(g.group_size, dim=1)
    logits = (q.to(dt) @ kf.transpose(-1, -2)) / math.sqrt(g.head_dim)
    i = torch.arange(g.q_len, device=q.device)[:, None]
    j = torch.arange(g.kv_len, device=q.device)[None, :]
    allowed = (i // block_size) == (j // block_size)
    if causal:
        allowed = allowed & (j <= i)
    weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return (weights @ vf).to(q.dtype)
