"""attnlab.nn modules against torch.nn.MultiheadAttention and naive formulas written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnlab as al
from attnlab.nn import (
    MultiheadAttention,
    NeighborhoodAttention,
    NeighborhoodAttention1d,
    NeighborhoodAttention2d,
    NeighborhoodAttention3d,
    RelativeSelfAttention,
)

F64 = torch.float64
E, H, B, L, S = 16, 4, 2, 5, 7


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def module_pair(direction="torch->attnlab", dtype=F64, **kw):
    """A torch.nn.MultiheadAttention and an attnlab one with the same weights."""
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=dtype, **kw)
    ours = MultiheadAttention(E, H, dtype=dtype, **kw)
    if direction == "torch->attnlab":
        ours.load_state_dict(ref.state_dict())
    else:
        ref.load_state_dict(ours.state_dict())
    return ref, ours


def inputs(kdim=E, vdim=E, cross=True, seed=1):
    q = randn(B, L, E, seed=seed).requires_grad_()
    if not cross:
        return q, q, q
    k = randn(B, S, kdim, seed=seed + 1).requires_grad_()
    v = randn(B, S, vdim, seed=seed + 2).requires_grad_()
    return q, k, v


def assert_same_call(ref, ours, q, k, v, grads=True, **kwargs):
    """Outputs, weights and gradients (inputs and parameters) of both modules agree."""
    out_r, w_r = ref(q, k, v, **kwargs)
    out_o, w_o = ours(q, k, v, **kwargs)
    torch.testing.assert_close(out_o, out_r, atol=1e-10, rtol=1e-10)
    if w_r is None:
        assert w_o is None
    else:
        torch.testing.assert_close(w_o, w_r, atol=1e-10, rtol=1e-10)
    if not grads:
        return
    xs = [x for x in dict.fromkeys((q, k, v)) if x.requires_grad]
    g = randn(*out_r.shape, seed=9)
    params_r, params_o = dict(ref.named_parameters()), dict(ours.named_parameters())
    assert params_r.keys() == params_o.keys()
    gr = torch.autograd.grad(out_r, xs + list(params_r.values()), g)
    go = torch.autograd.grad(out_o, xs + [params_o[n] for n in params_r], g)
    for a, b in zip(go, gr):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


# -- MultiheadAttention ---------------------------------------------------------------------
CONFIGS = {
    "self": dict(cross=False, kw={}),
    "cross": dict(cross=True, kw={}),
    "kdim_vdim": dict(cross=True, kw=dict(kdim=6, vdim=9)),
    "no_bias": dict(cross=True, kw=dict(bias=False)),
    "bias_kv": dict(cross=True, kw=dict(add_bias_kv=True)),
    "zero_attn": dict(cross=False, kw=dict(add_zero_attn=True)),
    "bias_kv_zero_attn_kdim": dict(
        cross=True, kw=dict(add_bias_kv=True, add_zero_attn=True, kdim=3)
    ),
}


@pytest.mark.parametrize("direction", ["torch->attnlab", "attnlab->torch"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mha_matches_torch(name, direction):
    cfg = CONFIGS[name]
    ref, ours = module_pair(direction, **cfg["kw"])
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for key, t in ref.state_dict().items():
        assert ours.state_dict()[key].shape == t.shape
    q, k, v = inputs(cfg["kw"].get("kdim", E), cfg["kw"].get("vdim", E), cfg["cross"])
    assert_same_call(ref, ours, q, k, v)
    assert_same_call(ref, ours, q, k, v, grads=False, average_attn_weights=False)
    assert_same_call(ref, ours, q, k, v, grads=False, need_weights=False)


def _masks():
    kpm_bool = torch.zeros(B, S, dtype=torch.bool)
    kpm_bool[0, -3:] = True
    kpm_float = randn(B, S, seed=3)
    kpm_float[1, 2] = float("-inf")
    am2_bool = torch.rand(L, S, generator=torch.Generator().manual_seed(4)) > 0.6
    am2_bool[:, 1] = False  # every query keeps a key
    am3_bool = torch.rand(B * H, L, S, generator=torch.Generator().manual_seed(5)) > 0.6
    am3_bool[..., 0] = False
    return {
        "kpm_bool": dict(key_padding_mask=kpm_bool),
        "kpm_float": dict(key_padding_mask=kpm_float),
        "am2_bool": dict(attn_mask=am2_bool),
        "am2_float": dict(attn_mask=randn(L, S, seed=6)),
        "am3_bool": dict(attn_mask=am3_bool),
        "am3_float": dict(attn_mask=randn(B * H, L, S, seed=7)),
        "kpm_bool_am3_bool": dict(key_padding_mask=kpm_bool, attn_mask=am3_bool),
        "kpm_float_am2_float": dict(key_padding_mask=kpm_float, attn_mask=randn(L, S, seed=8)),
    }


@pytest.mark.parametrize("extra", [{}, dict(add_bias_kv=True, add_zero_attn=True)])
@pytest.mark.parametrize("mask", list(_masks()))
def test_mha_masks_match_torch(mask, extra):
    ref, ours = module_pair(**extra)
    q, k, v = inputs()
    assert_same_call(ref, ours, q, k, v, **_masks()[mask])
    assert_same_call(ref, ours, q, k, v, grads=False, average_attn_weights=False, **_masks()[mask])


@pytest.mark.parametrize("extra", [{}, dict(add_bias_kv=True)])
def test_mha_is_causal_matches_torch_causal_mask(extra):
    ref, ours = module_pair(**extra)
    q, _, _ = inputs(cross=False)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)  # True = not allowed
    out_r, w_r = ref(q, q, q, attn_mask=causal, is_causal=True)
    variants = ({"is_causal": True}, {"attn_mask": causal})
    for kwargs in variants + ({"attn_mask": causal, "is_causal": True},):
        out_o, w_o = ours(q, q, q, **kwargs)
        torch.testing.assert_close(out_o, out_r, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(w_o, w_r, atol=1e-10, rtol=1e-10)
    assert_same_call(ref, ours, q, q, q, attn_mask=causal, is_causal=True)


def test_mha_sliding_window_pattern_equals_torch_mask():
    ref, _ = module_pair()
    ours = MultiheadAttention(E, H, dtype=F64, pattern=al.SlidingWindow(left=3))
    ours.load_state_dict(ref.state_dict())
    q, _, _ = inputs(cross=False)
    i, j = torch.arange(L).view(-1, 1), torch.arange(L).view(1, -1)
    not_allowed = ~((j <= i) & (j >= i - 3))
    for backend in ("auto", "tiled", "reference"):
        ours.backend = backend
        out_r, w_r = ref(q, q, q, attn_mask=not_allowed)
        out_o, w_o = ours(q, q, q)
        torch.testing.assert_close(out_o, out_r, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(w_o, w_r, atol=1e-10, rtol=1e-10)
    assert "SlidingWindow" in repr(ours) and "score_mod=None" in repr(ours)


def test_mha_callable_score_mod_equals_float_mask():
    bias = randn(H, L, S, seed=11)
    ref, _ = module_pair()
    def add_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx, kv_idx]

    ours = MultiheadAttention(E, H, dtype=F64, score_mod=add_bias)
    ours.load_state_dict(ref.state_dict())
    q, k, v = inputs()
    out_r, w_r = ref(q, k, v, attn_mask=bias.repeat(B, 1, 1))
    out_o, w_o = ours(q, k, v)
    torch.testing.assert_close(out_o, out_r, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(w_o, w_r, atol=1e-10, rtol=1e-10)
    assert "score_mod=CallableScoreMod(add_bias)" in ours.extra_repr()


def test_mha_unbatched_and_fully_masked_rows():
    ref, ours = module_pair()
    q, k, v = (x[0].detach() for x in inputs())
    out_r, w_r = ref(q, k, v, key_padding_mask=torch.arange(S) > 4)
    out_o, w_o = ours(q, k, v, key_padding_mask=torch.arange(S) > 4)
    assert out_o.shape == (L, E) and w_o.shape == (L, S)
    torch.testing.assert_close(out_o, out_r, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(w_o, w_r, atol=1e-10, rtol=1e-10)
    out_o, w_o = ours(q, k, v, key_padding_mask=torch.ones(S, dtype=torch.bool))
    assert torch.isfinite(out_o).all()  # torch gives NaN; attnlab's empty rows attend to nothing
    torch.testing.assert_close(out_o, ours.out_proj.bias.expand(L, E))
    assert (w_o == 0).all()


def test_mha_dropout_matches_torch_with_same_seed():
    ref, ours = module_pair(dropout=0.3, dtype=torch.float32)
    q, k, v = (x.float() for x in inputs())
    torch.manual_seed(123)
    out_r, w_r = ref(q, k, v, average_attn_weights=False)
    torch.manual_seed(123)
    out_o, w_o = ours(q, k, v, average_attn_weights=False)
    assert (w_o == 0).any()
    torch.testing.assert_close(w_o, w_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_o, out_r, atol=1e-5, rtol=1e-5)
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(q, k, v)[0], ref(q, k, v)[0], atol=1e-5, rtol=1e-5)


def test_mha_gqa_matches_manual():
    m = MultiheadAttention(E, H, dtype=F64, num_kv_heads=2, kdim=6, pattern=al.Causal())
    D = E // H
    assert m.k_proj_weight.shape == (2 * D, 6) and m.in_proj_bias.shape == (E + 4 * D,)
    with torch.no_grad():
        m.in_proj_bias.normal_()
    q, k, v = inputs(kdim=6)
    out, w = m(q, k, v, average_attn_weights=False)
    bq, bk, bv = m.in_proj_bias.split([E, 2 * D, 2 * D])
    Q = F.linear(q, m.q_proj_weight, bq).view(B, L, H, D).transpose(1, 2)
    K = F.linear(k, m.k_proj_weight, bk).view(B, S, 2, D).transpose(1, 2).repeat_interleave(2, 1)
    V = F.linear(v, m.v_proj_weight, bv).view(B, S, 2, D).transpose(1, 2).repeat_interleave(2, 1)
    logits = Q @ K.transpose(-1, -2) / math.sqrt(D)
    i, j = torch.arange(L).view(-1, 1), torch.arange(S).view(1, -1)
    p = logits.masked_fill(j > i + S - L, float("-inf")).softmax(-1)  # bottom-right causal
    expected = m.out_proj((p @ V).transpose(1, 2).reshape(B, L, E))
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(w, p, atol=1e-10, rtol=1e-10)
    out.sum().backward()
    assert m.k_proj_weight.grad is not None and m.k_proj_weight.grad.abs().sum() > 0
    # num_kv_heads == num_heads is plain multi-head attention, torch's layout
    ref = torch.nn.MultiheadAttention(E, H, batch_first=True)
    MultiheadAttention(E, H, num_kv_heads=H).load_state_dict(ref.state_dict())


def test_mha_replaces_self_attn_of_transformer_encoder_layer():
    layer = torch.nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
    layer.eval()
    x = randn(B, L, E, dtype=torch.float32)
    i, j = torch.arange(L).view(-1, 1), torch.arange(L).view(1, -1)
    with torch.no_grad():
        expected = layer(x, src_mask=~((j <= i) & (j >= i - 2)))
        attn = MultiheadAttention(E, H, pattern=al.SlidingWindow(left=2))
        attn.load_state_dict(layer.self_attn.state_dict())
        layer.self_attn = attn  # torch's fused inference path would ignore the pattern
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, call, exc, match",
    [
        (dict(embed_dim=10, num_heads=4), None, ValueError, "embed_dim=10"),
        (dict(num_kv_heads=3), None, ValueError, "num_kv_heads=3"),
        (dict(batch_first=False), None, ValueError, "batch_first=False.*only supports"),
        (dict(dropout=1.5), None, ValueError, "dropout=1.5"),
        (dict(kdim=0), None, ValueError, "kdim=0"),
        (dict(pattern=3), None, TypeError, "pattern"),
        ({}, dict(key_padding_mask=torch.zeros(B, S + 1) > 0), ValueError, "key_padding_mask"),
        ({}, dict(attn_mask=torch.zeros(B, L, S) > 0), ValueError, "attn_mask.shape"),
        ({}, dict(attn_mask=torch.zeros(L, S, dtype=torch.long)), TypeError, "attn_mask.dtype"),
        ({}, dict(is_causal=1), TypeError, "is_causal=1"),
        ({}, dict(query=randn(B, L, E + 1)), ValueError, "query.shape"),
    ],
)
def test_mha_validation(kwargs, call, exc, match):
    args = dict(embed_dim=E, num_heads=H, dtype=F64) | kwargs
    with pytest.raises(exc, match=match):
        m = MultiheadAttention(**args)
        q, k, v = inputs()
        call = dict(call or {})
        m(call.pop("query", q), k, v, **call)


# -- NeighborhoodAttention ------------------------------------------------------------------
def manual_neighborhood(m, x, pattern, rpb_bias=None):
    """qkv -> attnlab.attention(backend="reference") -> proj, written out here."""
    Bx, spatial, C = x.shape[0], x.shape[1:-1], x.shape[-1]
    Hh, D = m.num_heads, C // m.num_heads
    qkv = F.linear(x, m.qkv.weight, m.qkv.bias).reshape(Bx, -1, 3, Hh, D).permute(2, 0, 3, 1, 4)
    q, k, v = (t.reshape(Bx, Hh, *spatial, D) for t in qkv)
    out = al.attention(q, k, v, pattern, rpb_bias, backend="reference")
    out = out.reshape(Bx, Hh, -1, D).transpose(1, 2).reshape(*x.shape)
    return F.linear(out, m.proj.weight, m.proj.bias)


NA_CASES = [
    (NeighborhoodAttention1d, (11,), dict(kernel_size=3)),
    (NeighborhoodAttention1d, (12,), dict(kernel_size=4, dilation=2, stride=2)),
    (NeighborhoodAttention1d, (9,), dict(kernel_size=5, is_causal=True)),
    (NeighborhoodAttention2d, (6, 9), dict(kernel_size=3)),
    (NeighborhoodAttention2d, (7, 10), dict(kernel_size=(3, 5), dilation=(2, 1), stride=(1, 2))),
    (NeighborhoodAttention2d, (5, 8), dict(kernel_size=3, is_causal=(True, False))),
    (NeighborhoodAttention3d, (4, 5, 6), dict(kernel_size=(2, 3, 3), dilation=(1, 1, 2))),
]


@pytest.mark.parametrize("cls, spatial, kw", NA_CASES)
def test_neighborhood_matches_manual(cls, spatial, kw):
    torch.manual_seed(0)
    m = cls(8, 2, dtype=F64, **kw)
    x = randn(2, *spatial, 8).requires_grad_()
    out = m(x)
    assert out.shape == x.shape
    pattern = al.Neighborhood(
        tuple(m.kernel_size), tuple(m.dilation), tuple(m.stride), tuple(m.is_causal)
    )
    torch.testing.assert_close(out, manual_neighborhood(m, x, pattern), atol=1e-10, rtol=1e-10)
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert m.qkv.weight.grad.abs().sum() > 0 and m.proj.weight.grad.abs().sum() > 0


def test_neighborhood_1d_with_rel_pos_bias_equals_explicit_windows():
    """NAT (1-D, dilation 1): query i sees keys [start, start + k), start = clamp(i - k//2, 0,
    n - k), with bias rpb[h, j - i + k - 1]; written with explicit loops."""
    n, k, C, Hh = 9, 5, 8, 2
    m = NeighborhoodAttention1d(C, Hh, k, rel_pos_bias=True, dtype=F64)
    with torch.no_grad():
        m.rpb.normal_()
    x = randn(1, n, C)
    D = C // Hh
    q, kk, v = F.linear(x[0], m.qkv.weight, m.qkv.bias).view(n, 3, Hh, D).unbind(1)
    out = torch.zeros(n, Hh, D, dtype=F64)
    for h in range(Hh):
        for i in range(n):
            start = min(max(i - k // 2, 0), n - k)
            js = list(range(start, start + k))
            logits = torch.stack(
                [q[i, h] @ kk[j, h] / math.sqrt(D) + m.rpb[h, j - i + k - 1] for j in js]
            )
            out[i, h] = logits.softmax(0) @ v[js, h]
    expected = F.linear(out.reshape(n, C), m.proj.weight, m.proj.bias)
    torch.testing.assert_close(m(x)[0], expected, atol=1e-10, rtol=1e-10)
    m(x).sum().backward()
    assert m.rpb.grad.abs().sum() > 0


def test_neighborhood_generic_class_and_state_dict():
    a = NeighborhoodAttention2d(8, 2, (3, 3), rel_pos_bias=True)
    b = NeighborhoodAttention(8, 2, (3, 3), rel_pos_bias=True, ndim=2)
    assert set(a.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "rpb"}
    assert a.rpb.shape == (2, 5, 5)
    b.load_state_dict(a.state_dict())
    x = randn(1, 5, 6, 8, dtype=torch.float32)
    torch.testing.assert_close(a(x), b(x))
    assert "Neighborhood(kernel_size=(3, 3)" in repr(a) and "ndim=2" in repr(a)


@pytest.mark.parametrize(
    "make, x, exc, match",
    [
        (lambda: NeighborhoodAttention2d(8, 2, 3), randn(1, 5, 8), ValueError, "x.shape"),
        (lambda: NeighborhoodAttention2d(8, 2, (3, 3, 3)), None, TypeError, "kernel_size="),
        (lambda: NeighborhoodAttention2d(8, 3, 3), None, ValueError, "embed_dim=8"),
        (lambda: NeighborhoodAttention1d(8, 2, 3, ndim=2), None, ValueError, "ndim=2"),
        (lambda: NeighborhoodAttention(8, 2, 3), None, ValueError, "ndim=None"),
        (lambda: NeighborhoodAttention1d(8, 2, 7), randn(1, 5, 8), ValueError, "kernel_size"),
    ],
)
def test_neighborhood_validation(make, x, exc, match):
    with pytest.raises(exc, match=match):
        m = make()
        m(x.float())


# -- RelativeSelfAttention ------------------------------------------------------------------
def naive_relative(m, x):
    """O(L^2 D): explicit per-pair embeddings E[clip(j - i, -M, 0)], causal softmax."""
    Bx, Lx, C = x.shape
    Hh, D, M = m.num_heads, m.head_dim, m.max_distance
    q, k, v = F.linear(x, m.in_proj.weight, m.in_proj.bias).view(Bx, Lx, 3, Hh, D).unbind(2)
    table = m.relative.table
    out = torch.zeros(Bx, Lx, Hh, D, dtype=x.dtype)
    for i in range(Lx):
        for h in range(Hh):
            tab = table if m.shared_heads else table[h]
            rel = torch.stack([tab[max(j - i, -M) + M] for j in range(i + 1)])  # (i + 1, D)
            logits = ((q[:, i, h, None, :] * (k[:, : i + 1, h] + rel)).sum(-1)) / math.sqrt(D)
            out[:, i, h] = (logits.softmax(-1)[..., None] * v[:, : i + 1, h]).sum(1)
    return F.linear(out.reshape(Bx, Lx, C), m.out_proj.weight, m.out_proj.bias)


@pytest.mark.parametrize("shared", [False, True])
def test_relative_self_attention_matches_naive(shared):
    torch.manual_seed(0)
    m = RelativeSelfAttention(12, 3, max_distance=4, shared_heads=shared, dtype=F64)
    expected_shape = (5, 4) if shared else (3, 5, 4)
    assert m.relative.table.shape == expected_shape
    with torch.no_grad():
        m.relative.table.normal_()
    x = randn(2, 9, 12)
    torch.testing.assert_close(m(x), naive_relative(m, x), atol=1e-10, rtol=1e-10)


def test_relative_self_attention_is_causal_and_trains():
    torch.manual_seed(0)
    m = RelativeSelfAttention(12, 3, max_distance=3, dtype=F64)
    x = randn(2, 10, 12).requires_grad_()
    out = m(x)
    t = 4
    x2 = x.detach().clone()
    x2[:, t + 1 :] = randn(2, 10 - t - 1, 12, seed=5)
    out2 = m(x2)
    torch.testing.assert_close(out2[:, : t + 1], out[:, : t + 1], atol=1e-12, rtol=0)
    assert (out2[:, t + 1 :] - out[:, t + 1 :]).abs().max() > 1e-3
    out.square().sum().backward()
    assert m.relative.table.grad is not None and m.relative.table.grad.abs().sum() > 0
    # dropout: training falls back to the reference path; eval is deterministic
    d = RelativeSelfAttention(12, 3, max_distance=3, dropout=0.5, dtype=F64)
    d.load_state_dict(m.state_dict())
    d.train()
    d(x).sum().backward()
    d.eval()
    torch.testing.assert_close(d(x), m(x))
    assert "max_distance=3" in repr(m) and "Causal()" in repr(m)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(embed_dim=10, num_heads=4, max_distance=3), ValueError, "embed_dim=10"),
        (dict(embed_dim=12, num_heads=3, max_distance=0), ValueError, "max_distance=0"),
        (dict(embed_dim=12, num_heads=3, max_distance=2, dropout=-0.1), ValueError, "dropout="),
        (dict(embed_dim=12, num_heads=3, max_distance=2, shared_heads=1), TypeError, "shared_h"),
    ],
)
def test_relative_self_attention_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RelativeSelfAttention(**kwargs)
    with pytest.raises(ValueError, match="x.shape"):
        RelativeSelfAttention(12, 3, 2)(torch.randn(2, 5, 10))
