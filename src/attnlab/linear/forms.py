r"""Three execution forms of (optionally decayed) linear attention.

All forms act on already feature-mapped inputs ``phi_q (B, H, L, F)``, ``phi_k (B, H, L, F)``
and values ``v (B, H, L, Dv)`` (same dtype and device) and compute the same function.

Semantics
---------
Write ``q_i = phi_q[:, :, i]``, ``k_j = phi_k[:, :, j]``, ``v_j = v[:, :, j]`` and let
``gamma`` be the per-head decay (``decay``; ``gamma = 1`` when ``decay is None``), a scalar or a
tensor broadcastable to ``(H,)`` with values in ``(0, 1]`` (RetNet retention: Sun et al.,
"Retentive Network: A Successor to Transformer for Large Language Models", 2023).

Causal (``causal=True``)::

    num_i = sum_{j <= i} gamma^(i-j) (q_i . k_j) v_j  +  gamma^(i+1) (q_i S0)
    den_i = sum_{j <= i} gamma^(i-j) (q_i . k_j)      +  gamma^(i+1) (q_i . z0)
    o_i   = num_i / (den_i + eps)   if normalize  else  num_i,        eps = 1e-6

Non-causal (``causal=False``; ``decay`` must be ``None``, else ``ValueError``): the same with
the sums over all ``j`` and the ``gamma`` factors equal to 1.

State convention
----------------
The state after tokens ``0..t`` is ``(S_t, z_t)`` with ``S_t (B, H, F, Dv)``, ``z_t (B, H, F)``::

    S_t = gamma S_{t-1} + k_t v_t^T,    z_t = gamma z_{t-1} + k_t,    (S_{-1}, z_{-1}) = (S0, z0)

so ``num_i = q_i S_i`` and ``den_i = q_i . z_i``. ``initial_state = (S0, z0)`` is the state
*before* token 0 (zeros when ``None``), which is why it enters with ``gamma^(i+1)``. The state a
call returns (``return_state=True``) is ``(S_{L-1}, z_{L-1})``: passing it as ``initial_state``
to a call on the continuation gives the same outputs as one call on the concatenation. ``z``
is only tracked when ``normalize=True`` (``z`` of a returned state is ``None`` otherwise, and
an ``initial_state`` must then carry a ``z0`` of shape ``(B, H, F)``). Non-causal calls add
``q_i S0`` (and ``q_i . z0``) to every position and return ``S0 + sum_j k_j v_j^T``.

Forms
-----
* :func:`parallel_form` materialises the ``L x L`` (decay-weighted, masked) score matrix: for
  short inputs and as a reference.
* :func:`chunked_form` (Lightning Attention-2 style: Qin et al., 2024) splits the sequence into
  chunks of ``chunk_size`` tokens: an intra-chunk masked ``C x C`` product plus the inter-chunk
  state; memory is ``O(L C + F Dv)``, never ``L x L``; plain autograd differentiates it.
* :func:`recurrent_step` advances one token in ``O(F Dv)`` (causal only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from attnlab._checks import check_int

__all__ = [
    "EPS",
    "LinearAttentionState",
    "parallel_form",
    "chunked_form",
    "recurrent_step",
]

EPS = 1e-6


@dataclass
class LinearAttentionState:
    """Recurrent state ``S (B, H, F, Dv)`` and normaliser ``z (B, H, F)`` (``None`` when not
    normalising). Unpacks as ``S, z = state``."""

    S: torch.Tensor
    z: Optional[torch.Tensor] = None

    def __iter__(self):
        return iter((self.S, self.z))


StateLike = Union[LinearAttentionState, tuple, list]


# --------------------------------------------------------------------------- argument checks


def _check_tensor(name: str, x: object, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {name}.shape={tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {name}.dtype={x.dtype}")
    return x


def _check_qkv(phi_q, phi_k, v, ndim: int, suffix: str = "") -> None:
    nq, nk, nv = f"phi_q{suffix}", f"phi_k{suffix}", f"v{suffix}"
    _check_tensor(nq, phi_q, ndim)
    _check_tensor(nk, phi_k, ndim)
    _check_tensor(nv, v, ndim)
    if phi_k.shape != phi_q.shape:
        raise ValueError(
            f"{nk} must have the shape of {nq}, got {nq}.shape={tuple(phi_q.shape)}, "
            f"{nk}.shape={tuple(phi_k.shape)}"
        )
    if v.shape[:-1] != phi_q.shape[:-1]:
        raise ValueError(
            f"{nv} must match {nq} in all but the last dimension, got "
            f"{nq}.shape={tuple(phi_q.shape)}, {nv}.shape={tuple(v.shape)}"
        )
    for name, x in ((nk, phi_k), (nv, v)):
        if x.dtype != phi_q.dtype or x.device != phi_q.device:
            raise ValueError(
                f"{name} must have the dtype and device of {nq}, got {x.dtype}/{x.device} "
                f"vs {phi_q.dtype}/{phi_q.device}"
            )


def _as_decay(decay, heads: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    """``decay`` as a ``(H,)`` tensor of ``like``'s dtype/device (``None`` stays ``None``)."""
    if decay is None:
        return None
    if isinstance(decay, bool):
        raise TypeError(f"decay must be a float or a tensor, got decay={decay!r}")
    if isinstance(decay, (int, float)):
        d = torch.tensor(float(decay), dtype=like.dtype, device=like.device)
    elif isinstance(decay, torch.Tensor):
        if not (decay.is_floating_point() or decay.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"decay must be a real tensor, got decay.dtype={decay.dtype}")
        d = decay.to(dtype=like.dtype, device=like.device)
    else:
        raise TypeError(f"decay must be a float or a tensor, got {type(decay).__name__}")
    try:
        ok = torch.broadcast_shapes(d.shape, (heads,)) == (heads,)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"decay must be broadcastable to (H,)=({heads},), got decay.shape={tuple(d.shape)}"
        )
    if not bool(((d > 0) & (d <= 1)).all()):
        raise ValueError(f"decay must lie in (0, 1], got decay={decay!r}")
    return d.expand(heads)


def _check_decay_causal(decay, causal: bool) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got causal={causal!r}")
    if decay is not None and not causal:
        raise ValueError("decay is only defined for causal=True (got causal=False with decay)")


def _as_state(state, B: int, H: int, Fd: int, Dv: int, normalize: bool, like, name: str):
    """``(S, z)`` checked against the shapes; ``(None, None)`` for ``None``."""
    if state is None:
        return None, None
    if isinstance(state, LinearAttentionState):
        S, z = state.S, state.z
    elif isinstance(state, (tuple, list)) and len(state) == 2:
        S, z = state
    else:
        raise TypeError(
            f"{name} must be a LinearAttentionState or a tuple (S, z), got {type(state).__name__}"
        )
    if not isinstance(S, torch.Tensor) or tuple(S.shape) != (B, H, Fd, Dv):
        got = tuple(S.shape) if isinstance(S, torch.Tensor) else type(S).__name__
        raise ValueError(f"{name} S must have shape (B, H, F, Dv)={(B, H, Fd, Dv)}, got {got}")
    if z is None:
        if normalize:
            raise ValueError(f"{name} must carry z of shape (B, H, F) when normalize=True")
    elif not isinstance(z, torch.Tensor) or tuple(z.shape) != (B, H, Fd):
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"{name} z must have shape (B, H, F)={(B, H, Fd)}, got {got}")
    S = S.to(dtype=like.dtype, device=like.device)
    if z is not None:
        z = z.to(dtype=like.dtype, device=like.device)
    return S, (z if normalize else None)


def _check_normalize(normalize) -> None:
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got normalize={normalize!r}")


# --------------------------------------------------------------------------- decay helpers


def _decay_matrix(gamma: Optional[torch.Tensor], n: int, like: torch.Tensor) -> torch.Tensor:
    """``D[h, i, j] = gamma_h^(i-j)`` for ``j <= i`` else 0; shape ``(H or 1, n, n)``."""
    idx = torch.arange(n, device=like.device)
    mask = idx[:, None] >= idx[None, :]
    if gamma is None:
        return mask.to(like.dtype)[None]
    diff = (idx[:, None] - idx[None, :]).clamp(min=0).to(like.dtype)
    return torch.pow(gamma[:, None, None], diff) * mask.to(like.dtype)


def _powers(gamma: torch.Tensor, exps: torch.Tensor) -> torch.Tensor:
    """``gamma_h^e`` for every head and exponent: ``(H, len(exps))``."""
    return torch.pow(gamma[:, None], exps.to(gamma.dtype)[None, :])


# --------------------------------------------------------------------------- forms


def parallel_form(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    decay=None,
    normalize: bool,
    initial_state: Optional[StateLike] = None,
) -> torch.Tensor:
    """Linear attention via the full ``(B, H, L, L)`` score matrix ``(phi_q phi_k^T) * D``
    (``D`` the causal decay mask; see the module docstring). Returns ``(B, H, L, Dv)``."""
    _check_qkv(phi_q, phi_k, v, 4)
    _check_normalize(normalize)
    _check_decay_causal(decay, causal)
    B, H, L, Fd = phi_q.shape
    Dv = v.shape[-1]
    gamma = _as_decay(decay, H, phi_q)
    S0, z0 = _as_state(initial_state, B, H, Fd, Dv, normalize, phi_q, "initial_state")

    scores = phi_q @ phi_k.transpose(-1, -2)
    if causal:
        scores = scores * _decay_matrix(gamma, L, phi_q)
    num = scores @ v
    den = scores.sum(dim=-1) if normalize else None
    if S0 is not None:
        if gamma is None:
            w = torch.ones(1, L, dtype=phi_q.dtype, device=phi_q.device)
        else:
            w = _powers(gamma, torch.arange(1, L + 1, device=phi_q.device))
        num = num + w[None, :, :, None] * (phi_q @ S0)
        if normalize:
            den = den + w[None] * (phi_q @ z0[..., None]).squeeze(-1)
    if normalize:
        return num / (den[..., None] + EPS)
    return num


def chunked_form(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    decay=None,
    normalize: bool,
    chunk_size: int,
    initial_state: Optional[StateLike] = None,
    return_state: bool = False,
):
    """Chunkwise linear attention (Lightning Attention-2 style).

    Each chunk of ``C <= chunk_size`` tokens (the last may be shorter) adds its intra-chunk
    masked product ``((q k^T) * D_C) v`` to the inter-chunk term ``gamma^(r+1) q_r S`` from the
    state ``S`` entering the chunk, then updates
    ``S <- gamma^C S + sum_s gamma^(C-1-s) k_s v_s^T`` (and ``z`` alike with ``v_s = 1``).
    The largest intermediates are ``(B, H, C, C)`` and ``(B, H, L, Dv)``. Non-causal calls use
    one global state (no ``L x L`` either). Returns ``(B, H, L, Dv)``, or
    ``(out, LinearAttentionState)`` when ``return_state`` (see the module docstring).
    """
    _check_qkv(phi_q, phi_k, v, 4)
    _check_normalize(normalize)
    _check_decay_causal(decay, causal)
    check_int("chunk_size", chunk_size, 1)
    if not isinstance(return_state, bool):
        raise TypeError(f"return_state must be a bool, got return_state={return_state!r}")
    B, H, L, Fd = phi_q.shape
    Dv = v.shape[-1]
    gamma = _as_decay(decay, H, phi_q)
    S, z = _as_state(initial_state, B, H, Fd, Dv, normalize, phi_q, "initial_state")
    if S is None:
        S = phi_q.new_zeros(B, H, Fd, Dv)
        z = phi_q.new_zeros(B, H, Fd) if normalize else None

    if not causal:
        S = S + phi_k.transpose(-1, -2) @ v
        num = phi_q @ S
        if normalize:
            z = z + phi_k.sum(dim=-2)
            out = num / ((phi_q @ z[..., None]) + EPS)
        else:
            out = num
        return (out, LinearAttentionState(S, z)) if return_state else out

    cache = {}

    def consts(c: int):
        if c not in cache:
            dev = phi_q.device
            dmat = _decay_matrix(gamma, c, phi_q)
            if gamma is None:
                cache[c] = (dmat, None, None, None)
            else:
                q_w = _powers(gamma, torch.arange(1, c + 1, device=dev))[None, :, :, None]
                k_w = _powers(gamma, torch.arange(c - 1, -1, -1, device=dev))[None, :, :, None]
                s_w = torch.pow(gamma, float(c))[None, :, None, None]
                cache[c] = (dmat, q_w, k_w, s_w)
        return cache[c]

    outs = []
    for start in range(0, L, chunk_size):
        c = min(chunk_size, L - start)
        q = phi_q[:, :, start:start + c]
        k = phi_k[:, :, start:start + c]
        vc = v[:, :, start:start + c]
        dmat, q_w, k_w, s_w = consts(c)
        scores = (q @ k.transpose(-1, -2)) * dmat
        qd = q if q_w is None else q * q_w
        num = scores @ vc + qd @ S
        if normalize:
            den = scores.sum(dim=-1, keepdim=True) + qd @ z[..., None]
            outs.append(num / (den + EPS))
        else:
            outs.append(num)
        kd = k if k_w is None else k * k_w
        S_dec = S if s_w is None else S * s_w
        S = S_dec + kd.transpose(-1, -2) @ vc
        if normalize:
            z_dec = z if s_w is None else z * s_w[..., 0]
            z = z_dec + kd.sum(dim=-2)
    if outs:
        out = torch.cat(outs, dim=2)
    else:
        out = v.new_zeros(B, H, 0, Dv)
    return (out, LinearAttentionState(S, z)) if return_state else out


def recurrent_step(
    phi_q_t: torch.Tensor,
    phi_k_t: torch.Tensor,
    v_t: torch.Tensor,
    state: Optional[StateLike],
    *,
    decay=None,
    normalize: bool,
):
    """One causal token: ``S' = gamma S + k v^T``, ``z' = gamma z + k``,
    ``out = q S'`` (divided by ``q . z' + eps`` when ``normalize``).

    ``phi_q_t, phi_k_t (B, H, F)``, ``v_t (B, H, Dv)``; ``state`` ``(S, z)`` or ``None``
    (zeros). Returns ``(out (B, H, Dv), LinearAttentionState)``.
    """
    _check_qkv(phi_q_t, phi_k_t, v_t, 3, suffix="_t")
    _check_normalize(normalize)
    B, H, Fd = phi_q_t.shape
    Dv = v_t.shape[-1]
    gamma = _as_decay(decay, H, phi_q_t)
    S, z = _as_state(state, B, H, Fd, Dv, normalize, phi_q_t, "state")
    kv = phi_k_t[..., :, None] * v_t[..., None, :]
    if S is None:
        S_new = kv
        z_new = phi_k_t if normalize else None
    else:
        g = None if gamma is None else gamma[None, :, None]
        S_new = (S if g is None else S * g[..., None]) + kv
        z_new = ((z if g is None else z * g) + phi_k_t) if normalize else None
    out = (phi_q_t[..., None, :] @ S_new).squeeze(-2)
    if normalize:
        out = out / ((phi_q_t * z_new).sum(dim=-1, keepdim=True) + EPS)
    return out, LinearAttentionState(S_new, z_new)
