"""Linear attention forms and feature maps against the exact loop reference."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.linear import (
    EluPlusOne,
    Identity,
    LinearAttentionState,
    PerformerRandomFeatures,
    ReLU,
    chunked_form,
    naive_recurrence,
    parallel_form,
    recurrent_step,
)
from attnlab.testing import MaxNumel

B, H, F, DV = 2, 3, 4, 5
TOL = dict(rtol=1e-10, atol=1e-10)


def _inputs(L, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    # positive features keep the normaliser well away from zero
    q = torch.rand(B, H, L, F, generator=gen, dtype=torch.float64) + 0.1
    k = torch.rand(B, H, L, F, generator=gen, dtype=torch.float64) + 0.1
    v = torch.randn(B, H, L, DV, generator=gen, dtype=torch.float64)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def _state(seed=1, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    S = torch.randn(B, H, F, DV, generator=gen, dtype=torch.float64)
    z = torch.rand(B, H, F, generator=gen, dtype=torch.float64) + 0.5
    if requires_grad:
        S.requires_grad_(True)
        z.requires_grad_(True)
    return S, z


DECAY = torch.tensor([1 - 2.0 ** -(5 + h) for h in range(H)], dtype=torch.float64)
STRONG_DECAY = torch.tensor([0.5, 0.8, 0.95], dtype=torch.float64)
DECAYS = {"none": None, "retnet": DECAY, "strong": STRONG_DECAY, "scalar": 0.9}
# (causal, decay name): decay only with causal
MODES = [(True, d) for d in DECAYS] + [(False, "none")]


# --------------------------------------------------------------------------- forward equality


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal,decay", MODES)
@pytest.mark.parametrize("with_state", [False, True])
def test_parallel_matches_reference(causal, decay, normalize, with_state):
    q, k, v = _inputs(37)
    st = _state() if with_state else None
    kw = dict(causal=causal, decay=DECAYS[decay], normalize=normalize, initial_state=st)
    ref = naive_recurrence(q, k, v, **kw)
    torch.testing.assert_close(parallel_form(q, k, v, **kw), ref, **TOL)


@pytest.mark.parametrize("L", [37, 100])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal,decay", [(True, "none"), (True, "retnet"), (True, "strong"),
                                          (False, "none")])
def test_chunked_matches_reference(L, chunk_size, causal, decay, normalize):
    q, k, v = _inputs(L)
    kw = dict(causal=causal, decay=DECAYS[decay], normalize=normalize)
    ref, ref_state = naive_recurrence(q, k, v, **kw, return_state=True)
    out, state = chunked_form(q, k, v, **kw, chunk_size=chunk_size, return_state=True)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(state.S, ref_state.S, **TOL)
    if normalize:
        torch.testing.assert_close(state.z, ref_state.z, **TOL)
    else:
        assert state.z is None and ref_state.z is None


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal,decay", MODES)
def test_chunked_with_initial_state_matches_reference(causal, decay, normalize):
    q, k, v = _inputs(37)
    st = _state()
    kw = dict(causal=causal, decay=DECAYS[decay], normalize=normalize, initial_state=st)
    ref, ref_state = naive_recurrence(q, k, v, **kw, return_state=True)
    out, state = chunked_form(q, k, v, **kw, chunk_size=8, return_state=True)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(state.S, ref_state.S, **TOL)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("decay", ["none", "retnet", "strong", "scalar"])
@pytest.mark.parametrize("with_state", [False, True])
def test_recurrent_matches_reference(decay, normalize, with_state):
    L = 37
    q, k, v = _inputs(L)
    st = _state() if with_state else None
    ref, ref_state = naive_recurrence(q, k, v, causal=True, decay=DECAYS[decay],
                                      normalize=normalize, initial_state=st, return_state=True)
    state = st
    outs = []
    for t in range(L):
        o, state = recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], state,
                                  decay=DECAYS[decay], normalize=normalize)
        assert o.shape == (B, H, DV)
        outs.append(o)
    torch.testing.assert_close(torch.stack(outs, dim=2), ref, **TOL)
    torch.testing.assert_close(state.S, ref_state.S, **TOL)
    if normalize:
        torch.testing.assert_close(state.z, ref_state.z, **TOL)


def test_chunked_matches_reference_uneven_feature_and_value_dims():
    gen = torch.Generator().manual_seed(3)
    q = torch.rand(1, 2, 23, 7, generator=gen, dtype=torch.float64)
    k = torch.rand(1, 2, 23, 7, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, 23, 3, generator=gen, dtype=torch.float64)
    kw = dict(causal=True, decay=torch.tensor([0.7]), normalize=True)
    torch.testing.assert_close(chunked_form(q, k, v, **kw, chunk_size=6),
                               naive_recurrence(q, k, v, **kw), **TOL)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal,decay", [(True, "none"), (True, "retnet"), (True, "strong"),
                                          (False, "none")])
def test_chunked_gradients_match_reference(causal, decay, normalize):
    q, k, v = _inputs(37, requires_grad=True)
    S0, z0 = _state(requires_grad=True)
    st = (S0, z0)
    kw = dict(causal=causal, decay=DECAYS[decay], normalize=normalize, initial_state=st)
    leaves = (q, k, v, S0, z0) if normalize else (q, k, v, S0)
    g_out = torch.randn(B, H, 37, DV, dtype=torch.float64)

    def grads(out):
        return torch.autograd.grad((out * g_out).sum(), leaves)

    ref = grads(naive_recurrence(q, k, v, **kw))
    got = grads(chunked_form(q, k, v, **kw, chunk_size=5))
    for name, a, b in zip(("q", "k", "v", "S0", "z0"), got, ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"grad {n}: {m}")


# --------------------------------------------------------------------------- state carry


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("decay", ["none", "retnet", "strong"])
def test_state_carry_equals_one_call(decay, normalize):
    q, k, v = _inputs(100)
    kw = dict(causal=True, decay=DECAYS[decay], normalize=normalize, chunk_size=16)
    full, full_state = chunked_form(q, k, v, **kw, return_state=True)
    first, st = chunked_form(q[:, :, :40], k[:, :, :40], v[:, :, :40], **kw, return_state=True)
    second, st2 = chunked_form(q[:, :, 40:], k[:, :, 40:], v[:, :, 40:], **kw,
                               initial_state=st, return_state=True)
    torch.testing.assert_close(torch.cat([first, second], dim=2), full, **TOL)
    torch.testing.assert_close(st2.S, full_state.S, **TOL)
    # tuples work as states too
    second_t = chunked_form(q[:, :, 40:], k[:, :, 40:], v[:, :, 40:], **kw,
                            initial_state=(st.S, st.z))
    torch.testing.assert_close(second_t, second, **TOL)


def test_float32_chunked_close_to_reference():
    q, k, v = (t.float() for t in _inputs(100))
    kw = dict(causal=True, decay=DECAY.float(), normalize=True)
    torch.testing.assert_close(chunked_form(q, k, v, **kw, chunk_size=16),
                               naive_recurrence(q, k, v, **kw), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- feature maps


@pytest.mark.parametrize("fm", [Identity(), EluPlusOne(), ReLU(),
                                PerformerRandomFeatures(8, 32, seed=0)])
def test_feature_map_shapes(fm):
    x = torch.randn(2, 3, 11, 8)
    y = fm(x)
    assert y.shape == (2, 3, 11, fm.out_dim(8))


def test_feature_map_values_and_positivity():
    x = torch.randn(4, 16, dtype=torch.float64) * 3
    torch.testing.assert_close(Identity()(x), x)
    torch.testing.assert_close(ReLU()(x), x.clamp(min=0))
    elu = EluPlusOne()(x)
    assert (elu > 0).all()
    torch.testing.assert_close(elu, torch.where(x > 0, x + 1, torch.exp(x)))
    perf = PerformerRandomFeatures(16, 64, seed=3, input_scale=1.0)
    y = perf(x)
    assert (y > 0).all()
    w = perf.weight.double()
    expected = torch.exp(x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(64)
    torch.testing.assert_close(y, expected)


def test_performer_determinism_and_redraw():
    a = PerformerRandomFeatures(8, 16, seed=5)
    b = PerformerRandomFeatures(8, 16, seed=5)
    c = PerformerRandomFeatures(8, 16, seed=6)
    x = torch.randn(3, 8)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert not torch.allclose(a(x), c(x))
    before = a(x)
    a.redraw(7)
    assert not torch.allclose(a(x), before)
    a.redraw(5)
    torch.testing.assert_close(a(x), before, rtol=0, atol=0)


def test_performer_approximates_softmax_kernel():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(6, 4, generator=gen, dtype=torch.float64) * 0.3
    k = torch.randn(6, 4, generator=gen, dtype=torch.float64) * 0.3
    fm = PerformerRandomFeatures(4, 4096, seed=0, input_scale=1.0)
    approx = (fm(q) * fm(k)).sum(-1)
    exact = torch.exp((q * k).sum(-1))
    assert ((approx - exact).abs() / exact).max() < 0.1


def test_performer_bad_args():
    with pytest.raises(ValueError, match="num_features"):
        PerformerRandomFeatures(4, 0)
    with pytest.raises(TypeError, match="dim"):
        PerformerRandomFeatures(4.0, 8)
    with pytest.raises(ValueError, match="head_dim"):
        PerformerRandomFeatures(4, 8).out_dim(5)


# --------------------------------------------------------------------------- memory




@pytest.mark.parametrize("decay", [None, 0.99])
def test_chunked_never_allocates_L_by_L(decay):
    L, C = 2048, 64
    gen = torch.Generator().manual_seed(0)
    q = torch.rand(1, 1, L, 16, generator=gen, requires_grad=True)
    k = torch.rand(1, 1, L, 16, generator=gen, requires_grad=True)
    v = torch.randn(1, 1, L, 16, generator=gen, requires_grad=True)
    mode = MaxNumel()
    with mode:
        out = chunked_form(q, k, v, causal=True, decay=decay, normalize=True, chunk_size=C)
        out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    assert 0 < mode.max_numel < L * L / 8
    # the mode does see an L x L when one is made
    mode = MaxNumel()
    with mode:
        parallel_form(q[..., :256, :], k[..., :256, :], v[..., :256, :], causal=True,
                      normalize=True)
    assert mode.max_numel >= 256 * 256


# --------------------------------------------------------------------------- bad inputs


def _bad_calls():
    q, k, v = _inputs(10)
    good = dict(causal=True, normalize=True, chunk_size=4)
    S, z = _state()
    cases = [
        ("chunk_size", TypeError, dict(chunk_size=2.0)),
        ("chunk_size", TypeError, dict(chunk_size=True)),
        ("chunk_size", ValueError, dict(chunk_size=0)),
        ("chunk_size", ValueError, dict(chunk_size=-3)),
        ("decay", ValueError, dict(decay=0.0)),
        ("decay", ValueError, dict(decay=1.5)),
        ("decay", ValueError, dict(decay=torch.tensor([0.9, 0.9]))),
        ("decay", ValueError, dict(decay=torch.full((H, 1), 0.9))),
        ("decay", ValueError, dict(decay=torch.tensor([0.9, -0.1, 0.5]))),
        ("decay", TypeError, dict(decay="0.9")),
        ("decay", ValueError, dict(decay=0.9, causal=False)),
        ("initial_state", ValueError, dict(initial_state=(S[..., :2], z))),
        ("initial_state", ValueError, dict(initial_state=(S, z[..., :2]))),
        ("initial_state", ValueError, dict(initial_state=(S, None))),
        ("initial_state", TypeError, dict(initial_state=S)),
    ]
    for name, exc, over in cases:
        yield name, exc, (q, k, v), {**good, **over}
    yield "phi_k", ValueError, (q, k[:, :, :5], v), good
    yield "phi_k", ValueError, (q, k[..., :2], v), good
    yield "v", ValueError, (q, k, v[:, :2]), good
    yield "phi_q", ValueError, (q[0], k, v), good
    yield "phi_q", TypeError, (q.numpy(), k, v), good
    yield "v", ValueError, (q, k, v.float()), good


@pytest.mark.parametrize("name,exc,args,kwargs", list(_bad_calls()))
def test_chunked_bad_inputs(name, exc, args, kwargs):
    with pytest.raises(exc, match=name):
        chunked_form(*args, **kwargs)


def test_other_forms_bad_inputs():
    q, k, v = _inputs(10)
    with pytest.raises(ValueError, match="decay"):
        parallel_form(q, k, v, causal=False, decay=0.5, normalize=True)
    with pytest.raises(ValueError, match="phi_k"):
        parallel_form(q, k[:, :1], v, causal=True, normalize=True)
    with pytest.raises(ValueError, match="decay"):
        naive_recurrence(q, k, v, causal=True, decay=2.0, normalize=True)
    qt, kt, vt = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    with pytest.raises(ValueError, match="phi_k_t"):
        recurrent_step(qt, kt[..., :2], vt, None, normalize=True)
    with pytest.raises(ValueError, match="v_t"):
        recurrent_step(qt, kt, vt[:, :1], None, normalize=True)
    with pytest.raises(ValueError, match="decay"):
        recurrent_step(qt, kt, vt, None, decay=torch.zeros(H), normalize=True)
    with pytest.raises(ValueError, match="state"):
        recurrent_step(qt, kt, vt, LinearAttentionState(torch.zeros(B, H, F, 1)),
                       normalize=False)
    with pytest.raises(ValueError, match="state"):
        recurrent_step(qt, kt, vt, LinearAttentionState(torch.zeros(B, H, F, DV)),
                       normalize=True)


def test_empty_sequence():
    q, k, v = _inputs(0)
    out, st = chunked_form(q, k, v, causal=True, normalize=True, chunk_size=4,
                           return_state=True)
    assert out.shape == (B, H, 0, DV)
    assert st.S.shape == (B, H, F, DV) and st.z.shape == (B, H, F)
