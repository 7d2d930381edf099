"""The tiled backend: block-sparse exact softmax attention with batched GEMMs.

For every query tile the plan lists the key tiles the pattern touches. A chunk of query
tiles gathers its keys and values (whole tiles when they are contiguous in memory, single
tokens otherwise) and computes its logits with one batched GEMM; the pattern's mask,
stored once per plan as a 0/-inf bias, is added inside that GEMM (beta=1), the score mod
is applied, and a fused softmax reduces the rows. Rows whose key set is too long for the
working-set budget are split into slot groups merged exactly by log-sum-exp (the
FlashAttention recurrence, as in :mod:`attnlab.merge`). A custom ``autograd.Function``
saves only the inputs, the output and the log-sum-exp and recomputes chunk by chunk in
backward (probabilities of whole rows with the fused softmax, of split rows as
``exp(S - lse)``). Memory is O(L * span), never O(L * S) for a sparse pattern. Works on
CPU and CUDA; half-precision inputs are computed in float32.

Equivalent to :func:`attnlab.backends.reference.reference_attention`, which the tests
compare it with, outputs and gradients.
"""
from __future__ import annotations

import torch

from ..scores.base import ScoreContext, ScoreMod
from ..patterns.layout import Tiling
from .tiled_plan import Chunk, TiledPlan


# -- layout changes -------------------------------------------------------------------------
def to_tiles(x: torch.Tensor, t: Tiling, fold_heads: bool) -> torch.Tensor:
    """``(B, Hq, *L, E)`` -> ``(B, Hx, nQt, M, E)``: query tiles, zero padded, with the GQA
    group folded into the rows (``Hx = Hkv``) when ``fold_heads``."""
    g = t.geometry
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
    if fold_heads:
        G = g.group_size
        x = x.reshape(B, g.kv_heads, G, t.num_q_tiles, t.q_tile_size, E)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, g.kv_heads, t.num_q_tiles, G * t.q_tile_size, E)
    return x.contiguous()


def from_tiles(x: torch.Tensor, t: Tiling, fold_heads: bool) -> torch.Tensor:
    """Inverse of :func:`to_tiles` for tensors with or without a trailing feature axis."""
    g = t.geometry
    nd = g.ndim
    squeeze = x.ndim == 4
    if squeeze:
        x = x[..., None]
    B, E = x.shape[0], x.shape[-1]
    if fold_heads:
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
    """``(B, Hkv, *S, E)`` -> ``(B * Hkv * S, E)``, contiguous (a view when ``x`` is): whole
    tiles are moved as rows of ``tile * E`` elements, which a slice of a wider tensor is not."""
    return x.contiguous().view(-1, x.shape[-1])


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
        # when key tiles are contiguous runs of tokens, move whole tiles instead
        self.tile_gather = None
        if contiguous_kv_tiles(t):
            tile_base = (self.bsel * g.kv_heads + hkv) * t.num_kv_tiles
            self.tile_gather = tile_base[..., None] + tiles.clamp(min=0).view(1, 1, n, -1)

    def mask(self, plan: TiledPlan) -> torch.Tensor:
        """``(1, 1, n, Tq, span)`` visibility inside the gathered keys."""
        m = plan.pattern.mask(self.mask_b, self.mask_h, self.q_tok, self.kv_tok, plan.geometry)
        return m & self.kv_ok

    def score_context(self, plan: TiledPlan, query: torch.Tensor | None) -> ScoreContext:
        b = self.bsel.view(*self.bsel.shape, 1, 1)
        return ScoreContext(b, self.score_h, self.score_q, self.kv_tok, plan.geometry, query)


def contiguous_kv_tiles(t: Tiling) -> bool:
    """True if every key tile is a contiguous run of tokens in memory (no padding)."""
    g = t.geometry
    return all(x == 1 for x in t.kv_tile[:-1]) and g.kv_shape[-1] % t.kv_tile[-1] == 0


def _gather(x_flat: torch.Tensor, ci: ChunkIndex) -> torch.Tensor:
    """Keys or values of a chunk, ``(B', H', n, span, E)``, from ``(B * Hkv * S, E)``."""
    E = x_flat.shape[-1]
    if ci.tile_gather is not None:
        tiles = x_flat.view(-1, ci.span // ci.tile_gather.shape[-1] * E)
        out = torch.index_select(tiles, 0, ci.tile_gather.reshape(-1))
        return out.view(*ci.tile_gather.shape[:-1], ci.span, E)
    out = torch.index_select(x_flat, 0, ci.gather.reshape(-1))
    return out.view(*ci.gather.shape, E)


def _scatter_add(acc_flat: torch.Tensor, ci: ChunkIndex, src: torch.Tensor) -> None:
    """``acc_flat[rows of the chunk] += src`` (inverse of :func:`_gather`)."""
    E = acc_flat.shape[-1]
    if ci.tile_gather is not None:
        width = ci.span // ci.tile_gather.shape[-1] * E
        acc_flat.view(-1, width).index_add_(0, ci.tile_gather.reshape(-1), src.reshape(-1, width))
    else:
        acc_flat.index_add_(0, ci.gather.reshape(-1), src.reshape(-1, E))


def _select_rows(x: torch.Tensor, ci: ChunkIndex) -> torch.Tensor:
    return x[ci.bsel, ci.hsel, ci.qsel]


def _bmm_into(init, a: torch.Tensor, b_t: torch.Tensor, alpha: float, plan: TiledPlan) -> torch.Tensor:
    """``init + alpha * a @ b_t`` for batched ``(..., M, K) @ (..., K, N)``, one GEMM.

    ``init`` broadcasts against the result viewed as ``(..., G', Tq, N)`` (see
    :func:`_grouped`), or is None for zeros. It is materialised into the output first;
    adding it inside the GEMM (beta=1) costs no extra pass over the result."""
    *lead, M, K = a.shape
    N = b_t.shape[-1]
    a3, b3 = a.reshape(-1, M, K), b_t.reshape(-1, K, N)
    if init is None:
        out = torch.baddbmm(a3.new_empty(()).expand(a3.shape[0], M, N), a3, b3, beta=0, alpha=alpha)
    else:
        Tq = plan.tiling.q_tile_size
        out = torch.empty(*lead, M // Tq, Tq, N, dtype=a.dtype, device=a.device)
        out.copy_(init.expand_as(out))
        out = out.view(-1, M, N).baddbmm_(a3, b3, beta=1, alpha=alpha)
    return out.view(*lead, M, N)


def _grouped(x: torch.Tensor, plan: TiledPlan) -> torch.Tensor:
    """View ``(..., M, span)`` as ``(..., G', Tq, span)`` so per-tile biases broadcast."""
    Tq = plan.tiling.q_tile_size
    return x.view(*x.shape[:-2], x.shape[-2] // Tq, Tq, x.shape[-1])


def _ungrouped(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(*x.shape[:-3], x.shape[-3] * x.shape[-2], x.shape[-1])


def _row_bias(bias: torch.Tensor | None, row: torch.Tensor, plan: TiledPlan) -> torch.Tensor:
    """``bias (1,1,n,1,Tq,span) + row (B',H',n,M)`` in grouped form ``(B',H',n,G',Tq,*)``."""
    r = _grouped(row[..., None], plan)
    return r if bias is None else bias + r


def _score_mod(plan, ci, S, Qc, score_mod, track):
    """Apply the score mod; with ``track`` under autograd from a leaf (for its backward)."""
    ctx = ci.score_context(plan, Qc if score_mod.needs_query else None)
    if not track:
        return score_mod.modify(S, ctx), S
    raw = S.requires_grad_()
    with torch.enable_grad():
        return score_mod.modify(raw, ctx), raw


def _softmax_lse(S: torch.Tensor, with_lse: bool = True):
    """Softmax over the last axis and (when ``with_lse``) its log-sum-exp. Rows with no
    finite logit (hidden by the pattern, or set to -inf by a score mod) give probabilities
    0 and lse -inf."""
    m = S.amax(-1)
    P = torch.softmax(S, -1)
    lse = m - torch.log(P.amax(-1)) if with_lse else None
    empty = m == float("-inf")
    if bool(empty.any()):
        P.masked_fill_(empty[..., None], 0.0)
        if with_lse:
            lse.masked_fill_(empty, float("-inf"))
    return P, lse


def plan_work(plan: TiledPlan, dtype: torch.dtype) -> list[tuple[ChunkIndex, torch.Tensor | None, bool, bool]]:
    """Per chunk and slot group: its indices, additive mask bias ``(1, 1, n, 1, Tq, span)``
    (0 visible, -inf hidden; None when all visible), whether it starts a new set of rows
    and whether it holds whole rows (a single slot group). Built once in forward and
    reused in backward (memory O(L * span))."""
    work = []
    for chunk in plan.chunks:
        for lo in range(0, chunk.num_slots, chunk.group):
            ci = ChunkIndex(plan, chunk, lo, min(chunk.num_slots, lo + chunk.group))
            bias = None
            if chunk.needs_mask:
                mask = ci.mask(plan).unsqueeze(3)
                bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
                bias.masked_fill_(~mask, float("-inf"))
            work.append((ci, bias, lo == 0, chunk.group >= chunk.num_slots))
    return work


def tiled_forward(q_t, k_flat, v_flat, plan: TiledPlan, scale: float, score_mod, work):
    """Output ``(B, Hx, nQt, M, Dv)`` and lse ``(B, Hx, nQt, M)`` in tile layout."""
    B, Hx, nQt, M, _ = q_t.shape
    Dv = v_flat.shape[-1]
    out = q_t.new_zeros(B, Hx, nQt, M, Dv)
    lse = q_t.new_full((B, Hx, nQt, M), float("-inf"))
    acc_o = acc_l = None
    for i, (ci, bias, first, _) in enumerate(work):
        Qc = _select_rows(q_t, ci)
        Kc = _gather(k_flat, ci)
        Vc = _gather(v_flat, ci)
        Kt = Kc.transpose(-1, -2)
        if score_mod is None:
            S = _bmm_into(bias, Qc, Kt, scale, plan)
        else:
            S, _ = _score_mod(plan, ci, _bmm_into(None, Qc, Kt, scale, plan), Qc, score_mod, False)
            if bias is not None:
                S = _ungrouped(_grouped(S, plan) + bias)
        P, lse_c = _softmax_lse(S)
        Oc = torch.matmul(P, Vc)
        if first:
            acc_o, acc_l = Oc, lse_c
        else:
            acc_o, acc_l = _merge_two(acc_o, acc_l, Oc, lse_c)
        if i + 1 == len(work) or work[i + 1][2]:
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


def tiled_backward(q_t, k_flat, v_flat, out_t, lse_t, dout_t, dlse_t, plan, scale, score_mod, params, work):
    """Gradients in tile/flat layout, and of the score mod's parameters.

    Per chunk: ``P = exp(S + bias - lse)`` and ``dS = P * (dO V^T - delta)`` with
    ``delta = rowsum(dO * O) - dlse``; ``-lse`` and ``-delta`` ride in the GEMMs."""
    delta = (dout_t * out_t).sum(-1)
    if dlse_t is not None:
        delta = delta - dlse_t
    neg_lse = torch.where(torch.isfinite(lse_t), -lse_t, torch.full_like(lse_t, float("-inf")))
    neg_delta = -delta
    every_row_once = all(whole for _, _, _, whole in work) and sum(
        c.stop - c.start for c in plan.chunks
    ) == plan.row_qt.numel()
    dq_t = torch.empty_like(q_t) if every_row_once else torch.zeros_like(q_t)
    dk_flat = torch.zeros_like(k_flat)
    dv_flat = torch.zeros_like(v_flat)
    dparams = [torch.zeros_like(p) for p in params]
    needs_query = score_mod is not None and score_mod.needs_query
    for ci, bias, _, whole_rows in work:
        dq_extra = None
        Qc = _select_rows(q_t, ci)
        Kc = _gather(k_flat, ci)
        Vc = _gather(v_flat, ci)
        dOc = _select_rows(dout_t, ci)
        Kt = Kc.transpose(-1, -2)
        # P = exp(S + bias - lse); for whole rows the fused softmax recomputes it faster
        # (exp of -inf and of underflowing logits is slow in the elementwise kernel).
        shift = bias if whole_rows else _row_bias(bias, _select_rows(neg_lse, ci), plan)
        if score_mod is None:
            S_full = _bmm_into(shift, Qc, Kt, scale, plan)
        else:
            Qg = Qc.detach().requires_grad_() if needs_query else Qc
            S, raw = _score_mod(plan, ci, _bmm_into(None, Qc, Kt, scale, plan), Qg, score_mod, True)
            S_full = S.detach() if shift is None else _ungrouped(_grouped(S.detach(), plan) + shift)
        P = _softmax_lse(S_full, with_lse=False)[0] if whole_rows else S_full.exp_()
        dS = _bmm_into(
            _grouped(_select_rows(neg_delta, ci)[..., None], plan), dOc, Vc.transpose(-1, -2), 1.0, plan
        ).mul_(P)
        if score_mod is not None:
            inputs = [raw] + ([Qg] if needs_query else []) + list(params)
            grads = torch.autograd.grad(S, inputs, dS, allow_unused=True)
            dS = grads[0]
            if needs_query and grads[1] is not None:
                dq_extra = grads[1]
            for acc, gp in zip(dparams, grads[len(inputs) - len(params):]):
                if gp is not None:
                    acc += gp
        dv_c = torch.matmul(P.transpose(-1, -2), dOc)
        dq_c = torch.matmul(dS, Kc).mul_(scale)
        if dq_extra is not None:
            dq_c += dq_extra
        dk_c = torch.matmul(dS.transpose(-1, -2), Qc).mul_(scale)
        if every_row_once:
            dq_t[ci.bsel, ci.hsel, ci.qsel] = dq_c
        else:
            dq_t[ci.bsel, ci.hsel, ci.qsel] += dq_c
        _scatter_add(dk_flat, ci, dk_c)
        _scatter_add(dv_flat, ci, dv_c)
    return dq_t, dk_flat, dv_flat, dparams


class TiledAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out and lse; recomputes logits in backward."""

    @staticmethod
    def forward(ctx, q, k, v, plan, work, scale, score_mod, cdt, *params):
        q_t = to_tiles(q.to(cdt), plan.tiling, plan.fold_heads)
        k_flat = flat_kv(k.to(cdt))
        v_flat = flat_kv(v.to(cdt))
        out_t, lse_t = tiled_forward(q_t, k_flat, v_flat, plan, scale, score_mod, work)
        ctx.work = work
        ctx.save_for_backward(q_t, k_flat, v_flat, out_t, lse_t, *params)
        ctx.plan, ctx.scale, ctx.score_mod = plan, scale, score_mod
        ctx.in_dtypes = (q.dtype, k.dtype, v.dtype)
        ctx.kv_shapes = (k.shape, v.shape)
        out = from_tiles(out_t, plan.tiling, plan.fold_heads).to(q.dtype)
        lse = from_tiles(lse_t, plan.tiling, plan.fold_heads)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q_t, k_flat, v_flat, out_t, lse_t, *params = ctx.saved_tensors
        plan = ctx.plan
        cdt = q_t.dtype
        dout_t = to_tiles(dout.to(cdt), plan.tiling, plan.fold_heads)
        dlse_t = (
            to_tiles(dlse[..., None].to(cdt), plan.tiling, plan.fold_heads)[..., 0] if dlse is not None else None
        )
        dq_t, dk_flat, dv_flat, dparams = tiled_backward(
            q_t, k_flat, v_flat, out_t, lse_t, dout_t, dlse_t, plan, ctx.scale, ctx.score_mod, params, ctx.work
        )
        qd, kd, vd = ctx.in_dtypes
        dq = from_tiles(dq_t, plan.tiling, plan.fold_heads).to(qd)
        dk = dk_flat.reshape(ctx.kv_shapes[0]).to(kd)
        dv = dv_flat.reshape(ctx.kv_shapes[1]).to(vd)
        return (dq, dk, dv, None, None, None, None, None, *dparams)


def tiled_attention(
    q, k, v, plan: TiledPlan, scale: float, score_mod: ScoreMod | None, compute_dtype, work=None
):
    """Run the tiled backend; returns ``(out, lse)`` in the public layout. ``work`` is the
    plan's :func:`plan_work` (built here when not given)."""
    if work is None:
        work = plan_work(plan, compute_dtype)
    params = score_mod.differentiable_tensors() if score_mod is not None else []
    return TiledAttention.apply(q, k, v, plan, work, scale, score_mod, compute_dtype, *params)


__all__ = ["tiled_attention", "TiledAttention", "to_tiles", "from_tiles"]
