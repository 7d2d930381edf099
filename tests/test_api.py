"""The public entry points: ``attention`` semantics, dtypes, layouts, input validation and
``attention_weights``."""

from __future__ import annotations

import math

import pytest
import torch

import attnlab as al
from attnlab.testing import rel_error


def make_qkv(B, Hq, Hkv, q_shape, kv_shape, D, Dv, dtype=torch.float64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)

    return rnd(B, Hq, *q_shape, D), rnd(B, Hkv, *kv_shape, D), rnd(B, Hkv, *kv_shape, Dv)


def naive_full(q, k, v, scale):
    """Dense softmax attention written out (1 token axis)."""
    G = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    return torch.softmax(scale * q @ kk.transpose(-1, -2), -1) @ vv


# -- semantics ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "sdpa", "tiled", "reference"])
def test_default_scale_and_explicit_scale(backend):
    q, k, v = make_qkv(2, 4, 2, (13,), (17,), 6, 5, grad=False)
    out = al.attention(q, k, v, backend=backend)
    assert rel_error(out, naive_full(q, k, v, 1 / math.sqrt(6))) <= 1e-12
    out = al.attention(q, k, v, scale=0.3, backend=backend)
    assert rel_error(out, naive_full(q, k, v, 0.3)) <= 1e-12
    out = al.attention(q, k, v, scale=2, backend=backend)  # an int is a number too
    assert rel_error(out, naive_full(q, k, v, 2.0)) <= 1e-12


@pytest.mark.parametrize("dtype,lse_dtype", [(torch.float64, torch.float64),
                                             (torch.float32, torch.float32),
                                             (torch.float16, torch.float32),
                                             (torch.bfloat16, torch.float32)],
                         ids=["f64", "f32", "f16", "bf16"])
@pytest.mark.parametrize("backend", ["tiled", "reference"])
def test_return_lse_shape_and_dtype(backend, dtype, lse_dtype):
    q, k, v = make_qkv(2, 4, 2, (5, 3), (4, 2), 6, 5, dtype=dtype, grad=False)
    res = al.attention(q, k, v, al.Causal(), return_lse=True, backend=backend)
    assert isinstance(res, tuple) and len(res) == 2
    out, lse = res
    assert out.shape == (2, 4, 5, 3, 5) and out.dtype == dtype
    assert lse.shape == (2, 4, 5, 3) and lse.dtype == lse_dtype
    # the lse is the log-sum-exp of the visible scaled logits
    qf = q.double().reshape(2, 4, 15, 6)
    kf = k.double().reshape(2, 2, 8, 6).repeat_interleave(2, 1)
    logits = (qf @ kf.transpose(-1, -2)) / math.sqrt(6)
    i, j = torch.arange(15).view(-1, 1), torch.arange(8).view(1, -1)
    want = logits.masked_fill(~(j <= i + 8 - 15), float("-inf")).logsumexp(-1).reshape(2, 4, 5, 3)
    empty = torch.isneginf(want)
    assert torch.equal(torch.isneginf(lse), empty)
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_error(lse[~empty], want[~empty]) <= tol


def test_without_return_lse_returns_a_tensor():
    q, k, v = make_qkv(1, 2, 2, (8,), (8,), 4, 4, grad=False)
    assert isinstance(al.attention(q, k, v, al.SlidingWindow(2)), torch.Tensor)


# -- dtypes ---------------------------------------------------------------------------------
HALF = [torch.float16, torch.bfloat16]
HALF_PATTERNS = {
    "full": None, "causal": al.Causal(), "window|sinks": al.SlidingWindow(5) | al.Sinks(1),
}


@pytest.mark.parametrize("pattern", list(HALF_PATTERNS.values()), ids=list(HALF_PATTERNS))
@pytest.mark.parametrize("backend", ["tiled", "auto"])
@pytest.mark.parametrize("dtype", HALF, ids=["f16", "bf16"])
def test_half_precision_inputs(dtype, backend, pattern):
    """Half inputs give half outputs and gradients, equal to the float32 reference rounded to
    the input dtype (float32 accumulation inside)."""
    q, k, v = make_qkv(2, 4, 2, (37,), (37,), 8, 6, dtype=dtype)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    out = al.attention(q, k, v, pattern, backend=backend)
    ref = al.attention(qf, kf, vf, pattern, backend="reference")
    assert out.dtype == dtype
    eps = torch.finfo(dtype).eps
    assert rel_error(out, ref.to(dtype)) <= eps  # at most about one rounding of the output
    assert rel_error(out, ref) <= 2 * eps
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
    want = torch.autograd.grad(ref, (qf, kf, vf), dout)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        assert rel_error(a, b) <= 4 * eps


@pytest.mark.parametrize("dtype", HALF, ids=["f16", "bf16"])
def test_half_precision_with_score_mod_parameters(dtype):
    q, k, v = make_qkv(1, 4, 2, (30,), (30,), 8, 6, dtype=dtype)
    mod = al.RelativeBias(4, init_std=0.5)  # float32 parameters
    out = al.attention(q, k, v, al.Causal(), mod, backend="tiled")
    qf, kf, vf = (x.detach().float() for x in (q, k, v))
    ref = al.attention(qf, kf, vf, al.Causal(), mod, backend="reference")
    assert out.dtype == dtype
    assert rel_error(out, ref) <= 2 * torch.finfo(dtype).eps
    (gt,) = torch.autograd.grad(out.float().sum(), mod.table)
    (gr,) = torch.autograd.grad(ref.sum(), mod.table)
    assert gt.dtype == torch.float32
    assert rel_error(gt, gr) <= 8 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool],
                         ids=["int32", "int64", "uint8", "bool"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_integer_and_bool_inputs_raise_type_error(which, dtype):
    qkv = dict(zip("qkv", make_qkv(1, 2, 2, (8,), (8,), 4, 4, dtype=torch.float32, grad=False)))
    qkv[which] = qkv[which].to(dtype)
    msg = rf"{which} must be a floating-point tensor.*{which}\.dtype"
    with pytest.raises(TypeError, match=msg):
        al.attention(qkv["q"], qkv["k"], qkv["v"])


def test_mixed_dtypes_raise():
    q, k, v = make_qkv(1, 2, 2, (8,), (8,), 4, 4, dtype=torch.float32, grad=False)
    with pytest.raises(TypeError, match=r"share one dtype.*k\.dtype=torch\.float64"):
        al.attention(q, k.double(), v)
    with pytest.raises(TypeError, match=r"share one dtype.*v\.dtype=torch\.float16"):
        al.attention(q, k, v.half())


# -- layouts: non-contiguous inputs ---------------------------------------------------------
def _views(B, Hq, Hkv, L, S, D, Dv, seed=0):
    """q as a transposed view, k as a slice of a wider head dim, v as a strided slice."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, Hq, D, generator=g, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(B, Hkv, S, 2 * D, generator=g, dtype=torch.float64)[..., D:]
    v = torch.randn(B, Hkv, 2 * S, Dv, generator=g, dtype=torch.float64)[:, :, ::2]
    return q, k, v


@pytest.mark.parametrize("backend", ["auto", "tiled", "reference"])
@pytest.mark.parametrize("pattern", [None, al.Causal(), al.SlidingWindow(4, 1)],
                         ids=["full", "causal", "window"])
def test_non_contiguous_inputs(pattern, backend):
    views = _views(2, 4, 2, 21, 21, 8, 5)
    assert not any(x.is_contiguous() for x in views)
    views = [x.requires_grad_() for x in views]
    dense = [x.detach().contiguous().requires_grad_() for x in views]
    a = al.attention(*views, pattern, backend=backend)
    b = al.attention(*dense, pattern, backend=backend)
    assert rel_error(a, b) <= 1e-13
    dout = torch.randn(a.shape, generator=torch.Generator().manual_seed(1), dtype=a.dtype)
    for ga, gb in zip(torch.autograd.grad(a, views, dout), torch.autograd.grad(b, dense, dout)):
        assert ga.shape == gb.shape and rel_error(ga, gb) <= 1e-13


def test_non_contiguous_nd_inputs_tiled():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 5, 6, 2, 4, generator=g, dtype=torch.float64).permute(0, 3, 1, 2, 4)
    k = torch.randn(1, 2, 5, 6, 8, generator=g, dtype=torch.float64)[..., ::2]
    v = torch.randn(1, 2, 6, 5, 4, generator=g, dtype=torch.float64).transpose(2, 3)
    pattern = al.Neighborhood((3, 3))
    a, la = al.attention(q, k, v, pattern, return_lse=True, backend="tiled")
    b, lb = al.attention(q.contiguous(), k.contiguous(), v.contiguous(), pattern,
                         return_lse=True, backend="tiled")
    assert rel_error(a, b) <= 1e-13 and rel_error(la, lb) <= 1e-13


# -- bad inputs: every message names the argument ---------------------------------------------
def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


Q, K, V = _t(2, 4, 10, 8), _t(2, 2, 10, 8), _t(2, 2, 10, 6)

def _nbh(shape, pattern, kv_shape=None):
    kv_shape = kv_shape or shape
    return al.attention(_t(1, 1, *shape, 4), _t(1, 1, *kv_shape, 4), _t(1, 1, *kv_shape, 4),
                        pattern)


# name -> (call, exception, regex that the message must match: it names the argument)
BAD = {
    "batch-mismatch": (
        lambda: al.attention(Q, _t(3, 2, 10, 8), _t(3, 2, 10, 6)),
        ValueError, r"batch sizes differ.*k\.shape\[0\]=3"),
    "kv-heads-mismatch": (
        lambda: al.attention(Q, K, _t(2, 1, 10, 6)),
        ValueError, r"k and v must have the same number of heads.*v\.shape\[1\]=1"),
    "hq-not-multiple": (
        lambda: al.attention(_t(2, 3, 10, 8), K, V),
        ValueError, r"multiple.*q\.shape\[1\]=3 and k\.shape\[1\]=2"),
    "head-dim-mismatch": (
        lambda: al.attention(Q, _t(2, 2, 10, 7), V),
        ValueError, r"same head dimension.*k\.shape\[-1\]=7"),
    "kv-token-shapes": (
        lambda: al.attention(Q, K, _t(2, 2, 11, 6)),
        ValueError, r"k and v must have the same token axes.*v\.shape=\(2, 2, 11, 6\)"),
    "kv-token-axes-count": (
        lambda: al.attention(Q, _t(2, 2, 2, 5, 8), _t(2, 2, 2, 5, 6)),
        ValueError, r"same number of dimensions.*k\.shape"),
    "too-few-dims": (
        lambda: al.attention(Q[0], K[0], V[0]),
        ValueError, r"q must have shape \(B, H, \*tokens, D\).*q\.shape=\(4, 10, 8\)"),
    "empty-dim": (
        lambda: al.attention(_t(2, 4, 0, 8), K, V),
        ValueError, r"q has an empty dimension"),
    "pattern-axes": (
        lambda: al.attention(Q, K, V, al.Neighborhood((3, 3))),
        ValueError, r"pattern Neighborhood.*2 token axes but the inputs have 1"),
    "kernel-larger-than-axis": (
        lambda: _nbh((5, 6), al.Neighborhood((7, 3))),
        ValueError, r"kernel_size=7 is larger than token axis 0 of length 5"),
    "dilation-times-kernel": (
        lambda: _nbh((10,), al.Neighborhood(3, dilation=4)),
        ValueError, r"dilation \* kernel_size = 4 \* 3 = 12 is larger than token axis 0"),
    "neighborhood-cross": (
        lambda: _nbh((5,), al.Neighborhood(3), kv_shape=(6,)),
        ValueError, r"self-attention.*\(5,\).*\(6,\)"),
    "negative-left": (
        lambda: al.SlidingWindow(left=-1),
        ValueError, r"left must be an int >= 0.*left=-1"),
    "negative-right": (
        lambda: al.SlidingWindow(left=2, right=-3),
        ValueError, r"right=-3"),
    "zero-dilation": (
        lambda: al.SlidingWindow(left=2, dilation=0),
        ValueError, r"dilation=0"),
    "int-q": (
        lambda: al.attention(Q.to(torch.int32), K, V),
        TypeError, r"q must be a floating-point.*int32"),
    "bool-k": (
        lambda: al.attention(Q, K.bool(), V),
        TypeError, r"k must be a floating-point.*bool"),
    "int64-v": (
        lambda: al.attention(Q, K, V.long()),
        TypeError, r"v must be a floating-point.*int64"),
    "mixed-dtypes": (
        lambda: al.attention(Q, K.double(), V),
        TypeError, r"k\.dtype=torch\.float64"),
    "other-device-k": (
        lambda: al.attention(Q, _t(2, 2, 10, 8, device="meta"), V),
        ValueError, r"one device.*k\.device=meta"),
    "other-device-v": (
        lambda: al.attention(Q, K, _t(2, 2, 10, 6, device="meta")),
        ValueError, r"one device.*v\.device=meta"),
    "score-mod-other-device": (
        lambda: al.attention(Q, K, V, score_mod=al.RelativeBias(4).to("meta")),
        ValueError, r"score_mod parameters are on meta but q is on cpu"),
    "block-sparse-layout-shape": (
        lambda: al.attention(Q, K, V, al.BlockSparse(torch.ones(2, 2, dtype=torch.bool), 4)),
        ValueError, r"layout must have block shape.*\(3, 3\).*layout\.shape=\(2, 2\)"),
    "block-sparse-layout-heads": (
        lambda: al.attention(Q, K, V, al.BlockSparse(torch.ones(1, 3, 3, 3, dtype=torch.bool), 4)),
        ValueError, r"layout batch/head axes.*layout\.shape=\(1, 3, 3, 3\)"),
    "unknown-backend": (
        lambda: al.attention(Q, K, V, backend="fast"),
        ValueError, r"backend='fast'"),
    "forced-backend-cannot-run": (
        lambda: al.attention(Q, K, V, al.Causal(), backend="sdpa", return_lse=True),
        ValueError, r"backend='sdpa' cannot run this problem.*return_lse"),
    "scale-str": (
        lambda: al.attention(Q, K, V, scale="0.5"),
        TypeError, r"scale must be a float.*str"),
    "scale-bool": (
        lambda: al.attention(Q, K, V, scale=True),
        TypeError, r"scale must be a float.*bool"),
    "scale-nan": (
        lambda: al.attention(Q, K, V, scale=float("nan")),
        ValueError, r"scale must be finite"),
    "non-tensor-q": (
        lambda: al.attention(Q.tolist(), K, V),
        TypeError, r"q must be a torch\.Tensor.*list"),
    "non-tensor-v": (
        lambda: al.attention(Q, K, None),
        TypeError, r"v must be a torch\.Tensor.*NoneType"),
    "pattern-not-pattern": (
        lambda: al.attention(Q, K, V, pattern=3),
        TypeError, r"pattern must be"),
    "score-mod-not-callable": (
        lambda: al.attention(Q, K, V, score_mod="alibi"),
        TypeError, r"score_mod must be"),
    "return-lse-not-bool": (
        lambda: al.attention(Q, K, V, return_lse=1),
        TypeError, r"return_lse must be a bool"),
    "mask-mod-not-bool": (
        lambda: al.attention(Q, K, V, lambda b, h, q, k: (k <= q).float()),
        TypeError, r"mask_mod.*must return a boolean tensor"),
    "alibi-heads": (
        lambda: al.attention(Q, K, V, score_mod=al.ALiBi(3)),
        ValueError, r"num_heads=3.*4 heads"),
    "document-ids-length": (
        lambda: al.attention(Q, K, V, al.Document(torch.zeros(9, dtype=torch.long))),
        ValueError, r"ids must have shape \(10,\).*ids\.shape=\(9,\)"),
}


@pytest.mark.parametrize("call,exc,match", list(BAD.values()), ids=list(BAD))
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_explain_validates_like_attention():
    with pytest.raises(ValueError, match=r"batch sizes differ"):
        al.explain(Q, _t(3, 2, 10, 8), _t(3, 2, 10, 6))
    with pytest.raises(TypeError, match=r"q must be a floating-point"):
        al.explain(Q.int(), K, V)


# -- attention_weights ------------------------------------------------------------------------
WEIGHT_CASES = {
    "B2-Hq4-Hkv2-L12-S12-causal": ((2, 4, 2, (12,), (12,), 6, 5), al.Causal(), None),
    "B1-Hq2-Hkv1-L9-S14-window": ((1, 2, 1, (9,), (14,), 4, 3), al.SlidingWindow(3, 1), None),
    "B2-Hq2-Hkv2-L15-S6-causal-empty": ((2, 2, 2, (15,), (6,), 4, 4), al.Causal(), None),
    "B1-Hq4-Hkv2-L4x5-nbh": ((1, 4, 2, (4, 5), (4, 5), 4, 6), al.Neighborhood((3, 3)), None),
    "B1-Hq4-Hkv4-L2x3x4-full-alibi": ((1, 4, 4, (2, 3, 4), (2, 3, 4), 4, 4), None, al.ALiBi(4)),
    "B1-Hq2-Hkv1-L10-relemb": (
        (1, 2, 1, (10,), (10,), 4, 4), al.Causal(), al.RelativeEmbedding(4, 3)),
}


@pytest.mark.parametrize("geom,pattern,score_mod", list(WEIGHT_CASES.values()),
                         ids=list(WEIGHT_CASES))
def test_attention_weights(geom, pattern, score_mod):
    B, Hq, Hkv, Ls, Ss, D, Dv = geom
    q, k, v = make_qkv(*geom, grad=False)
    if score_mod is not None:
        score_mod = score_mod.double()
    w = al.attention_weights(q, k, v, pattern, score_mod)
    assert w.shape == (B, Hq, *Ls, *Ss) and w.dtype == q.dtype
    L, S = math.prod(Ls), math.prod(Ss)
    wf = w.reshape(B, Hq, L, S)
    assert (wf >= 0).all()
    # zero outside the pattern
    from attnlab.testing import dense_mask

    mask = dense_mask(al.patterns.as_pattern(pattern), al.geometry.check_qkv(q, k, v))
    assert (wf[~mask] == 0).all()
    # rows sum to 1, or to 0 for rows that see no key
    sums = wf.sum(-1)
    empty = ~mask.any(-1)
    torch.testing.assert_close(sums[~empty], torch.ones_like(sums[~empty]), rtol=0, atol=1e-12)
    assert (sums[empty] == 0).all()
    # weights @ v is the attention output
    vv = v.reshape(B, Hkv, S, Dv).repeat_interleave(Hq // Hkv, 1)
    out = al.attention(q, k, v, pattern, score_mod)
    assert rel_error((wf @ vv).reshape(out.shape), out) <= 1e-12


def test_attention_weights_empty_rows_are_zero():
    q, k, v = make_qkv(1, 2, 2, (8,), (3,), 4, 4, grad=False)
    w = al.attention_weights(q, k, v, al.Causal())
    assert w.shape == (1, 2, 8, 3)
    assert (w[:, :, :5] == 0).all()
    torch.testing.assert_close(w[:, :, 5:].sum(-1), torch.ones(1, 2, 3, dtype=w.dtype))


def test_attention_weights_half_dtype_and_guard():
    q, k, v = make_qkv(1, 2, 2, (8,), (8,), 4, 4, dtype=torch.float16, grad=False)
    assert al.attention_weights(q, k, v).dtype == torch.float16
    with pytest.raises(ValueError, match=r"max_elements=100"):
        al.attention_weights(q, k, v, max_elements=100)


def test_attention_weights_differentiable():
    q, k, v = make_qkv(1, 2, 1, (5,), (4,), 3, 3)
    mod = al.RelativeBias(2, num_buckets=4, max_distance=4, init_std=0.5).double()

    def f(q, k):
        return al.attention_weights(q, k, v, al.SlidingWindow(2, 1), mod)

    assert torch.autograd.gradcheck(f, (q, k))
    w = f(q, k)
    (g,) = torch.autograd.grad((w * torch.arange(w.numel(), dtype=w.dtype).view(w.shape)).sum(),
                               mod.table)
    assert g.abs().max() > 0
