"""KMeansRouting / ClusterMask / KMeansRouter: clusters re-derived by hand, exact attention over
the selected set, mask and layout agree, degenerate and causal settings, online k-means, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from routing_checks import TOL, assert_exact_over_selection, assert_layout_agrees, perturbed_after

import attnlab as al
from attnlab.geometry import check_qkv
from attnlab.patterns import resolve_pattern
from attnlab.patterns.routing_kmeans import ClusterMask, KMeansRouter, KMeansRouting
from attnlab.testing import MaxNumel, dense_mask, make_geometry, random_qkv

TILES = [((16,), (16,)), ((7,), (5,)), ((64,), (16,)), ((1,), (150,))]


def _centroids(Hq=4, C=4, D=8, seed=3):
    return torch.randn(Hq, C, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cos_argmax_by_hand(x, cent):
    """Nearest centroid by explicit loops: largest cosine similarity, lowest index on ties."""
    B, H, N, _ = x.shape
    out = torch.empty(B, H, N, dtype=torch.long)
    for b in range(B):
        for h in range(H):
            c = cent[h] if cent.ndim == 3 else cent[b, h]
            for i in range(N):
                sims = [float(x[b, h, i] @ c[j] / (x[b, h, i].norm() * c[j].norm())) for j in range(c.shape[0])]
                out[b, h, i] = max(range(len(sims)), key=lambda j: (sims[j], -j))
    return out


def _kv_heads(k, Hq):
    return k.repeat_interleave(Hq // k.shape[1], 1)


def test_clusters_are_the_nearest_centroids_by_hand():
    q, k, _ = random_qkv(B=1, L=23, S=31)
    cent = _centroids()
    static = resolve_pattern(KMeansRouting(4, centroids=cent), q, k)
    cq, ck = _cos_argmax_by_hand(q, cent), _cos_argmax_by_hand(_kv_heads(k, 4), cent)
    want = cq[..., :, None] == ck[..., None, :]
    assert 1 < len(cq.unique()) and torch.equal(dense_mask(static, check_qkv(q, k, k)), want)


def test_balanced_clusters_take_each_centroids_nearest_tokens_by_hand():
    q, k, _ = random_qkv(B=1, Hq=2, Hkv=1, L=20, S=26)
    cent = _centroids(Hq=2, C=3)
    w = 6
    static = resolve_pattern(KMeansRouting(3, centroids=cent, window=w), q, k)
    kk = _kv_heads(k, 2)
    want = torch.zeros(1, 2, 20, 26, dtype=torch.bool)
    for h in range(2):
        for c in range(3):
            mu = cent[h, c] / cent[h, c].norm()
            qs = sorted(range(20), key=lambda i: (-float(q[0, h, i] @ mu / q[0, h, i].norm()), i))[:w]
            ks = sorted(range(26), key=lambda j: (-float(kk[0, h, j] @ mu / kk[0, h, j].norm()), j))[:w]
            for i in qs:
                want[0, h, i, ks] = True
    assert torch.equal(dense_mask(static, check_qkv(q, k, k)), want)
    assert static.q_member.sum(2).eq(w).all() and static.k_member.sum(2).eq(w).all()


def test_per_call_kmeans_is_lloyd_from_evenly_spaced_tokens_by_hand():
    q, k, _ = random_qkv(B=1, Hq=2, Hkv=2, L=17, S=13)
    C, iters = 3, 2
    static = resolve_pattern(KMeansRouting(C, iters=iters), q, k)
    want_q = torch.empty(1, 2, 17, dtype=torch.long)
    want_k = torch.empty(1, 2, 13, dtype=torch.long)
    for h in range(2):
        x = [v / v.norm() for v in torch.cat([q[0, h], k[0, h]])]
        N = len(x)
        cent = [x[round(i * (N - 1) / (C - 1))] for i in range(C)]
        for _ in range(iters):
            ids = [max(range(C), key=lambda c: (float(v @ cent[c] / cent[c].norm()), -c)) for v in x]
            for c in range(C):
                members = [v for v, i in zip(x, ids) if i == c]
                if members:
                    s = torch.stack(members).sum(0)
                    cent[c] = s / s.norm()
        ids = [max(range(C), key=lambda c: (float(v @ cent[c] / cent[c].norm()), -c)) for v in x]
        want_q[0, h], want_k[0, h] = torch.tensor(ids[:17]), torch.tensor(ids[17:])
    want = want_q[..., :, None] == want_k[..., None, :]
    assert torch.equal(dense_mask(static, check_qkv(q, k, k)), want)


@pytest.mark.parametrize("make", [
    lambda: KMeansRouting(4, centroids=_centroids()),
    lambda: KMeansRouting(3),
    lambda: KMeansRouting(4, centroids=_centroids(), window=25),
    lambda: KMeansRouting(4, centroids=_centroids()) & al.Causal(),
    lambda: KMeansRouting(2) | al.SlidingWindow(16),
    lambda: KMeansRouting(3, window=40) & al.patterns.TopKBlocks(4, 16) & al.Causal(),
], ids=["fixed", "per-call", "balanced", "causal", "union-window", "and-topk-causal"])
def test_attention_over_the_clusters_is_exact(make):
    q, k, v = random_qkv(L=150, grad=True)  # GQA 4/2, 150 not a multiple of the tiles
    static = assert_exact_over_selection(make(), q, k, v)
    assert_layout_agrees(static, q, k, TILES)


def test_exact_with_a_score_mod_and_cross_attention():
    q, k, v = random_qkv(L=70, S=101, grad=True)
    assert_exact_over_selection(KMeansRouting(3, centroids=_centroids(C=3)) & al.Causal(), q, k, v,
                                score_mod=al.ALiBi(4))


@pytest.mark.parametrize("window", [None, 7])
def test_cluster_layout_is_exact_for_ids_and_sound_for_memberships(window):
    q, k, _ = random_qkv(L=60, S=45)
    static = resolve_pattern(KMeansRouting(3, centroids=_centroids(C=3), window=window), q, k)
    assert_layout_agrees(static, q, k, TILES[:3], exact=window is None)
    # tiles holding a single token each: the layout is the mask itself
    g = check_qkv(q, k, k)
    lay = static.block_layout(al.Tiling(g, (1,), (1,)))
    assert torch.equal(lay.any.expand(2, 4, 60, 45), dense_mask(static, g))
    assert torch.equal(lay.full.expand(2, 4, 60, 45), dense_mask(static, g))


def test_cluster_mask_from_ids_and_memberships_agree_and_unassigned_tokens_see_nothing():
    g = make_geometry((6,), (5,))
    cq = torch.tensor([[[0, 1, 2, -1, 1, 0]]])
    ck = torch.tensor([[[1, 1, 0, 2, -1]]])
    a = ClusterMask(cq, ck, 3)
    b = ClusterMask.from_membership(F.one_hot(cq.clamp(min=0), 3).bool() & (cq >= 0)[..., None],
                                    F.one_hot(ck.clamp(min=0), 3).bool() & (ck >= 0)[..., None])
    want = (cq[..., :, None] == ck[..., None, :]) & (cq[..., :, None] >= 0)
    assert torch.equal(dense_mask(a, g), want) and torch.equal(dense_mask(b, g), want)
    assert not dense_mask(a, g)[0, 0, 3].any()
    # more than one 60-bit word of clusters
    many = ClusterMask(torch.tensor([[[0, 61, 119]]]), torch.tensor([[[119, 61, 60, 0, 61]]]), 120)
    assert dense_mask(many, make_geometry((3,), (5,)))[0, 0].nonzero().tolist() == [[0, 3], [1, 1], [1, 4], [2, 0]]


def test_one_cluster_is_dense_and_causal():
    q, k, v = random_qkv(L=100)
    torch.testing.assert_close(al.attention(q, k, v, pattern=KMeansRouting(1)), al.attention(q, k, v), **TOL)
    torch.testing.assert_close(al.attention(q, k, v, pattern=KMeansRouting(1, centroids=_centroids(C=1)) & al.Causal()),
                               al.attention(q, k, v, pattern=al.Causal()), **TOL)
    # balanced with window = L: every centroid takes every token
    torch.testing.assert_close(al.attention(q, k, v, pattern=KMeansRouting(3, window=100)), al.attention(q, k, v), **TOL)


def test_fixed_centroid_routing_is_causal():
    """Routing by fixed centroids looks at each token alone: with & Causal(), new later keys
    and values change no earlier output (and do change the later clusters)."""
    q, k, v = random_qkv(L=96)
    pat = KMeansRouting(4, centroids=_centroids()) & al.Causal()
    out = al.attention(q, k, v, pattern=pat)
    k2, v2 = perturbed_after(40, k, v)
    out2 = al.attention(q, k2, v2, pattern=pat)
    torch.testing.assert_close(out2[:, :, :40], out[:, :, :40], **TOL)
    a, b = resolve_pattern(pat, q, k).parts[0], resolve_pattern(pat, q, k2).parts[0]
    assert not torch.equal(a.k_member[:, :, 40:], b.k_member[:, :, 40:])


def test_selection_and_layout_never_form_l_by_s():
    L = 1024
    q, k, v = random_qkv(B=1, Hq=2, Hkv=1, L=L, dtype=torch.float32)
    pat = KMeansRouting(8, centroids=torch.randn(8, 8))
    with MaxNumel() as probe:
        static = resolve_pattern(pat, q, k)
        static.block_layout(al.Tiling(check_qkv(q, k, v), (64,), (16,)))
    assert probe.max_numel < L * L // 8


def _clustered(n, dirs, noise, gen):
    C, D = dirs.shape
    which = torch.randint(0, C, (n,), generator=gen)
    return dirs[which] + noise * torch.randn(n, D, generator=gen)


def test_router_centroids_converge_on_clustered_data():
    gen = torch.Generator().manual_seed(0)
    D, C, H = 16, 4, 2
    dirs = torch.linalg.qr(torch.randn(D, D, generator=gen))[0][:C]  # orthonormal cluster directions
    router = KMeansRouter(H, D, C, decay=0.9)
    router.train()

    def error():
        c = F.normalize(router.centroids, dim=-1)
        cos = c @ dirs.T  # (H, C, C)
        return (1 - cos.amax(1)).max().item()  # every true direction has a close centroid

    for step in range(60):
        q = _clustered(2 * H * 64, dirs, 0.35, gen).reshape(2, H, 64, D)
        k = _clustered(2 * 1 * 48, dirs, 0.35, gen).reshape(2, 1, 48, D)  # GQA: one kv head
        router.update(q, k)
        if step == 0:
            first = error()
    assert first > 0.05 and error() < 0.01
    # the pattern reads the learned centroids: tokens near one direction share a cluster
    x = dirs[torch.tensor([0, 1, 2, 3, 0, 1])].reshape(1, 1, 6, D).expand(1, H, 6, D)
    static = resolve_pattern(router.pattern(), x, x[:, :1])
    m = dense_mask(static, check_qkv(x, x[:, :1], x[:, :1]))[0, 0]
    assert m[0, 4] and m[1, 5] and not m[0, 1] and m.sum() == 10


def test_router_does_not_move_in_eval_mode_and_checks_shapes():
    router = KMeansRouter(2, 8, 3)
    before = router.centroids.clone()
    router.eval()
    router.update(torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8))
    assert torch.equal(router.centroids, before) and not bool(router.initialized)
    router.train()
    with pytest.raises(ValueError, match="update expects q"):
        router.update(torch.randn(1, 3, 10, 8), torch.randn(1, 3, 10, 8))
    pat = router(torch.randn(1, 2, 10, 8), torch.randn(1, 1, 10, 8))
    assert isinstance(pat, KMeansRouting) and bool(router.initialized)
    assert not torch.equal(router.centroids, before)


def test_errors():
    q, k, v = random_qkv(L=20)
    with pytest.raises(ValueError, match="num_clusters must be an int >= 1"):
        KMeansRouting(0)
    with pytest.raises(ValueError, match="window=21 is larger than min"):
        al.attention(q, k, v, pattern=KMeansRouting(2, window=21))
    with pytest.raises(ValueError, match="centroids hold 3 clusters but num_clusters=2"):
        KMeansRouting(2, centroids=torch.randn(3, 8))
    with pytest.raises(ValueError, match="head dimension is D=8"):
        al.attention(q, k, v, pattern=KMeansRouting(3, centroids=torch.randn(3, 5)))
    with pytest.raises(ValueError, match="H = 1 or Hq=4"):
        al.attention(q, k, v, pattern=KMeansRouting(3, centroids=torch.randn(2, 3, 8)))
    with pytest.raises(TypeError, match="centroids must be None"):
        KMeansRouting(2, centroids=[[1.0]])
    with pytest.raises(ValueError, match="cluster ids must be < num_clusters=2"):
        ClusterMask(torch.tensor([[[0, 2]]]), torch.tensor([[[0]]]), 2)
    with pytest.raises(TypeError, match="q_cluster must be an int32/int64 tensor"):
        ClusterMask(torch.zeros(1, 1, 3), torch.zeros(1, 1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="needs_inputs|chooses its keys"):
        KMeansRouting(2).mask(None, None, None, None, None)
    assert math.isclose(KMeansRouter(1, 2, 2, decay=0.5).decay, 0.5)
    with pytest.raises(ValueError, match="decay must be a float in"):
        KMeansRouter(1, 2, 2, decay=1.0)
