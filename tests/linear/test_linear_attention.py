"""attnlab.linear_attention: the three forms against the token-by-token recurrence."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.testing import MaxNumel
from attnlab.linear import (
    CosFormer,
    EluPlusOne,
    Hedgehog,
    LinearAttentionState,
    PerformerRandomFeatures,
    ReLU,
    T2R,
    TaylorExp,
    linear_attention,
    linear_attention_weights,
    naive_recurrence,
    retnet_decay,
    tnl_decay,
)

FORMS = ("chunked", "parallel", "recurrent")
TOL = dict(rtol=1e-9, atol=1e-9)


def _qkv(B=2, Hq=4, Hkv=2, L=23, S=None, D=6, Dv=5, seed=0, grad=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    S = L if S is None else S
    q = torch.randn(B, Hq, L, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, S, Dv, generator=g, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _expected(q, k, v, phi, *, scale=None, **kw):
    """The recurrence on explicitly feature-mapped, head-expanded inputs."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    L = q.shape[2]
    if getattr(phi, "needs_positions", False):
        pos = torch.arange(L)
        fq, fk = phi(q, pos, L), phi(k, pos, L)
    else:
        fq, fk = phi(q), phi(k)
    scale = fq.shape[-1] ** -0.5 if scale is None else scale
    return naive_recurrence(fq * scale, fk, v, **kw)


def _gate(B, H, L, F, seed=3, low=0.3):
    g = torch.Generator().manual_seed(seed)
    shape = (B, H, L) if F is None else (B, H, L, F)
    return low + (1 - low) * torch.rand(*shape, generator=g, dtype=torch.float64)


MAPS = {
    "elu+1": EluPlusOne(), "relu": ReLU(), "cosformer": CosFormer(), "taylor": TaylorExp(),
    "performer": PerformerRandomFeatures(6, 10, seed=1, orthogonal=True),
    "hedgehog": Hedgehog(6, 4, num_heads=4), "t2r": T2R(6, 7),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("causal", [False, True])
def test_feature_maps_all_forms_match_recurrence(name, causal, form):
    q, k, v = _qkv(L=23)
    phi = MAPS[name]
    with torch.no_grad():
        out = linear_attention(q, k, v, feature_map=phi, causal=causal, form=form, chunk_size=5)
        ref = _expected(q, k, v, phi, causal=causal, normalize=True)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("gate_kind", ["none", "scalar", "feature"])
@pytest.mark.parametrize("decay", [None, "retnet"])
@pytest.mark.parametrize("normalize", [False, True])
def test_decay_and_gates_all_forms_with_grads(form, gate_kind, decay, normalize):
    B, Hq, L, D = 2, 4, 19, 6
    q, k, v = _qkv(B=B, Hq=Hq, L=L, D=D, grad=True)
    gate = None if gate_kind == "none" else _gate(B, Hq, L, None if gate_kind == "scalar" else D)
    if gate is not None:
        gate.requires_grad_(True)
    dec = None if decay is None else retnet_decay(Hq)
    kw = dict(causal=True, decay=dec, gate=gate, normalize=normalize)
    out = linear_attention(q, k, v, feature_map="identity", form=form, chunk_size=4, **kw)
    ref = _expected(q, k, v, lambda x: x, **kw)
    torch.testing.assert_close(out, ref, **TOL)
    leaves = [t for t in (q, k, v, gate) if t is not None]
    go = torch.randn_like(out)
    g1 = torch.autograd.grad(out, leaves, go)
    g2 = torch.autograd.grad(ref, leaves, go)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("form", ["chunked", "recurrent"])
@pytest.mark.parametrize("normalize", [False, True])
def test_state_in_and_out_with_gradients(form, normalize):
    B, H, L, D = 1, 2, 13, 4
    q, k, v = _qkv(B=B, Hq=H, Hkv=H, L=L, D=D, Dv=3, grad=True)
    g = torch.Generator().manual_seed(5)
    S0 = torch.randn(B, H, D, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z0 = (torch.rand(B, H, D, generator=g, dtype=torch.float64) + 1).requires_grad_(True)
    state = (S0, z0 if normalize else None)
    gate = _gate(B, H, L, D)
    kw = dict(causal=True, gate=gate, decay=0.9, normalize=normalize)
    out, st = linear_attention(q, k, v, feature_map="relu", form=form, chunk_size=3, initial_state=state,
                               return_state=True, **kw)
    ref, rst = _expected(q, k, v, torch.relu, initial_state=state, return_state=True, **kw)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(st.S, rst.S, **TOL)
    loss = out.square().sum() + st.S.sin().sum() + (st.z.sum() if normalize else 0)
    loss_ref = ref.square().sum() + rst.S.sin().sum() + (rst.z.sum() if normalize else 0)
    leaves = [q, k, v, S0] + ([z0] if normalize else [])
    for a, b in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(loss_ref, leaves)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("phi", [EluPlusOne(), CosFormer(max_len=64)])
def test_two_calls_with_carried_state_equal_one_call(phi):
    q, k, v = _qkv(L=30)
    kw = dict(feature_map=phi, causal=True, decay=tnl_decay(4, 1, 3))
    with torch.no_grad():
        whole = linear_attention(q, k, v, **kw)
        a, st = linear_attention(q[:, :, :17], k[:, :, :17], v[:, :, :17], return_state=True, **kw)
        b = linear_attention(q[:, :, 17:], k[:, :, 17:], v[:, :, 17:], initial_state=st,
                             position_offset=17, chunk_size=4, **kw)
    torch.testing.assert_close(torch.cat([a, b], dim=2), whole, **TOL)


def test_token_by_token_decoding_equals_prefill():
    q, k, v = _qkv(L=12)
    with torch.no_grad():
        full = linear_attention(q, k, v, causal=True, decay=0.95)
        state, outs = None, []
        for t in range(12):
            o, state = linear_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], causal=True,
                                        decay=0.95, initial_state=state, return_state=True, form="recurrent")
            outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=2), full, **TOL)


@settings(max_examples=25, deadline=None)
@given(L=st.integers(1, 40), chunk=st.integers(1, 17), hkv=st.sampled_from([1, 2]),
       gate_kind=st.sampled_from(["none", "scalar", "feature"]), normalize=st.booleans(),
       seed=st.integers(0, 1000))
def test_random_configurations_chunked_equals_recurrence(L, chunk, hkv, gate_kind, normalize, seed):
    B, Hq, D = 1, 2, 3
    q, k, v = _qkv(B=B, Hq=Hq, Hkv=hkv, L=L, D=D, Dv=2, seed=seed)
    gate = None if gate_kind == "none" else _gate(B, Hq, L, None if gate_kind == "scalar" else D, seed, 0.05)
    kw = dict(causal=True, gate=gate, normalize=normalize)
    out = linear_attention(q, k, v, feature_map="elu+1", chunk_size=chunk, **kw)
    torch.testing.assert_close(out, _expected(q, k, v, EluPlusOne(), **kw), **TOL)


def test_tiny_per_feature_gates_take_the_exact_path():
    """Gates near 0 make exp(-cumsum log g) overflow the factored product; the exact C x C x F
    fallback must still match the recurrence (and stay finite) in float32."""
    B, H, L, D = 1, 2, 40, 4
    q, k, v = _qkv(B=B, Hq=H, Hkv=H, L=L, D=D, Dv=3, dtype=torch.float32)
    gate = torch.full((B, H, L, D), 1e-3)
    out = linear_attention(q, k, v, feature_map="identity", causal=True, gate=gate, normalize=False, chunk_size=32)
    ref = _expected(q.double(), k.double(), v.double(), lambda x: x, causal=True, gate=gate.double(),
                    normalize=False)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("S", [9, 23, 40])
@pytest.mark.parametrize("decay", [None, 0.8])
def test_causal_cross_attention_is_bottom_right_aligned(S, decay):
    q, k, v = _qkv(L=23, S=S)
    with torch.no_grad():
        out = linear_attention(q, k, v, causal=True, decay=decay, chunk_size=4)
        w = attnlab.attention_weights(q, k, v, pattern=attnlab.Causal())  # visibility only
        lw = linear_attention_weights(q, k, v, causal=True, decay=decay)
    assert torch.equal(lw != 0, w != 0)
    torch.testing.assert_close(out, lw @ v.repeat_interleave(2, 1), **TOL)
    if S < 23:  # queries without a visible key return 0
        assert torch.equal(out[:, :, : 23 - S], torch.zeros_like(out[:, :, : 23 - S]))


@pytest.mark.parametrize("gate_kind", ["scalar", "feature"])
def test_weights_reproduce_outputs(gate_kind):
    q, k, v = _qkv(L=17)
    gate = _gate(2, 4, 17, None if gate_kind == "scalar" else 6)
    kw = dict(feature_map="elu+1", causal=True, gate=gate, decay=0.9)  # positive: no empty rows
    w = linear_attention_weights(q, k, v, **kw)
    torch.testing.assert_close(w @ v.repeat_interleave(2, 1), linear_attention(q, k, v, **kw), **TOL)
    rows = w.sum(-1)  # normalised rows sum to (den / (den + eps)) ~ 1
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-4)


def test_multi_dimensional_tokens_are_flattened_row_major():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    out = linear_attention(q, k, v, causal=True)
    flat = linear_attention(*(t.reshape(1, 2, 20, 3) for t in (q, k, v)), causal=True)
    assert out.shape == (1, 2, 4, 5, 3)
    torch.testing.assert_close(out.reshape(1, 2, 20, 3), flat, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_is_close_to_float64(dtype):
    q, k, v = _qkv(L=50)
    ref = linear_attention(q, k, v, causal=True, decay=0.97)
    out = linear_attention(*(t.to(dtype) for t in (q, k, v)), causal=True, decay=0.97)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()


def test_performer_approximates_softmax_attention_better_with_more_features():
    q, k, v = _qkv(B=1, Hq=2, Hkv=2, L=32, D=8, Dv=4)
    q, k = q * 0.5, k * 0.5
    exact = attnlab.attention(q, k, v)
    errs = []
    for m in (8, 4096):
        phi = PerformerRandomFeatures(8, m, seed=0, orthogonal=True)
        errs.append((linear_attention(q, k, v, feature_map=phi) - exact).abs().mean().item())
    assert errs[1] < 0.35 * errs[0]
    assert errs[1] < 0.02


def test_feature_map_kernels():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 1, 1, 1, 6, generator=g, dtype=torch.float64)
    s = (x * y).sum() / math.sqrt(6)
    taylor = TaylorExp()
    torch.testing.assert_close((taylor(x) * taylor(y)).sum(), 1 + s + s * s / 2)
    cos = CosFormer(max_len=10)
    pi, pj = torch.tensor([7]), torch.tensor([3])
    got = (cos(x, pi, 10) * cos(y, pj, 10)).sum()
    want = (torch.relu(x) * torch.relu(y)).sum() * math.cos(math.pi * 4 / 20)
    torch.testing.assert_close(got, want)
    hh = Hedgehog(6)  # identity init: [softmax(x), softmax(-x)]
    torch.testing.assert_close(hh(x), torch.cat([x.softmax(-1), (-x).softmax(-1)], -1))
    assert hh.out_dim(6) == 12 and taylor.out_dim(6) == 43 and cos.out_dim(6) == 12


def test_learnable_feature_maps_receive_gradients():
    q, k, v = _qkv(L=9)
    for phi in (Hedgehog(6, num_heads=4), T2R(6, 8, num_heads=4)):
        linear_attention(q, k, v, feature_map=phi, causal=True).sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in phi.parameters())


def test_separate_query_and_key_maps():
    q, k, v = _qkv(L=11)
    pair = (Hedgehog(6, num_heads=4), Hedgehog(6, num_heads=4))
    with torch.no_grad():
        pair[1].weight.mul_(0.5)
        out = linear_attention(q, k, v, feature_map=pair, causal=True)
        rep = lambda t: t.repeat_interleave(2, 1)  # noqa: E731
        fq, fk = pair[0](q), pair[1](rep(k))
        ref = naive_recurrence(fq / math.sqrt(12), fk, rep(v), causal=True, normalize=True)
    torch.testing.assert_close(out, ref, **TOL)


def test_no_L_by_L_tensor_in_the_chunked_form():
    B, H, L, D = 1, 2, 300, 4
    q, k, v = _qkv(B=B, Hq=H, Hkv=H, L=L, D=D, Dv=4, dtype=torch.float32, grad=True)
    gate = _gate(B, H, L, D).float()
    with MaxNumel() as m:
        out = linear_attention(q, k, v, causal=True, gate=gate, chunk_size=16)
        out.sum().backward()
    assert m.max_numel < L * L


def test_state_dtype_for_half_inputs_is_float32():
    q, k, v = _qkv(L=5, dtype=torch.bfloat16)
    out, st = linear_attention(q, k, v, causal=True, return_state=True)
    assert out.dtype == torch.bfloat16 and st.S.dtype == torch.float32 and isinstance(st, LinearAttentionState)


def _bad_calls():
    yield "chunk_size", dict(chunk_size=0), ValueError, "chunk_size"
    yield "decay zero", dict(causal=True, decay=0.0), ValueError, r"decay must lie in \(0, 1\]"
    yield "decay big", dict(causal=True, decay=torch.tensor([0.5, 1.5, 0.9, 0.9])), ValueError, "decay"
    yield "decay shape", dict(causal=True, decay=torch.ones(3)), ValueError, r"broadcastable to \(H,\)"
    yield "decay non-causal", dict(decay=0.9), ValueError, "causal=True"
    yield "gate shape", dict(causal=True, gate=torch.rand(2, 4, 7)), ValueError, r"gate must have shape"
    yield "gate range", dict(causal=True, gate=torch.zeros(2, 4, 8)), ValueError, r"gate values must lie"
    yield "form", dict(form="fast"), ValueError, "form must be one of"
    yield "parallel state", dict(form="parallel", return_state=True), ValueError, "return_state"
    yield "state shape", dict(causal=True, initial_state=(torch.zeros(2, 4, 6, 6), torch.zeros(2, 4, 6))), \
        ValueError, r"initial_state S must have shape"
    yield "state z missing", dict(causal=True, initial_state=(torch.zeros(2, 4, 6, 5), None)), ValueError, "z"
    yield "state type", dict(causal=True, initial_state="s"), TypeError, "initial_state"
    yield "map name", dict(feature_map="softmax"), ValueError, "feature_map='softmax'"
    yield "map type", dict(feature_map=3), TypeError, "feature_map"
    yield "map pair sizes", dict(feature_map=(EluPlusOne(), TaylorExp())), ValueError, "same number of features"
    yield "map out_dim", dict(feature_map=PerformerRandomFeatures(5, 4)), ValueError, "dim=5"
    yield "map shape", dict(feature_map=lambda x: x[..., 0]), ValueError, "must return"
    yield "scale", dict(scale="big"), TypeError, "scale"
    yield "offset", dict(position_offset=-1), ValueError, "position_offset"
    yield "causal type", dict(causal=1), TypeError, "causal must be a bool"
    yield "normalize type", dict(normalize=None), TypeError, "normalize"


@pytest.mark.parametrize("name,kwargs,exc,match", list(_bad_calls()))
def test_bad_inputs(name, kwargs, exc, match):
    q, k, v = _qkv(L=8)
    with pytest.raises(exc, match=match):
        linear_attention(q, k, v, **kwargs)


def test_bad_tensors_and_gate_with_cross_causal():
    q, k, v = _qkv(L=8, S=5)
    with pytest.raises(ValueError, match="L == S"):
        linear_attention(q, k, v, causal=True, gate=torch.rand(2, 4, 8) + 0.5)
    with pytest.raises(TypeError, match="q"):
        linear_attention(q.numpy(), k, v)
    with pytest.raises(ValueError, match="weights would build"):
        big = torch.zeros(64, 64, 300, 1)
        linear_attention_weights(big, big, big, causal=True)


@pytest.mark.parametrize("gate_kind", ["none", "scalar", "feature"])
def test_many_segments_match_recurrence_with_grads(monkeypatch, gate_kind):
    """Segments of 8 tokens (instead of 2048) so that a short input crosses many of them, each
    recomputed in the backward pass; outputs, returned state and all gradients must still be
    exact."""
    import attnlab.linear.segments as segments

    monkeypatch.setattr(segments, "SEGMENT_TOKENS", 8)
    B, Hq, L, D = 2, 4, 45, 6
    q, k, v = _qkv(B=B, Hq=Hq, L=L, D=D, grad=True)
    gate = None if gate_kind == "none" else _gate(B, Hq, L, None if gate_kind == "scalar" else 2 * D).requires_grad_()
    phi = Hedgehog(6, num_heads=4).double()
    kw = dict(causal=True, decay=0.97, gate=gate, normalize=True)
    out, st = linear_attention(q, k, v, feature_map=phi, chunk_size=3, return_state=True, **kw)
    ref, rst = _expected(q, k, v, phi, return_state=True, **kw)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(st.S, rst.S, **TOL)
    leaves = [t for t in (q, k, v, gate, *phi.parameters()) if t is not None]
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * go).sum() + st.S.sum(), leaves),
                    torch.autograd.grad((ref * go).sum() + rst.S.sum(), leaves)):
        torch.testing.assert_close(a, b, **TOL)
