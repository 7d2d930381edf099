"""RegionRouting / RegionMask (BiFormer) on 1-, 2- and 3-D grids: the routing re-derived by hand,
exact attention over the kept regions, exact layouts, degenerate and causal settings, errors."""

import itertools
import math

import pytest
import torch
from routing_checks import TOL, assert_exact_over_selection, assert_layout_agrees, perturbed_after

import attnlab as al
from attnlab.backends.registry import TiledBackend
from attnlab.geometry import check_qkv
from attnlab.patterns import resolve_pattern
from attnlab.patterns.region_routing import RegionMask, RegionRouting
from attnlab.testing import dense_mask, random_qkv


def _grid_qkv(shape, B=2, Hq=4, Hkv=2, D=8, seed=0, grad=False, kv_shape=None):
    g = torch.Generator().manual_seed(seed)
    kv_shape = kv_shape or shape
    make = lambda H, s: torch.randn(B, H, *s, D, generator=g, dtype=torch.float64).requires_grad_(grad)
    return make(Hq, shape), make(Hkv, kv_shape), make(Hkv, kv_shape)


def _routing_by_hand(q, k, region, top_k):
    """Region means with explicit loops over coordinates, then the top_k affinities per row."""
    B, Hq = q.shape[:2]
    G = Hq // k.shape[1]
    qs, ks = q.shape[2:-1], k.shape[2:-1]

    def means(x, shape, h):
        grid = [n // r for n, r in zip(shape, region)]
        out = []
        for cell in itertools.product(*[range(n) for n in grid]):
            pts = itertools.product(*[range(c * r, (c + 1) * r) for c, r in zip(cell, region)])
            out.append(torch.stack([x[h][p] for p in pts]).mean(0))
        return torch.stack(out)

    keep = []
    for b in range(B):
        rows = []
        for h in range(Hq):
            A = means(q[b], qs, h) @ means(k[b], ks, h // G).T
            rows.append(torch.zeros(A.shape, dtype=torch.bool).scatter_(-1, A.topk(top_k, -1).indices, True))
        keep.append(torch.stack(rows))
    return torch.stack(keep)


def _token_mask(keep, region, q_shape, kv_shape):
    """Dense (B, H, L, S) mask from region keeps, coordinate by coordinate."""
    def rid(coord, shape):
        grid = [n // r for n, r in zip(shape, region)]
        out = 0
        for c, r, n in zip(coord, region, grid):
            out = out * n + c // r
        return out
    qr = torch.tensor([rid(c, q_shape) for c in itertools.product(*map(range, q_shape))])
    kr = torch.tensor([rid(c, kv_shape) for c in itertools.product(*map(range, kv_shape))])
    return keep[:, :, qr][:, :, :, kr]


@pytest.mark.parametrize("shape,region,top_k", [((24,), (4,), 2), ((6, 9), (2, 3), 3), ((4, 4, 6), (2, 2, 3), 2)])
def test_kept_regions_are_the_top_k_region_affinities_by_hand(shape, region, top_k):
    q, k, _ = _grid_qkv(shape, B=1, Hq=2, Hkv=1)
    static = resolve_pattern(RegionRouting(region, top_k), q, k)
    keep = _routing_by_hand(q, k, region, top_k)
    assert torch.equal(static.keep, keep)
    assert torch.equal(dense_mask(static, check_qkv(q, k, k)), _token_mask(keep, region, shape, shape))


@pytest.mark.parametrize("shape,region,top_k,extra", [
    ((96,), 8, 3, None),
    ((96,), (12,), 2, al.Causal()),
    ((12, 18), (3, 6), 3, None),
    ((12, 18), (4, 3), 4, al.Causal()),
    ((12, 18), (3, 3), 2, al.Neighborhood((3, 5))),
    ((4, 6, 6), (2, 3, 2), 3, None),
], ids=["1d", "1d-causal", "2d", "2d-causal", "2d-or-neighborhood", "3d"])
def test_attention_over_the_kept_regions_is_exact(shape, region, top_k, extra):
    q, k, v = _grid_qkv(shape, grad=True)
    pat = RegionRouting(region, top_k)
    if isinstance(extra, al.Causal):
        pat = pat & extra
    elif extra is not None:
        pat = pat | extra
    static = assert_exact_over_selection(pat, q, k, v)
    r = RegionRouting(region, top_k).region
    nd = len(shape)
    tiles = [(r, r), ((1,) * nd, (2,) * nd), (tuple(min(s, x + 1) for s, x in zip(shape, r)), (3,) * nd)]
    assert_layout_agrees(static, q, k, tiles, exact=extra is None)


def test_exact_with_a_score_mod_and_cross_attention_on_different_grids():
    q, k, v = _grid_qkv((6, 8), grad=True, kv_shape=(9, 4))
    static = assert_exact_over_selection(RegionRouting((3, 2), 2), q, k, v, score_mod=al.Softcap(3.0))
    assert static.keep.shape == (2, 4, 8, 6)


def test_tiles_are_the_regions_and_the_layout_is_the_keep_table():
    q, k, v = _grid_qkv((12, 18))
    pat = RegionRouting((3, 6), 2)
    static = resolve_pattern(pat, q, k)
    g = check_qkv(q, k, v)
    problem = al.api._problem(q, k, v, pat, None, None, False, None)
    tiling = TiledBackend().tiling(problem)
    assert tiling.q_tile == (3, 6) and tiling.kv_tile == (3, 6) and pat.preferred_tile(g) == ((3, 6), (3, 6))
    lay = static.block_layout(tiling)
    assert torch.equal(lay.any, static.keep) and torch.equal(lay.full, static.keep)


def test_all_regions_is_dense_and_causal():
    q, k, v = _grid_qkv((8, 12))
    n = (8 // 2) * (12 // 4)
    torch.testing.assert_close(al.attention(q, k, v, pattern=RegionRouting((2, 4), n)), al.attention(q, k, v), **TOL)
    torch.testing.assert_close(al.attention(q, k, v, pattern=RegionRouting((2, 4), n) & al.Causal()),
                               al.attention(q, k, v, pattern=al.Causal()), **TOL)


def test_candidates_inside_an_intersection_are_regions_with_a_visible_pair():
    q, k, _ = random_qkv(L=64)
    static = resolve_pattern(RegionRouting(8, 3) & al.Causal(), q, k).parts[0]
    assert not static.keep.triu(1).any()  # no future region is spent on
    assert torch.equal(static.keep.sum(-1), torch.arange(1, 9).clamp(max=3).expand(2, 4, 8))


def test_local_routing_is_causal_in_1d():
    """Own region kept, every other candidate region in the past: with & Causal(), new later
    keys change no earlier output (and do change the later routing)."""
    q, k, v = random_qkv(L=96)
    pat = RegionRouting(8, 3, local=True) & al.Causal()
    out = al.attention(q, k, v, pattern=pat)
    k2, v2 = perturbed_after(44, k, v)  # mid-region: region 5 holds visible and hidden keys
    out2 = al.attention(q, k2, v2, pattern=pat)
    torch.testing.assert_close(out2[:, :, :44], out[:, :, :44], **TOL)
    a, b = resolve_pattern(pat, q, k).parts[0].keep, resolve_pattern(pat, q, k2).parts[0].keep
    assert a.diagonal(dim1=-2, dim2=-1).all() and not torch.equal(a, b)


def test_routing_without_local_reads_the_own_regions_hidden_keys():
    """The documented limit: without local=True the own region competes with its mean, which
    includes keys hidden from its early queries, so a later key can change an earlier output."""
    q, k, v = random_qkv(L=96)
    pat = RegionRouting(8, 1) & al.Causal()
    out = al.attention(q, k, v, pattern=pat)
    changed = False
    for seed in range(4):
        k2, v2 = perturbed_after(44, k, v, seed=seed, scale=10.0)
        changed |= not torch.allclose(al.attention(q, k2, v2, pattern=pat)[:, :, 40:44], out[:, :, 40:44])
    assert changed


def test_region_mask_layout_on_misaligned_tiles_and_partial_regions():
    g = al.testing.make_geometry((7, 5), batch=1, q_heads=2)
    keep = torch.rand(1, 2, 4 * 3, 4 * 3, generator=torch.Generator().manual_seed(0)) < 0.4
    m = RegionMask(keep, (2, 2))  # 7 x 5 grid in 2 x 2 regions: the last ones are partial
    m.validate(g)
    for qt, kt in [((3, 2), (2, 3)), ((1, 5), (7, 1)), ((2, 2), (2, 2)), ((4, 4), (1, 1))]:
        al.testing.check_pattern_layout(m, g, qt, kt, exact=True)


def test_errors():
    q, k, v = _grid_qkv((6, 8))
    with pytest.raises(ValueError, match=r"region=\(4, 4\) does not divide the q token grid \(6, 8\): axis 0"):
        al.attention(q, k, v, pattern=RegionRouting((4, 4), 1))
    with pytest.raises(ValueError, match="top_k=13 is larger than the number of key regions 12"):
        al.attention(q, k, v, pattern=RegionRouting((2, 2), 13))
    with pytest.raises(ValueError, match="defined on 1 token axes but the inputs have 2"):
        al.attention(q, k, v, pattern=RegionRouting(2, 1))
    q2, k2, v2 = _grid_qkv((6, 8), kv_shape=(4, 8))
    with pytest.raises(ValueError, match="local=True needs equal query and key grids"):
        al.attention(q2, k2, v2, pattern=RegionRouting((2, 2), 1, local=True))
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        RegionRouting((2, 2), 0)
    with pytest.raises(ValueError, match="region must have 1, 2 or 3 entries"):
        RegionRouting((2, 2, 2, 2), 1)
    with pytest.raises(ValueError, match=r"region\[1\] must be an int >= 1"):
        RegionRouting((2, 0), 1)
    with pytest.raises(ValueError, match="keep must have shape"):
        RegionMask(torch.ones(1, 1, 3, 3, dtype=torch.bool), (2, 2)).validate(check_qkv(q, k, v))
    assert math.prod(RegionRouting((2, 3), 1).region) == 6
