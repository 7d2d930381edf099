"""The tiled backend against the reference backend: outputs, log-sum-exps and gradients.

Every comparison runs ``attention(..., backend="tiled")`` and ``backend="reference"`` on
the same inputs, with a random upstream gradient on *both* ``out`` and ``lse``, and
compares the outputs, the lse (including where it is ``-inf``) and the gradients of q, k,
v and of the score mod's parameters: to 1e-10 in float64 and 1e-4 (relative) in float32.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import attnlab as al
from attnlab.backends.registry import TiledBackend
from attnlab.backends.tiled_plan import build_plan
from attnlab.testing import rel_error

F64_TOL = 1e-10
F32_TOL = 1e-4


# -- helpers --------------------------------------------------------------------------------
def make_qkv(B, Hq, Hkv, q_shape, kv_shape, D, Dv, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    return rnd(B, Hq, *q_shape, D), rnd(B, Hkv, *kv_shape, D), rnd(B, Hkv, *kv_shape, Dv)


def score_params(score_mod) -> list[torch.Tensor]:
    if isinstance(score_mod, torch.nn.Module):
        return [p for p in score_mod.parameters() if p.requires_grad]
    if isinstance(score_mod, (list, tuple)):
        return [p for m in score_mod for p in score_params(m)]
    return []


def run(q, k, v, pattern=None, score_mod=None, backend="tiled", options=None, seed=1):
    """``(out, lse, grads)`` with grads of ``(q, k, v, *score-mod params)`` under random
    upstream gradients on out and on lse (also on rows whose lse is -inf)."""
    out, lse = al.attention(
        q, k, v, pattern, score_mod, return_lse=True, backend=backend, options=options
    )
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype)
    inputs = [q, k, v, *score_params(score_mod)]
    grads = torch.autograd.grad([out, lse], inputs, [dout, dlse], allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(inputs, grads)]
    return out.detach(), lse.detach(), grads


def assert_same_lse(lse, ref, tol):
    empty = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(lse), empty), "rows with no visible key differ"
    assert torch.isfinite(lse[~empty]).all()
    assert rel_error(lse[~empty], ref[~empty]) <= tol


def check_tiled(q, k, v, pattern=None, score_mod=None, options=None, tol=None):
    """Tiled vs reference (in float64 compute); returns the tiled ``(out, lse, grads)``."""
    tol = tol or (F64_TOL if q.dtype == torch.float64 else F32_TOL)
    got = run(q, k, v, pattern, score_mod, "tiled", options)
    want = run(q, k, v, pattern, score_mod, "reference", {"compute_dtype": torch.float64})
    assert got[0].dtype == q.dtype and got[0].shape == want[0].shape
    assert got[1].shape == want[1].shape
    assert rel_error(got[0], want[0]) <= tol, f"out: {rel_error(got[0], want[0]):.3g}"
    assert_same_lse(got[1], want[1], tol)
    names = ["dq", "dk", "dv"] + [f"dparam{i}" for i in range(len(got[2]) - 3)]
    for name, a, b in zip(names, got[2], want[2]):
        assert torch.isfinite(a).all(), f"{name} is not finite"
        assert a.shape == b.shape
        assert rel_error(a, b) <= tol, f"{name}: {rel_error(a, b):.3g}"
    # empty rows: exactly zero output, -inf lse, zero query gradient
    empty = torch.isneginf(got[1])
    if empty.any():
        assert (got[0][empty] == 0).all()
        assert (got[2][0][empty] == 0).all()
    return got


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


# -- every catalog mechanism -----------------------------------------------------------------
SHAPES = [(77,), (9, 11), (4, 5, 6)]


def catalog_cases():
    for m in al.catalog():
        if m.kind not in ("pattern", "score_mod"):
            continue
        for shape in SHAPES:
            if len(shape) not in m.ndims:
                continue
            yield pytest.param(m, shape, id=f"{m.name}-L{shape_id(shape)}")


def head_dim_for(m) -> int:
    # the catalog's RelativeEmbedding example is built for head_dim 64
    return 64 if m.name == "relative_embedding" else 8


@pytest.mark.parametrize("mech,shape", list(catalog_cases()))
def test_catalog_float64(mech, shape):
    pattern, score_mod = mech.example(shape, 4)
    if isinstance(score_mod, torch.nn.Module):
        score_mod = score_mod.double()
    q, k, v = make_qkv(2, 4, 2, shape, shape, head_dim_for(mech), 6)
    check_tiled(q, k, v, pattern, score_mod)


@pytest.mark.parametrize("mech,shape", list(catalog_cases()))
def test_catalog_float32(mech, shape):
    pattern, score_mod = mech.example(shape, 4)
    q, k, v = make_qkv(1, 4, 2, shape, shape, head_dim_for(mech), 6, dtype=torch.float32)
    check_tiled(q, k, v, pattern, score_mod)


@pytest.mark.parametrize("mech,shape", list(catalog_cases()))
def test_catalog_tiny_tiles(mech, shape):
    """Tiles far smaller than the problem (and not dividing it), slot groups split."""
    nd = len(shape)
    tiles = {1: ((8,), (3,)), 2: ((2, 3), (3, 2)), 3: ((2, 2, 3), (1, 3, 2))}[nd]
    pattern, score_mod = mech.example(shape, 2)
    if isinstance(score_mod, torch.nn.Module):
        score_mod = score_mod.double()
    q, k, v = make_qkv(1, 2, 1, shape, shape, head_dim_for(mech), 3, seed=3)
    opts = {"q_tile": tiles[0], "kv_tile": tiles[1], "chunk_elements": 256}
    check_tiled(q, k, v, pattern, score_mod, opts)


CROSS = {1: [((77,), (50,)), ((50,), (77,))], 2: [((9, 11), (6, 7)), ((6, 7), (9, 11))],
         3: [((4, 5, 6), (3, 4, 5))]}


def cross_cases():
    for m in al.catalog():
        if m.kind not in ("pattern", "score_mod"):
            continue
        for nd in m.ndims:
            for qs, ks in CROSS[nd]:
                yield pytest.param(m, qs, ks, id=f"{m.name}-L{shape_id(qs)}-S{shape_id(ks)}")


@pytest.mark.parametrize("mech,q_shape,kv_shape", list(cross_cases()))
def test_catalog_cross_attention(mech, q_shape, kv_shape):
    """L != S where the mechanism allows it (the example is built for the query shape)."""
    pattern, score_mod = mech.example(q_shape, 4)
    geometry = al.geometry.check_qkv(*make_qkv(1, 4, 2, q_shape, kv_shape, head_dim_for(mech), 5))
    try:
        al.patterns.as_pattern(pattern).validate(geometry)
    except ValueError as e:
        pytest.skip(f"{mech.name} does not apply to L={q_shape}, S={kv_shape}: {e}")
    if isinstance(score_mod, torch.nn.Module):
        score_mod = score_mod.double()
    q, k, v = make_qkv(2, 4, 2, q_shape, kv_shape, head_dim_for(mech), 5)
    opts = {"q_tile": 8, "kv_tile": 4} if len(q_shape) == 1 else None
    check_tiled(q, k, v, pattern, score_mod, opts)


# -- geometry: GQA / MQA, Dv != D, L != S, tile sizes ----------------------------------------
GEOMS = [  # B, Hq, Hkv, L, S, D, Dv
    (1, 1, 1, 77, 77, 8, 8),
    (2, 4, 2, 77, 50, 8, 5),
    (2, 4, 1, 50, 77, 4, 12),
    (1, 3, 3, 33, 33, 16, 3),
    (2, 2, 1, 1, 33, 8, 8),
    (1, 2, 2, 33, 1, 8, 8),
    (1, 6, 2, 37, 29, 8, 4),
]
PATTERNS_1D = {
    "causal": al.Causal(),
    "window-l9-r2": al.SlidingWindow(9, 2),
    "window-dil2": al.SlidingWindow(5, 3, dilation=2),
    "window4+sinks2": al.SlidingWindow(4) | al.Sinks(2),
    "prefixlm5": al.PrefixLM(5),
    "strided3&causal": al.Strided(3) & al.Causal(),
}
TILES = {
    "default": None,
    "q8-kv4": {"q_tile": 8, "kv_tile": 4},
    "q8-kv3": {"q_tile": 8, "kv_tile": 3},
    "q5-kv7-chunk64": {"q_tile": 5, "kv_tile": 7, "chunk_elements": 64},
}


def geom_id(g):
    B, Hq, Hkv, L, S, D, Dv = g
    return f"B{B}-Hq{Hq}-Hkv{Hkv}-L{L}-S{S}-D{D}-Dv{Dv}"


@pytest.mark.parametrize("tiles", list(TILES.values()), ids=list(TILES))
@pytest.mark.parametrize("pattern", list(PATTERNS_1D.values()), ids=list(PATTERNS_1D))
@pytest.mark.parametrize("geom", GEOMS, ids=[geom_id(g) for g in GEOMS])
def test_geometries_float64(geom, pattern, tiles):
    B, Hq, Hkv, L, S, D, Dv = geom
    q, k, v = make_qkv(B, Hq, Hkv, (L,), (S,), D, Dv)
    check_tiled(q, k, v, pattern, None, tiles)


@pytest.mark.parametrize("pattern", list(PATTERNS_1D.values()), ids=list(PATTERNS_1D))
@pytest.mark.parametrize("geom", GEOMS[:3], ids=[geom_id(g) for g in GEOMS[:3]])
def test_geometries_float32(geom, pattern):
    B, Hq, Hkv, L, S, D, Dv = geom
    q, k, v = make_qkv(B, Hq, Hkv, (L,), (S,), D, Dv, dtype=torch.float32)
    check_tiled(q, k, v, pattern, None, {"q_tile": 8, "kv_tile": 3})


ND_CASES = {
    "nbh3x5-dil2x1": ((9, 11), al.Neighborhood((3, 5), dilation=(2, 1))),
    "nbh-stride-causal": ((9, 11), al.Neighborhood((5, 3), stride=(2, 1),
                                                    is_causal=(True, False))),
    "halo2x3": ((9, 11), al.Halo((2, 3), (1, 1))),
    "blocked4": ((9, 11), al.Blocked(4)),
    "causal2d": ((9, 11), al.Causal()),
    "nbh3d-causal0": ((4, 5, 6), al.Neighborhood((3, 3, 3), is_causal=(True, False, False))),
    "nbh3d-dil": ((4, 5, 6), al.Neighborhood((2, 2, 3), dilation=(2, 2, 1))),
    "grid3d": ((4, 5, 6), al.Grid((2, 5, 3))),
    "nbh|sinks-3d": ((4, 5, 6), al.Neighborhood((1, 3, 3)) | al.Sinks(7)),
}
ND_TILES = {
    2: {"q2x3-kv3x2": ((2, 3), (3, 2)), "q4x4-kv1x5": ((4, 4), (1, 5)),
        "q1x1-kv2x2": ((1, 1), (2, 2))},
    3: {"q2x2x3-kv1x3x2": ((2, 2, 3), (1, 3, 2)), "q4x5x6-kv1x1x1": ((4, 5, 6), (1, 1, 1))},
}


def nd_cases():
    for name, (shape, pattern) in ND_CASES.items():
        for tname, (qt, kt) in ND_TILES[len(shape)].items():
            yield pytest.param(shape, pattern, {"q_tile": qt, "kv_tile": kt}, id=f"{name}-{tname}")


@pytest.mark.parametrize("shape,pattern,tiles", list(nd_cases()))
def test_nd_tiles(shape, pattern, tiles):
    q, k, v = make_qkv(2, 4, 2, shape, shape, 6, 5)
    check_tiled(q, k, v, pattern, None, tiles)


# -- composition, plain callables, score mods ------------------------------------------------
def _mask_bh(b, h, q_idx, kv_idx):
    return ((kv_idx + h + b) % 3 != 0) & ((q_idx - kv_idx).abs() < 9)


def _mask_plain(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) & ((q_idx - kv_idx < 5) | (kv_idx % 7 == 0))


def _score_plain(score, b, h, q_idx, kv_idx):
    return score - 0.1 * (h + 1) * (q_idx - kv_idx).abs() + 0.05 * b


def _ids():
    return torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [0] * 3 + [1] * 30 + [3] * 4])


COMPOSED = {
    "(window|sinks)&causal": lambda: ((al.SlidingWindow(3, 3) | al.Sinks(2)) & al.Causal(), None),
    "strided|window": lambda: (al.Strided(4) | al.SlidingWindow(2), None),
    "window&window": lambda: (al.SlidingWindow(6, 6, dilation=2) & al.SlidingWindow(3, 9), None),
    "doc(B,L)&causal": lambda: (al.Document(_ids()) & al.Causal(), None),
    "doc|global": lambda: (al.Document(_ids()[0]) | al.GlobalTokens(2), None),
    "shards(per-head)&causal": lambda: (al.Strided(2, mode="shard") & al.Causal(), None),
    "mask_mod": lambda: (_mask_plain, None),
    "mask_mod(b,h)": lambda: (_mask_bh, None),
    "mask_mod|window": lambda: (al.SlidingWindow(2) | _mask_bh, None),
    "score_mod": lambda: (al.Causal(), _score_plain),
    "mask_mod+score_mod": lambda: (_mask_bh, _score_plain),
    "alibi+softcap": lambda: (al.SlidingWindow(8, 8), [al.ALiBi(4), al.Softcap(2.0)]),
    "relbias-causal": lambda: (al.Causal(), al.RelativeBias(4, bidirectional=False, init_std=0.5)),
    "relemb-per-head": lambda: (
        al.Causal(), al.RelativeEmbedding(8, 5, num_heads=4, causal=False, init_std=0.5)),
    "temperature-learned": lambda: (
        al.SlidingWindow(5, 5),
        al.Temperature(torch.tensor([0.5, 1.0, 2.0, 3.0]), learnable=True)),
    "chain-params": lambda: (
        al.PrefixLM(4), [al.RelativeBias(4, init_std=0.5), al.Temperature(0.7, learnable=True)]),
    "prefixlm(per-batch)": lambda: (al.PrefixLM(torch.tensor([0, 9])), None),
    "block_sparse(B,Hq)": lambda: (al.BlockSparse(
        torch.rand(2, 4, 5, 4, generator=torch.Generator().manual_seed(0)) < 0.5, (8, 10)), None),
    "block_sparse(1,Hq)|window": lambda: (al.BlockSparse(
        torch.rand(1, 4, 5, 4, generator=torch.Generator().manual_seed(1)) < 0.3, (8, 10))
        | al.SlidingWindow(1), al.ALiBi(4)),
}


def _double(score_mod):
    if isinstance(score_mod, torch.nn.Module):
        return score_mod.double()
    if isinstance(score_mod, list):
        return [_double(m) for m in score_mod]
    return score_mod


@pytest.mark.parametrize("tiles", [None, {"q_tile": 8, "kv_tile": 3, "chunk_elements": 64}],
                         ids=["default", "q8-kv3-chunk64"])
@pytest.mark.parametrize("case", list(COMPOSED.values()), ids=list(COMPOSED))
def test_composed_and_callables(case, tiles):
    pattern, score_mod = case()
    q, k, v = make_qkv(2, 4, 2, (37,), (37,), 8, 5)
    got = check_tiled(q, k, v, pattern, _double(score_mod), tiles)
    if score_params(score_mod):  # the parameters did receive a gradient
        assert any(gp.abs().max() > 0 for gp in got[2][3:])


@pytest.mark.parametrize("L,S", [(20, 37), (37, 20)], ids=["L20-S37", "L37-S20"])
def test_score_mods_cross_attention(L, S):
    mods = [al.ALiBi(4), al.RelativeBias(4, init_std=0.5).double(),
            al.RelativeEmbedding(8, 6, causal=False, init_std=0.5).double()]
    q, k, v = make_qkv(2, 4, 1, (L,), (S,), 8, 5)
    for mod in mods:
        check_tiled(q, k, v, al.SlidingWindow(6, 2) | al.Sinks(1), mod,
                    {"q_tile": 8, "kv_tile": 4, "chunk_elements": 64})


PER_BATCH_CROSS = {
    "document(B,L)/(B,S)": lambda: al.Document(
        torch.tensor([[0] * 10 + [1] * 10, [1] * 20]),
        torch.tensor([[0] * 17 + [1] * 20, [0] * 30 + [1] * 7])),
    "prefixlm(per-batch)": lambda: al.PrefixLM(torch.tensor([3, 30])),
    "strided-shard|window": lambda: al.Strided(3, mode="shard") | al.SlidingWindow(2, 2),
}


@pytest.mark.parametrize("make", list(PER_BATCH_CROSS.values()), ids=list(PER_BATCH_CROSS))
def test_per_batch_and_per_head_patterns_cross_attention(make):
    q, k, v = make_qkv(2, 4, 2, (20,), (37,), 8, 5)
    check_tiled(q, k, v, make(), None, {"q_tile": 8, "kv_tile": 3, "chunk_elements": 64})


# -- rows with no visible key ----------------------------------------------------------------
EMPTY = {
    "causal-L>S": lambda: ((61,), (23,), al.Causal()),
    "causal-2d-L>S": lambda: ((9, 11), (6, 7), al.Causal()),
    "document-absent-ids": lambda: ((37,), (20,), al.Document(
        _ids(), torch.tensor([[0] * 10 + [2] * 10, [5] * 20]))),
    "sinks0-all-empty": lambda: ((37,), (37,), al.Sinks(0)),
    "window-dil-L>S": lambda: ((40,), (13,), al.SlidingWindow(5, 3, dilation=2)),
}


@pytest.mark.parametrize("tiles", [None, {"q_tile": 8, "kv_tile": 4},
                                   {"q_tile": 4, "kv_tile": 3, "chunk_elements": 64}],
                         ids=["default", "q8-kv4", "q4-kv3-chunk64"])
@pytest.mark.parametrize("case", list(EMPTY.values()), ids=list(EMPTY))
def test_empty_rows(case, tiles):
    q_shape, kv_shape, pattern = case()
    q, k, v = make_qkv(2, 4, 2, q_shape, kv_shape, 8, 5)
    out, lse, grads = check_tiled(q, k, v, pattern, None, tiles)
    empty = torch.isneginf(lse)
    assert empty.any(), "the case must have empty rows"
    assert (out[empty] == 0).all()
    assert not torch.isnan(lse).any()
    for gr in grads:
        assert torch.isfinite(gr).all()
    assert (grads[0][empty] == 0).all()
    if isinstance(pattern, al.Sinks):  # nothing visible at all: every gradient is zero
        for gr in grads:
            assert (gr == 0).all()


def test_empty_rows_expected_positions():
    """Causal with L > S: exactly the first L - S query rows are empty (bottom-right)."""
    L, S = 30, 12
    q, k, v = make_qkv(1, 2, 2, (L,), (S,), 4, 4)
    out, lse = al.attention(q, k, v, al.Causal(), return_lse=True, backend="tiled",
                            options={"q_tile": 8, "kv_tile": 4})
    empty_rows = torch.isneginf(lse[0, 0])
    assert empty_rows.tolist() == [True] * (L - S) + [False] * S
    assert (out[:, :, : L - S] == 0).all()


# -- slot-group splitting (the online merge path) --------------------------------------------
def _plan(q, k, v, pattern, options):
    from attnlab.api import _problem

    problem = _problem(q, k, v, pattern, None, None, True, options)
    return build_plan(problem.pattern, TiledBackend().tiling(problem), options["chunk_elements"])


@pytest.mark.parametrize("pattern",
                         [al.Full(), al.Causal(), al.SlidingWindow(20, 5) | al.Sinks(3)],
                         ids=["full", "causal", "window|sinks"])
def test_slot_groups_are_merged_exactly(pattern):
    q, k, v = make_qkv(2, 4, 2, (45,), (60,), 8, 5)
    opts = {"q_tile": 8, "kv_tile": 4, "chunk_elements": 64}
    plan = _plan(q, k, v, pattern, opts)
    assert any(c.group < c.num_slots for c in plan.chunks), "the test must split rows"
    check_tiled(q, k, v, pattern, None, opts)
    mod = al.RelativeBias(4, init_std=0.5).double()
    check_tiled(q, k, v, pattern, mod, opts)


# -- hypothesis: random configurations -------------------------------------------------------
_leaf = st.one_of(
    st.builds(al.SlidingWindow, left=st.integers(0, 12), right=st.integers(0, 6),
              dilation=st.integers(1, 3)),
    st.just(al.Causal()),
    st.builds(al.Sinks, st.integers(0, 5)),
)
_patterns = st.recursive(
    _leaf,
    lambda children: st.one_of(
        st.tuples(children, children).map(lambda t: t[0] | t[1]),
        st.tuples(children, children).map(lambda t: t[0] & t[1]),
    ),
    max_leaves=3,
)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.integers(1, 3),
    L=st.integers(1, 40), S=st.integers(1, 40), D=st.integers(1, 8), Dv=st.integers(1, 8),
    q_tile=st.integers(1, 20), kv_tile=st.integers(1, 20),
    chunk=st.sampled_from([64, 1000, 1 << 21]), pattern=_patterns, seed=st.integers(0, 2**16),
)
def test_hypothesis_random_configurations(B, Hkv, group, L, S, D, Dv, q_tile, kv_tile, chunk,
                                          pattern, seed):
    q, k, v = make_qkv(B, Hkv * group, Hkv, (L,), (S,), D, Dv, seed=seed)
    opts = {"q_tile": q_tile, "kv_tile": kv_tile, "chunk_elements": chunk}
    check_tiled(q, k, v, pattern, None, opts)


# -- gradcheck -------------------------------------------------------------------------------
TINY_OPTS = {"q_tile": 4, "kv_tile": 2, "chunk_elements": 8}


def _gradcheck_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("pattern", [al.SlidingWindow(3, 1), al.Causal(), al.Full()],
                         ids=["window", "causal-L>S", "full"])
def test_gradcheck_plain(pattern):
    q, k, v = _gradcheck_inputs()

    def f(q, k, v):
        out, lse = al.attention(q, k, v, pattern, return_lse=True, backend="tiled",
                                options=TINY_OPTS)
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("make_mod", [
    lambda: al.RelativeBias(2, num_buckets=4, max_distance=4, init_std=0.5),
    lambda: al.RelativeEmbedding(3, 3, causal=False, init_std=0.5),
    lambda: al.RelativeEmbedding(3, 2, num_heads=2, causal=True, init_std=0.5),
], ids=["relative_bias", "relative_embedding", "relative_embedding-per-head"])
def test_gradcheck_score_mod_parameters(make_mod):
    """Gradients of q, k, v and of the score mod's table (fed in as a gradcheck input)."""
    q, k, v = _gradcheck_inputs(1)
    mod = make_mod().double()
    table = mod.table.detach().clone().requires_grad_()

    def f(q, k, v, table):
        mod._parameters["table"] = table  # the table under test, differentiable
        return al.attention(q, k, v, al.SlidingWindow(3, 1), mod, return_lse=True,
                            backend="tiled", options=TINY_OPTS)

    assert torch.autograd.gradcheck(f, (q, k, v, table))


def test_captured_tensor_in_score_mod_gets_gradient():
    q, k, v = _gradcheck_inputs(2)
    bias = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h] * (q_idx - kv_idx).abs()

    grads = {}
    for backend in ("reference", "tiled"):
        out = al.attention(q, k, v, al.Causal(), score_mod, backend=backend)
        (grads[backend],) = torch.autograd.grad(out.sum(), bias, allow_unused=True)
    assert grads["reference"] is not None and grads["reference"].abs().max() > 0
    assert grads["tiled"] is not None
    assert rel_error(grads["tiled"], grads["reference"]) <= F64_TOL


# -- memory: never L x S for a sparse pattern ------------------------------------------------
class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (and how many ops ran)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


@pytest.mark.parametrize("backend", ["tiled", "auto"])
def test_memory_never_quadratic_for_sliding_window(backend):
    L = S = 4096
    limit = L * S // 4  # per head: B = Hq = 1
    q, k, v = make_qkv(1, 1, 1, (L,), (S,), 16, 16, dtype=torch.float32)
    pattern = al.SlidingWindow(left=32)
    if backend == "auto":
        assert al.explain(q, k, v, pattern, return_lse=True).backend == "tiled"
    fwd = LargestTensor()
    with fwd:
        out, lse = al.attention(q, k, v, pattern, return_lse=True, backend=backend)
    assert fwd.ops > 0
    assert fwd.largest < limit, f"forward made a tensor of {fwd.largest} elements ({fwd.op})"
    bwd = LargestTensor()
    with bwd:
        (out.sum() + lse.sum()).backward()
    assert bwd.ops > 0, "backward ran outside the recording mode"
    assert bwd.largest < limit, f"backward made a tensor of {bwd.largest} elements ({bwd.op})"
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_memory_probe_detects_quadratic_reference():
    """The probe above can fail: the reference backend does materialise L x S."""
    L = 4096
    q, k, v = make_qkv(1, 1, 1, (L,), (L,), 16, 16, dtype=torch.float32)
    probe = LargestTensor()
    with torch.no_grad(), probe:
        al.attention(q, k, v, al.SlidingWindow(left=32), backend="reference")
    assert probe.largest >= L * L // 4


# -- numerics and options ----------------------------------------------------------------------
@pytest.mark.parametrize("scale", [30.0, 100.0])
def test_large_logits_float32(scale):
    """Large logits through split slot groups: the online merge stays exact in float32."""
    q, k, v = make_qkv(2, 4, 2, (45,), (60,), 8, 5, dtype=torch.float32)
    pattern = al.SlidingWindow(20, 5) | al.Sinks(3)
    opts = {"q_tile": 8, "kv_tile": 4, "chunk_elements": 64}
    outs = {}
    for backend, o in (("tiled", opts), ("reference", {"compute_dtype": torch.float64})):
        out, lse = al.attention(q, k, v, pattern, scale=scale, return_lse=True,
                                backend=backend, options=o)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        grads = torch.autograd.grad([out, lse], (q, k, v), [dout, torch.ones_like(lse)])
        outs[backend] = (out, lse, grads)
    a, b = outs["tiled"], outs["reference"]
    assert rel_error(a[0], b[0]) <= F32_TOL and rel_error(a[1], b[1]) <= F32_TOL
    for ga, gb in zip(a[2], b[2]):
        assert torch.isfinite(ga).all() and rel_error(ga, gb) <= F32_TOL


def test_compute_dtype_option():
    """float64 compute on float32 inputs: the float64 result rounded once to float32."""
    q, k, v = make_qkv(2, 4, 2, (45,), (60,), 8, 5, dtype=torch.float32)
    out, lse = al.attention(q, k, v, al.Causal(), return_lse=True, backend="tiled",
                            options={"compute_dtype": torch.float64})
    ref, ref_lse = al.attention(q.double(), k.double(), v.double(), al.Causal(), return_lse=True,
                                backend="reference")
    assert out.dtype == torch.float32 and lse.dtype == torch.float64
    assert rel_error(out, ref.float()) <= torch.finfo(torch.float32).eps
    assert rel_error(lse, ref_lse) <= 1e-12
    with pytest.raises(ValueError, match=r"compute_dtype.*must be torch.float32 or torch.float64"):
        al.attention(q, k, v, al.Causal(), backend="tiled",
                     options={"compute_dtype": torch.float16})


def test_broadcast_kv_and_non_contiguous_upstream_gradient():
    """k expanded over the batch (stride 0) and a transposed upstream gradient."""
    q, _, v = make_qkv(2, 4, 2, (30,), (30,), 8, 5)
    k0 = torch.randn(1, 2, 30, 8, dtype=torch.float64, requires_grad=True)
    k = k0.expand(2, 2, 30, 8)
    dout = torch.randn(2, 4, 5, 30, dtype=torch.float64).transpose(-1, -2)
    res = {}
    for backend in ("tiled", "reference"):
        out = al.attention(q, k, v, al.SlidingWindow(4), backend=backend,
                           options={"q_tile": 8, "kv_tile": 3} if backend == "tiled" else None)
        res[backend] = (out, torch.autograd.grad(out, (q, k0, v), dout))
    assert rel_error(res["tiled"][0], res["reference"][0]) <= F64_TOL
    for a, b in zip(res["tiled"][1], res["reference"][1]):
        assert rel_error(a, b) <= F64_TOL


def test_deterministic():
    q, k, v = make_qkv(2, 4, 2, (45,), (60,), 8, 5)
    opts = {"q_tile": 8, "kv_tile": 3, "chunk_elements": 64}
    a = run(q, k, v, al.SlidingWindow(9) | al.Sinks(2), None, "tiled", opts)
    b = run(q, k, v, al.SlidingWindow(9) | al.Sinks(2), None, "tiled", opts)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


def test_only_score_mod_parameters_require_grad():
    q, k, v = (x.detach() for x in make_qkv(1, 4, 2, (30,), (30,), 8, 5))
    mod = al.RelativeBias(4, init_std=0.5).double()
    outs = [al.attention(q, k, v, al.Causal(), mod, backend=b) for b in ("tiled", "reference")]
    assert outs[0].requires_grad
    ga, gb = (torch.autograd.grad(o.sum(), mod.table)[0] for o in outs)
    assert rel_error(ga, gb) <= F64_TOL


# -- score mods that produce -inf (FlexAttention-style masking inside a score_mod) -----------
def _neg_inf_score_mod(score, b, h, q_idx, kv_idx):
    return torch.where((q_idx < 5) & (kv_idx < 10), float("-inf"), score)


def test_score_mod_with_neg_inf_single_slot_group():
    q, k, v = make_qkv(1, 2, 2, (20,), (20,), 4, 4)
    got = check_tiled(q, k, v, None, _neg_inf_score_mod)
    assert not torch.isnan(got[0]).any()


@pytest.mark.parametrize("pattern,opts", [
    (None, {"q_tile": 4, "kv_tile": 4, "chunk_elements": 16}),
    (al.Causal(), None),
], ids=["full-split-slot-groups", "causal-rows-fully-masked"])
def test_score_mod_with_neg_inf(pattern, opts):
    q, k, v = make_qkv(1, 2, 2, (20,), (20,), 4, 4)
    out, lse = al.attention(q, k, v, pattern, _neg_inf_score_mod, return_lse=True,
                            backend="tiled", options=opts)
    ref, ref_lse = al.attention(q, k, v, pattern, _neg_inf_score_mod, return_lse=True,
                                backend="reference")
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert rel_error(out, ref) <= F64_TOL
    assert_same_lse(lse, ref_lse, F64_TOL)
