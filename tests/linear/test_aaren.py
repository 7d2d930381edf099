"""Aaren (attention as a prefix scan) against causal softmax attention and its RNN form."""

from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.linear.aaren import AarenState, aaren, aaren_reference, aaren_step
from attnlab.testing import MaxNumel

TOL = {"rtol": 1e-10, "atol": 1e-10}
D, DV = 5, 3


def _inputs(S, h=4, hkv=2, batch=2, seed=0, shared_query=False, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*((h, D) if shared_query else (batch, h, D)), generator=gen,
                    dtype=torch.float64)
    k = torch.randn(batch, hkv, S, D, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, hkv, S, DV, generator=gen, dtype=torch.float64)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def _attnlab_causal(q, k, v, scale=None):
    """The single query repeated at every position, through ``attnlab.attention``."""
    S = k.shape[2]
    if q.dim() == 2:
        q = q.expand(k.shape[0], *q.shape)
    q_rep = q[:, :, None, :].expand(q.shape[0], q.shape[1], S, q.shape[2])
    return attnlab.attention(q_rep, k, v, pattern=attnlab.Causal(), scale=scale)


def _steps(q, k, v, state=None, scale=None):
    outs = []
    for t in range(k.shape[2]):
        o, state = aaren_step(state, q, k[:, :, t], v[:, :, t], scale=scale)
        outs.append(o)
    return torch.stack(outs, dim=2), state


@pytest.mark.parametrize("S", [1, 7, 33, 100])
@pytest.mark.parametrize("h,hkv", [(4, 2), (3, 3), (2, 1)])
def test_scan_matches_causal_attention(S, h, hkv):
    q, k, v = _inputs(S, h, hkv)
    out = aaren(q, k, v)
    assert out.shape == (2, h, S, DV)
    torch.testing.assert_close(out, _attnlab_causal(q, k, v), **TOL)
    torch.testing.assert_close(out, aaren_reference(q, k, v), **TOL)


def test_shared_learned_query_broadcasts_over_batch():
    q, k, v = _inputs(13, shared_query=True)
    out = aaren(q, k, v)
    torch.testing.assert_close(out, _attnlab_causal(q, k, v), **TOL)
    torch.testing.assert_close(out, aaren(q.expand(2, -1, -1), k, v), **TOL)


def test_reference_is_the_prefix_softmax():
    q, k, v = _inputs(6, 2, 2, batch=1)
    out = aaren_reference(q, k, v)
    for h in range(2):
        s = (k[0, h] @ q[0, h]) / math.sqrt(D)
        for t in range(6):
            p = torch.softmax(s[: t + 1], dim=0)
            torch.testing.assert_close(out[0, h, t], p @ v[0, h, : t + 1], **TOL)


@pytest.mark.parametrize("S", [1, 7, 33])
def test_gradients_match_reference(S):
    q, k, v = _inputs(S, requires_grad=True)
    g_out = torch.randn(2, 4, S, DV, dtype=torch.float64)

    def grads(out):
        # with S == 1 the output is v: q and k may be unused (their gradient is 0)
        got = torch.autograd.grad((out * g_out).sum(), (q, k, v), allow_unused=True)
        pairs = zip(got, (q, k, v), strict=True)
        return [torch.zeros_like(x) if g is None else g for g, x in pairs]

    want = grads(_attnlab_causal(q, k, v))
    for fn in (aaren, aaren_reference):
        for got, w in zip(grads(fn(q, k, v)), want, strict=True):
            torch.testing.assert_close(got, w, **TOL)


@pytest.mark.parametrize("S", [1, 7, 33, 100])
def test_rnn_steps_match_scan(S):
    q, k, v = _inputs(S)
    out, state = aaren(q, k, v, return_state=True)
    steps, step_state = _steps(q, k, v)
    torch.testing.assert_close(steps, out, **TOL)
    assert isinstance(step_state, AarenState)
    torch.testing.assert_close(step_state.m, state.m, **TOL)
    torch.testing.assert_close(step_state.u, state.u, **TOL)
    torch.testing.assert_close(step_state.w, state.w, **TOL)
    torch.testing.assert_close(state.output(), out[:, :, -1], **TOL)


def test_rnn_step_gradients_match_scan():
    q, k, v = _inputs(9, requires_grad=True)
    g_out = torch.randn(2, 4, 9, DV, dtype=torch.float64)
    a = torch.autograd.grad((aaren(q, k, v) * g_out).sum(), (q, k, v))
    b = torch.autograd.grad((_steps(q, k, v)[0] * g_out).sum(), (q, k, v))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("split", [1, 5, 12])
def test_state_carry_two_halves_equal_one_call(split):
    q, k, v = _inputs(17, requires_grad=True)
    whole, whole_state = aaren(q, k, v, return_state=True)
    first, st = aaren(q, k[:, :, :split], v[:, :, :split], return_state=True)
    second, st2 = aaren(q, k[:, :, split:], v[:, :, split:], initial_state=st, return_state=True)
    torch.testing.assert_close(torch.cat([first, second], dim=2), whole, **TOL)
    torch.testing.assert_close(st2.output(), whole_state.output(), **TOL)
    # continuing with RNN steps from a scanned prefix
    steps, _ = _steps(q, k[:, :, split:], v[:, :, split:], state=st)
    torch.testing.assert_close(steps, second, **TOL)
    g = torch.randn_like(whole)
    a = torch.autograd.grad((whole * g).sum(), (q, k, v))
    b = torch.autograd.grad((torch.cat([first, second], dim=2) * g).sum(), (q, k, v))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, **TOL)


def test_large_logits_do_not_overflow():
    S = 40
    gen = torch.Generator().manual_seed(1)
    q = torch.ones(1, 1, 1, dtype=torch.float64)
    signs = torch.randint(0, 2, (S,), generator=gen) * 2 - 1
    k = (1000.0 * signs).to(torch.float64).view(1, 1, S, 1)
    v = torch.randn(1, 1, S, DV, generator=gen, dtype=torch.float64)
    out = aaren(q, k, v, scale=1.0)
    steps, _ = _steps(q, k, v, scale=1.0)
    # scores are +-1000: the prefix softmax is uniform over the prefix's maxima
    expected = torch.empty(S, DV, dtype=torch.float64)
    for t in range(S):
        s = signs[: t + 1]
        top = s == s.max()
        expected[t] = v[0, 0, : t + 1][top].mean(dim=0)
    for got in (out, steps):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got[0, 0], expected, **TOL)
    q.requires_grad_(True)
    (g,) = torch.autograd.grad(aaren(q, k, v, scale=1.0).sum(), q)
    assert torch.isfinite(g).all()


def test_scale():
    q, k, v = _inputs(11)
    torch.testing.assert_close(aaren(q, k, v), aaren(q, k, v, scale=1 / math.sqrt(D)), **TOL)
    for scale in (0.3, 2.5):
        out = aaren(q, k, v, scale=scale)
        torch.testing.assert_close(out, _attnlab_causal(q, k, v, scale=scale), **TOL)
        torch.testing.assert_close(out, aaren_reference(q, k, v, scale=scale), **TOL)
    assert not torch.allclose(aaren(q, k, v, scale=0.3), aaren(q, k, v, scale=2.5))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_sanity(dtype, tol):
    q, k, v = _inputs(33)
    want = aaren_reference(q, k, v)
    out = aaren(*(t.to(dtype) for t in (q, k, v)))
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    o, st = aaren_step(None, q.to(dtype), k[:, :, 0].to(dtype), v[:, :, 0].to(dtype))
    assert o.dtype == dtype and st.w.dtype == torch.float32




def test_scan_never_materialises_S_by_S():
    S = 400
    q, k, v = (t.float().requires_grad_(True) for t in _inputs(S, 2, 1, batch=1))
    mode = MaxNumel()
    with mode:
        aaren(q, k, v).sum().backward()
    assert q.grad is not None
    assert 0 < mode.max_numel < S * S / 20


# --------------------------------------------------------------------------- bad input


def test_bad_inputs():
    q, k, v = _inputs(5, 4, 2)
    with pytest.raises(ValueError, match=r"q must have shape \(B, H, D\) or \(H, D\).*q.shape"):
        aaren(q[:, :, None], k, v)
    with pytest.raises(ValueError, match=r"k must have shape \(B, Hkv, S, D\)"):
        aaren(q, k[:, :, 0], v)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        aaren(q[:, :3], k, v)
    with pytest.raises(ValueError, match="q and k must have the same head dimension"):
        aaren(q[..., :2], k, v)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        aaren(q.tolist(), k, v)
    with pytest.raises(ValueError, match="scale must be finite"):
        aaren(q, k, v, scale=math.nan)
    with pytest.raises(TypeError, match="return_state must be a bool"):
        aaren(q, k, v, return_state=1)


def test_bad_states_and_steps():
    q, k, v = _inputs(5, 4, 2)
    _, st = aaren(q, k, v, return_state=True)
    with pytest.raises(TypeError, match="initial_state must be an AarenState"):
        aaren(q, k, v, initial_state=(st.m, st.u, st.w))
    bad = AarenState(st.m, st.u, st.w[..., :2])
    with pytest.raises(ValueError, match=r"initial_state.w must have shape \(2, 4, 3\)"):
        aaren(q, k, v, initial_state=bad)
    with pytest.raises(ValueError, match=r"state.m must have shape \(2, 4\)"):
        aaren_step(AarenState(st.m[:, :2], st.u, st.w), q, k[:, :, 0], v[:, :, 0])
    with pytest.raises(ValueError, match=r"k_t must have shape \(B, Hkv, D\)"):
        aaren_step(None, q, k, v[:, :, 0])
    with pytest.raises(TypeError, match="v_t must be a torch.Tensor"):
        aaren_step(None, q, k[:, :, 0], None)
