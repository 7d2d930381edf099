r"""The causal chunked form of linear attention, segment by segment, with a memory-lean backward.

:func:`causal_segments` runs the chunked computation of :mod:`attnlab.linear.forms` (Qin et
al., "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large
Language Models", 2024) over segments of :data:`SEGMENT_TOKENS` tokens, one after the other,
each starting from the joint state ``[S | z]`` the previous one left; inside a segment all its
chunks run at once (:func:`chunk_segment`).

Under autograd the whole loop is one ``torch.autograd.Function`` that keeps only its inputs
and the (small) state entering each segment. Its backward walks the segments in reverse,
recomputes each one's forward with autograd from those, and writes the segment's gradients
into preallocated ``dq``, ``dk``, ``dv`` (and gate) tensors while passing the state's gradient
to the segment before. Memory beyond the inputs, the output and their gradients is one
segment's working set, where per-segment autograd (or checkpointing) would also hold every
segment's gradient until a final concatenation.

Feature maps applied inside the segments (``features``) must be deterministic functions of
their inputs and of the tensors passed as ``params`` (their learnable parameters): the
backward recomputes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["EPS", "SEGMENT_TOKENS", "causal_segments", "chunk_segment", "with_ones"]

EPS = 1e-6
SEGMENT_TOKENS = 1024
"""Tokens per segment: segments run one after the other (carrying the state), their chunks all
at once, so the working set stays cache-sized and the time linear in the length."""


def with_ones(v: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``v`` with a column of ones appended when normalising: ``S`` and ``z`` become one matrix
    ``[S | z]``, so numerator and denominator come out of the same products."""
    if not normalize:
        return v
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _intra_gated(q, k, b, mask):
    """Intra-chunk scores ``sum_f q_if k_jf exp(b_if - b_jf)`` (``j <= i``) for per-feature
    cumulative log gates ``b (.., C, F)``; factored when ``exp(-b)`` is safe, else exact."""
    limit = 0.5 * math.log(torch.finfo(q.dtype).max)
    if bool((-b).max() < limit):
        scores = (q * torch.exp(b)) @ (k * torch.exp(-b)).transpose(-1, -2)
        return scores.masked_fill(~mask, 0.0)
    diff = (b[..., :, None, :] - b[..., None, :, :]).masked_fill(~mask[..., None], float("-inf"))
    return torch.einsum("...if,...jf,...ijf->...ij", q, k, torch.exp(diff))


def chunk_segment(phi_q, phi_k, ve, log_g, state, C: int):
    """The causal chunked computation of one segment (all its chunks at once) from the joint
    state ``[S | z]`` entering it; returns ``(out (B, H, n, Dv'), state after it)``.

    The segment is padded to ``N`` chunks of ``C`` tokens, viewed as ``(B, H, N, C, .)``: per
    chunk the intra-chunk masked product ``((q k^T) * W) v`` (``W[i, j] = exp(b_i - b_j)``,
    ``j <= i``, ``b`` the cumulative ``log_g`` inside the chunk) plus ``(q * exp(b)) S_n`` from
    the state ``S_n`` entering the chunk, where
    ``S_{n+1} = exp(b_C) * S_n + sum_j exp(b_C - b_j) k_j v_j^T``. Without gates the states are
    an exclusive cumulative sum over chunks; with gates, a loop over the ``N`` chunks."""
    B, H, L, _ = phi_q.shape
    N = -(-L // C)
    pad = N * C - L

    def chunks(x):
        x = F.pad(x, (0, 0, 0, pad)) if pad else x
        return x.reshape(*x.shape[:2], N, C, x.shape[-1])

    q, k, vc = chunks(phi_q), chunks(phi_k), chunks(ve)
    mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if log_g is None:
        scores = (q @ k.transpose(-1, -2)).masked_fill(~mask, 0.0)
        updates = k.transpose(-1, -2) @ vc  # (B, H, N, F, Dv')
        before = torch.cumsum(updates, dim=2) - updates  # exclusive: state entering each chunk
        states = before + state[:, :, None]
        out = scores @ vc + q @ states
        final = states[:, :, -1] + updates[:, :, -1]
    else:
        b = torch.cumsum(chunks(log_g), dim=-2)  # (B|1, H, N, C, F|1), non-increasing along C
        b_last = b[..., -1:, :]
        if b.shape[-1] == 1:
            diff = (b - b.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
            scores = (q @ k.transpose(-1, -2)) * torch.exp(diff)
        else:
            scores = _intra_gated(q, k, b, mask)
        updates = (k * torch.exp(b_last - b)).transpose(-1, -2) @ vc
        carry = torch.exp(b_last).transpose(-1, -2)  # (B|1, H, N, F|1, 1)
        states = []
        for n in range(N):
            states.append(state)
            state = carry[:, :, n] * state + updates[:, :, n]
        final = state
        out = scores @ vc + (q * torch.exp(b)) @ torch.stack(states, dim=2)
    return out.reshape(B, H, N * C, -1)[:, :, :L], final


def _run_segment(q_s, k_s, v_s, g_s, log_decay, state, pos, *, features, chunk_size, normalize):
    """One segment from raw inputs: feature maps, gates in log space, the chunked product and,
    when normalising, the division by the normaliser column."""
    phi_q, phi_k = (q_s, k_s) if features is None else features(q_s, k_s, pos)
    log_g = None if log_decay is None else log_decay.expand(1, q_s.shape[1], q_s.shape[2], 1)
    if g_s is not None:
        log_g = torch.log(g_s) if log_g is None else log_g + torch.log(g_s)
    out, state = chunk_segment(phi_q, phi_k, with_ones(v_s, normalize), log_g, state, chunk_size)
    if normalize:
        out = out[..., :-1] / (out[..., -1:] + EPS)
    return out, state


@dataclass(frozen=True)
class _Plan:
    run: Callable
    bounds: tuple[tuple[int, int], ...]
    positions: tuple[Optional[torch.Tensor], ...]


def _sliced(x: Optional[torch.Tensor], a: int, b: int) -> Optional[torch.Tensor]:
    return None if x is None else x[:, :, a:b]


def _forward(plan: _Plan, q, k, v, gate, log_decay, state):
    """All segments in order; returns ``(out, final state, the state entering each segment)``."""
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    entering = []
    for (a, b), pos in zip(plan.bounds, plan.positions):
        entering.append(state)
        out_s, state = plan.run(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], _sliced(gate, a, b),
                                log_decay, state, pos)
        out[:, :, a:b] = out_s
    return out, state, entering


class _CausalSegments(torch.autograd.Function):
    """``(out, final state)`` of all segments; backward recomputes one segment at a time."""

    @staticmethod
    def forward(ctx, plan, q, k, v, gate, log_decay, state, *params):
        out, final, entering = _forward(plan, q, k, v, gate, log_decay, state)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, gate, log_decay, *entering, *params)
        return out, final

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_state):
        plan = ctx.plan
        n = len(plan.bounds)
        q, k, v, gate, log_decay, *rest = ctx.saved_tensors
        entering, params = rest[:n], rest[n:]
        need = ctx.needs_input_grad[1:]  # q, k, v, gate, log_decay, state, *params
        inputs = (q, k, v, gate, log_decay)
        grads = [torch.zeros_like(x) if x is not None and w else None for x, w in zip(inputs, need)]
        wanted = [p for p, w in zip(params, need[6:]) if w]
        d_params = [torch.zeros_like(p) for p in wanted]
        for s in reversed(range(n)):
            a, b = plan.bounds[s]
            with torch.enable_grad():
                leaves = [None if x is None else x.detach().requires_grad_(w)
                          for x, w in zip((*(_sliced(x, a, b) for x in inputs[:4]), log_decay), need)]
                st = entering[s].detach().requires_grad_(s > 0 or need[5])
                out_s, st_out = plan.run(*leaves, st, plan.positions[s])
            pairs = [(o, g) for o, g in ((out_s, d_out[:, :, a:b]), (st_out, d_state)) if o.requires_grad]
            wrt = [t for t in (*leaves, st) if t is not None and t.requires_grad] + wanted
            got = list(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                           allow_unused=True)) if pairs else [None] * len(wrt)
            for i, leaf in enumerate(leaves):
                if leaf is None or not leaf.requires_grad:
                    continue
                g = got.pop(0)
                if g is not None:
                    if i == 4:
                        grads[4] += g
                    else:
                        grads[i][:, :, a:b] = g
            g_state = got.pop(0) if st.requires_grad else None
            d_state = torch.zeros_like(st) if g_state is None else g_state
            for acc, g in zip(d_params, got):
                if g is not None:
                    acc += g
        d_params_iter = iter(d_params)
        all_params = [next(d_params_iter) if w else None for w in need[6:]]
        return (None, *grads, d_state if need[5] else None, *all_params)


def causal_segments(q, k, v, log_decay, gate, state, chunk_size: int, normalize: bool, *,
                    features: Optional[Callable] = None, positions: Optional[torch.Tensor] = None,
                    params: Sequence[torch.Tensor] = ()):
    """The causal chunked form in segments of :data:`SEGMENT_TOKENS` tokens from the joint state
    ``[S | z]``; returns ``(out (B, H, L, Dv), joint state after the last token)``.

    ``log_decay`` is ``None`` or ``(1, H, 1, 1)``, ``gate`` ``None`` or a checked
    ``(B, H, L, 1|F)`` gate. ``features(q_s, k_s, positions_s) -> (phi_q, phi_k)`` maps each
    segment's raw inputs (identity when ``None``); ``params`` are the tensors it depends on that
    may need gradients (a feature map's parameters). Under autograd only the inputs and the
    state entering each segment are kept (see the module docstring)."""
    L = q.shape[2]
    C = min(chunk_size, L)
    seg = C * max(1, SEGMENT_TOKENS // C)
    bounds = tuple((a, min(a + seg, L)) for a in range(0, L, seg))
    pos = (None,) * len(bounds) if positions is None else tuple(positions[a:b] for a, b in bounds)
    plan = _Plan(partial(_run_segment, features=features, chunk_size=C, normalize=normalize),
                 bounds, pos)
    tensors = (q, k, v, gate, log_decay, state, *params)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _CausalSegments.apply(plan, *tensors)
    out, final, _ = _forward(plan, q, k, v, gate, log_decay, state)
    return out, final
