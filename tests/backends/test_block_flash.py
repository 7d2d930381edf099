"""The block-flash backend against the reference backend: outputs and gradients of q, k, v.

Whole tiles run on a flash kernel (every test runs twice: on attnlab's native kernel and on
PyTorch's CPU flash kernel), partial tiles on the tiled backend's masked GEMMs; the two merge by log-sum-exp, and backward evaluates each part with the global
output and lse. Compared in float64 (1e-10) on shapes that are not multiples of the tiles,
with GQA, with rows that see no key, and with layouts per head and shared by all heads.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab as al
from attnlab.backends import block_flash, registry
from attnlab.backends.block_flash import cpu_flash_ops
from attnlab.backends.native import block_flash_kernel
from attnlab.backends.registry import BlockFlashBackend
from attnlab.api import _problem
from attnlab.testing import rel_error

pytestmark = pytest.mark.skipif(cpu_flash_ops() is None, reason="this torch has no CPU flash kernel")


@pytest.fixture(autouse=True, params=["native", "aten"])
def whole_tile_kernel(request, monkeypatch):
    """Runs each test with the whole tiles on the native kernel, then on PyTorch's."""
    if request.param == "native":
        if block_flash_kernel() is None:
            pytest.skip("the native kernel did not build here")
    else:
        monkeypatch.setattr(block_flash, "native_kernel_for", lambda dtype: None)
        monkeypatch.setattr(registry, "native_kernel_for", lambda dtype: None)
    return request.param


def make_qkv(B, Hq, Hkv, L, S, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, n, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
                 for h, n in ((Hq, L), (Hkv, S), (Hkv, S)))


def compare(q, k, v, pattern, options=None, tol=1e-10):
    out = al.attention(q, k, v, pattern=pattern, backend="block_flash", options=options)
    ref = al.attention(q, k, v, pattern=pattern, backend="reference")
    assert rel_error(out, ref) < tol
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for name, a, b in zip("qkv", grads, ref_grads):
        # a gradient that is exactly zero (one visible key) is matched to round-off
        assert rel_error(a, b) < tol or (a - b).abs().max() < 1e-12, name
    return out


def doc_ids(B, n, cuts):
    ids = torch.zeros(B, n, dtype=torch.long)
    for c in cuts:
        ids[:, c:] += 1
    return ids


CASES = [
    ("causal L<S", lambda: al.Causal(), 2, 4, 2, 150, 200, None),
    ("causal L>S, empty rows", lambda: al.Causal(), 1, 2, 1, 130, 70, {"q_tile": 32, "kv_tile": 16}),
    ("window, shared layout, GQA", lambda: al.SlidingWindow(left=90, right=3), 2, 6, 2, 203, 203,
     {"q_tile": 32, "kv_tile": 16}),
    ("top-k blocks per head", lambda: al.TopKBlocks(3, 32) & al.Causal(), 2, 4, 2, 256, 256, None),
    ("top-k blocks, S not a multiple", lambda: al.TopKBlocks(2, 32) | al.Sinks(4), 1, 2, 2, 100, 111, None),
    ("document", lambda: al.Document(doc_ids(2, 200, (90, 150))), 2, 2, 1, 200, 200, None),
    ("full, padded tiles", lambda: al.Full(), 1, 3, 3, 77, 93, {"q_tile": 32, "kv_tile": 32}),
]


@pytest.mark.parametrize("name,make,B,Hq,Hkv,L,S,options", CASES, ids=[c[0] for c in CASES])
def test_matches_reference_float64(name, make, B, Hq, Hkv, L, S, options):
    q, k, v = make_qkv(B, Hq, Hkv, L, S, 16)
    out = compare(q, k, v, make(), options)
    if "empty" in name:
        assert torch.all(out[:, :, : L - S] == 0)


def test_float32_and_bfloat16_inputs():
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, k, v = make_qkv(1, 2, 2, 130, 130, 32, dtype=dtype)
        out = compare(q, k, v, al.SlidingWindow(left=64), {"q_tile": 32, "kv_tile": 16}, tol)
        assert out.dtype == dtype


@settings(max_examples=15, deadline=None)
@given(L=st.integers(1, 120), S=st.integers(1, 120), left=st.integers(0, 80), group=st.sampled_from([1, 2]),
       q_tile=st.sampled_from([8, 16, 32]), kv_tile=st.sampled_from([8, 16]))
def test_random_windows(L, S, left, group, q_tile, kv_tile):
    q, k, v = make_qkv(1, 2 * group, 2, L, S, 8, seed=L * 1000 + S)
    compare(q, k, v, al.SlidingWindow(left=left, right=2) & al.Causal(), {"q_tile": q_tile, "kv_tile": kv_tile})


def test_split_covers_every_touched_tile_once():
    q, k, v = make_qkv(1, 2, 2, 256, 256, 16)
    pattern = al.resolve_pattern(al.TopKBlocks(3, 32) & al.Causal(), q, k)
    plan = BlockFlashBackend().plan(_problem(q, k, v, pattern, None, None, False, {"q_tile": 32, "kv_tile": 32}))
    layout = pattern.block_layout(plan.tiling)
    assert plan.whole_pairs + plan.partial_pairs == int(torch.broadcast_to(layout.any, (1, 2, 8, 8)).sum())
    assert plan.partial_pairs == 2 * 8  # the diagonal tile of each query tile and head
    assert sum(c.rows.numel() * c.kv_index.shape[1] for c in plan.calls) == plan.whole_pairs


def test_auto_selection_prefers_it_only_for_mostly_whole_layouts(whole_tile_kernel):
    q, k, v = make_qkv(1, 2, 2, 1024, 1024, 16)
    mostly_whole = al.TopKBlocks(8, 64)
    assert al.explain(q, k, v, pattern=mostly_whole).backend == "block_flash"
    thin = al.SlidingWindow(left=4, right=4)
    text = al.explain(q, k, v, pattern=thin)
    assert text.reasons["block_flash"] == []
    if whole_tile_kernel == "native":  # it masks the partial tiles itself
        assert text.backend == "block_flash"
    else:
        assert text.backend == "tiled"
        assert "touched tile pairs are whole" in "; ".join(text.declined["block_flash"])
    al.attention(q, k, v, pattern=thin, backend="block_flash")  # forced, it still runs


@pytest.mark.parametrize("kwargs,expected", [
    ({"score_mod": al.Softcap(20.0)}, "score_mod"),
    ({"return_lse": True}, "return_lse"),
])
def test_refuses_what_the_kernel_cannot_do(kwargs, expected):
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16)
    with pytest.raises(ValueError, match=expected):
        al.attention(q, k, v, pattern=al.Causal(), backend="block_flash", **kwargs)


@pytest.mark.parametrize("Dv", [5, 24])
def test_value_width_different_from_head_width(Dv):
    q, k, _ = make_qkv(1, 4, 2, 90, 90, 16)
    v = torch.randn(1, 2, 90, Dv, dtype=torch.float64, requires_grad=True)
    out = compare(q, k, v, al.SlidingWindow(left=40), {"q_tile": 16, "kv_tile": 16})
    assert out.shape[-1] == Dv


def test_two_dimensional_neighborhood():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 11, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    compare(q, k, v, al.Neighborhood(kernel_size=(5, 5)), {"q_tile": (3, 4), "kv_tile": (1, 11)})


def test_static_patterns_reuse_their_split_plan():
    q, k, v = make_qkv(1, 2, 2, 300, 300, 16)
    pattern = al.SlidingWindow(left=100, right=0)
    first = BlockFlashBackend().plan(_problem(q, k, v, pattern, None, None, False, None))
    again = BlockFlashBackend().plan(_problem(q, k, v, al.SlidingWindow(left=100, right=0), None, None, False, None))
    assert again is first
    other = BlockFlashBackend().plan(_problem(q, k, v, al.SlidingWindow(left=99, right=0), None, None, False, None))
    assert other is not first


@pytest.mark.parametrize("pattern", [al.SlidingWindow(left=100), al.TopKBlocks(4, 64) & al.Causal()],
                         ids=["window", "top-k blocks"])
def test_working_set_is_below_l_by_s(pattern):
    """No tensor of the forward or backward holds L x S / 4 elements (the native kernel's own
    buffers hold one query tile against a block of keys; partial masks are a bit per pair)."""
    from attnlab.testing import MaxNumel

    L = 3072
    q, k, v = make_qkv(1, 1, 1, L, L, 16, dtype=torch.float32)
    with MaxNumel() as probe:
        out = al.attention(q, k, v, pattern=pattern, backend="block_flash")
        out.sum().backward()
    assert probe.max_numel < L * L // 4, probe.max_numel


def test_explain_names_the_kernel_that_runs(whole_tile_kernel):
    q, k, v = make_qkv(1, 2, 2, 256, 256, 32, dtype=torch.float32)
    text = str(al.explain(q, k, v, pattern=al.SlidingWindow(40), backend="block_flash"))
    if whole_tile_kernel == "native":
        assert "kernel: attnlab native (C++), torch.float32; partial tiles masked in the same kernel" in text
    else:
        assert "kernel: PyTorch's CPU flash kernel" in text
