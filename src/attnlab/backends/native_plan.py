"""The lists the native block-flash kernel reads: per query tile, its key units and masks.

A query tile (a row of ``q_t.view(-1, M, D)``: batch, head or key head, tile) lists the key
units it attends, each ``unit`` consecutive keys of ``k_flat``. When key tiles are aligned in
memory (``unit`` is the key tile), every touched tile is listed, and a partial tile carries
its pattern mask (``Tq x Tk`` bits, computed once per plan from
:meth:`~attnlab.Pattern.mask` on that tile's tokens only, a bit per partial pair): the kernel then computes the whole
pattern and the tiled pass is not needed. Otherwise (``unit`` is one token) only whole tiles
are listed and the partial ones stay with the tiled backend. Rows are ordered by the key head
whose gradients they write, ``group_ptr`` bounding each head's run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASK_PAIRS_PER_STEP = 1 << 20  # pairs of partial tiles whose masks are evaluated at once


@dataclass
class NativeLists:
    rows: torch.Tensor  # (n,) query-tile rows: all of them, in order
    ptr: torch.Tensor  # (n + 1,) row i lists units[ptr[i]:ptr[i + 1]]
    units: torch.Tensor  # (nnz,) key units, rows of k_flat.view(-1, unit * D)
    mask_index: torch.Tensor  # (nnz,) -1 for a whole tile, else its mask in ``masks``
    masks: torch.Tensor  # (n_masks, Tq, ceil(unit / 8)) uint8, bit j % 8 of byte j // 8 for key j;
    # query row m of a tile uses mask row m % Tq
    group_ptr: torch.Tensor  # (n_groups + 1,) runs of rows writing one key head (run g: rows
    # [g S, (g + 1) S) of the flat keys, S keys per head)
    covers_partial: bool  # the partial tiles are listed too (no tiled pass needed)


def build_native_lists(plan) -> NativeLists:
    """The :class:`NativeLists` of a :class:`~attnlab.backends.split_plan.SplitPlan`."""
    tiling, layout, pattern = plan.tiling, plan.layout, plan.pattern
    g = tiling.geometry
    Tk = tiling.kv_tile_size
    covers_partial = plan.aligned
    whole = layout.any & layout.full & tiling.kv_tile_complete
    listed = layout.any if covers_partial else whole
    Bb, Hb, nq, nk = listed.shape
    hx = g.kv_heads if plan.fold_heads else g.q_heads
    long = dict(dtype=torch.long, device=listed.device)

    # number the partial tiles of the layout itself (shared layouts are masked once)
    partial = listed & ~whole
    mask_id = torch.full(partial.shape, -1, **long)
    n_masks = int(partial.sum())
    mask_id[partial] = torch.arange(n_masks, **long)
    masks = (_tile_masks(pattern, tiling, torch.nonzero(partial)) if n_masks
             else torch.zeros(0, 1, (plan.unit + 7) // 8, dtype=torch.uint8))

    pairs = torch.nonzero(torch.broadcast_to(listed, (g.batch, hx, nq, nk)))  # row-major: rows grouped
    b, h, qt, kt = pairs.unbind(1)
    rows_all = (b * hx + h) * nq + qt
    hkv = h if plan.fold_heads else h // g.group_size
    head = b * g.kv_heads + hkv
    if covers_partial:
        units = head * nk + kt
        mask_index = mask_id[b % Bb, h % Hb, qt, kt]
    else:  # one token per unit: the tokens of each whole tile (which holds no padding)
        units = (head[:, None] * g.kv_len + tiling.kv_token_index[kt]).reshape(-1)
        rows_all = rows_all.repeat_interleave(Tk)
        mask_index = torch.full_like(units, -1)
    # every row is listed (those with no unit get out 0, lse -inf), so outputs need no fill
    rows = torch.arange(g.batch * hx * nq, **long)
    counts = torch.bincount(rows_all, minlength=rows.numel())
    ptr = torch.cat([torch.zeros(1, **long), torch.cumsum(counts, 0)])
    per_group = nq * (1 if plan.fold_heads else g.group_size)
    group_ptr = torch.arange(0, rows.numel() + 1, per_group, **long)
    return NativeLists(rows.contiguous(), ptr, units.contiguous(), mask_index.contiguous(), masks, group_ptr,
                       covers_partial)


def _tile_masks(pattern, tiling, tiles: torch.Tensor) -> torch.Tensor:
    """``(n, Tq, ceil(Tk / 8))`` bit-packed visibility of the tiles ``(bb, hb, qt, kt)``
    (padded queries, which the output drops, are evaluated at token 0)."""
    g = tiling.geometry
    Tq, Tk = tiling.q_tile_size, tiling.kv_tile_size
    bits = 2 ** torch.arange(8, dtype=torch.uint8)
    parts = []
    step = max(1, MASK_PAIRS_PER_STEP // (Tq * Tk))
    for lo in range(0, tiles.shape[0], step):
        bb, hb, qt, kt = tiles[lo:lo + step].unbind(1)
        n = bb.numel()
        q_tok = tiling.q_token_index[qt].clamp(min=0).view(1, 1, n, Tq, 1)
        kv_tok = tiling.kv_token_index[kt].view(1, 1, n, 1, Tk)
        m = pattern.mask(bb.view(1, 1, n, 1, 1), hb.view(1, 1, n, 1, 1), q_tok, kv_tok, g)
        m = torch.broadcast_to(m, (1, 1, n, Tq, Tk))[0, 0]
        m = torch.nn.functional.pad(m, (0, -Tk % 8)).view(n, Tq, -1, 8).to(torch.uint8)
        parts.append((m * bits).sum(-1, dtype=torch.uint8))
    return torch.cat(parts).contiguous()


__all__ = ["NativeLists", "build_native_lists"]
