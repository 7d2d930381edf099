"""The tiled backend: block-sparse exact softmax attention with batched GEMMs.

For every query tile the plan lists the key tiles the pattern touches. A chunk of query
tiles gathers its keys and values (``index_select``), computes its logits with one batched
GEMM, applies the score mod and, where a tile pair is only partly visible, the pattern's
elementwise mask, and reduces with a fused softmax. Rows whose key set is too long for
the working-set budget are split into slot groups that are merged exactly by log-sum-exp
(the FlashAttention recurrence, see :mod:`attnlab.merge`). A custom ``autograd.Function``
saves only the inputs, the output and the log-sum-exp, and recomputes the logits chunk by
chunk in backward. Memory is O(L * span), never O(L * S) for a sparse pattern. Works on
CPU and CUDA; half-precision inputs are computed in float32.

Equivalent to :func:`attnlab.backends.reference.reference_attention`, which the tests
compare it with, outputs and gradients.
"""

from __future__ import annotations

import torch

from ..scores.base import ScoreContext, ScoreMod
from .rowops import probs_dscores, softmax_lse
from .tiled_plan import Chunk, TiledPlan


# -- layout changes -------------------------------------------------------------------------
def to_tiles(x: torch.Tensor, plan: TiledPlan) -> torch.Tensor:
    """``(B, Hq, *L, E)`` -> ``(B, Hx, nQt, M, E)`` (zero padded, GQA group folded if shared)."""
    g, t = plan.geometry, plan.tiling
    nd = g.ndim
    B, H, E = x.shape[0], x.shape[1], x.shape[-1]
    pad = []
    for s, tile in zip(reversed(g.q_shape), reversed(t.q_tile)):
        pad += [0, -s % tile]
    if any(pad):
        x = torch.nn.functional.pad(x, [0, 0] + pad)
    split = [B, H]
    for gr, tile in zip(t.q_grid, t.q_tile):
        split += [gr, tile]
    x = x.reshape(*split, E)
    perm = [0, 1] + [2 + 2 * i for i in range(nd)] + [3 + 2 * i for i in range(nd)] + [2 + 2 * nd]
    x = x.permute(perm).reshape(B, H, t.num_q_tiles, t.q_tile_size, E)
    if plan.fold_heads:
        G = g.group_size
        x = x.reshape(B, g.kv_heads, G, t.num_q_tiles, t.q_tile_size, E)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, g.kv_heads, t.num_q_tiles, G * t.q_tile_size, E)
    return x.contiguous()


def from_tiles(x: torch.Tensor, plan: TiledPlan) -> torch.Tensor:
    """Inverse of :func:`to_tiles` for tensors with or without a trailing feature axis."""
    g, t = plan.geometry, plan.tiling
    nd = g.ndim
    squeeze = x.ndim == 4
    if squeeze:
        x = x[..., None]
    B, E = x.shape[0], x.shape[-1]
    if plan.fold_heads:
        G = g.group_size
        x = x.reshape(B, g.kv_heads, t.num_q_tiles, G, t.q_tile_size, E).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(B, g.q_heads, *t.q_grid, *t.q_tile, E)
    perm = [0, 1]
    for i in range(nd):
        perm += [2 + i, 2 + nd + i]
    x = x.permute(perm + [2 + 2 * nd]).reshape(
        B, g.q_heads, *[gr * tile for gr, tile in zip(t.q_grid, t.q_tile)], E
    )
    x = x[(slice(None), slice(None)) + tuple(slice(0, s) for s in g.q_shape)]
    return x[..., 0] if squeeze else x


def flat_kv(x: torch.Tensor) -> torch.Tensor:
    """``(B, Hkv, *S, E)`` -> ``(B * Hkv * S, E)`` (a view when contiguous)."""
    return x.reshape(-1, x.shape[-1])


# -- per-chunk index sets -------------------------------------------------------------------
class ChunkIndex:
    """Index tensors of one chunk (and one slot group) of the plan."""

    def __init__(self, plan: TiledPlan, chunk: Chunk, slot_lo: int, slot_hi: int):
        g, t = plan.geometry, plan.tiling
        dev = t.device
        rows = slice(chunk.start, chunk.stop)
        n = chunk.stop - chunk.start
        self.n = n
        qt = plan.row_qt[rows]
        zero = torch.zeros((), dtype=torch.long, device=dev)
        if plan.batch_in_rows:
            rb = plan.row_b[rows]
            self.bsel = rb.view(1, 1, n)
            self.mask_b = rb.view(1, 1, n, 1, 1)
        else:
            self.bsel = torch.arange(g.batch, device=dev).view(-1, 1, 1)
            self.mask_b = zero.view(1, 1, 1, 1, 1)
        if plan.fold_heads:
            self.hsel = torch.arange(g.kv_heads, device=dev).view(1, -1, 1)
            hkv = self.hsel
            G = g.group_size
            m = torch.arange(plan.rows_per_tile, device=dev) // t.q_tile_size
            self.score_h = (self.hsel.view(1, -1, 1, 1, 1) * G + m.view(1, 1, 1, -1, 1))
            self.mask_h = zero.view(1, 1, 1, 1, 1)
        else:
            rh = plan.row_h[rows]
            self.hsel = rh.view(1, 1, n)
            hkv = self.hsel // g.group_size
            self.score_h = rh.view(1, 1, n, 1, 1)
            self.mask_h = self.score_h
        self.qsel = qt.view(1, 1, n)
        q_tok = t.q_token_index[qt]  # (n, Tq)
        self.q_tok = q_tok.clamp(min=0).view(1, 1, n, -1, 1)
        reps = plan.rows_per_tile // t.q_tile_size
        self.score_q = self.q_tok.repeat(1, 1, 1, reps, 1) if reps > 1 else self.q_tok
        tiles = plan.kv_tiles[rows, slot_lo:slot_hi]  # (n, ns)
        pos = t.kv_token_index[tiles.clamp(min=0)]  # (n, ns, Tk)
        pos = torch.where((tiles >= 0)[..., None], pos, torch.full_like(pos, -1)).reshape(n, -1)
        self.kv_ok = (pos >= 0).view(1, 1, n, 1, -1)
        self.kv_tok = pos.clamp(min=0).view(1, 1, n, 1, -1)
        # padded slots read token 0 of their head; the mask hides them
        base = (self.bsel * g.kv_heads + hkv) * g.kv_len  # (B', H', n) broadcast
        self.gather = base[..., None] + pos.clamp(min=0).view(1, 1, n, -1)
        self.span = pos.shape[1]

    def mask(self, plan: TiledPlan) -> torch.Tensor:
        """``(1, 1, n, Tq, span)`` visibility inside the gathered keys."""
        m = plan.pattern.mask(self.mask_b, self.mask_h, self.q_tok, self.kv_tok, plan.geometry)
        return m & self.kv_ok

    def score_context(self, plan: TiledPlan, query: torch.Tensor | None) -> ScoreContext:
        b = self.bsel.view(*self.bsel.shape, 1, 1)
        return ScoreContext(b, self.score_h, self.score_q, self.kv_tok, plan.geometry, query)


def _gather(x_flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    out = torch.index_select(x_flat, 0, idx.reshape(-1))
    return out.view(*idx.shape, x_flat.shape[-1])


def _select_rows(x: torch.Tensor, ci: ChunkIndex) -> torch.Tensor:
    return x[ci.bsel, ci.hsel, ci.qsel]


def _scores(plan, ci, Qc, Kc, scale, score_mod, track=False):
    """Logits ``(B', H', n, M, span)`` with the score mod applied (not masked).

    With ``track`` the score mod runs under autograd and the pre-mod logits are returned
    as a leaf (for the score mod's backward)."""
    Bp, Hp, n, M, D = Qc.shape
    span = Kc.shape[-2]
    S = torch.baddbmm(
        Qc.new_empty(()).expand(Bp * Hp * n, M, span),
        Qc.reshape(-1, M, D),
        Kc.reshape(-1, span, D).transpose(1, 2),
        beta=0,
        alpha=scale,
    ).view(Bp, Hp, n, M, span)
    raw = S
    if score_mod is not None:
        ctx = ci.score_context(plan, Qc if score_mod.needs_query else None)
        if track:
            raw = S.requires_grad_()
            with torch.enable_grad():
                S = score_mod.modify(raw, ctx)
        else:
            S = score_mod.modify(S, ctx)
    return S, raw


def _grouped(x: torch.Tensor, plan: TiledPlan) -> torch.Tensor:
    """View ``(..., M, span)`` as ``(..., G', Tq, span)`` so per-tile masks broadcast."""
    Tq = plan.tiling.q_tile_size
    return x.view(*x.shape[:-2], x.shape[-2] // Tq, Tq, x.shape[-1])


def _empty_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``(1, 1, n, 1, Tq)`` rows with no visible key in this slot group, or None if none."""
    if mask is None:
        return None
    empty = ~mask.any(-1)
    return empty if bool(empty.any()) else None


def plan_work(plan: TiledPlan) -> list[tuple[ChunkIndex, torch.Tensor | None, torch.Tensor | None, bool]]:
    """Per chunk and slot group: its indices, mask ``(1, 1, n, 1, Tq, span)``, empty rows
    and whether it starts a new set of rows. Built once in forward, reused in backward
    (memory O(L * span) bytes)."""
    work = []
    for chunk in plan.chunks:
        for lo in range(0, chunk.num_slots, chunk.group):
            ci = ChunkIndex(plan, chunk, lo, min(chunk.num_slots, lo + chunk.group))
            mask = ci.mask(plan).unsqueeze(3) if chunk.needs_mask else None
            work.append((ci, mask, _empty_rows(mask), lo == 0))
    return work


def tiled_forward(q_t, k_flat, v_flat, plan: TiledPlan, scale: float, score_mod, work, fused):
    """Output ``(B, Hx, nQt, M, Dv)`` and lse ``(B, Hx, nQt, M)`` in tile layout."""
    B, Hx, nQt, M, _ = q_t.shape
    Dv = v_flat.shape[-1]
    out = q_t.new_zeros(B, Hx, nQt, M, Dv)
    lse = q_t.new_full((B, Hx, nQt, M), float("-inf"))
    acc_o = acc_l = None
    for i, (ci, mask, empty, first) in enumerate(work):
        Qc = _select_rows(q_t, ci)
        Kc = _gather(k_flat, ci.gather)
        Vc = _gather(v_flat, ci.gather)
        S, _ = _scores(plan, ci, Qc, Kc, scale, score_mod)
        P, lse_c = softmax_lse(_grouped(S, plan), mask, empty, fused)
        Oc = torch.matmul(P.view(S.shape), Vc)
        lse_c = lse_c.reshape(S.shape[:-1])
        if first:
            acc_o, acc_l = Oc, lse_c
        else:
            acc_o, acc_l = _merge_two(acc_o, acc_l, Oc, lse_c)
        if i + 1 == len(work) or work[i + 1][3]:
            out[ci.bsel, ci.hsel, ci.qsel] = acc_o
            lse[ci.bsel, ci.hsel, ci.qsel] = acc_l
    return out, lse


def _merge_two(o1, l1, o2, l2):
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    tot = w1 + w2
    safe = torch.where(tot > 0, tot, torch.ones_like(tot))
    o = (o1 * (w1 / safe)[..., None]) + (o2 * (w2 / safe)[..., None])
    lse = torch.where(tot > 0, m + torch.log(safe), torch.full_like(tot, float("-inf")))
    return o, lse


def tiled_backward(q_t, k_flat, v_flat, out_t, lse_t, dout_t, dlse_t, plan, scale, score_mod, params, work, fused):
    """Gradients in tile/flat layout, and of the score mod's parameters."""
    delta = (dout_t * out_t).sum(-1)
    if dlse_t is not None:
        delta = delta - dlse_t
    lse_safe = torch.where(torch.isfinite(lse_t), lse_t, torch.full_like(lse_t, float("inf")))
    dq_t = torch.zeros_like(q_t)
    dk_flat = torch.zeros_like(k_flat)
    dv_flat = torch.zeros_like(v_flat)
    dparams = [torch.zeros_like(p) for p in params]
    needs_query = score_mod is not None and score_mod.needs_query
    for ci, mask, _, _ in work:
        Qc = _select_rows(q_t, ci)
        Kc = _gather(k_flat, ci.gather)
        Vc = _gather(v_flat, ci.gather)
        dOc = _select_rows(dout_t, ci)
        Lc = _select_rows(lse_safe, ci)
        Dc = _select_rows(delta, ci)
        Qg = Qc.detach().requires_grad_() if needs_query else Qc
        S, raw = _scores(plan, ci, Qg, Kc, scale, score_mod, track=score_mod is not None)
        dP = torch.matmul(dOc, Vc.transpose(-1, -2))
        P, dS = probs_dscores(
            _grouped(S.detach(), plan), mask, _grouped(Lc[..., None], plan)[..., 0],
            _grouped(dP, plan), _grouped(Dc[..., None], plan)[..., 0], fused,
            inplace=score_mod is None,
        )
        P, dS = P.view(S.shape), dS.view(S.shape)
        if score_mod is not None:
            inputs = [raw] + ([Qg] if needs_query else []) + list(params)
            grads = torch.autograd.grad(S, inputs, dS, allow_unused=True)
            dS = grads[0]
            if needs_query and grads[1] is not None:
                dq_t[ci.bsel, ci.hsel, ci.qsel] += grads[1]
            for acc, gp in zip(dparams, grads[len(inputs) - len(params):]):
                if gp is not None:
                    acc += gp
        dv_c = torch.matmul(P.transpose(-1, -2), dOc)
        dq_c = torch.matmul(dS, Kc).mul_(scale)
        dk_c = torch.matmul(dS.transpose(-1, -2), Qc).mul_(scale)
        dq_t[ci.bsel, ci.hsel, ci.qsel] += dq_c
        idx = ci.gather.reshape(-1)
        dk_flat.index_add_(0, idx, dk_c.reshape(-1, dk_c.shape[-1]))
        dv_flat.index_add_(0, idx, dv_c.reshape(-1, dv_c.shape[-1]))
    return dq_t, dk_flat, dv_flat, dparams


class TiledAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out and lse; recomputes logits in backward."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale, score_mod, cdt, fused, *params):
        q_t = to_tiles(q.to(cdt), plan)
        k_flat = flat_kv(k.to(cdt))
        v_flat = flat_kv(v.to(cdt))
        work = plan_work(plan)
        out_t, lse_t = tiled_forward(q_t, k_flat, v_flat, plan, scale, score_mod, work, fused)
        ctx.fused = fused
        ctx.work = work
        ctx.save_for_backward(q_t, k_flat, v_flat, out_t, lse_t, *params)
        ctx.plan, ctx.scale, ctx.score_mod = plan, scale, score_mod
        ctx.in_dtypes = (q.dtype, k.dtype, v.dtype)
        ctx.kv_shapes = (k.shape, v.shape)
        out = from_tiles(out_t, plan).to(q.dtype)
        lse = from_tiles(lse_t, plan)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q_t, k_flat, v_flat, out_t, lse_t, *params = ctx.saved_tensors
        plan = ctx.plan
        cdt = q_t.dtype
        dout_t = to_tiles(dout.to(cdt), plan)
        dlse_t = to_tiles(dlse[..., None].to(cdt), plan)[..., 0] if dlse is not None else None
        dq_t, dk_flat, dv_flat, dparams = tiled_backward(
            q_t, k_flat, v_flat, out_t, lse_t, dout_t, dlse_t, plan, ctx.scale, ctx.score_mod, params, ctx.work, ctx.fused
        )
        qd, kd, vd = ctx.in_dtypes
        dq = from_tiles(dq_t, plan).to(qd)
        dk = dk_flat.reshape(ctx.kv_shapes[0]).to(kd)
        dv = dv_flat.reshape(ctx.kv_shapes[1]).to(vd)
        return (dq, dk, dv, None, None, None, None, None, *dparams)


def tiled_attention(q, k, v, plan: TiledPlan, scale: float, score_mod: ScoreMod | None, compute_dtype, fused: bool = False):
    """Run the tiled backend; returns ``(out, lse)`` in the public layout.

    ``fused`` compiles the row work (softmax, lse, probability recomputation) with
    ``torch.compile``; see :mod:`attnlab.backends.rowops`."""
    params = [p for p in score_mod.parameters()] if score_mod is not None else []
    return TiledAttention.apply(q, k, v, plan, scale, score_mod, compute_dtype, fused, *params)


__all__ = ["tiled_attention", "TiledAttention", "to_tiles", "from_tiles"]
