"""attnlab's native block-sparse flash kernel on its own lists, against dense softmax per tile.

Each query tile attends the union of its listed key units, masked per unit; compared in
float64 (1e-12) with the gradients of q, k and v, on rows that see no key, with the unit one
token or a whole tile, and on both backward schedules (a key head per task, and per-thread
copies of dk/dv when there are fewer heads than threads).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from attnlab.backends.native import block_flash_kernel, unavailable_reason


def test_builds_where_a_compiler_is_present():
    if os.environ.get("ATTNLAB_NATIVE") == "0" or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("native kernels disabled or no compiler")
    assert block_flash_kernel() is not None, unavailable_reason()


@pytest.fixture(scope="module")
def native():
    module = block_flash_kernel()
    if module is None:
        pytest.skip(f"native kernel unavailable: {unavailable_reason()}")
    return module


def random_lists(n_rows, n_units, unit, M, Tq, max_listed, p_mask, seed):
    """Row ids (a subset, in order), their unit lists and per-unit masks; some masks hide
    everything, some rows list nothing."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.nonzero(torch.rand(n_rows, generator=g) < 0.8).view(-1)
    lists, mask_ids, masks = [], [], []
    for _ in rows.tolist():
        c = int(torch.randint(0, max_listed + 1, (1,), generator=g))
        units = torch.randperm(n_units, generator=g)[:c]
        ids = torch.full((c,), -1, dtype=torch.long)
        for j in range(c):
            if torch.rand(1, generator=g) < p_mask:
                m = (torch.rand(Tq, unit, generator=g) < 0.6).to(torch.uint8)
                if torch.rand(1, generator=g) < 0.2:
                    m.zero_()
                ids[j] = len(masks)
                masks.append(m)
        lists.append(units)
        mask_ids.append(ids)
    ptr = torch.tensor([0] + [len(u) for u in lists]).cumsum(0)
    units = torch.cat(lists) if lists else torch.zeros(0, dtype=torch.long)
    mask_index = torch.cat(mask_ids) if mask_ids else torch.zeros(0, dtype=torch.long)
    masks = torch.stack(masks) if masks else torch.zeros(0, Tq, unit, dtype=torch.uint8)
    return rows, ptr, units.contiguous(), mask_index.contiguous(), masks.contiguous()


def pack(masks: torch.Tensor) -> torch.Tensor:
    """Bit-pack ``(n, Tq, unit)`` 0/1 masks along the keys, bit j % 8 of byte j // 8."""
    n, Tq, unit = masks.shape
    padded = torch.nn.functional.pad(masks, (0, -unit % 8)).view(n, Tq, -1, 8).long()
    return (padded << torch.arange(8)).sum(-1).to(torch.uint8).contiguous()


def dense_reference(q, k, v, rows, ptr, units, mask_index, masks, unit, scale):
    """Per listed tile: logits over its gathered keys, masks applied, softmax (empty rows 0)."""
    R, M, D = q.shape
    Tq = masks.shape[1]
    out = torch.zeros(R, M, v.shape[1], dtype=q.dtype)
    lse = torch.full((R, M), float("-inf"), dtype=q.dtype)
    outs = []
    for i, r in enumerate(rows.tolist()):
        lo, hi = int(ptr[i]), int(ptr[i + 1])
        keys = (units[lo:hi, None] * unit + torch.arange(unit)).reshape(-1)
        s = q[r] @ k[keys].T * scale
        visible = torch.ones(M, keys.numel(), dtype=torch.bool)
        for j in range(hi - lo):
            if mask_index[lo + j] >= 0:
                visible[:, j * unit:(j + 1) * unit] = masks[mask_index[lo + j]].bool().repeat(M // Tq, 1)
        s = s.masked_fill(~visible, float("-inf"))
        l_r = torch.logsumexp(s, -1)
        p = torch.exp(s - l_r[:, None]).nan_to_num(0.0)
        outs.append((r, p @ v[keys], l_r))
    for r, o, l_r in outs:
        out = out.index_put((torch.tensor([r]),), o[None])
        lse = lse.index_put((torch.tensor([r]),), l_r[None])
    return out, lse


@pytest.mark.parametrize("unit,M,Tq,heads", [(16, 16, 16, 3), (1, 8, 8, 2), (12, 24, 8, 1)],
                         ids=["tile units", "token units", "folded group rows, one head, unit not a byte multiple"])
def test_forward_and_backward_match_dense(native, unit, M, Tq, heads):
    rows_per_head, units_per_head, D, Dv, scale = 5, 9, 12, 7, 0.3
    n_rows, n_units = heads * rows_per_head, heads * units_per_head
    rows, ptr, units, mask_index, masks = random_lists(n_rows, units_per_head, unit, M, Tq, 6, 0.4, seed=unit)
    # keep each row's units inside its own key head, so heads write disjoint dk/dv
    head_of_row = rows // rows_per_head
    units = units + torch.repeat_interleave(head_of_row, ptr.diff()) * units_per_head
    g = torch.Generator().manual_seed(1)
    q = torch.randn(n_rows, M, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(n_units * unit, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(n_units * unit, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    ref_out, ref_lse = dense_reference(q, k, v, rows, ptr, units, mask_index, masks, unit, scale)

    out = torch.zeros(n_rows, M, Dv, dtype=torch.float64)
    lse = torch.full((n_rows, M), float("-inf"), dtype=torch.float64)
    native.forward(q.detach(), k.detach(), v.detach(), rows, ptr, units, mask_index, pack(masks), unit, scale, out,
                   lse)
    assert torch.allclose(out, ref_out, atol=1e-12, rtol=0)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-12, rtol=0)
    assert torch.isinf(ref_lse).any(), "the case should hold rows that see no key"

    dout = torch.randn(n_rows, M, Dv, generator=g, dtype=torch.float64)
    ref = torch.autograd.grad(ref_out, (q, k, v), dout)
    counts = torch.bincount(head_of_row, minlength=heads)
    # one thread and a run per head: a head per task; two threads and one run: per-thread copies
    schedules = {"a head per task": (1, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])),
                 "per-thread copies": (2, torch.tensor([0, rows.numel()]))}
    threads = torch.get_num_threads()
    try:
        for name, (n_threads, group_ptr) in schedules.items():
            torch.set_num_threads(n_threads)
            grads = [torch.zeros_like(x) for x in (q, k, v)]
            native.backward(q.detach(), k.detach(), v.detach(), out, dout, lse, rows, ptr, units, mask_index,
                            pack(masks), group_ptr, unit, scale, False, *grads)
            for label, a, b in zip("qkv", grads, ref):
                assert torch.allclose(a, b, atol=1e-11, rtol=0), (name, label)
            # overwrite sets the listed rows of dq and all of dk, dv instead of adding to them
            dq, dk, dv = (torch.full_like(x, 7.0) for x in (q, k, v))
            native.backward(q.detach(), k.detach(), v.detach(), out, dout, lse, rows, ptr, units, mask_index,
                            pack(masks), group_ptr, unit, scale, True, dq, dk, dv)
            assert torch.allclose(dq[rows], ref[0][rows], atol=1e-11, rtol=0), name
            assert torch.allclose(dk, ref[1], atol=1e-11, rtol=0), name
            assert torch.allclose(dv, ref[2], atol=1e-11, rtol=0), name
    finally:
        torch.set_num_threads(threads)


def test_float32_agrees_with_float64(native):
    rows, ptr, units, mask_index, masks = random_lists(6, 40, 16, 16, 16, 30, 0.2, seed=3)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((6, 16, 32), (640, 32), (640, 32)))
    results = []
    for dt in (torch.float32, torch.float64):
        out = torch.zeros(6, 16, 32, dtype=dt)
        lse = torch.full((6, 16), float("-inf"), dtype=dt)
        native.forward(q.to(dt), k.to(dt), v.to(dt), rows, ptr, units, mask_index, pack(masks), 16, 0.2, out, lse)
        results.append(out.double())
    assert torch.allclose(results[0], results[1], atol=1e-5)


def test_rejects_inconsistent_lists(native):
    q, k, v = torch.zeros(2, 4, 8), torch.zeros(16, 8), torch.zeros(16, 8)
    out, lse = torch.zeros(2, 4, 8), torch.zeros(2, 4)
    no_masks = torch.zeros(0, 4, 1, dtype=torch.uint8)
    ok = dict(rows=torch.tensor([0, 1]), ptr=torch.tensor([0, 1, 2]), units=torch.tensor([0, 3]),
              mask_index=torch.tensor([-1, -1]))

    def call(**changes):
        a = {**ok, **changes}
        native.forward(q, k, v, a["rows"], a["ptr"], a["units"], a["mask_index"], no_masks, 4, 1.0, out, lse)

    call()
    for changes, message in (({"units": torch.tensor([0, 4])}, "key unit out of range"),
                             ({"rows": torch.tensor([0, 2])}, "row id out of range"),
                             ({"ptr": torch.tensor([0, 2, 1])}, "ptr"),
                             ({"mask_index": torch.tensor([-1, 0])}, "mask index out of range"),
                             ({"units": torch.tensor([0, 3], dtype=torch.int32)}, "int64")):
        with pytest.raises(RuntimeError, match=message):
            call(**changes)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        native.forward(q.half(), k.half(), v.half(), ok["rows"], ok["ptr"], ok["units"], ok["mask_index"], no_masks,
                       4, 1.0, out.half(), lse.half())
    with pytest.raises(RuntimeError, match="unit must be >= 1"):  # checked before any division by it
        native.forward(q, k, v, ok["rows"], ok["ptr"], ok["units"], ok["mask_index"], no_masks, 0, 1.0, out, lse)
