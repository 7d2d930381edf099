"""ExpertChoice / TokenSubset / MixtureOfSparseAttention (MoSA): the chosen tokens re-derived by
hand, exact attention over them, zero output for unselected queries, causality with fixed
scores, the layer's gathered and full-sequence paths agree, the layer trains, errors."""

import pytest
import torch
from routing_checks import TOL, assert_exact_over_selection, assert_layout_agrees, perturbed_after

import attnlab as al
from attnlab.geometry import check_qkv
from attnlab.patterns import resolve_pattern
from attnlab.patterns.expert_choice import ExpertChoice, MixtureOfSparseAttention, TokenSubset
from attnlab.testing import dense_mask, random_qkv

TILES = [((16,), (16,)), ((7,), (5,)), ((64,), (16,))]


def _scores(B=2, H=4, L=150, seed=2):
    return torch.randn(B, H, L, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_selected_tokens_are_each_heads_top_k_by_hand():
    q, k, _ = random_qkv(L=30)
    r = _scores(L=30)
    static = resolve_pattern(ExpertChoice(7, r), q, k)
    want = torch.zeros(2, 4, 30, 30, dtype=torch.bool)
    for b in range(2):
        for h in range(4):
            top = sorted(range(30), key=lambda t: -float(r[b, h, t]))[:7]
            for i in top:
                want[b, h, i, top] = True
    assert torch.equal(dense_mask(static, check_qkv(q, k, k)), want)


def test_callable_router_sees_q_and_k_and_broadcast_scores():
    q, k, _ = random_qkv(L=40)
    seen = {}

    def router(qq, kk):
        seen["shapes"] = (tuple(qq.shape), tuple(kk.shape))
        return kk.norm(dim=-1).repeat_interleave(2, 1)

    static = resolve_pattern(ExpertChoice(5, router), q, k)
    assert seen["shapes"] == ((2, 4, 40, 8), (2, 2, 40, 8))
    want = k.norm(dim=-1).repeat_interleave(2, 1).topk(5, -1).indices.sort(-1).values
    assert torch.equal(static.q_selected.nonzero()[:, 2].view(2, 4, 5), want)
    shared = resolve_pattern(ExpertChoice(5, _scores(B=1, H=1, L=40)), q, k)  # one score row for all
    m = dense_mask(shared, check_qkv(q, k, k))
    assert m.shape == (2, 4, 40, 40) and torch.equal(m[0, 0], m[1, 3]) and m[0, 0].sum() == 25


@pytest.mark.parametrize("make", [
    lambda: ExpertChoice(40, _scores()),
    lambda: ExpertChoice(33, _scores()) & al.Causal(),
    lambda: ExpertChoice(30, lambda q, k: q.norm(dim=-1)) | al.SlidingWindow(8),
    lambda: ExpertChoice(60, _scores()) & al.patterns.TopKBlocks(3, 16) & al.Causal(),
], ids=["plain", "causal", "callable-or-window", "and-topk-causal"])
def test_attention_over_the_selected_tokens_is_exact(make):
    q, k, v = random_qkv(L=150, grad=True)
    static = assert_exact_over_selection(make(), q, k, v)
    assert_layout_agrees(static, q, k, TILES)


def test_exact_on_a_2d_grid_with_a_score_mod():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 6, 7, 8, generator=gen, dtype=torch.float64).requires_grad_() for h in (4, 2, 2))
    assert_exact_over_selection(ExpertChoice(12, _scores(L=42)) & al.Causal(), q, k, v, score_mod=al.ALiBi(4))


def test_token_subset_layout_is_exact():
    q, k, _ = random_qkv(L=61)
    static = resolve_pattern(ExpertChoice(20, _scores(L=61)), q, k)
    assert_layout_agrees(static, q, k, TILES + [((1,), (1,))], exact=True)
    g = al.testing.make_geometry((9,), (11,), batch=1, q_heads=2)
    sub = TokenSubset(torch.rand(1, 2, 9) < 0.5, torch.rand(1, 1, 11) < 0.6)
    sub.validate(g)
    for t in TILES:
        al.testing.check_pattern_layout(sub, g, *t, exact=True)


def test_unselected_queries_output_zero_and_selected_ones_never_see_unselected_keys():
    q, k, v = random_qkv(L=50)
    r = _scores(L=50)
    out, lse = al.attention(q, k, v, pattern=ExpertChoice(10, r) & al.Causal(), return_lse=True)
    sel = torch.zeros(2, 4, 50, dtype=torch.bool).scatter_(-1, r.topk(10, -1).indices, True)
    assert (out[~sel] == 0).all() and torch.isneginf(lse[~sel]).all() and torch.isfinite(lse[sel]).all()
    v2 = v.clone()
    unselected_everywhere = ~sel.any(1).any(0)  # tokens no head of no batch element chose
    v2[:, :, unselected_everywhere] = 1e3
    torch.testing.assert_close(al.attention(q, k, v2, pattern=ExpertChoice(10, r) & al.Causal()), out, **TOL)


def test_all_tokens_is_dense_and_causal():
    q, k, v = random_qkv(L=100)
    r = _scores(L=100)
    torch.testing.assert_close(al.attention(q, k, v, pattern=ExpertChoice(100, r)), al.attention(q, k, v), **TOL)
    torch.testing.assert_close(al.attention(q, k, v, pattern=ExpertChoice(100, r) & al.Causal()),
                               al.attention(q, k, v, pattern=al.Causal()), **TOL)


def test_fixed_scores_are_causal():
    q, k, v = random_qkv(L=96)
    pat = ExpertChoice(30, _scores(L=96)) & al.Causal()
    out = al.attention(q, k, v, pattern=pat)
    k2, v2 = perturbed_after(40, k, v)
    out2 = al.attention(q, k2, v2, pattern=pat)
    torch.testing.assert_close(out2[:, :, :40], out[:, :, :40], **TOL)
    assert not torch.allclose(out2[:, :, 40:], out[:, :, 40:])


def _module_pair(k=6, causal=True):
    torch.manual_seed(0)
    a = MixtureOfSparseAttention(16, 4, k, causal=causal).double()
    b = MixtureOfSparseAttention(16, 4, k, causal=causal, gather=False).double()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("causal", [True, False])
def test_gathered_layer_equals_the_pattern_on_the_full_sequence(causal):
    a, b = _module_pair(causal=causal)
    x = torch.randn(3, 20, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, **TOL)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, **TOL, msg=name)
    assert a.router.weight.grad.abs().sum() > 0  # the router learns through the sigmoid gate


def test_layer_matches_a_hand_written_mosa_head():
    a, _ = _module_pair(k=5)
    x = torch.randn(1, 12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    q, k, v = a.qkv(x).reshape(1, 12, 3, 4, 4).permute(2, 0, 3, 1, 4)
    r = a.router(x).transpose(1, 2)
    heads = torch.zeros(1, 4, 12, 4, dtype=torch.float64)
    for h in range(4):
        idx = sorted(r[0, h].topk(5).indices.tolist())
        qs, ks, vs = q[0, h, idx], k[0, h, idx], v[0, h, idx]
        logits = (qs @ ks.T) / 2.0 + torch.full((5, 5), float("-inf"), dtype=torch.float64).triu(1)
        heads[0, h, idx] = torch.softmax(logits, -1) @ vs * torch.sigmoid(r[0, h, idx])[:, None]
    want = a.out_proj(heads.transpose(1, 2).reshape(1, 12, 16))
    torch.testing.assert_close(a(x), want, **TOL)


def test_layer_trains_on_a_toy_task():
    """Teacher-student: a fixed random MoSA layer produces the targets; a second one, from a
    different initialisation, must bring the loss well below its start in 150 Adam steps
    (about a second on a CPU)."""
    torch.manual_seed(1)
    teacher = MixtureOfSparseAttention(16, 4, 6)
    torch.manual_seed(0)
    student = MixtureOfSparseAttention(16, 4, 6)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    losses = []
    for step in range(150):
        x = torch.randn(16, 24, 16, generator=gen)
        with torch.no_grad():
            y = teacher(x)
        loss = (student(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)


def test_errors():
    q, k, v = random_qkv(L=20)
    with pytest.raises(ValueError, match="k=21 is larger than the number of tokens L=20"):
        al.attention(q, k, v, pattern=ExpertChoice(21, _scores(L=20)))
    with pytest.raises(ValueError, match=r"router scores must have shape \(1 or B=2, 1 or Hq=4, L=20\)"):
        al.attention(q, k, v, pattern=ExpertChoice(3, _scores(L=19)))
    q2, k2, v2 = random_qkv(L=20, S=30)
    with pytest.raises(ValueError, match="q and k token shapes must be equal"):
        al.attention(q2, k2, v2, pattern=ExpertChoice(3, _scores(L=20)))
    with pytest.raises(ValueError, match="router must return scores"):
        al.attention(q, k, v, pattern=ExpertChoice(3, lambda q, k: q.sum(-1)[:, :, :5]))
    with pytest.raises(TypeError, match="router must be a"):
        ExpertChoice(3, "scores")
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        ExpertChoice(0, _scores())
    with pytest.raises(ValueError, match="embed_dim=10 must be a multiple of num_heads=4"):
        MixtureOfSparseAttention(10, 4, 2)
    with pytest.raises(ValueError, match="k=9 is larger than the sequence length L=8"):
        MixtureOfSparseAttention(8, 2, 9)(torch.randn(1, 8, 8))
