"""Linear attention over a sequence sharded across ranks: the chunked form with one chunk
per rank.

Each rank computes the state contribution of its shard (``dS_r = sum_t G_{t..end} K_t v_t^T``
and the normaliser ``dz_r``, from a zero state) and the factor ``A_r`` by which a state
entering the shard decays across it (``decay ** L_r``, times the product of the shard's
gates). The small ``(S, z, A)`` of every rank are all-gathered and each rank composes the
state entering its shard, ``S_r = A_{r-1} S_{r-1} + dS_{r-1}`` (the recurrence of the chunked
form between chunks), then runs :func:`attnlab.linear_attention` on its shard from that
state. Non-causal attention uses the sum of the other ranks' states. Exact to the
single-process chunked form; differentiable (the all-gather's backward all-reduces the
gradients of the states), so every rank must run backward.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..geometry import check_qkv
from ..linear.api import _feature_maps, linear_attention
from ..linear.forms import LinearAttentionState, _as_decay, _as_gate
from .._checks import check_bool, check_int
from ._group import check_agree, resolve_group
from .collectives import all_gather_stack


def _carry(decay, gate, B: int, H: int, L: int, Fd: int, like: torch.Tensor):
    """``A (B|1, H, F|1, 1)``: the factor by which a state entering the shard decays across it
    (``A[..., 0]`` for the normaliser)."""
    a = like.new_ones(1, H, 1)
    gamma = _as_decay(decay, H, like)
    if gamma is not None:
        a = a * (gamma ** L).view(1, H, 1)
    if gate is not None:
        g = _as_gate(gate, B, H, L, Fd, like)  # (B, H, L, 1 or F)
        a = a * torch.exp(torch.log(g).sum(2))
    return a[..., None]


def ring_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Any = None,
    feature_map: Any = None,
    causal: bool = True,
    decay: Any = None,
    gate: Optional[torch.Tensor] = None,
    normalize: bool = True,
    scale: Optional[float] = None,
    chunk_size: int = 64,
    seq_len: int | None = None,
    return_state: bool = False,
    timeout: Any = None,
    check_ranks: bool = True,
):
    """:func:`attnlab.linear_attention` of this rank's contiguous shard of a sequence sharded
    over ``group`` (rank ``r`` holds tokens ``r * L_r .. (r + 1) * L_r - 1``); equal, outputs
    and gradients, to the single-process call on the gathered sequence.

    ``q``, ``k``, ``v`` are ``(B, Hq, L_r, D)``, ``(B, Hkv, L_r, D)``, ``(B, Hkv, L_r, Dv)``;
    ``gate`` is this rank's shard ``(B, Hq, L_r[, F])``; the other arguments are those of
    ``linear_attention`` and must match on every rank. Contiguous shards only: linear
    attention costs the same for every shard, so there is nothing to balance. A causal
    sequence padded at the end (``shard(..., pad=True)``, true length ``seq_len``) gives the
    same outputs for the real tokens; non-causal attention would count padded keys, so it
    refuses padding. Feature maps that read token positions (cosFormer) are refused: they also
    read the whole length, which ``linear_attention`` takes from the local shard.

    Returns ``out (B, Hq, L_r, Dv)``, or ``(out, state)`` with ``return_state``: the state
    after the last token of the whole sequence (the same on every rank).
    """
    who = "ring_linear_attention"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if isinstance(x, torch.Tensor) and x.ndim != 4:
            raise ValueError(f"{who} shards one token axis: {name} must be (B, H, L, D), got "
                             f"{name}.shape={tuple(x.shape)}")
    g = check_qkv(q, k, v)
    info = resolve_group(group, timeout, who)
    check_bool("causal", causal)
    check_bool("return_state", return_state)
    check_bool("check_ranks", check_ranks)
    check_int("chunk_size", chunk_size, 1)
    if g.q_len != g.kv_len:
        raise ValueError(f"{who} needs q and k shards of one length, got q.shape[2]={g.q_len}, "
                         f"k.shape[2]={g.kv_len}")
    W, r, n = info.world_size, info.rank, g.q_len
    if seq_len is not None:
        check_int("seq_len", seq_len, 1)
        if seq_len > W * n:
            raise ValueError(f"seq_len={seq_len} exceeds world_size * local length = {W * n}")
        if seq_len < W * n and not causal:
            raise ValueError(f"seq_len={seq_len} < {W * n} means padded keys, which non-causal linear "
                             "attention cannot ignore; shard a length divisible by the world size")
    if any(getattr(phi, "needs_positions", False) for phi in _feature_maps(feature_map)):
        raise ValueError(f"{who} does not support position-dependent feature maps (cosFormer): they "
                         "read the total length, which each rank only knows as its shard's")
    if check_ranks:
        check_agree({"batch size": g.batch, "query heads": g.q_heads, "key/value heads": g.kv_heads,
                     "local length": n, "head dim": g.head_dim, "value dim": g.value_dim,
                     "causal": int(causal), "normalize": int(normalize), "gate given": int(gate is not None)},
                    info, g.device, who)
    kw = dict(feature_map=feature_map, decay=decay, gate=gate, normalize=normalize, scale=scale,
              chunk_size=chunk_size, position_offset=r * n)
    _, own = linear_attention(q, k, v, causal=causal, return_state=True, **kw)
    Fd = own.S.shape[-2]
    a_S = _carry(decay if causal else None, gate if causal else None, g.batch, g.q_heads, n, Fd, own.S)
    # one packed gather (and so one all-reduce in backward, whatever order autograd runs in)
    parts = [own.S] + ([own.z] if normalize else [])
    if causal:
        parts.append(a_S.expand(own.S.shape[0], -1, a_S.shape[2], -1))
    packed = all_gather_stack(torch.cat([p.reshape(-1) for p in parts]), info,
                              "the other ranks' linear-attention states")
    pieces = list(packed.split([p.numel() for p in parts], dim=1))
    S_all = pieces.pop(0).reshape(W, *own.S.shape)
    z_all = pieces.pop(0).reshape(W, *own.z.shape) if normalize else None
    if causal:
        A_all = pieces.pop(0).reshape(W, own.S.shape[0], *a_S.shape[1:])
        S_in, z_in = torch.zeros_like(own.S), None if z_all is None else torch.zeros_like(own.z)
        states = []
        for j in range(W):
            states.append((S_in, z_in))
            S_in = A_all[j] * S_in + S_all[j]
            if z_in is not None:
                z_in = A_all[j][..., 0] * z_in + z_all[j]
        S_r, z_r = states[r]
        final = LinearAttentionState(S_in, z_in)
    else:
        others = [j for j in range(W) if j != r]
        S_r = S_all[others].sum(0)
        z_r = None if z_all is None else z_all[others].sum(0)
        final = LinearAttentionState(S_all.sum(0), None if z_all is None else z_all.sum(0))
    out = linear_attention(q, k, v, causal=causal, initial_state=LinearAttentionState(S_r, z_r), **kw)
    return (out, final) if return_state else out


__all__ = ["ring_linear_attention"]
