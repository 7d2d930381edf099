r"""Three execution forms of linear attention with optional decay and data-dependent gates.

All forms act on already feature-mapped inputs ``phi_q (B, H, L, F)``, ``phi_k (B, H, L, F)``
and values ``v (B, H, L, Dv)`` (same dtype and device) and compute the same function.

Semantics
---------
Write ``q_t = phi_q[:, :, t]``, ``k_t = phi_k[:, :, t]``, ``v_t = v[:, :, t]``. The causal
recurrence (``causal=True``) is, for ``t = 0 .. L-1``::

    S_t = g_t * S_{t-1} + k_t v_t^T,     z_t = g_t * z_{t-1} + k_t,     (S_{-1}, z_{-1}) = (S0, z0)
    o_t = q_t S_t / (q_t . z_t + eps)   if normalize   else   q_t S_t,         eps = 1e-6

with ``S (B, H, F, Dv)``, ``z (B, H, F)`` and the per-step gate ``g_t``, the product of

* ``decay``: a constant per head, a float or a tensor broadcastable to ``(H,)`` in ``(0, 1]``
  (RetNet retention: Sun et al., "Retentive Network: A Successor to Transformer for Large
  Language Models", 2023; TransNormerLLM's decay: Qin et al., "TransNormerLLM: A Faster and
  Better Large Language Model with Improved TransNormer", 2023), and
* ``gate``: a data-dependent gate in ``(0, 1]``, ``(B, H, L)`` (one scalar per head and token,
  as Mamba-2) or ``(B, H, L, F)`` (one per key feature, ``g_t * S`` scaling the rows of ``S``:
  GLA, Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient Training",
  2024).

Unrolled: ``o_i = sum_{j <= i} (q_i * G_{i,j}) . k_j v_j`` with ``G_{i,j} = g_{j+1} ... g_i``
(elementwise over features), plus ``(q_i * g_1 ... g_i * g_0) S0``: ``initial_state = (S0, z0)``
is the state *before* token 0, so it is gated by ``g_0`` too. The state a call returns
(``return_state=True``) is ``(S_{L-1}, z_{L-1})``; passing it as ``initial_state`` to a call on
the continuation gives the outputs of one call on the concatenation. ``z`` is tracked only when
``normalize=True`` (``None`` otherwise).

Non-causal (``causal=False``; no ``decay`` or ``gate``): ``o_i = q_i S / (q_i . z + eps)``
with ``S = S0 + sum_j k_j v_j^T`` (``z`` alike) for every ``i``; that ``S`` is the returned state.

Forms
-----
* :func:`parallel_form` materialises the ``L x L`` gated, masked score matrix: short inputs,
  and the implicit attention matrix (:func:`gated_scores`).
* :func:`chunked_form` (Lightning Attention-2: Qin et al., "Lightning Attention-2: A Free
  Lunch for Handling Unlimited Sequence Lengths in Large Language Models", 2024) splits the
  sequence into chunks of ``chunk_size`` tokens, all processed at once: an intra-chunk masked
  ``C x C`` product plus the inter-chunk term from the state entering each chunk; the states
  are a cumulative sum over chunks (a short loop over chunks when gated), in segments of
  :data:`~attnlab.linear.segments.SEGMENT_TOKENS` tokens carried one to the next
  (:mod:`attnlab.linear.segments`). Memory ``O(L C + (L / C) F Dv)``, never ``L x L``; under
  autograd one function over all segments keeps only its inputs and the state entering each
  segment, and recomputes each segment in the backward pass.
* :func:`recurrent_step` advances one token in ``O(F Dv)`` (causal only): decoding.

Gates are handled in log space: with ``b_t = sum_{s <= t} log g_s`` inside a chunk, the weight
of key ``j`` at query ``i`` is ``exp(b_i - b_j) <= 1``; only differences with ``j <= i`` and
suffix sums are exponentiated, so nothing overflows. Per-feature gates factor the intra-chunk
product as ``(q * exp(b)) (k * exp(-b))^T`` while ``exp(-b)`` stays below ``sqrt`` of the
dtype's largest value, and otherwise fall back to the exact ``C x C x F`` product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from attnlab._checks import check_int
from attnlab.linear.segments import EPS, causal_segments, with_ones

__all__ = [
    "EPS",
    "LinearAttentionState",
    "parallel_form",
    "chunked_form",
    "recurrent_step",
    "gated_scores",
]



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


def _check_qkv(phi_q, phi_k, v, ndim: int, suffix: str = "", causal: bool = True) -> None:
    """Shapes ``(B, H, L, F)``, ``(B, H, S, F)``, ``(B, H, S, Dv)``; ``S == L`` when causal."""
    nq, nk, nv = f"phi_q{suffix}", f"phi_k{suffix}", f"v{suffix}"
    _check_tensor(nq, phi_q, ndim)
    _check_tensor(nk, phi_k, ndim)
    _check_tensor(nv, v, ndim)
    same = phi_k.shape == phi_q.shape if causal else (
        phi_k.shape[:-2] == phi_q.shape[:-2] and phi_k.shape[-1] == phi_q.shape[-1])
    if not same:
        what = "the shape" if causal else "the batch, head and feature sizes"
        raise ValueError(
            f"{nk} must have {what} of {nq}, got {nq}.shape={tuple(phi_q.shape)}, "
            f"{nk}.shape={tuple(phi_k.shape)}"
        )
    if v.shape[:-1] != phi_k.shape[:-1]:
        raise ValueError(
            f"{nv} must match {nk} in all but the last dimension, got "
            f"{nk}.shape={tuple(phi_k.shape)}, {nv}.shape={tuple(v.shape)}"
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


def _as_gate(gate, B: int, H: int, L: int, Fd: int, like: torch.Tensor, name: str = "gate"):
    """``gate`` as a ``(B, H, L, 1)`` or ``(B, H, L, F)`` tensor of ``like``'s dtype/device."""
    if not isinstance(gate, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(gate).__name__}")
    if not gate.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {name}.dtype={gate.dtype}")
    shape = tuple(gate.shape)
    if shape == (B, H, L):
        g = gate[..., None]
    elif shape == (B, H, L, Fd):
        g = gate
    else:
        raise ValueError(
            f"{name} must have shape (B, H, L)={(B, H, L)} or (B, H, L, F)={(B, H, L, Fd)}, "
            f"got {name}.shape={shape}"
        )
    if not bool(((g > 0) & (g <= 1)).all()):
        raise ValueError(f"{name} values must lie in (0, 1], got min={g.min().item():.3g}, "
                         f"max={g.max().item():.3g}")
    return g.to(dtype=like.dtype, device=like.device)


def _log_gates(decay, gate, B: int, H: int, L: int, Fd: int, like: torch.Tensor):
    """Per-step ``log g_t`` broadcastable to ``(B, H, L, F)`` (``None`` without decay/gate)."""
    log_g = None
    gamma = _as_decay(decay, H, like)
    if gamma is not None:
        log_g = torch.log(gamma).view(1, H, 1, 1)
    if gate is not None:
        lg = torch.log(_as_gate(gate, B, H, L, Fd, like))
        log_g = lg if log_g is None else log_g + lg
    return log_g


def _check_modes(causal, decay, gate) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got causal={causal!r}")
    if not causal and (decay is not None or gate is not None):
        which = "decay" if decay is not None else "gate"
        raise ValueError(f"{which} is only defined for causal=True (got causal=False with {which})")


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


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {name}={value!r}")


# --------------------------------------------------------------------------- shared pieces


def _joint_state(S, z, B, H, Fd, Dv, normalize, like) -> torch.Tensor:
    if S is None:
        return like.new_zeros(B, H, Fd, Dv + int(normalize))
    return torch.cat([S, z[..., None]], dim=-1) if normalize else S


def _split(out_ext: torch.Tensor, state_ext, normalize: bool, divided: bool = False):
    """``(out, LinearAttentionState)`` from the joint ``[num | den]`` / ``[S | z]`` tensors
    (``divided``: ``out_ext`` is already ``num / (den + eps)``)."""
    if not normalize:
        return out_ext, (None if state_ext is None else LinearAttentionState(state_ext, None))
    out = out_ext if divided else out_ext[..., :-1] / (out_ext[..., -1:] + EPS)
    if state_ext is None:
        return out, None
    return out, LinearAttentionState(state_ext[..., :-1], state_ext[..., -1])


def gated_scores(phi_q: torch.Tensor, phi_k: torch.Tensor, log_g) -> torch.Tensor:
    """``A[i, j] = sum_f q_if k_jf exp(b_if - b_jf)`` for ``j <= i`` else 0, with
    ``b = cumsum(log_g)`` along the tokens (``log_g`` ``None``: plain causal mask).
    ``(B, H, L, L)``: the causal score matrix of :func:`parallel_form`."""
    L = phi_q.shape[-2]
    tril = torch.ones(L, L, dtype=torch.bool, device=phi_q.device).tril()
    if log_g is None:
        return (phi_q @ phi_k.transpose(-1, -2)).masked_fill(~tril, 0.0)
    b = torch.cumsum(log_g.expand(*log_g.shape[:-2], L, log_g.shape[-1]), dim=-2)
    diff = b[..., :, None, :] - b[..., None, :, :]  # (.., L, L, F or 1)
    w = torch.exp(diff.masked_fill(~tril[..., None], float("-inf")))
    if log_g.shape[-1] == 1:
        return (phi_q @ phi_k.transpose(-1, -2)) * w[..., 0]
    return torch.einsum("...if,...jf,...ijf->...ij", phi_q, phi_k, w)


# --------------------------------------------------------------------------- forms


def parallel_form(phi_q, phi_k, v, *, causal: bool, decay=None, gate=None, normalize: bool,
                  initial_state: Optional[StateLike] = None) -> torch.Tensor:
    """Linear attention via the full ``(B, H, L, L)`` gated score matrix (see the module
    docstring; per-feature gates build an ``L x L x F`` weight). Returns ``(B, H, L, Dv)``."""
    _check_modes(causal, decay, gate)
    _check_qkv(phi_q, phi_k, v, 4, causal=causal)
    _check_bool("normalize", normalize)
    B, H, L, Fd = phi_q.shape
    Dv = v.shape[-1]
    log_g = _log_gates(decay, gate, B, H, L, Fd, phi_q)
    S0, z0 = _as_state(initial_state, B, H, Fd, Dv, normalize, phi_q, "initial_state")
    ve = with_ones(v, normalize)
    if causal:
        out = gated_scores(phi_q, phi_k, log_g) @ ve
    else:
        out = (phi_q @ phi_k.transpose(-1, -2)) @ ve
    if S0 is not None:
        qd = phi_q
        if log_g is not None:
            qd = phi_q * torch.exp(torch.cumsum(log_g.expand(*log_g.shape[:-2], L, log_g.shape[-1]), -2))
        out = out + qd @ _joint_state(S0, z0, B, H, Fd, Dv, normalize, phi_q)
    return _split(out, None, normalize)[0]


def chunked_form(phi_q, phi_k, v, *, causal: bool, decay=None, gate=None, normalize: bool,
                 chunk_size: int, initial_state: Optional[StateLike] = None,
                 return_state: bool = False):
    """Chunkwise linear attention (Lightning Attention-2), exact to the recurrence.

    The sequence is padded to ``N`` chunks of ``C = chunk_size`` tokens, viewed as
    ``(B, H, N, C, .)`` and processed at once: per chunk the intra-chunk masked product
    ``((q k^T) * W) v`` (``W[i, j] = exp(b_i - b_j)``, ``j <= i``) plus ``(q * exp(b)) S_n``
    from the state ``S_n`` entering the chunk, where
    ``S_{n+1} = exp(b_C) * S_n + sum_j exp(b_C - b_j) k_j v_j^T``. Without gates the states
    are an exclusive cumulative sum over chunks; with gates, a loop over the ``N`` chunks of
    ``(B, H, F, Dv)`` updates. Largest intermediates: ``(B, H, L, C)`` and
    ``(B, H, N, F, Dv)``. Returns ``(B, H, L, Dv)``, or ``(out, LinearAttentionState)``
    with ``return_state``.
    """
    _check_modes(causal, decay, gate)
    _check_qkv(phi_q, phi_k, v, 4, causal=causal)
    _check_bool("normalize", normalize)
    check_int("chunk_size", chunk_size, 1)
    _check_bool("return_state", return_state)
    B, H, L, Fd = phi_q.shape
    Dv = v.shape[-1]
    S0, z0 = _as_state(initial_state, B, H, Fd, Dv, normalize, phi_q, "initial_state")
    state = _joint_state(S0, z0, B, H, Fd, Dv, normalize, phi_q)
    ve = with_ones(v, normalize)

    if not causal:
        state = state + phi_k.transpose(-1, -2) @ ve
        out, st = _split(phi_q @ state, state, normalize)
        return (out, st) if return_state else out
    if L == 0:
        out, st = _split(ve[..., :0, :], state, normalize)
        return (out, st) if return_state else out

    out, state = causal_segments(phi_q, phi_k, v, _log_gates(decay, None, B, H, 1, Fd, phi_q),
                                 None if gate is None else _as_gate(gate, B, H, L, Fd, phi_q),
                                 state, chunk_size, normalize)
    out, st = _split(out, state, normalize, divided=True)
    return (out, st) if return_state else out


def recurrent_step(phi_q_t, phi_k_t, v_t, state: Optional[StateLike], *, decay=None, gate=None,
                   normalize: bool):
    """One causal token: ``S' = g * S + k v^T``, ``z' = g * z + k``, ``out = q S'`` (divided
    by ``q . z' + eps`` when ``normalize``), ``g`` the product of ``decay`` and ``gate``.

    ``phi_q_t, phi_k_t (B, H, F)``, ``v_t (B, H, Dv)``, ``gate`` ``(B, H)`` or ``(B, H, F)``
    in ``(0, 1]``; ``state`` ``(S, z)`` or ``None`` (zeros). Returns
    ``(out (B, H, Dv), LinearAttentionState)``.
    """
    _check_qkv(phi_q_t, phi_k_t, v_t, 3, suffix="_t")
    _check_bool("normalize", normalize)
    B, H, Fd = phi_q_t.shape
    Dv = v_t.shape[-1]
    log_g = _log_gates(decay, None if gate is None else gate[:, :, None], B, H, 1, Fd, phi_q_t)
    S, z = _as_state(state, B, H, Fd, Dv, normalize, phi_q_t, "state")
    st = _joint_state(S, z, B, H, Fd, Dv, normalize, phi_q_t)
    if log_g is not None:
        st = st * torch.exp(log_g[:, :, 0])[..., None]
    st = st + phi_k_t[..., :, None] * with_ones(v_t, normalize)[..., None, :]
    out = (phi_q_t[..., None, :] @ st).squeeze(-2)
    return _split(out, st, normalize)
