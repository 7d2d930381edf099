r"""Kernelized attention with a relative positional encoding, computed with FFTs.

"Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding"
(Luo et al., NeurIPS 2021). With ``phi`` a feature map and ``rel_bias`` a relative position
bias in log space, the (unnormalised) attention weight of query ``i`` on key ``j`` of head
``h`` is ``c_ij (phi(q_i) . phi(k_j))`` with the Toeplitz factor

    c_ij = exp(rel_bias[h, i - j + S - 1])                 (0 <= i < L, 0 <= j < S)

and ``c_ij = 0`` for ``j > i + S - L`` when ``causal`` (bottom-right aligned, as
:class:`attnlab.Causal`). The output is

    o_i = sum_j c_ij (phi(q_i) . phi(k_j)) v_j / (sum_j c_ij (phi(q_i) . phi(k_j)) + eps).

Because ``c_ij`` only depends on ``i - j``, the sums ``sum_j c_{i-j} phi(k_j) v_j^T`` and
``sum_j c_{i-j} phi(k_j)`` are convolutions along the sequence, computed with real FFTs in
``O((L + S) log(L + S) F Dv)`` per head and no ``L x S`` tensor.

* :func:`toeplitz_kernelized_attention`: the FFT fast path.
* :func:`toeplitz_kernelized_attention_reference`: the explicit ``L x S`` matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from attnlab.geometry import Geometry, check_qkv
from attnlab.linear.feature_maps import EluPlusOne

__all__ = ["toeplitz_kernelized_attention", "toeplitz_kernelized_attention_reference"]

_HALF = (torch.float16, torch.bfloat16)


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {name}={value!r}")
    return value


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a positive float, got eps={eps!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite float, got eps={eps!r}")
    return float(eps)


def _check_rel_bias(rel_bias: object, g: Geometry, like: torch.Tensor) -> torch.Tensor:
    """``rel_bias`` as a ``(Hq or 1, L + S - 1)`` tensor of ``like``'s dtype."""
    n = g.q_len + g.kv_len - 1
    if not isinstance(rel_bias, torch.Tensor):
        raise TypeError(f"rel_bias must be a torch.Tensor, got {type(rel_bias).__name__}")
    if not rel_bias.is_floating_point():
        raise TypeError(f"rel_bias must be floating point, got rel_bias.dtype={rel_bias.dtype}")
    if rel_bias.device != like.device:
        raise ValueError(
            f"rel_bias must be on the device of q, got rel_bias.device={rel_bias.device} and "
            f"q.device={like.device}"
        )
    shape = tuple(rel_bias.shape)
    ok = (rel_bias.dim() == 1 and shape == (n,)) or (
        rel_bias.dim() == 2 and shape[1] == n and shape[0] in (1, g.q_heads)
    )
    if not ok:
        raise ValueError(
            f"rel_bias must have shape (Hq, L + S - 1)=({g.q_heads}, {n}) or (L + S - 1,)=({n},),"
            f" got rel_bias.shape={shape}"
        )
    if bool((torch.isnan(rel_bias) | (rel_bias == math.inf)).any()):
        raise ValueError("rel_bias must not contain NaN or +inf (-inf, i.e. c = 0, is allowed)")
    return rel_bias.to(like.dtype).reshape(-1, n)


def _prepare(q, k, v, rel_bias, feature_map, causal, eps):
    """Checked inputs in the compute dtype: ``phi_q (B, Hq, L, F)``, ``phi_k (B, Hkv, S, F)``,
    ``v``, ``rel_bias (Hq or 1, L + S - 1)``, the geometry and the output dtype."""
    g = check_qkv(q, k, v)
    if q.dim() != 4:
        raise ValueError(
            f"q, k and v must have exactly one token axis (B, H, L, D), got "
            f"q.shape={tuple(q.shape)}"
        )
    _check_flag("causal", causal)
    eps = _check_eps(eps)
    if feature_map is None:
        feature_map = EluPlusOne()
    elif not callable(feature_map):
        raise TypeError(
            f"feature_map must be a callable (an nn.Module such as EluPlusOne()) or None, got "
            f"{type(feature_map).__name__}"
        )
    out_dtype = q.dtype
    dtype = torch.float32 if q.dtype in _HALF else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    rb = _check_rel_bias(rel_bias, g, q)
    phi_q, phi_k = feature_map(q), feature_map(k)
    for name, phi, x in (("phi(q)", phi_q, q), ("phi(k)", phi_k, k)):
        if not isinstance(phi, torch.Tensor) or tuple(phi.shape[:-1]) != tuple(x.shape[:-1]):
            got = tuple(phi.shape) if isinstance(phi, torch.Tensor) else type(phi).__name__
            raise ValueError(
                f"feature_map must map (..., D) to (..., F) on the last dimension, got "
                f"{name} of shape {got} for an input of shape {tuple(x.shape)}"
            )
    if phi_q.shape[-1] != phi_k.shape[-1]:
        raise ValueError(
            f"feature_map gave different feature sizes for q and k: phi(q).shape[-1]="
            f"{phi_q.shape[-1]}, phi(k).shape[-1]={phi_k.shape[-1]}"
        )
    return phi_q.to(dtype), phi_k.to(dtype), v, rb, g, out_dtype, eps


def toeplitz_kernelized_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_bias: torch.Tensor,
    *,
    feature_map: Callable[[torch.Tensor], torch.Tensor] | None = None,
    causal: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The explicit ``(B, Hq, L, S)`` weight matrix ``c_ij (phi(q_i) . phi(k_j))`` (see the module
    docstring; same arguments and result as :func:`toeplitz_kernelized_attention`)."""
    phi_q, phi_k, v, rb, g, out_dtype, eps = _prepare(
        q, k, v, rel_bias, feature_map, causal, eps
    )
    L, S = g.q_len, g.kv_len
    i = torch.arange(L, device=q.device)[:, None]
    j = torch.arange(S, device=q.device)[None, :]
    logc = rb[:, i - j + S - 1]  # (Hq or 1, L, S)
    if causal:
        logc = logc.masked_fill(j > i + S - L, -math.inf)
    c = torch.exp(logc)
    if g.group_size > 1:
        phi_k = phi_k.repeat_interleave(g.group_size, dim=1)
        v = v.repeat_interleave(g.group_size, dim=1)
    w = (phi_q @ phi_k.transpose(-1, -2)) * c
    out = (w @ v) / (w.sum(dim=-1, keepdim=True) + eps)
    return out.to(out_dtype)


def _fft_size(n: int) -> int:
    """The smallest ``m >= n`` of the form ``2^a 3^b 5^c`` (a fast FFT length)."""
    m = max(n, 1)
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def toeplitz_kernelized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_bias: torch.Tensor,
    *,
    feature_map: Callable[[torch.Tensor], torch.Tensor] | None = None,
    causal: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Kernelized attention with an RPE Toeplitz factor, via FFT convolutions.

    "Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding" (2021):
    ``o_i = sum_j c_ij (phi(q_i).phi(k_j)) v_j / (sum_j c_ij (phi(q_i).phi(k_j)) + eps)`` with
    ``c_ij = exp(rel_bias[h, i - j + S - 1])`` (and ``0`` for ``j > i + S - L`` when ``causal``).

    Args:
        q: ``(B, Hq, L, D)``; k: ``(B, Hkv, S, D)``; v: ``(B, Hkv, S, Dv)`` (GQA: query head
            ``h`` uses kv head ``h // (Hq // Hkv)``).
        rel_bias: ``(Hq, L + S - 1)`` log-space relative position bias, entry ``i - j + S - 1``
            for query ``i`` and key ``j``; a ``(L + S - 1,)`` tensor is shared by all heads.
            ``-inf`` entries give ``c = 0``.
        feature_map: ``phi``, applied to the last dim of ``q`` and ``k``; ``EluPlusOne()``
            (``elu(x) + 1``) when None.
        causal: zero ``c_ij`` for ``j > i + S - L`` (bottom-right aligned).
        eps: added to the denominator (``> 0``).

    Returns ``(B, Hq, L, Dv)`` in the dtype of ``q`` (half precision is computed in float32).

    ``num`` and ``den`` are ``sum_j c_{i-j} phi(k_j) (v_j, 1)^T`` contracted with ``phi(q_i)``;
    the Toeplitz sums are linear convolutions along the sequence done with ``rfft`` of length
    ``>= L + S - 1`` (no circular wrap-around reaches the ``L`` outputs kept). For stability
    ``exp(rel_bias - m_h)`` is used, ``m_h`` the per-head max over the entries in use: the
    factor ``exp(m_h)`` cancels between ``num`` and ``den``, and ``eps`` is scaled by
    ``exp(-m_h)`` so the result equals the formula above exactly. FFT round-off is relative to
    the largest ``c``: in float32, positions whose ``c`` are ``~1e-6`` of the head's largest
    lose accuracy (use float64 for strongly decaying biases), and a row whose weights are all
    exactly 0 (e.g. ``relu`` features that vanish) gives round-off over ``eps`` rather than 0.
    Queries that see no key at all (``causal`` with ``i < L - S``) return exactly 0.
    """
    phi_q, phi_k, v, rb, g, out_dtype, eps = _prepare(
        q, k, v, rel_bias, feature_map, causal, eps
    )
    B, Hq, Hkv, G = g.batch, g.q_heads, g.kv_heads, g.group_size
    L, S, Fd, Dv = g.q_len, g.kv_len, phi_q.shape[-1], g.value_dim
    n = L + S - 1
    if causal:
        # keys j > i + S - L are exactly the offsets i - j + S - 1 < L - 1
        rb = torch.cat([torch.full_like(rb[:, : L - 1], -math.inf), rb[:, L - 1:]], dim=1)
    m = rb.detach().amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    kernel = torch.exp(rb - m)  # (Hq or 1, n), entries in [0, 1]
    eps_h = eps * torch.exp(-m)  # (Hq or 1, 1)

    P = _fft_size(n)
    ones = torch.ones_like(v[..., :1])
    kv = phi_k[..., :, None] * torch.cat([v, ones], dim=-1)[..., None, :]  # (B,Hkv,S,F,Dv+1)
    kv_f = torch.fft.rfft(kv, n=P, dim=2)
    hk = kernel.shape[0]
    ker_f = torch.fft.rfft(kernel, n=P, dim=1)
    ker_f = ker_f.view(1, Hkv if hk > 1 else 1, G if hk > 1 else 1, -1, 1, 1)
    conv = torch.fft.irfft(kv_f[:, :, None] * ker_f, n=P, dim=3)[:, :, :, S - 1: S - 1 + L]
    # conv[b, hk, g, i] = sum_j c_{i-j} phi(k_j) (v_j, 1)^T: (B, Hkv, G or 1, L, F, Dv + 1)
    pq = phi_q.reshape(B, Hkv, G, L, 1, Fd)
    nd = (pq @ conv).squeeze(-2)  # (B, Hkv, G, L, Dv + 1)
    eps_b = eps_h.view(1, Hkv if hk > 1 else 1, G if hk > 1 else 1, 1, 1)
    out = nd[..., :Dv] / (nd[..., Dv:] + eps_b)
    if causal and L > S:
        # queries i < L - S see no key: exactly 0, not FFT round-off over eps
        out = torch.cat([torch.zeros_like(out[..., : L - S, :]), out[..., L - S:, :]], dim=-2)
    return out.reshape(B, Hq, L, Dv).to(out_dtype)
