"""NSA: fast path vs dense reference (outputs, gradients of q, k, v, gates and the learned
compressor), degenerate settings equal to plain attention, the selection rule on a hand-made
example, causality, errors, and the module."""

from __future__ import annotations

import math

import pytest
import torch

import attnlab as al
from attnlab.hybrids import BlockCompressor, NativeSparseAttention, native_sparse_attention, native_sparse_attention_reference
from attnlab.hybrids.nsa import nsa_selection
from hybrid_checks import F64, assert_causal, assert_matches_reference, causal_reference, module_matches_reference, qkv, randn

CASES = [  # Hq, Hkv, L, S, block, num_selected, window, num_local, include_first
    (2, 2, 37, 37, 4, 3, 5, 2, True),
    (4, 2, 45, 45, 8, 4, 7, 1, True),  # GQA, L not a multiple of the block
    (4, 1, 21, 33, 5, 5, 4, 2, False),  # MQA, decoding-style L < S
    (2, 2, 30, 23, 3, 4, 6, 2, True),  # L > S: the first rows see nothing
    (2, 2, 16, 16, 4, 4, 16, 0, False),  # every block selectable, no forced block
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("compress", ["mean", "mlp"])
def test_fast_matches_reference(case, compress):
    Hq, Hkv, L, S, block, n, w, nl, first = case
    q, k, v = qkv(2, Hq, Hkv, L, S, 8, 6)
    gates = randn(2, Hq, L, 3, gen=torch.Generator().manual_seed(1))
    ck = cv = None
    params = []
    if compress == "mlp":
        ck, cv = BlockCompressor(block, 8).double(), BlockCompressor(block, 6).double()
        params = [*ck.parameters(), *cv.parameters()]
    kw = dict(block_size=block, num_selected=n, window=w, num_local_blocks=nl, include_first=first,
              compress_k=ck, compress_v=cv)
    assert_matches_reference(lambda: native_sparse_attention(q, k, v, gates, **kw),
                             lambda: native_sparse_attention_reference(q, k, v, gates, **kw),
                             [q, k, v, gates, *params], ["q", "k", "v", "gates"] + ["phi"] * len(params))


@pytest.mark.parametrize("query_block", [4, 7, 64])
def test_query_block_selection_matches_reference(query_block):
    q, k, v = qkv(2, 4, 2, 45, 45, 8)
    gates = randn(2, 4, 45, 3, gen=torch.Generator().manual_seed(1))
    kw = dict(block_size=4, num_selected=4, window=6, query_block=query_block)
    assert_matches_reference(lambda: native_sparse_attention(q, k, v, gates, **kw),
                             lambda: native_sparse_attention_reference(q, k, v, gates, **kw), [q, k, v, gates], "qkvg")


def test_query_block_is_causal_across_query_blocks():
    """A query block shares one selection made from all its queries, so causality holds from one
    query block to the next (inside a block a later query can change an earlier one's choice)."""
    q, k, v = qkv(1, 2, 2, 40, 40, 8)
    gates = torch.rand(1, 2, 40, 3, dtype=F64)
    fn = lambda q, k, v: native_sparse_attention(q, k, v, gates, block_size=4, num_selected=3, window=5,  # noqa: E731
                                                 query_block=8)
    for cut in (8, 24, 32):
        assert_causal(fn, q, k, v, cut)


def test_separate_branch_keys_and_values():
    g = torch.Generator().manual_seed(2)
    q = randn(1, 4, 29, 8, gen=g)
    ks = tuple(randn(1, 2, 29, 8, gen=g) for _ in range(3))
    vs = tuple(randn(1, 2, 29, 8, gen=g) for _ in range(3))
    gates = randn(1, 4, 29, 3, gen=g)
    kw = dict(block_size=4, num_selected=4, window=6)
    assert_matches_reference(lambda: native_sparse_attention(q, ks, vs, gates, **kw),
                             lambda: native_sparse_attention_reference(q, ks, vs, gates, **kw),
                             [q, *ks, *vs, gates])
    # each branch reads only its own keys/values: the window branch alone ignores the others
    out_w = native_sparse_attention(q, ks, vs, torch.tensor([0.0, 0.0, 1.0], dtype=F64).expand(1, 4, 29, 3), **kw)
    want = al.attention(q, ks[2], vs[2], al.SlidingWindow(5), backend="reference")
    torch.testing.assert_close(out_w, want, rtol=1e-9, atol=1e-11)


def test_all_blocks_selected_and_wide_window_is_a_known_combination():
    """top-n = every block and a window >= S: the selected and window branches are both causal
    attention, so out = a * o_cmp + (b + c) * causal; with block_size 1 the compressed keys are
    the keys themselves, and all three are causal attention."""
    q, k, v = qkv(2, 4, 2, 26, 26, 8)
    a, b, c = 0.2, 0.5, 0.3
    gates = torch.tensor([a, b, c], dtype=F64).expand(2, 4, 26, 3)
    causal = causal_reference(q, k, v)
    out, (o_cmp, o_slc, o_win) = native_sparse_attention(q, k, v, gates, block_size=4, num_selected=7, window=26,
                                                         return_branches=True)
    torch.testing.assert_close(o_slc, causal, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(o_win, causal, rtol=1e-9, atol=1e-11)
    # compressed branch: attention over block means, visible once complete
    kc = k[:, :, :24].reshape(2, 2, 6, 4, 8).mean(3)
    vc = v[:, :, :24].reshape(2, 2, 6, 4, 8).mean(3)
    t = torch.arange(26)
    vis = (torch.arange(6)[None, :] + 1) * 4 - 1 <= t[:, None]
    want_cmp = al.attention(q, kc, vc, al.BlockSparse(vis, (1, 1)), backend="reference")
    torch.testing.assert_close(o_cmp, want_cmp, rtol=1e-9, atol=1e-11)
    assert o_cmp[:, :, :3].abs().max() == 0  # the first 3 queries see no complete block
    torch.testing.assert_close(out, a * o_cmp + (b + c) * causal, rtol=1e-9, atol=1e-11)
    out1 = native_sparse_attention(q, k, v, gates, block_size=1, num_selected=26, window=26)
    torch.testing.assert_close(out1, causal, rtol=1e-9, atol=1e-11)


def test_selection_rule_on_a_hand_made_example():
    """One query at t = 21 with blocks of 4: blocks 0..4 are complete (block 5 has started);
    forced = block 0 and the local blocks 4, 5; the remaining budget goes to the best scores."""
    t = torch.tensor([21])
    p = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]], dtype=F64).view(1, 1, 1, 5)
    lay = nsa_selection(p, t, kv_heads=1, nkb=6, block=4, num_selected=5, num_local=2, include_first=True)
    assert lay[0, 0, 0].tolist() == [True, True, False, True, True, True]
    lay = nsa_selection(p, t, kv_heads=1, nkb=6, block=4, num_selected=3, num_local=2, include_first=True)
    assert lay[0, 0, 0].tolist() == [True, False, False, False, True, True]
    # GQA: the two heads of a group sum their scores and share the choice
    p2 = torch.tensor([[0.0, 0.4, 0.0, 0.3, 0.3], [0.0, 0.0, 0.5, 0.3, 0.2]], dtype=F64).view(1, 2, 1, 5)
    # (sums 0, .4, .5, .6, .5: block 3, then the tie between 2 and 4 goes to 2; head 0 alone
    # would have taken blocks 1 and 3)
    lay = nsa_selection(p2, t, kv_heads=1, nkb=6, block=4, num_selected=3, num_local=1, include_first=False)
    assert lay[0, 0, 0].tolist() == lay[0, 1, 0].tolist() == [False, False, True, True, False, True]
    # ties go to the lower block index
    flat = torch.full((1, 1, 1, 5), 0.2, dtype=F64)
    lay = nsa_selection(flat, t, kv_heads=1, nkb=6, block=4, num_selected=3, num_local=1, include_first=False)
    assert lay[0, 0, 0].tolist() == [True, True, False, False, False, True]


def test_causal():
    q, k, v = qkv(1, 2, 2, 40, 40, 8)
    gates = torch.rand(1, 2, 40, 3, dtype=F64)
    fn = lambda q, k, v: native_sparse_attention(q, k, v, gates, block_size=4, num_selected=3, window=5)  # noqa: E731
    for cut in (1, 17, 24, 39):
        assert_causal(fn, q, k, v, cut)


def test_no_nan_when_rows_see_nothing():
    q, k, v = qkv(1, 2, 2, 12, 5, 4)
    gates = torch.ones(1, 2, 12, 3, dtype=F64)
    out = native_sparse_attention(q, k, v, gates, block_size=2, num_selected=3, window=2)
    assert torch.isfinite(out).all() and out[:, :, :7].abs().max() == 0
    ref = native_sparse_attention_reference(q, k, v, gates, block_size=2, num_selected=3, window=2)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)


def test_bad_inputs():
    q, k, v = qkv(1, 2, 2, 16, 16, 4)
    gates = torch.ones(1, 2, 16, 3, dtype=F64)
    kw = dict(block_size=4, num_selected=3, window=4)
    with pytest.raises(ValueError, match=r"num_selected=5 is larger than the number of key blocks .* = 4"):
        native_sparse_attention(q, k, v, gates, **{**kw, "num_selected": 5})
    with pytest.raises(ValueError, match=r"num_selected=2 must be at least .* = 3"):
        native_sparse_attention(q, k, v, gates, **{**kw, "num_selected": 2})
    with pytest.raises(ValueError, match=r"block_size must be an int >= 1, got block_size=0"):
        native_sparse_attention(q, k, v, gates, **{**kw, "block_size": 0})
    with pytest.raises(TypeError, match=r"window must be an int >= 1, got window=2.5"):
        native_sparse_attention(q, k, v, gates, **{**kw, "window": 2.5})
    with pytest.raises(ValueError, match=r"gates must have shape \(B, Hq, L, 3\) = \(1, 2, 16, 3\)"):
        native_sparse_attention(q, k, v, gates[..., :2], **kw)
    with pytest.raises(ValueError, match=r"triples must have 3 entries"):
        native_sparse_attention(q, (k, k), (v, v), gates, **kw)
    with pytest.raises(ValueError, match=r"compress_k must map .* to \(B, H, n, D'\)"):
        native_sparse_attention(q, k, v, gates, compress_k=lambda x: x, **kw)
    with pytest.raises(ValueError, match=r"one token axis"):
        native_sparse_attention(q.view(1, 2, 4, 4, 4), k.view(1, 2, 4, 4, 4), v.view(1, 2, 4, 4, 4), gates, **kw)
    with pytest.raises(ValueError, match=r"query_block must be an int >= 1, got query_block=0"):
        native_sparse_attention(q, k, v, gates, query_block=0, **kw)
    with pytest.raises(ValueError, match=r"compress must be 'mlp' or 'mean', got compress='max'"):
        NativeSparseAttention(16, 2, 4, 3, 4, compress="max")


@pytest.mark.parametrize("compress", ["mlp", "mean"])
def test_module_matches_reference(compress):
    torch.manual_seed(0)
    m = NativeSparseAttention(16, 4, block_size=4, num_selected=3, window=5, num_kv_heads=2, compress=compress)
    module_matches_reference(m, torch.randn(2, 27, 16))


def test_module_is_causal_and_gated_per_head():
    torch.manual_seed(0)
    m = NativeSparseAttention(16, 2, block_size=4, num_selected=3, window=5).double()
    x = torch.randn(1, 30, 16, dtype=F64)
    y = m(x)
    x2 = x.clone()
    x2[:, 20:] += 1.0
    torch.testing.assert_close(m(x2)[:, :20], y[:, :20], rtol=0, atol=1e-12)
    assert m.gate.out_features == 3 * 2 and math.isclose(m.kv_proj.out_features, 6 * 2 * 8)
