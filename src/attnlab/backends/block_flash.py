"""The block-flash backend: block-sparse attention on a fused CPU flash kernel.

For each query tile, the key tiles its pattern sees *whole* are attended by a flash kernel
(blocked online softmax, no logits in memory, parallel over query tiles). Two kernels do it:

- attnlab's own (:mod:`attnlab.backends.native`, compiled on first use) takes the list of
  whole key tiles of every query tile at once and keeps 64-query tiles at the speed of a
  long dense sequence; used for float32 and float64 when it builds;
- otherwise ``aten::_scaled_dot_product_flash_attention_for_cpu`` (the kernel behind CPU
  SDPA), on each query tile's whole tiles gathered into one contiguous run, query tiles with
  equally many whole tiles sharing one call.

The partial tiles run on the tiled backend's masked GEMMs. The two partial results merge
exactly by log-sum-exp.

Backward is exact in the same split, as in ring attention: each part's gradient is the
flash (or tiled) backward of that part evaluated with the *global* output and log-sum-exp,
``dS = P * (dO V^T - rowsum(dO * O))`` with ``P = exp(S - lse)``; ``dq`` adds up over parts,
``dk``/``dv`` of gathered tiles are scattered back with ``index_add_``. Only inputs, output
and log-sum-exp are saved.

The gather moves whole tiles of keys (``tile * D`` contiguous elements when the tiles are
aligned in memory), so the work per query tile is one dense flash call over ``c * tile``
keys: the cost of block-sparse attention becomes that of dense attention over the kept
tiles. Memory: the gathered keys and values of one call, bounded by ``gather_elements``.
"""

from __future__ import annotations

import torch

from .native import block_flash_kernel
from .native_plan import NativeLists, build_native_lists
from .split_plan import SplitPlan
from .tiled import _merge_two, flat_kv, from_tiles, plan_work, tiled_backward, tiled_forward, to_tiles


def cpu_flash_ops():
    """``(forward, backward)`` of PyTorch's CPU flash-attention kernel, or None when this
    build of torch has none."""
    try:
        return (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
    except (AttributeError, RuntimeError):
        return None


def _gather(x_units: torch.Tensor, index: torch.Tensor, E: int) -> torch.Tensor:
    """``(n, 1, c * Tk, E)`` keys or values of one call from rows of ``unit * E`` elements."""
    n = index.shape[0]
    return torch.index_select(x_units, 0, index.reshape(-1)).view(n, 1, -1, E)


def _partial_work(plan: SplitPlan, dtype: torch.dtype):
    """The tiled work list of the partial tiles. No slot group holds a whole row of the
    softmax (the whole tiles hold the rest), so backward recomputes ``exp(S - lse)``."""
    if plan.partial is None:
        return []
    if dtype not in plan.partial_work:
        plan.partial_work[dtype] = [(ci, bias, first, False) for ci, bias, first, _ in plan_work(plan.partial, dtype)]
    return plan.partial_work[dtype]


def native_kernel_for(dtype: torch.dtype):
    """attnlab's compiled kernel when it serves ``dtype`` (float32, float64), else None."""
    return block_flash_kernel() if dtype in (torch.float32, torch.float64) else None


def _tiled_partial(plan: SplitPlan, lists: NativeLists | None) -> bool:
    """Whether the partial tiles run on the tiled backend (checked without building its plan)."""
    return plan.partial_pairs > 0 and not (lists is not None and lists.covers_partial)


def native_lists(plan: SplitPlan) -> NativeLists:
    """The plan's tiles as the native kernel's lists, built on first use and kept in the plan."""
    if plan.native_lists is None:
        plan.native_lists = build_native_lists(plan)
    return plan.native_lists


def _native(plan: SplitPlan, dtype: torch.dtype):
    """``(kernel, lists)`` when the native kernel serves ``dtype``, else ``(None, None)``."""
    kernel = native_kernel_for(dtype)
    return (kernel, native_lists(plan)) if kernel is not None else (None, None)


def block_flash_forward(q_t, k_flat, v_flat, plan: SplitPlan, work, scale: float):
    """Output ``(B, Hx, nQt, M, Dv)`` and lse ``(B, Hx, nQt, M)`` in tile layout."""
    B, Hx, nQt, M, D = q_t.shape
    Dv = v_flat.shape[-1]
    q_rows = q_t.view(-1, M, D)
    native, n = _native(plan, q_t.dtype)
    if native is not None:  # it writes every row
        out, lse = q_t.new_empty(B * Hx * nQt, M, Dv), q_t.new_empty(B * Hx * nQt, M)
        native.forward(q_rows, k_flat.view(-1, D), v_flat.view(-1, Dv), n.rows, n.ptr, n.units, n.mask_index,
                       n.masks, plan.unit, scale, out, lse)
    else:
        out, lse = q_t.new_zeros(B * Hx * nQt, M, Dv), q_t.new_full((B * Hx * nQt, M), float("-inf"))
        _aten_forward(q_rows, k_flat, v_flat, plan, scale, out, lse)
    out, lse = out.view(B, Hx, nQt, M, Dv), lse.view(B, Hx, nQt, M)
    if _tiled_partial(plan, n):
        out_p, lse_p = tiled_forward(q_t, k_flat, v_flat, plan.partial, scale, None, work)
        out, lse = _merge_two(out, lse, out_p, lse_p)
    return out, lse


def _aten_forward(q_rows, k_flat, v_flat, plan: SplitPlan, scale: float, out, lse):
    fwd, _ = cpu_flash_ops()
    D, Dv = q_rows.shape[-1], v_flat.shape[-1]
    k_units = k_flat.view(-1, plan.unit * D)
    v_units = v_flat.view(-1, plan.unit * Dv)
    for call in plan.calls:
        o, l = fwd(q_rows[call.rows].unsqueeze(1), _gather(k_units, call.kv_index, D),
                   _gather(v_units, call.kv_index, Dv), 0.0, False, scale=scale)
        out[call.rows] = o[:, 0]
        lse[call.rows] = l[:, 0].to(lse.dtype)


def block_flash_backward(q_t, k_flat, v_flat, out_t, lse_t, dout_t, plan: SplitPlan, work, scale: float):
    """``dq`` in tile layout and ``dk``, ``dv`` flat, from the global output and lse."""
    M, D = q_t.shape[-2:]
    Dv = v_flat.shape[-1]
    native, n = _native(plan, q_t.dtype)
    tiled_part = _tiled_partial(plan, n)
    if tiled_part:
        dq_t, dk_flat, dv_flat, _ = tiled_backward(q_t, k_flat, v_flat, out_t, lse_t, dout_t, None,
                                                   plan.partial, scale, None, [], work)
    elif native is not None:  # the native kernel sets every row of dq, dk and dv
        dq_t, dk_flat, dv_flat = torch.empty_like(q_t), torch.empty_like(k_flat), torch.empty_like(v_flat)
    else:
        dq_t, dk_flat, dv_flat = torch.zeros_like(q_t), torch.zeros_like(k_flat), torch.zeros_like(v_flat)
    q_rows, o_rows, do_rows = q_t.view(-1, M, D), out_t.view(-1, M, Dv), dout_t.view(-1, M, Dv)
    l_rows = lse_t.view(-1, M)
    if native is not None:
        native.backward(q_rows, k_flat.view(-1, D), v_flat.view(-1, Dv), o_rows.contiguous(), do_rows.contiguous(),
                        l_rows.contiguous(), n.rows, n.ptr, n.units, n.mask_index, n.masks, n.group_ptr, plan.unit,
                        scale, not tiled_part, dq_t.view(-1, M, D), dk_flat.view(-1, D), dv_flat.view(-1, Dv))
        return dq_t, dk_flat, dv_flat
    _, bwd = cpu_flash_ops()
    k_units, v_units = k_flat.view(-1, plan.unit * D), v_flat.view(-1, plan.unit * Dv)
    dq_rows = dq_t.view(-1, M, D)
    dk_units, dv_units = dk_flat.view(-1, plan.unit * D), dv_flat.view(-1, plan.unit * Dv)
    for call in plan.calls:
        r = call.rows
        dq, dk, dv = bwd(do_rows[r].unsqueeze(1), q_rows[r].unsqueeze(1), _gather(k_units, call.kv_index, D),
                         _gather(v_units, call.kv_index, Dv), o_rows[r].unsqueeze(1),
                         l_rows[r].unsqueeze(1).to(torch.promote_types(q_t.dtype, torch.float32)),
                         0.0, False, scale=scale)
        dq_rows.index_add_(0, r, dq[:, 0])
        idx = call.kv_index.reshape(-1)
        dk_units.index_add_(0, idx, dk.reshape(idx.numel(), -1))
        dv_units.index_add_(0, idx, dv.reshape(idx.numel(), -1))
    return dq_t, dk_flat, dv_flat


class BlockFlashAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out and lse; backward per part as in the module doc."""

    @staticmethod
    def forward(ctx, q, k, v, plan: SplitPlan, scale: float, cdt):
        t, fold = plan.tiling, plan.fold_heads
        in_dtypes, (D, Dv) = (q.dtype, k.dtype, v.dtype), (q.shape[-1], v.shape[-1])
        q, k, v = _same_width(q.to(cdt), k.to(cdt), v.to(cdt))
        q_t = to_tiles(q, t, fold)
        k_flat, v_flat = flat_kv(k), flat_kv(v)
        work = _partial_work(plan, cdt) if _tiled_partial(plan, _native(plan, cdt)[1]) else []
        out_t, lse_t = block_flash_forward(q_t, k_flat, v_flat, plan, work, scale)
        ctx.save_for_backward(q_t, k_flat, v_flat, out_t, lse_t)
        ctx.plan, ctx.work, ctx.scale = plan, work, scale
        ctx.in_dtypes, ctx.kv_shapes = in_dtypes, (k.shape, v.shape)
        ctx.widths = (D, Dv)
        lse = from_tiles(lse_t, t, fold)
        ctx.mark_non_differentiable(lse)
        return from_tiles(out_t, t, fold)[..., :Dv].to(in_dtypes[0]), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q_t, k_flat, v_flat, out_t, lse_t = ctx.saved_tensors
        plan = ctx.plan
        D, Dv = ctx.widths
        dout_t = to_tiles(_pad(dout.to(q_t.dtype), q_t.shape[-1]), plan.tiling, plan.fold_heads)
        dq_t, dk_flat, dv_flat = block_flash_backward(q_t, k_flat, v_flat, out_t, lse_t, dout_t, plan,
                                                      ctx.work, ctx.scale)
        qd, kd, vd = ctx.in_dtypes
        dq = from_tiles(dq_t, plan.tiling, plan.fold_heads)[..., :D].to(qd)
        dk = dk_flat.reshape(ctx.kv_shapes[0])[..., :D].to(kd)
        dv = dv_flat.reshape(ctx.kv_shapes[1])[..., :Dv].to(vd)
        return dq, dk, dv, None, None, None


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def _same_width(q, k, v):
    """The flash kernel needs one head size: pad the narrower of ``D`` and ``Dv`` with zeros
    (zero features leave the logits and the kept output columns unchanged)."""
    width = max(q.shape[-1], v.shape[-1])
    return _pad(q, width), _pad(k, width), _pad(v, width)


def block_flash_attention(q, k, v, plan: SplitPlan, scale: float, compute_dtype):
    """Run the block-flash backend; ``(out, lse)`` in the public layout (``lse`` carries no
    gradient: the backend runs only calls that do not return it)."""
    return BlockFlashAttention.apply(q, k, v, plan, scale, compute_dtype)


__all__ = ["block_flash_attention", "BlockFlashAttention", "cpu_flash_ops"]
