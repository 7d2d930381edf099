"""Score mods (ALiBi, T5 relative bias, Music Transformer relative embeddings, softcap,
temperature) against naive dense formulas written independently here."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from attnlab.scores.alibi import ALiBi, alibi_slopes
from attnlab.scores.base import ScoreContext
from attnlab.scores.relative_bias import RelativeBias, relative_position_bucket
from attnlab.scores.relative_embedding import RelativeEmbedding
from attnlab.scores.softcap import Softcap, Temperature
from attnlab.testing import make_geometry

B, H, D = 2, 3, 5


def dense_inputs(L, S, H=H, D=D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    geom = make_geometry((L,), (S,), batch=B, q_heads=H, head_dim=D)
    score = torch.randn(B, H, L, S, generator=g, dtype=dtype)
    query = torch.randn(B, H, L, D, generator=g, dtype=dtype)
    ctx = ScoreContext(
        torch.arange(B).view(B, 1, 1, 1),
        torch.arange(H).view(1, H, 1, 1),
        torch.arange(L).view(1, 1, L, 1),
        torch.arange(S).view(1, 1, 1, S),
        geom,
        query,
    )
    return score, ctx


def tiled_view(score, ctx, n=3, m=4, span=5, seed=1):
    """The same problem seen through a backend's tiled broadcast shapes: score
    (B, H, n, m, span), q_idx (1, 1, n, m, 1), kv_idx (1, 1, n, 1, span), arbitrary flat
    indices (random queries and keys per tile)."""
    g = torch.Generator().manual_seed(seed)
    _, Hh, L, S = score.shape
    qt = torch.randint(0, L, (n, m), generator=g)
    kt = torch.randint(0, S, (n, span), generator=g)
    t_score = score[:, :, qt[:, :, None], kt[:, None, :]]
    t_ctx = ScoreContext(
        ctx.b.view(-1, 1, 1, 1, 1),
        ctx.h.view(1, Hh, 1, 1, 1),
        qt.view(1, 1, n, m, 1),
        kt.view(1, 1, n, 1, span),
        ctx.geometry,
        ctx.query[:, :, qt],
    )
    return t_score, t_ctx, (qt, kt)


def check_against(mod, naive_bias, L, S, H=H, D=D):
    """mod.modify == score + naive_bias (B or 1, H, L, S) on dense and tiled shapes."""
    score, ctx = dense_inputs(L, S, H, D)
    mod = mod.double()
    mod.validate(ctx.geometry)
    bias = naive_bias(ctx.query)
    out = mod.modify(score, ctx)
    assert out.shape == score.shape
    torch.testing.assert_close(out, score + bias)
    t_score, t_ctx, (qt, kt) = tiled_view(score, ctx)
    t_out = mod.modify(t_score, t_ctx)
    expect = (score + bias)[:, :, qt[:, :, None], kt[:, None, :]]
    torch.testing.assert_close(t_out, expect)


# ----------------------------------------------------------------------------- ALiBi


def test_alibi_slopes_power_of_two():
    assert alibi_slopes(8).tolist() == [1 / 2**k for k in range(1, 9)]
    assert alibi_slopes(4).tolist() == [1 / 4, 1 / 16, 1 / 64, 1 / 256]


def test_alibi_slopes_other_counts_follow_the_papers_rule():
    assert alibi_slopes(6).tolist() == [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]
    expect12 = [2.0**-k for k in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expect12))
    assert alibi_slopes(1).tolist() == [2.0**-8]


@pytest.mark.parametrize("L,S", [(6, 6), (4, 9), (9, 6)])
def test_alibi_matches_naive_loops(L, S):
    mod = ALiBi(H)
    slopes = [2.0 ** (-8 * (h + 1) / 2) for h in range(2)] + [2.0 ** (-8 / 4)]  # paper, H=3
    assert mod.slopes.tolist() == pytest.approx(slopes)

    def naive(query):
        bias = torch.zeros(1, H, L, S, dtype=torch.float64)
        for h in range(H):
            for i in range(L):
                for j in range(S):
                    bias[0, h, i, j] = -slopes[h] * abs(j - (i + S - L))
        return bias

    check_against(mod, naive, L, S)


def test_alibi_custom_slopes_are_a_buffer():
    mod = ALiBi(2, slopes=torch.tensor([0.5, 3.0]))
    assert "slopes" in dict(mod.named_buffers()) and not list(mod.parameters())
    score, ctx = dense_inputs(3, 3, H=2)
    out = mod.modify(torch.zeros_like(score), ctx)
    assert out[0, 1, 0, 2].item() == -6.0 and out[0, 0, 2, 0].item() == -1.0
    assert "num_heads=2" in repr(mod)


# --------------------------------------------------------------------- T5 relative bias


def t5_bucket_exact(rel, bidirectional, num_buckets, max_distance):
    """T5's bucket by exact integer arithmetic: the log bucket k is the largest with
    n >= E * (max_distance / E) ** (k / (N - E))."""
    off = 0
    if bidirectional:
        num_buckets //= 2
        off = num_buckets if rel > 0 else 0
        n = abs(rel)
    else:
        n = max(-rel, 0)
    E, N = num_buckets // 2, num_buckets
    if n < E:
        return off + n
    k = 0
    while k + 1 <= N - 1 - E and n ** (N - E) * E ** (k + 1) >= max_distance ** (k + 1) * E ** (
        N - E
    ):
        k += 1
    return off + E + k


def test_relative_position_bucket_hand_values():
    # bidirectional, 32 buckets, max_distance 128: 16 per side, 8 exact, then
    # floor(8 + 2 * log2(n / 8)) capped at 15; keys after the query are offset by 16.
    hand = {0: 0, -1: 1, -7: 7, -8: 8, -12: 9, -16: 10, -23: 11, -32: 12, -45: 12, -64: 14,
            -90: 14, -127: 15, -128: 15, -1000: 15, 1: 17, 7: 23, 8: 24, 16: 26, 64: 30,
            200: 31}
    rel = torch.tensor(list(hand))
    assert relative_position_bucket(rel, True, 32, 128).tolist() == list(hand.values())
    # unidirectional: 16 exact, then floor(16 + 16 * log(n / 16) / log(8)) capped at 31
    hand = {5: 0, 0: 0, -1: 1, -15: 15, -16: 16, -32: 21, -64: 26, -100: 30, -128: 31,
            -5000: 31}
    rel = torch.tensor(list(hand))
    assert relative_position_bucket(rel, False, 32, 128).tolist() == list(hand.values())


@pytest.mark.parametrize("cfg", [(True, 32, 128), (False, 32, 128), (True, 8, 20), (False, 6, 10)])
def test_relative_position_bucket_equals_exact_arithmetic(cfg):
    rel = torch.arange(-1500, 1501)
    expect = [t5_bucket_exact(r, *cfg) for r in rel.tolist()]
    assert relative_position_bucket(rel, *cfg).tolist() == expect


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("L,S", [(7, 7), (5, 11), (11, 5)])
def test_relative_bias_matches_naive_loops(bidirectional, L, S):
    mod = RelativeBias(H, num_buckets=8, max_distance=6, bidirectional=bidirectional)
    table = mod.table.detach().double()

    def naive(query):
        bias = torch.zeros(1, H, L, S, dtype=torch.float64)
        for h in range(H):
            for i in range(L):
                for j in range(S):
                    bk = t5_bucket_exact(j - (i + S - L), bidirectional, 8, 6)
                    bias[0, h, i, j] = table[bk, h]
        return bias

    check_against(mod, naive, L, S)


def test_relative_bias_gradcheck():
    mod = RelativeBias(2, num_buckets=6, max_distance=5, bidirectional=True).double()
    score, ctx = dense_inputs(3, 4, H=2)
    table = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    f = lambda t: functional_call(mod, {"table": t}, (score,), {"ctx": ctx})  # noqa: E731
    assert torch.autograd.gradcheck(f, (table,))


# ------------------------------------------------------ Music Transformer relative embedding


def naive_rel_embedding(table, query, L, S, max_distance, causal, scale):
    """scale * q_i . E[clip(j - (i + S - L))] by building the (L, S, D) embeddings."""
    hi = 0 if causal else max_distance
    idx = torch.empty(L, S, dtype=torch.long)
    for i in range(L):
        for j in range(S):
            idx[i, j] = min(max(j - (i + S - L), -max_distance), hi) + max_distance
    if table.ndim == 2:
        emb = table[idx]  # (L, S, D)
        return scale * torch.einsum("bhld,lsd->bhls", query, emb)
    emb = table[:, idx]  # (H, L, S, D)
    return scale * torch.einsum("bhld,hlsd->bhls", query, emb)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("L,S", [(6, 6), (4, 10), (10, 4)])
def test_relative_embedding_matches_naive_dense(causal, per_head, L, S):
    M = 3
    mod = RelativeEmbedding(D, M, num_heads=H if per_head else None, causal=causal)
    rows = M + 1 if causal else 2 * M + 1
    assert mod.table.shape == ((H, rows, D) if per_head else (rows, D))
    table = mod.table.detach().double()
    check_against(
        mod, lambda q: naive_rel_embedding(table, q, L, S, M, causal, 1 / math.sqrt(D)), L, S
    )


def test_relative_embedding_custom_scale_and_repr():
    mod = RelativeEmbedding(D, 2, causal=False, scale=0.7)
    table = mod.table.detach().double()
    check_against(mod, lambda q: naive_rel_embedding(table, q, 5, 7, 2, False, 0.7), 5, 7)
    r = repr(mod)
    assert "head_dim=5" in r and "max_distance=2" in r and "causal=False" in r


@pytest.mark.parametrize("per_head", [False, True])
def test_relative_embedding_gradcheck_table_and_query(per_head):
    mod = RelativeEmbedding(3, 2, num_heads=2 if per_head else None, causal=False).double()
    score, ctx = dense_inputs(3, 4, H=2, D=3)
    table = torch.randn(*mod.table.shape, dtype=torch.float64, requires_grad=True)
    query = ctx.query.clone().requires_grad_(True)

    def f(t, q):
        c = ScoreContext(ctx.b, ctx.h, ctx.q_idx, ctx.kv_idx, ctx.geometry, q)
        return functional_call(mod, {"table": t}, (score,), {"ctx": c})

    assert torch.autograd.gradcheck(f, (table, query))


@pytest.mark.parametrize("per_head", [False, True])
def test_relative_embedding_is_memory_linear(per_head):
    from torch.profiler import ProfilerActivity, profile

    L = S = 384
    Dl = 64
    mod = RelativeEmbedding(Dl, 32, num_heads=1 if per_head else None, causal=True)
    geom = make_geometry((L,), (S,), q_heads=1, head_dim=Dl)
    score = torch.randn(1, 1, L, S)
    ctx = ScoreContext(
        torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, 1, dtype=torch.long),
        torch.arange(L).view(1, 1, L, 1), torch.arange(S).view(1, 1, 1, S), geom,
        torch.randn(1, 1, L, Dl),
    )
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        mod.modify(score, ctx)
    biggest = max(e.cpu_memory_usage for e in p.key_averages())
    assert 0 < biggest < L * S * Dl * 4 // 8  # an (L, S, D) float tensor would be 8x this


def test_relative_embedding_needs_the_query():
    mod = RelativeEmbedding(D, 2)
    score, ctx = dense_inputs(3, 3)
    with pytest.raises(TypeError, match="needs the query"):
        mod(score, ctx.b, ctx.h, ctx.q_idx, ctx.kv_idx)
    ctx.query = None
    with pytest.raises(ValueError, match="ctx.query"):
        mod.modify(score, ctx)


# ------------------------------------------------------------------ softcap, temperature


def test_softcap_formula_and_bound():
    mod = Softcap(5.0)
    score, ctx = dense_inputs(4, 6)
    score = score * 8
    out = mod.modify(score, ctx)
    y = score / 5.0
    torch.testing.assert_close(out, 5.0 * (torch.exp(2 * y) - 1) / (torch.exp(2 * y) + 1))
    assert out.abs().max() < 5.0 and out.abs().max() > 4.5
    # far beyond the cap tanh saturates in floating point: bounded by cap, never above
    huge = torch.tensor([[[[1e6, -1e9, 0.0]]]], dtype=torch.float64)
    assert mod.modify(huge, ctx).tolist() == [[[[5.0, -5.0, 0.0]]]]
    small = torch.full((1, 1, 1, 1), 1e-3, dtype=torch.float64)
    torch.testing.assert_close(mod.modify(small, ctx), small, rtol=1e-6, atol=0)
    t_score, t_ctx, _ = tiled_view(score, ctx, n=2, m=3, span=3)
    assert (mod.modify(t_score, t_ctx).abs() < 5.0).all()
    assert "cap=5.0" in repr(mod)


def test_temperature_scalar_and_per_head():
    score, ctx = dense_inputs(4, 6)
    torch.testing.assert_close(Temperature(2.0).modify(score, ctx), score / 2.0)
    temps = [0.5, 2.0, 4.0]

    def naive(query):
        bias = torch.zeros(B, H, 4, 6, dtype=torch.float64)
        for h in range(H):
            bias[:, h] = score[:, h] / temps[h] - score[:, h]
        return bias

    check_against(Temperature(torch.tensor(temps, dtype=torch.float64)), naive, 4, 6)
    assert "learnable=False" in repr(Temperature(2.0))


def test_temperature_learnable_gradcheck():
    mod = Temperature(torch.tensor([0.5, 2.0], dtype=torch.float64), learnable=True)
    assert [n for n, _ in mod.named_parameters()] == ["temperature"]
    score, ctx = dense_inputs(3, 4, H=2)
    t = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    f = lambda t: functional_call(mod, {"temperature": t}, (score,), {"ctx": ctx})  # noqa: E731
    assert torch.autograd.gradcheck(f, (t,))
    p = torch.nn.Parameter(torch.tensor(1.5))
    assert Temperature(p).temperature is p


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: ALiBi(0), ValueError, "num_heads=0"),
        (lambda: ALiBi(2.0), TypeError, "num_heads"),
        (lambda: ALiBi(4, slopes=[1.0, 2.0]), ValueError, r"slopes.*\(4,\)"),
        (lambda: ALiBi(2, slopes="ab"), TypeError, "slopes"),
        (lambda: ALiBi(2, slopes=[1.0, float("nan")]), ValueError, "finite"),
        (lambda: alibi_slopes(-1), ValueError, "num_heads=-1"),
        (lambda: RelativeBias(2, num_buckets=7), ValueError, "num_buckets=7"),
        (lambda: RelativeBias(2, num_buckets=32, max_distance=8), ValueError, "max_distance=8"),
        (lambda: RelativeBias(2, bidirectional=1), TypeError, "bidirectional"),
        (lambda: RelativeBias(2, init_std=-1.0), ValueError, "init_std=-1.0"),
        (lambda: relative_position_bucket(torch.zeros(2), True), TypeError, "integer"),
        (lambda: RelativeEmbedding(0, 4), ValueError, "head_dim=0"),
        (lambda: RelativeEmbedding(4, 0), ValueError, "max_distance=0"),
        (lambda: RelativeEmbedding(4, 2, num_heads=0), ValueError, "num_heads=0"),
        (lambda: RelativeEmbedding(4, 2, scale=-1.0), ValueError, "scale=-1.0"),
        (lambda: RelativeEmbedding(4, 2, causal="yes"), TypeError, "causal"),
        (lambda: Softcap(0.0), ValueError, "cap=0.0"),
        (lambda: Softcap(-3), ValueError, "cap=-3"),
        (lambda: Softcap(float("inf")), ValueError, "cap=inf"),
        (lambda: Softcap("5"), TypeError, "cap"),
        (lambda: Temperature(0.0), ValueError, "temperature"),
        (lambda: Temperature([1.0, -2.0]), ValueError, "temperature"),
        (lambda: Temperature(torch.ones(2, 2)), ValueError, r"shape \(2, 2\)"),
        (lambda: Temperature("hot"), TypeError, "temperature"),
        (lambda: Temperature(1.0, learnable="yes"), TypeError, "learnable"),
    ],
)
def test_constructor_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize(
    "mod,match",
    [
        (ALiBi(4), "num_heads=4"),
        (RelativeBias(4), "num_heads=4"),
        (RelativeEmbedding(D, 2, num_heads=4), "num_heads=4"),
        (RelativeEmbedding(D + 1, 2), "head_dim=6"),
        (Temperature([1.0, 2.0]), "2 per-head"),
    ],
)
def test_validate_errors(mod, match):
    geom = make_geometry((4,), batch=1, q_heads=H, head_dim=D)
    with pytest.raises(ValueError, match=match):
        mod.validate(geom)
    RelativeEmbedding(D, 2).validate(geom)  # shared table: any head count


# ------------------------------------------------------------- through the reference backend


def naive_attention(q, k, v, bias, causal, scale=None):
    """softmax(scale * q k^T + bias) v over flat tokens, GQA by repeating kv heads."""
    Bq, Hq, L, Dq = q.shape
    rep = Hq // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scale = 1 / math.sqrt(Dq) if scale is None else scale
    logits = scale * q @ k.transpose(-1, -2) + bias
    if causal:
        S = k.shape[2]
        i = torch.arange(L).view(L, 1)
        j = torch.arange(S).view(1, S)
        logits = logits.masked_fill(j > i + S - L, float("-inf"))
    return torch.softmax(logits, -1) @ v


def qkv(L, S, Hq=4, Hkv=2, Dh=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(B, Hq, L, Dh), mk(B, Hkv, S, Dh), mk(B, Hkv, S, 3)


def bias_of(mod, q, L, S):
    """The naive bias of each mod, from its own (differentiable) parameters."""
    Hq = q.shape[1]
    rel = [[j - (i + S - L) for j in range(S)] for i in range(L)]
    if isinstance(mod, ALiBi):
        slopes = alibi_slopes(Hq).double()
        return -slopes.view(Hq, 1, 1) * torch.tensor(rel, dtype=torch.float64).abs()
    if isinstance(mod, RelativeBias):
        bk = torch.tensor(
            [
                [t5_bucket_exact(r, mod.bidirectional, mod.num_buckets, mod.max_distance)
                 for r in row]
                for row in rel
            ]
        )
        return mod.table.double()[bk].permute(2, 0, 1)
    return naive_rel_embedding(
        mod.table.double(), q, L, S, mod.max_distance, mod.causal, 1 / math.sqrt(q.shape[-1])
    )


REF_CASES = [
    ("alibi", lambda: ALiBi(4), True, (5, 8)),
    ("alibi-cross", lambda: ALiBi(4), False, (7, 4)),
    ("t5", lambda: RelativeBias(4, num_buckets=8, max_distance=6), False, (9, 6)),
    ("t5-causal", lambda: RelativeBias(4, 8, 6, bidirectional=False), True, (6, 9)),
    ("musictr", lambda: RelativeEmbedding(4, 3), True, (6, 8)),
    ("musictr-heads", lambda: RelativeEmbedding(4, 3, num_heads=4, causal=False), False, (8, 5)),
]


@pytest.mark.parametrize("name,make,causal,LS", REF_CASES, ids=[c[0] for c in REF_CASES])
def test_reference_backend_matches_naive_and_trains_the_tables(name, make, causal, LS):
    from attnlab import Causal
    from attnlab.backends.reference import reference_attention

    L, S = LS
    mod = make()
    q, k, v = qkv(L, S)
    out = reference_attention(q, k, v, pattern=Causal() if causal else None, score_mod=mod)
    expect = naive_attention(q, k, v, bias_of(mod, q, L, S), causal)
    torch.testing.assert_close(out, expect)
    params = list(mod.parameters())
    if params:
        out.square().sum().backward()
        (table,) = params
        assert table.grad is not None and table.grad.abs().sum() > 0
        (g,) = torch.autograd.grad(
            naive_attention(q, k, v, bias_of(mod, q, L, S), causal).square().sum(), table
        )
        torch.testing.assert_close(table.grad, g)


def test_reference_backend_softcap_temperature_chain_and_2d_tokens():
    from attnlab.backends.reference import reference_attention

    q, k, v = qkv(12, 12)
    temps = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    mod = Temperature(temps.clone(), learnable=True) + Softcap(3.0) + ALiBi(4)
    shape = lambda x: x.reshape(B, x.shape[1], 3, 4, x.shape[-1])  # noqa: E731
    out = reference_attention(shape(q), shape(k), shape(v), score_mod=mod)
    assert out.shape == (B, 4, 3, 4, 3)
    logits = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 2.0 / temps.view(4, 1, 1)
    logits = 3.0 * torch.tanh(logits / 3.0) + bias_of(ALiBi(4), q, 12, 12)
    expect = torch.softmax(logits, -1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out.reshape(B, 4, 12, 3), expect)
    out.sum().backward()
    assert mod.mods[0].temperature.grad.abs().min() > 0
