"""LinearEstimateTopK (SEA): the estimate and the chosen blocks re-derived by hand, exact
attention over them, degenerate and causal settings, no L x S tensor, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from routing_checks import TOL, assert_exact_over_selection, assert_layout_agrees, perturbed_after

import attnlab as al
from attnlab.geometry import check_qkv
from attnlab.patterns import BlockSparse, KeySet, resolve_pattern
from attnlab.patterns.linear_estimate import LinearEstimateTopK
from attnlab.testing import MaxNumel, dense_mask, random_qkv

TILES = [((16,), (16,)), ((7,), (5,)), ((64,), (16,))]


def _selection_by_hand(q, k, k_blocks, bq, bk, phi, causal=False):
    """Per (b, h, query block): mean over its queries of the normalised linear-attention mass
    of every key block, with loops; local block (that of the first query) forced, counted in k."""
    B, Hq, L, _ = q.shape
    G = Hq // k.shape[1]
    S = k.shape[2]
    nq, nk = math.ceil(L / bq), math.ceil(S / bk)
    off = S - L
    keep = torch.zeros(B, Hq, nq, nk, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            kk = phi(k[b, h // G])
            ksum = [kk[c * bk:(c + 1) * bk].sum(0) for c in range(nk)]
            for r in range(nq):
                rows = range(r * bq, min(L, (r + 1) * bq))
                cand = [c for c in range(nk) if not causal or c * bk <= rows[-1] + off]
                first = min(max(r * bq + off, 0), S - 1)
                local = first // bk if rows[-1] + off >= 0 else None
                others = [c for c in cand if c != local]
                score = {c: 0.0 for c in others}
                for i in rows:
                    fq = phi(q[b, h, i])
                    z = sum(float(fq @ ksum[c]) for c in others)
                    for c in others:
                        score[c] += float(fq @ ksum[c]) / z / len(rows)
                ranked = sorted(others, key=lambda c: -score[c])
                chosen = ([local] if local in cand else []) + ranked
                keep[b, h, r, chosen[:k_blocks]] = True
    return keep


ELU1 = lambda x: F.elu(x) + 1


@pytest.mark.parametrize("causal", [False, True])
def test_chosen_blocks_are_the_top_estimated_masses_by_hand(causal):
    q, k, _ = random_qkv(B=1, Hq=2, Hkv=1, L=45, S=45 if causal else 61)
    pat = LinearEstimateTopK(3, 8)
    static = resolve_pattern(pat & al.Causal() if causal else pat, q, k)
    lay = (static.parts[0] if causal else static).layout
    assert torch.equal(lay, _selection_by_hand(q, k, 3, 8, 8, ELU1, causal))


def test_relu_map_and_a_callable_map():
    q, k, _ = random_qkv(B=1, Hq=2, Hkv=2, L=40)
    for fm, fn in (("relu", torch.relu), (torch.exp, torch.exp)):
        lay = resolve_pattern(LinearEstimateTopK(2, (8, 8), fm), q, k).layout
        assert torch.equal(lay, _selection_by_hand(q, k, 2, 8, 8, fn))


def test_every_query_weighs_the_same_and_the_local_block_is_out_of_the_normaliser():
    """Hand-built: query 0 is 100x larger and prefers key block 1, queries 1-3 prefer block 2.
    Averaging normalised estimates lets the three win (unnormalised sums would pick block 1).
    With local=True the local block 0 holds keys that queries 1-3 like a lot; left in the
    normaliser it would crush their preference for block 2."""
    def qk(local_keys):
        q = torch.tensor([[100.0, 0.0]] + [[0.0, 1.0]] * 3 + [[1.0, 1.0]] * 12, dtype=torch.float64)
        k = torch.tensor([local_keys] * 4 + [[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4 + [[0.1, 0.1]] * 4,
                         dtype=torch.float64)
        return q.view(1, 1, 16, 2), k.view(1, 1, 16, 2)

    identity = lambda x: x
    q, k = qk([0.1, 0.1])
    lay = resolve_pattern(LinearEstimateTopK(1, 4, identity, local=False), q, k).layout
    assert lay[0, 0, 0].tolist() == [False, False, True, False]
    q, k = qk([0.0, 50.0])
    lay = resolve_pattern(LinearEstimateTopK(2, 4, identity), q, k).layout
    assert lay[0, 0, 0].tolist() == [True, False, True, False]


def test_estimate_is_block_sums_of_feature_dot_products():
    q, k, _ = random_qkv(B=1, Hq=2, Hkv=1, L=10, S=21)
    pat = LinearEstimateTopK(1, 4)
    from attnlab.patterns.content import SelectionContext
    g = check_qkv(q, k, k)
    est = pat.estimate(SelectionContext(q, k, g, 8 ** -0.5))
    full = ELU1(q) @ ELU1(k.repeat_interleave(2, 1)).transpose(-1, -2)  # (1, 2, 10, 21), small
    want = torch.stack([full[..., c * 4:(c + 1) * 4].sum(-1) for c in range(6)], -1)
    torch.testing.assert_close(est, want, **TOL)


@pytest.mark.parametrize("make", [
    lambda: LinearEstimateTopK(3, 16),
    lambda: LinearEstimateTopK(2, 32) & al.Causal(),
    lambda: LinearEstimateTopK(3, (16, 32), per_query=True) & al.Causal(),
    lambda: LinearEstimateTopK(2, 16, "relu", local=False) | al.SlidingWindow(8),
    lambda: (LinearEstimateTopK(2, 16) | al.patterns.TopKBlocks(1, 16)) & al.Causal(),
], ids=["plain", "causal", "per-query-causal", "relu-or-window", "or-topk-causal"])
def test_attention_over_the_estimated_blocks_is_exact(make):
    q, k, v = random_qkv(L=150, grad=True)
    static = assert_exact_over_selection(make(), q, k, v)
    assert_layout_agrees(static, q, k, TILES)


def test_exact_with_a_score_mod_and_bottom_right_causal_cross_attention():
    q, k, v = random_qkv(L=70, S=150, grad=True)
    _, lse = al.attention(q, k, v, pattern=LinearEstimateTopK(1, 32) & al.Causal(), return_lse=True)
    assert torch.isfinite(lse).all()
    assert_exact_over_selection(LinearEstimateTopK(2, 32) & al.Causal(), q, k, v, score_mod=al.ALiBi(4))


def test_results_are_block_layouts_or_key_sets():
    q, k, _ = random_qkv(L=64)
    assert isinstance(resolve_pattern(LinearEstimateTopK(2, 16), q, k), BlockSparse)
    assert isinstance(resolve_pattern(LinearEstimateTopK(2, 16, per_query=True), q, k), KeySet)


def test_all_blocks_is_dense_and_causal():
    q, k, v = random_qkv(L=100)
    n = math.ceil(100 / 16)
    torch.testing.assert_close(al.attention(q, k, v, pattern=LinearEstimateTopK(n, 16)), al.attention(q, k, v), **TOL)
    torch.testing.assert_close(al.attention(q, k, v, pattern=LinearEstimateTopK(n, 16) & al.Causal()),
                               al.attention(q, k, v, pattern=al.Causal()), **TOL)


def test_causal_selection_ignores_later_keys():
    """With & Causal() and equal blocks, the local block is forced and left out of the
    normaliser, so new keys after position 44 (inside block 2) change no earlier output."""
    q, k, v = random_qkv(L=128)
    pat = LinearEstimateTopK(2, 16) & al.Causal()
    out = al.attention(q, k, v, pattern=pat)
    k2, v2 = perturbed_after(44, k, v)
    out2 = al.attention(q, k2, v2, pattern=pat)
    torch.testing.assert_close(out2[:, :, :44], out[:, :, :44], **TOL)
    a, b = resolve_pattern(pat, q, k).parts[0].layout, resolve_pattern(pat, q, k2).parts[0].layout
    assert not torch.equal(a, b)


def test_causal_selection_ignores_later_keys_hand_built():
    """Query block 2 (queries 8-11) picks one of blocks 0 / 1 besides its local block 2; keys 10
    and 11 are hidden from queries 8 and 9. Making them huge must not change block 2's pick."""
    q = torch.tensor([[1.0, 1.0]] * 8 + [[100.0, 0.0]] + [[0.0, 1.0]] * 3, dtype=torch.float64).view(1, 1, 12, 2)
    k = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4 + [[0.1, 0.1]] * 4, dtype=torch.float64).view(1, 1, 12, 2)
    v = torch.randn(1, 1, 12, 3, dtype=torch.float64)
    pat = LinearEstimateTopK(2, 4, lambda x: x) & al.Causal()
    k2 = k.clone()
    k2[0, 0, 10:] = torch.tensor([0.0, 50.0])
    a, b = (resolve_pattern(pat, q, kk).parts[0].layout[0, 0, 2].tolist() for kk in (k, k2))
    assert a == b == [False, True, True]
    torch.testing.assert_close(al.attention(q, k2, v, pattern=pat)[:, :, :10], al.attention(q, k, v, pattern=pat)[:, :, :10],
                               **TOL)


def test_selection_never_forms_l_by_s():
    L = 2048
    q, k, _ = random_qkv(B=1, Hq=2, Hkv=1, L=L, dtype=torch.float32)
    with MaxNumel() as probe:
        resolve_pattern(LinearEstimateTopK(4, 64) & al.Causal(), q, k)
    assert probe.max_numel <= 2 * L * (L // 64)  # the (B, Hq, L, nKb) estimate


def test_errors():
    q, k, v = random_qkv(L=40)
    with pytest.raises(ValueError, match=r"k=4 is larger than the number of key blocks .* = 3"):
        al.attention(q, k, v, pattern=LinearEstimateTopK(4, 16))
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        LinearEstimateTopK(0, 16)
    with pytest.raises(ValueError, match="feature_map must be one of"):
        LinearEstimateTopK(1, 16, "softmax")
    with pytest.raises(TypeError, match="feature_map must be a string or a callable"):
        LinearEstimateTopK(1, 16, 3)
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        LinearEstimateTopK(1, 0)
    assert dense_mask(resolve_pattern(LinearEstimateTopK(3, 16), q, k), check_qkv(q, k, v)).all()
