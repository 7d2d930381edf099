"""Toeplitz-RPE kernelized attention (FFT) against the explicit L x S matrix."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from attnlab.linear.feature_maps import EluPlusOne, PerformerRandomFeatures, ReLU
from attnlab.linear.forms import parallel_form
from attnlab.linear.toeplitz import toeplitz_kernelized_attention as fast
from attnlab.linear.toeplitz import toeplitz_kernelized_attention_reference as ref

TOL = {"rtol": 1e-10, "atol": 1e-10}
D, DV = 3, 4


def _inputs(L, S, hq=2, hkv=2, batch=2, shared_bias=False, seed=0, dtype=torch.float64,
            requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, L, D, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, hkv, S, D, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, hkv, S, DV, generator=gen, dtype=torch.float64)
    shape = (L + S - 1,) if shared_bias else (hq, L + S - 1)
    rb = 0.5 * torch.randn(*shape, generator=gen, dtype=torch.float64)
    out = [t.to(dtype) for t in (q, k, v, rb)]
    if requires_grad:
        for t in out:
            t.requires_grad_(True)
    return out


SIZES = [(7, 7), (5, 11), (11, 4), (1, 1), (1, 6), (9, 1), (13, 13)]
HEADS = [(2, 2), (4, 2), (3, 1)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L,S", SIZES)
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_matches_explicit_matrix(L, S, hq, hkv, causal):
    q, k, v, rb = _inputs(L, S, hq, hkv)
    out = fast(q, k, v, rb, causal=causal)
    assert out.shape == (2, hq, L, DV) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref(q, k, v, rb, causal=causal), **TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_shared_bias_equals_repeated_per_head_bias(causal):
    q, k, v, rb = _inputs(6, 9, 4, 2, shared_bias=True)
    out = fast(q, k, v, rb, causal=causal)
    torch.testing.assert_close(out, fast(q, k, v, rb.expand(4, -1), causal=causal), **TOL)
    torch.testing.assert_close(out, ref(q, k, v, rb, causal=causal), **TOL)


def test_reference_follows_the_formula_elementwise():
    L, S = 4, 6
    q, k, v, rb = _inputs(L, S, 2, 1, batch=1)
    phi = EluPlusOne()
    for causal in (False, True):
        out = ref(q, k, v, rb, causal=causal)
        for h in range(2):
            for i in range(L):
                num = torch.zeros(DV, dtype=torch.float64)
                den = torch.zeros((), dtype=torch.float64)
                for j in range(S):
                    if causal and j > i + S - L:
                        continue
                    w = math.exp(rb[h, i - j + S - 1]) * (phi(q[0, h, i]) @ phi(k[0, 0, j]))
                    num = num + w * v[0, 0, j]
                    den = den + w
                torch.testing.assert_close(out[0, h, i], num / (den + 1e-6), **TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_zero_bias_is_plain_linear_attention(causal):
    q, k, v, _ = _inputs(9, 9)
    rb = torch.zeros(17, dtype=torch.float64)
    phi = EluPlusOne()
    expected = parallel_form(phi(q), phi(k), v, causal=causal, normalize=True)
    torch.testing.assert_close(fast(q, k, v, rb, causal=causal), expected, **TOL)


@pytest.mark.parametrize("feature_map", [ReLU(), PerformerRandomFeatures(D, 8, seed=3)],
                         ids=["relu", "performer"])
def test_other_feature_maps(feature_map):
    q, k, v, rb = _inputs(8, 5, 4, 2)
    # a row whose weights are all 0 (phi(q_i) = 0, or phi(k_j) = 0 for every visible j) is
    # exactly 0 in the reference but FFT round-off / eps (~1e-10) in the fast path
    q, k = q.abs() + 0.1, k.abs() + 0.1
    for causal in (False, True):
        torch.testing.assert_close(
            fast(q, k, v, rb, feature_map=feature_map, causal=causal),
            ref(q, k, v, rb, feature_map=feature_map, causal=causal),
            **TOL,
        )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L,S,hq,hkv,shared", [(7, 5, 4, 2, False), (5, 8, 3, 1, False),
                                               (9, 9, 2, 2, True)])
def test_gradients_match_reference(L, S, hq, hkv, shared, causal):
    leaves = _inputs(L, S, hq, hkv, shared_bias=shared, requires_grad=True)
    g_out = torch.randn(2, hq, L, DV, dtype=torch.float64)

    def grads(fn):
        return torch.autograd.grad((fn(*leaves, causal=causal) * g_out).sum(), leaves)

    for got, want in zip(grads(fast), grads(ref), strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_large_biases_do_not_overflow():
    q, k, v, rb = _inputs(6, 8)
    # exp(rb + 800) overflows float64; the ratio is num/den with eps negligible
    out = fast(q, k, v, rb + 800.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref(q, k, v, rb, eps=1e-300), **TOL)
    # exp(rb - 800) underflows: c ~ 1e-348, so num / (den + eps) is 0 in float64
    low = fast(q, k, v, rb - 800.0)
    torch.testing.assert_close(low, ref(q, k, v, rb - 800.0), **TOL)
    assert low.abs().max() < 1e-300


def test_eps_matters_exactly_as_in_the_formula():
    q, k, v, rb = _inputs(5, 7)
    for shift in (-10.0, 0.0, 10.0):
        torch.testing.assert_close(fast(q, k, v, rb + shift, eps=0.3),
                                   ref(q, k, v, rb + shift, eps=0.3), **TOL)


def test_minus_inf_bias_entries_zero_the_weight():
    q, k, v, rb = _inputs(5, 5)
    rb = rb.clone()
    rb[:, :3] = -math.inf
    out = fast(q, k, v, rb)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref(q, k, v, rb), **TOL)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_low_precision_sanity(dtype, tol):
    q, k, v, rb = _inputs(21, 17, 4, 2)
    want = ref(q, k, v, rb, causal=True)
    out = fast(*(t.to(dtype) for t in (q, k, v, rb)), causal=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


class _ShapeLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def test_never_materialises_L_by_S():
    L, S = 300, 257
    q, k, v, rb = _inputs(L, S, 2, 1, batch=1, dtype=torch.float32, requires_grad=True)
    log = _ShapeLog()
    with log:
        fast(q, k, v, rb, causal=True).sum().backward()
    assert q.grad is not None and rb.grad is not None
    assert log.shapes
    assert max(math.prod(s) for s in log.shapes) < L * S / 4
    assert not any(L in s and S in s for s in log.shapes)


# --------------------------------------------------------------------------- bad input


def test_bad_rel_bias():
    q, k, v, rb = _inputs(4, 6)
    with pytest.raises(ValueError, match=r"rel_bias must have shape .*\(2, 9\).*rel_bias.shape"):
        fast(q, k, v, rb[:, :-1])
    with pytest.raises(ValueError, match="rel_bias must have shape"):
        fast(q, k, v, rb.expand(3, 2, 9))
    with pytest.raises(TypeError, match="rel_bias must be a torch.Tensor"):
        fast(q, k, v, rb.tolist())
    with pytest.raises(TypeError, match="rel_bias must be floating point"):
        fast(q, k, v, rb.long())
    bad = rb.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="rel_bias must not contain NaN"):
        fast(q, k, v, bad)


def test_bad_arguments():
    q, k, v, rb = _inputs(4, 6, 3, 1)
    with pytest.raises(ValueError, match=r"eps must be a positive.*eps=0"):
        fast(q, k, v, rb, eps=0.0)
    with pytest.raises(TypeError, match="causal must be a bool"):
        fast(q, k, v, rb, causal=1)
    with pytest.raises(TypeError, match="feature_map must be a callable"):
        fast(q, k, v, rb, feature_map="elu")
    with pytest.raises(ValueError, match="feature_map must map"):
        fast(q, k, v, rb, feature_map=lambda x: x.sum(dim=-1))
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        fast(q, k.expand(2, 2, 6, D), v.expand(2, 2, 6, DV), rb)
    with pytest.raises(ValueError, match="exactly one token axis"):
        fast(q[:, :, None], k[:, :, None], v[:, :, None], rb)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        ref(q, None, v, rb)
    with pytest.raises(ValueError, match="q and k must have the same head dimension"):
        fast(q, F.pad(k, (0, 1)), v, rb)
