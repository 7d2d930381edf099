"""HierarchicalTopK (HiP): the tree search re-derived with plain recursion, equality with
TopKBlocks when the search starts at the blocks, exact attention over the result, degenerate
and causal settings, errors."""

import math

import pytest
import torch
from routing_checks import TOL, assert_exact_over_selection, assert_layout_agrees, perturbed_after

import attnlab as al
from attnlab.patterns import TopKBlocks, resolve_pattern
from attnlab.patterns.hierarchical_topk import HierarchicalTopK, start_level
from attnlab.testing import MaxNumel, random_qkv

TILES = [((16,), (16,)), ((7,), (5,)), ((64,), (16,))]
NEG = float("-inf")


def _search_by_hand(q, k, K, bq, bk, br, causal=False, local=True, allowed=None):
    """The documented search with lists and recursion, one (batch, head, query block) at a time
    (``allowed``: an optional (Bb, Hb, nq, nk) block layout the search is restricted to)."""
    B, Hq, L, D = q.shape
    G = Hq // k.shape[1]
    S = k.shape[2]
    nq, nk = math.ceil(L / bq), math.ceil(S / bk)
    off = S - L
    keep = torch.zeros(B, Hq, nq, nk, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            pk = [k[b, h // G, c * bk:(c + 1) * bk].mean(0) for c in range(nk)]
            for r in range(nq):
                rows = list(range(r * bq, min(L, (r + 1) * bq)))
                pq = q[b, h, rows].mean(0)
                scores = [float(pq @ pk[c]) / math.sqrt(D) for c in range(nk)]
                cand = [c for c in range(nk) if (not causal or c * bk <= rows[-1] + off)
                        and (allowed is None or allowed[b % allowed.shape[0], h % allowed.shape[1], r, c])]
                loc = min(max(rows[0] + off, 0), S - 1) // bk if local and rows[-1] + off >= 0 else None
                elig = [c for c in cand if c != loc]

                def rep(a, size, elig=elig, scores=scores):
                    inside = [c for c in elig if a <= c < a + size]
                    return scores[inside[(len(inside) - 1) // 2]] if inside else NEG

                def score(a, m, rep=rep):
                    if m == 0:
                        return rep(a, 1)
                    return max(rep(a + i * br ** (m - 1), br ** (m - 1)) for i in range(br))

                m = start_level(nk, K, br)
                spans = [i * br ** m for i in range(math.ceil(nk / br ** m))]
                while True:
                    ranked = sorted(spans, key=lambda a: -score(a, m))[:K]
                    if m == 0:
                        break
                    m -= 1
                    spans = [a + i * br ** m for a in ranked for i in range(br)]
                leaves = sorted((a for a in ranked if score(a, 0) > NEG), key=lambda a: -score(a, 0))
                chosen = ([loc] if loc in cand else []) + leaves
                keep[b, h, r, chosen[:K]] = True
    return keep


def test_start_level():
    assert start_level(19, 3, 2) == 2  # ceil(19 / 4) = 5 <= 6 spans
    assert start_level(19, 3, 3) == 1  # ceil(19 / 3) = 7 <= 9
    assert start_level(6, 3, 2) == 0
    assert start_level(1000, 1, 2) == 9


@pytest.mark.parametrize("K,br,causal,local,S", [
    (3, 2, False, False, 149), (3, 3, False, True, 149), (2, 2, True, True, 149), (4, 2, True, True, 190),
    (2, 2, False, False, 149), (2, 3, True, True, 149),  # children of 4 and of 3 blocks: middle != first
])
def test_search_matches_the_recursive_definition(K, br, causal, local, S):
    L = 149
    q, k, _ = random_qkv(B=2, Hq=3, Hkv=1, L=L, S=S)
    pat = HierarchicalTopK(K, 8, br, local=local)
    static = resolve_pattern(pat & al.Causal() if causal else pat, q, k)
    lay = (static.parts[0] if causal else static).layout
    want = _search_by_hand(q, k, K, 8, 8, br, causal, local)
    assert torch.equal(lay, want)
    assert (lay.sum(-1) <= K).all() and (lay.sum(-1) >= 1).all()


@pytest.mark.parametrize("shape", [(1, 2), (2, 1), (2, 2)])
def test_search_inside_a_per_batch_or_per_head_block_layout(shape):
    q, k, _ = random_qkv(B=2, Hq=2, Hkv=1, L=149)
    allowed = torch.rand(*shape, 19, 19, generator=torch.Generator().manual_seed(4)) < 0.6
    static = resolve_pattern(HierarchicalTopK(2, 8) & al.BlockSparse(allowed, 8), q, k)
    assert torch.equal(static.parts[0].layout, _search_by_hand(q, k, 2, 8, 8, 2, allowed=allowed))


def test_search_starting_at_the_blocks_is_top_k_blocks():
    q, k, _ = random_qkv(L=150)
    for K, br, local in [(4, 3, True), (5, 2, False), (10, 2, True)]:  # 10 blocks of 16 <= K * br
        for wrap in (lambda p: p, lambda p: p & al.Causal()):
            a = resolve_pattern(wrap(HierarchicalTopK(K, 16, br, local=local)), q, k)
            b = resolve_pattern(wrap(TopKBlocks(K, 16, local=local)), q, k)
            a, b = (getattr(x, "parts", [x])[0].layout for x in (a, b))
            assert torch.equal(a, b)


def test_search_finds_a_planted_run_of_blocks_and_can_miss_a_lone_block():
    """Like HiP, the search relies on nearby keys scoring alike: a run of strong blocks is
    found from 64 blocks with 2 * 2 * log2(64) block scores, a lone strong block whose span's
    representatives score low can be missed."""
    q, k, _ = random_qkv(B=1, Hq=1, Hkv=1, L=64, S=64 * 16)
    target = q[0, 0, :16].mean(0)
    run = k.clone()
    run[0, 0, 34 * 16:46 * 16] = 4 * target / target.norm()  # blocks 34..45 of 64
    lay = resolve_pattern(HierarchicalTopK(2, 16, 2, local=False), q, run).layout[0, 0, 0]
    assert lay.nonzero().flatten().tolist() in [[a, b] for a in range(34, 46) for b in range(a + 1, 46)]
    lone = k.clone()
    lone[0, 0, 37 * 16:38 * 16] = 4 * target / target.norm()
    assert not resolve_pattern(HierarchicalTopK(2, 16, 2, local=False), q, lone).layout[0, 0, 0, 37]
    assert resolve_pattern(TopKBlocks(2, 16, local=False), q, lone).layout[0, 0, 0, 37]


@pytest.mark.parametrize("make", [
    lambda: HierarchicalTopK(2, 16),
    lambda: HierarchicalTopK(3, 8, 3) & al.Causal(),
    lambda: HierarchicalTopK(2, (16, 8), per_query=True) & al.Causal(),
    lambda: HierarchicalTopK(2, 16, local=False) | al.SlidingWindow(8),
    lambda: HierarchicalTopK(1, 8) & al.patterns.SlidingWindow(64) & al.Causal(),
], ids=["plain", "causal-b3", "per-query-causal", "or-window", "and-window-causal"])
def test_attention_over_the_found_blocks_is_exact(make):
    q, k, v = random_qkv(L=150, grad=True)
    static = assert_exact_over_selection(make(), q, k, v)
    assert_layout_agrees(static, q, k, TILES)


def test_exact_with_a_score_mod_and_cross_attention():
    q, k, v = random_qkv(L=70, S=150, grad=True)
    assert_exact_over_selection(HierarchicalTopK(2, 16) & al.Causal(), q, k, v, score_mod=al.Softcap(2.0))


def test_all_blocks_is_dense_and_causal():
    q, k, v = random_qkv(L=100)
    n = math.ceil(100 / 16)
    torch.testing.assert_close(al.attention(q, k, v, pattern=HierarchicalTopK(n, 16)), al.attention(q, k, v), **TOL)
    torch.testing.assert_close(al.attention(q, k, v, pattern=HierarchicalTopK(n, 16, 3) & al.Causal()),
                               al.attention(q, k, v, pattern=al.Causal()), **TOL)


def test_causal_search_ignores_later_keys():
    q, k, v = random_qkv(L=256)
    pat = HierarchicalTopK(2, 16) & al.Causal()  # 16 blocks: the search starts at level 2
    out = al.attention(q, k, v, pattern=pat)
    k2, v2 = perturbed_after(100, k, v)  # inside block 6
    torch.testing.assert_close(al.attention(q, k2, v2, pattern=pat)[:, :, :100], out[:, :, :100], **TOL)
    a, b = resolve_pattern(pat, q, k).parts[0].layout, resolve_pattern(pat, q, k2).parts[0].layout
    assert not torch.equal(a, b)


def test_causal_search_ignores_hidden_keys_of_the_local_block_hand_built():
    """16 blocks of 8, query block 12 (local), K=2, branching 2: the search starts with spans of
    4 blocks scored through the first block of each half. The best visible block 5 is found
    through span [4, 8). Keys 100..103 of the local block are hidden from queries 96..99;
    were the local block eligible, making them huge would push span [12, 16) in, [4, 8) out,
    and block 0 instead of 5 would be chosen."""
    q = torch.zeros(1, 1, 128, 4, dtype=torch.float64)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 128, 4, dtype=torch.float64)
    for block, value in ((0, 1.0), (4, 0.8), (5, 1.8), (8, 0.2)):
        k[0, 0, 8 * block:8 * block + 8, 0] = value
    pat = HierarchicalTopK(2, 8, 2) & al.Causal()
    k2 = k.clone()
    k2[0, 0, 100:104, 0] = 100.0
    for kk in (k, k2):
        row = resolve_pattern(pat, q, kk).parts[0].layout[0, 0, 12]
        assert row.nonzero().flatten().tolist() == [5, 12]


def test_selection_never_forms_more_than_the_pooled_inputs():
    L = 4096
    q, k, _ = random_qkv(B=1, Hq=2, Hkv=1, L=L, dtype=torch.float32)
    with MaxNumel() as probe:
        resolve_pattern(HierarchicalTopK(4, 64) & al.Causal(), q, k)
    assert probe.max_numel <= 2 * L * 8  # the keys repeated to the query heads (B, Hq, S, D)


def test_errors():
    q, k, v = random_qkv(L=40)
    with pytest.raises(ValueError, match=r"k=4 is larger than the number of key blocks .* = 3"):
        al.attention(q, k, v, pattern=HierarchicalTopK(4, 16))
    with pytest.raises(ValueError, match="branching must be an int >= 2"):
        HierarchicalTopK(2, 16, 1)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        HierarchicalTopK(0, 16)
    with pytest.raises(TypeError, match="local must be a bool"):
        HierarchicalTopK(1, 16, local=1)
