"""Automatic backend selection, ``explain``, forced backends, and the flex backend on CPU."""

from __future__ import annotations

import math

import pytest
import torch

import attnlab as al
from attnlab.backends.registry import all_backends
from attnlab.testing import rel_error

BACKENDS = ["sdpa", "flex", "block_flash", "tiled", "reference"]


def make_qkv(B, Hq, Hkv, q_shape, kv_shape, D, Dv, dtype=torch.float64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)

    return rnd(B, Hq, *q_shape, D), rnd(B, Hkv, *kv_shape, D), rnd(B, Hkv, *kv_shape, Dv)


def grads(out, inputs, seed=5):
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, dout)


def explicit_causal(q, k, v):
    """Bottom-right causal attention written out: key j visible to query i iff j <= i + S - L."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(Hq // Hkv, 1)
    vv = v.repeat_interleave(Hq // Hkv, 1)
    logits = (q @ kk.transpose(-1, -2)) / math.sqrt(D)
    i = torch.arange(L).view(L, 1)
    j = torch.arange(S).view(1, S)
    visible = j <= i + S - L
    logits = logits.masked_fill(~visible, float("-inf"))
    p = torch.softmax(logits, -1).nan_to_num(0.0)  # rows with no visible key -> 0
    return p @ vv, visible


def test_priority_order():
    assert list(all_backends()) == BACKENDS


# -- auto: sdpa for dense and causal self-attention ------------------------------------------
SDPA_CASES = {
    "full-B2-Hq4-Hkv2-L33-D8-Dv5": (None, (2, 4, 2, (33,), (33,), 8, 5)),
    "full-cross-B1-Hq2-Hkv1-L20-S45": (al.Full(), (1, 2, 1, (20,), (45,), 8, 8)),
    "causal-B2-Hq4-Hkv1-L33": (al.Causal(), (2, 4, 1, (33,), (33,), 8, 6)),
    "causal-2d-L6x7": (al.Causal(), (1, 2, 2, (6, 7), (6, 7), 4, 4)),
    "full-2d-L6x7-S3x5": (al.Full(), (1, 2, 2, (6, 7), (3, 5), 4, 4)),
}


@pytest.mark.parametrize("pattern,geom", list(SDPA_CASES.values()), ids=list(SDPA_CASES))
def test_auto_picks_sdpa_for_full_and_causal(pattern, geom):
    q, k, v = make_qkv(*geom)
    e = al.explain(q, k, v, pattern)
    assert e.backend == "sdpa"
    assert e.startswith("backend: sdpa")
    out = al.attention(q, k, v, pattern)
    ref = al.attention(q, k, v, pattern, backend="reference")
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert rel_error(out, ref) <= 1e-10
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert rel_error(a, b) <= 1e-10


@pytest.mark.parametrize("L,S", [(20, 45), (45, 20), (1, 9), (9, 1)],
                         ids=["L20-S45", "L45-S20", "L1-S9", "L9-S1"])
def test_causal_cross_is_bottom_right_and_not_sdpa(L, S):
    q, k, v = make_qkv(2, 4, 2, (L,), (S,), 8, 5)
    e = al.explain(q, k, v, al.Causal())
    assert e.backend != "sdpa"
    assert any("L != S" in r for r in e.reasons["sdpa"])
    want, visible = explicit_causal(q, k, v)
    for backend in ("auto", "tiled", "reference"):
        out, lse = al.attention(q, k, v, al.Causal(), backend=backend, return_lse=True)
        assert rel_error(out, want) <= 1e-10, backend
        empty = ~visible.any(1)  # (L,)
        assert torch.isneginf(lse[..., empty]).all() and torch.isfinite(lse[..., ~empty]).all()
        assert (out[:, :, empty] == 0).all()
    with pytest.raises(ValueError, match="L != S"):
        al.attention(q, k, v, al.Causal(), backend="sdpa")


# -- auto: tiled for sparse problems ----------------------------------------------------------
def _doc():
    return al.Document(torch.arange(40) // 10)


TILED_CASES = {
    "sliding_window": (lambda: (al.SlidingWindow(5), None), (40,)),
    "window|sinks": (lambda: (al.SlidingWindow(5) | al.Sinks(2), None), (40,)),
    "document": (lambda: (_doc(), None), (40,)),
    "block_sparse": (lambda: (al.BlockSparse(torch.eye(4, dtype=torch.bool), 10), None), (40,)),
    "neighborhood-2d": (lambda: (al.Neighborhood((3, 3)), None), (6, 7)),
    "full+alibi": (lambda: (al.Full(), al.ALiBi(4)), (40,)),
    "causal+softcap": (lambda: (al.Causal(), al.Softcap(5.0)), (40,)),
    "mask_mod": (lambda: (lambda b, h, q, k: k <= q, None), (40,)),
}


@pytest.mark.parametrize("case,shape", list(TILED_CASES.values()), ids=list(TILED_CASES))
def test_auto_picks_tiled_for_sparse(case, shape):
    pattern, score_mod = case()
    q, k, v = make_qkv(1, 4, 2, shape, shape, 8, 8)
    assert al.explain(q, k, v, pattern, score_mod).backend == "tiled"
    out = al.attention(q, k, v, pattern, score_mod)
    ref = al.attention(q, k, v, pattern, score_mod, backend="reference")
    assert rel_error(out, ref) <= 1e-10


def test_auto_with_return_lse_avoids_sdpa():
    q, k, v = make_qkv(1, 2, 2, (16,), (16,), 4, 4)
    assert al.explain(q, k, v, return_lse=True).backend == "tiled"
    out, lse = al.attention(q, k, v, return_lse=True)
    ref, ref_lse = al.attention(q, k, v, return_lse=True, backend="reference")
    assert rel_error(out, ref) <= 1e-10 and rel_error(lse, ref_lse) <= 1e-10


# -- explain ----------------------------------------------------------------------------------
EXPLAIN_CASES = {
    "full": (None, None, {}),
    "window": (al.SlidingWindow(3), None, {}),
    "causal-lse": (al.Causal(), None, {"return_lse": True}),
    "relemb": (al.Causal(), al.RelativeEmbedding(8, 4), {}),
}


@pytest.mark.parametrize("pattern,score_mod,kw", list(EXPLAIN_CASES.values()),
                         ids=list(EXPLAIN_CASES))
def test_explain_names_backend_and_every_reason(pattern, score_mod, kw):
    q, k, v = make_qkv(1, 2, 1, (12,), (12,), 8, 8, dtype=torch.float32)
    e = al.explain(q, k, v, pattern, score_mod, **kw)
    assert isinstance(e, str)
    assert e.backend in BACKENDS
    assert f"backend: {e.backend}" in e
    assert set(e.reasons) == set(BACKENDS)
    assert e.reasons[e.backend] == []
    for name in BACKENDS:
        assert name in e
        if name != e.backend:
            for reason in e.reasons[name]:
                assert reason in e
    # the first backend (in priority order) with no reason is the one chosen
    first = next(n for n in BACKENDS if not e.reasons[n] and not e.declined[n])
    assert e.backend == first
    # and attention() runs exactly what explain says (same result as that backend forced)
    out = al.attention(q, k, v, pattern, score_mod, **kw)
    forced = al.attention(q, k, v, pattern, score_mod, backend=e.backend, **kw)
    if isinstance(out, tuple):
        out, forced = out[0], forced[0]
    torch.testing.assert_close(out, forced, rtol=0, atol=0)


def test_explain_reasons_are_specific():
    q, k, v = make_qkv(1, 2, 2, (12,), (12,), 8, 8, dtype=torch.float32)
    e = al.explain(q, k, v, al.SlidingWindow(3), al.RelativeEmbedding(8, 4), return_lse=True)
    assert e.backend == "tiled"
    sdpa = " ".join(e.reasons["sdpa"])
    assert "Full and Causal" in sdpa and "score_mod" in sdpa and "return_lse" in sdpa
    flex = " ".join(e.reasons["flex"])
    assert "allow_cpu" in flex and "backward" in flex and "RelativeEmbedding" in flex


def test_explain_forced_backend_that_cannot_run():
    q, k, v = make_qkv(1, 2, 2, (12,), (12,), 8, 8, dtype=torch.float32)
    e = al.explain(q, k, v, al.SlidingWindow(3), backend="sdpa")
    assert e.backend is None
    assert "sdpa: runs only Full and Causal" in e


# -- forced backends that cannot run ---------------------------------------------------------
def test_forced_sdpa_with_sliding_window_raises():
    q, k, v = make_qkv(1, 2, 2, (12,), (12,), 8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"backend='sdpa' cannot run.*only Full and Causal"):
        al.attention(q, k, v, al.SlidingWindow(3), backend="sdpa")


def test_forced_sdpa_with_return_lse_raises():
    q, k, v = make_qkv(1, 2, 2, (12,), (12,), 8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"sdpa.*log-sum-exp \(return_lse=True\)"):
        al.attention(q, k, v, backend="sdpa", return_lse=True)


def test_forced_sdpa_with_score_mod_raises():
    q, k, v = make_qkv(1, 2, 2, (12,), (12,), 8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="sdpa: cannot apply a score_mod"):
        al.attention(q, k, v, score_mod=al.Softcap(5.0), backend="sdpa")


def test_forced_flex_on_cpu_without_allow_cpu_raises():
    q, k, v = make_qkv(1, 2, 2, (12,), (12,), 8, 8, dtype=torch.float32, grad=False)
    with pytest.raises(ValueError, match=r"backend='flex' cannot run.*allow_cpu"):
        al.attention(q, k, v, al.SlidingWindow(3), backend="flex")


def test_forced_flex_on_cpu_with_grad_raises():
    q, k, v = make_qkv(1, 2, 2, (12,), (12,), 8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="no backward on CPU"):
        al.attention(q, k, v, al.SlidingWindow(3), backend="flex",
                     options={"allow_cpu": True, "compile": False})


def test_forced_reference_over_its_guard_raises():
    q, k, v = make_qkv(2, 4, 2, (10,), (10,), 8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"B\*Hq\*L\*S = 800.*max_elements=100"):
        al.attention(q, k, v, backend="reference", options={"max_elements": 100})
    # just at the guard it runs
    out = al.attention(q, k, v, backend="reference", options={"max_elements": 800})
    assert out.shape == (2, 4, 10, 8)


def test_forced_backends_agree_on_full():
    q, k, v = make_qkv(2, 4, 2, (19,), (23,), 8, 5)
    outs = {b: al.attention(q, k, v, backend=b) for b in ("sdpa", "tiled", "reference")}
    for b in ("sdpa", "tiled"):
        assert rel_error(outs[b], outs["reference"]) <= 1e-10


# -- unknown names -----------------------------------------------------------------------------
def test_unknown_backend_raises():
    q, k, v = make_qkv(1, 2, 2, (12,), (12,), 8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"unknown backend='triton_v9'.*'tiled'"):
        al.attention(q, k, v, backend="triton_v9")
    with pytest.raises(TypeError, match="backend must be a string"):
        al.attention(q, k, v, backend=None)


def test_unknown_option_raises():
    q, k, v = make_qkv(1, 2, 2, (12,), (12,), 8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"unknown options \['q_tiles'\]"):
        al.attention(q, k, v, options={"q_tiles": 8})
    # an option of another backend is unknown to a forced one
    with pytest.raises(ValueError, match=r"unknown options \['allow_cpu'\].*\['tiled'\]"):
        al.attention(q, k, v, al.SlidingWindow(2), backend="tiled", options={"allow_cpu": True})
    with pytest.raises(TypeError, match="options must be a dict"):
        al.attention(q, k, v, options=[("q_tile", 8)])


def test_tiled_refuses_too_many_tile_pairs():
    """The tile-pair guard: tiled says why and auto falls back (nothing is computed)."""
    q, k, v = make_qkv(1, 1, 1, (9000,), (9000,), 1, 1, dtype=torch.float32, grad=False)
    opts = {"q_tile": 1, "kv_tile": 1}
    e = al.explain(q, k, v, al.SlidingWindow(3), options=opts)
    assert e.backend == "reference"
    assert any("tile pairs" in r and "q_tile" in r for r in e.reasons["tiled"])
    assert al.explain(q, k, v, al.SlidingWindow(3), backend="tiled", options=opts).backend is None
    with pytest.raises(ValueError, match=r"backend='tiled' cannot run.*tile pairs"):
        al.attention(q, k, v, al.SlidingWindow(3), backend="tiled", options=opts)


def test_bad_tile_option_raises():
    q, k, v = make_qkv(1, 2, 2, (12,), (12,), 8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="tile"):
        al.attention(q, k, v, al.SlidingWindow(2), backend="tiled", options={"q_tile": 0})
    with pytest.raises(ValueError, match="kv_tile"):
        al.attention(q, k, v, al.SlidingWindow(2), backend="tiled", options={"kv_tile": (2, 2)})


@pytest.mark.parametrize("options", [{"q_tile": 8.0}, {"q_tile": True}, {"chunk_elements": "x"}],
                         ids=["q_tile-float", "q_tile-bool", "chunk_elements-str"])
def test_bad_option_types_name_the_option(options):
    q, k, v = make_qkv(1, 2, 2, (12,), (12,), 8, 8, dtype=torch.float32)
    (name,) = options
    with pytest.raises((TypeError, ValueError), match=name):
        al.attention(q, k, v, al.SlidingWindow(2), backend="tiled", options=options)


# -- flex on CPU (inference, not compiled) -----------------------------------------------------
def _flex_cpu_problem() -> str | None:
    """Why raw FlexAttention cannot run on this CPU, or None if it can."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:
        return f"torch {torch.__version__} has no flex_attention ({e})"
    try:
        x = torch.randn(1, 1, 16, 8)
        with torch.no_grad():
            flex_attention(x, x, x)
    except Exception as e:  # noqa: BLE001 - any failure means: not on this CPU
        return f"flex_attention does not run on this CPU: {type(e).__name__}: {e}"
    return None


FLEX_OPTS = {"allow_cpu": True, "compile": False}
_DOC_IDS = [[0] * 10 + [1] * 20 + [2] * 7, [0] * 3 + [1] * 30 + [3] * 4]


def _random_layout(*shape, seed=0, p=0.5):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < p


# name -> (() -> (pattern, score_mod), (B, Hq, Hkv, L, S, D, Dv))
FLEX_CASES = {
    "window-B1-Hq4-Hkv2-L40": (
        lambda: (al.SlidingWindow(5, 2), None), (1, 4, 2, (40,), (40,), 8, 8)),
    "neighborhood-2d-B2-L6x7": (
        lambda: (al.Neighborhood((3, 3)), None), (2, 2, 2, (6, 7), (6, 7), 8, 4)),
    "causal+alibi-L40-S30": (
        lambda: (al.Causal(), al.ALiBi(2)), (1, 2, 1, (40,), (30,), 8, 8)),
    "shards(per-head)&causal-B2-Hq4-Hkv2": (
        lambda: (al.Strided(2, mode="shard") & al.Causal(), None), (2, 4, 2, (37,), (37,), 8, 8)),
    "block_sparse(B,Hq)": (
        lambda: (al.BlockSparse(_random_layout(2, 4, 5, 4), (8, 10)), None),
        (2, 4, 2, (37,), (37,), 8, 8)),
    "document(B,L)&causal": (
        lambda: (al.Document(torch.tensor(_DOC_IDS)) & al.Causal(), None),
        (2, 4, 2, (37,), (37,), 8, 8)),
    "neighborhood-3d-causal0": (
        lambda: (al.Neighborhood((3, 3, 3), is_causal=(True, False, False)), None),
        (1, 2, 1, (4, 5, 6), (4, 5, 6), 8, 8)),
    "window-relbias-L300": (
        lambda: (al.SlidingWindow(20) | al.Sinks(4), al.RelativeBias(2, init_std=0.5)),
        (1, 2, 2, (300,), (300,), 8, 8)),
    "window-cross-L150-S260": (
        lambda: (al.SlidingWindow(20, 3), None), (1, 2, 1, (150,), (260,), 8, 8)),
}


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("case,geom", list(FLEX_CASES.values()), ids=list(FLEX_CASES))
def test_flex_on_cpu_matches_reference(case, geom):
    why = _flex_cpu_problem()
    if why:
        pytest.skip(why)
    pattern, score_mod = case()
    q, k, v = make_qkv(*geom, dtype=torch.float32, grad=False)
    with torch.no_grad():
        e = al.explain(q, k, v, pattern, score_mod, backend="flex", options=FLEX_OPTS)
        assert e.backend == "flex", e
        out, lse = al.attention(q, k, v, pattern, score_mod, return_lse=True, backend="flex",
                                options=FLEX_OPTS)
        ref, ref_lse = al.attention(q, k, v, pattern, score_mod, return_lse=True,
                                    backend="reference", options={"compute_dtype": torch.float64})
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert rel_error(out, ref) <= 1e-4
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert rel_error(lse[~empty], ref_lse[~empty]) <= 1e-4
    assert (out[empty] == 0).all()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_flex_float64_lse_dtype():
    why = _flex_cpu_problem()
    if why:
        pytest.skip(why)
    q, k, v = make_qkv(1, 2, 2, (24,), (24,), 8, 8, grad=False)
    with torch.no_grad():
        out, lse = al.attention(q, k, v, al.SlidingWindow(4), return_lse=True, backend="flex",
                                options=FLEX_OPTS)
        ref, ref_lse = al.attention(q, k, v, al.SlidingWindow(4), return_lse=True,
                                    backend="reference")
    assert rel_error(out, ref) <= 1e-10
    assert lse.dtype == torch.float64
    assert rel_error(lse, ref_lse) <= 1e-10


def test_compiled_flex_on_cpu_refuses_return_lse_with_a_reason():
    q = torch.randn(1, 1, 16, 8)
    why = al.explain(q, q, q, al.Causal(), return_lse=True, options={"allow_cpu": True}).reasons["flex"]
    assert any("log-sum-exp" in r for r in why)


def test_flex_raises_dynamos_recompile_limit_only_inside_the_call():
    from attnlab.backends import flex

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, name)
    with flex._recompile_limit():
        assert getattr(config, name) >= flex.RECOMPILE_LIMIT
    assert getattr(config, name) == before


@pytest.mark.slow
@pytest.mark.parametrize("pattern", [al.SlidingWindow(8) | al.Sinks(3), al.Strided(4, mode="shard") & al.Causal()],
                         ids=["sinks", "shards"])
def test_compiled_flex_on_cpu_compiles_masks_of_broadcast_patterns(pattern):
    q, k, v = (torch.randn(1, 4, 96, 16) for _ in range(3))
    out = al.attention(q, k, v, pattern, backend="flex", options={"allow_cpu": True})
    torch.testing.assert_close(out, al.attention(q, k, v, pattern, backend="reference"), atol=1e-5, rtol=1e-5)
