"""The peers compute the same function as attnlab on the cases where they apply."""

import pytest
import torch

import attnlab as al
from attnlab import registry
from attnlab.bench import peers
from attnlab.bench.efficiency import make_case
from attnlab.bench.planner import Measurement
from attnlab.registry import Mechanism


def _mech(name, pattern, score_mod=None, causal=True):
    return Mechanism(name, "core", "pattern", (), True, causal, True, (1,), ("tiled",),
                     lambda s, h: (pattern, score_mod))


def _case(mech, L=70, S=None, pattern="noncausal-self", heads=2, dtype="float64", limit=1 << 30):
    m = Measurement(mech.name, pattern, L, S or L, dtype, "cpu", 1, heads, 16)
    return make_case(m, mech, limit)


def _expected(case):
    return al.attention(case.q, case.k, case.v, case.pattern, case.score_mod, backend="reference")


def _run(prep, case):
    with torch.no_grad():
        return prep.forward(*prep.convert(case.q, case.k, case.v))


@pytest.mark.parametrize("pattern,score_mod", [
    (al.SlidingWindow(left=9, right=4), None),
    (al.Causal(), al.ALiBi(2)),
    (al.Strided(4, mode="shard") | al.SlidingWindow(3), None),  # depends on the head
], ids=["window", "alibi", "per-head"])
def test_sdpa_dense_matches_reference(pattern, score_mod):
    case = _case(_mech("m", pattern, score_mod))
    prep = peers.SDPADense().prepare(case)
    assert prep.note is None
    torch.testing.assert_close(_run(prep, case), _expected(case))


def test_sdpa_dense_notes_a_non_additive_score_mod():
    case = _case(_mech("m", al.Causal(), al.Softcap(5.0)))
    prep = peers.SDPADense().prepare(case)
    assert "Softcap not applied" in prep.note
    want = al.attention(case.q, case.k, case.v, al.Causal(), backend="reference")
    torch.testing.assert_close(_run(prep, case), want)


@pytest.mark.parametrize("mod,additive", [(al.ALiBi(2), True), (al.RelativeBias(2), True),
                                          (al.Softcap(5.0), False), (al.Temperature(0.5), False)])
def test_additive_score_mods_are_recognised(mod, additive):
    assert peers._is_additive(mod, _case(_mech("m", al.Causal(), mod))) is additive


def test_dense_peers_are_skipped_over_the_memory_limit():
    case = _case(_mech("m", al.Causal()), limit=1000)
    with pytest.raises(peers.Skipped, match="memory limit"):
        peers.SDPADense().prepare(case)
    with pytest.raises(peers.Skipped, match="memory limit"):
        peers.FlexEager().prepare(case)


def test_flex_eager_matches_attnlab_forward_only_on_cpu():
    case = _case(_mech("m", al.SlidingWindow(left=7) | al.Sinks(2), al.ALiBi(2)), L=80, dtype="float32")
    prep = peers.FlexEager().prepare(case)
    assert prep.backward == "no backward on CPU"
    torch.testing.assert_close(_run(prep, case), _expected(case), atol=2e-5, rtol=2e-5)


def test_flex_refuses_a_query_dependent_score_mod():
    case = _case(_mech("m", al.Causal(), al.RelativeEmbedding(16, max_distance=8)))
    with pytest.raises(peers.Unsupported, match="query vectors"):
        peers.FlexEager().prepare(case)


@pytest.mark.slow
def test_flex_compiled_matches_and_reports_compile_time():
    case = _case(_mech("m", al.SlidingWindow(left=16)), L=128, dtype="float32")
    prep = peers.FlexCompiled().prepare(case)
    assert prep.compile_s > 0
    torch.testing.assert_close(_run(prep, case), _expected(case), atol=2e-5, rtol=2e-5)


def test_natten_matches_neighborhood_and_refuses_what_it_cannot_compute():
    pytest.importorskip("natten")
    mech = registry.get("neighborhood")
    case = _case(mech, L=75, dtype="float32")
    prep = peers.Natten().prepare(case)
    assert peers.Natten().applies(case) and prep.backward == "no backward on CPU"
    torch.testing.assert_close(_run(prep, case).transpose(1, 2), _expected(case), atol=2e-5, rtol=2e-5)
    with pytest.raises(peers.Unsupported, match="self attention"):
        peers.Natten().prepare(_case(mech, L=75, S=37, pattern="noncausal-cross"))
    with pytest.raises(peers.Unsupported, match="another pattern"):
        peers.Natten().prepare(_case(mech, L=75, pattern="causal-self"))
    assert not peers.Natten().applies(_case(registry.get("sliding_window"), L=64, pattern="causal-self"))


@pytest.mark.parametrize("right", [0, 6])
def test_local_attention_matches_sliding_window(right):
    pytest.importorskip("local_attention")
    case = _case(_mech("m", al.SlidingWindow(left=6, right=right), causal=right == 0), L=45, dtype="float32")
    impl = peers.LocalAttention()
    assert impl.applies(case)
    torch.testing.assert_close(_run(impl.prepare(case), case), _expected(case), atol=2e-5, rtol=2e-5)
    with pytest.raises(peers.Unsupported):
        impl.prepare(_case(_mech("m", al.SlidingWindow(left=6, right=2)), L=45))


def test_fla_applies_only_to_its_named_mechanisms_and_says_when_missing(monkeypatch):
    impl = peers.FlaNaive()
    assert not impl.applies(_case(_mech("sliding_window", al.SlidingWindow(4))))
    assert impl.applies(_case(_mech("retention", al.Causal())))
    monkeypatch.setattr(peers.FlaNaive, "package", "no_such_package_for_attnlab")
    assert "not installed" in impl.missing() and "pip install" in impl.missing()


def test_select_impls():
    assert [i.name for i in peers.select_impls([])] == ["attnlab"]
    assert [i.name for i in peers.select_impls(["natten", "sdpa_dense"])] == ["attnlab", "sdpa_dense", "natten"]
    assert len(peers.select_impls(None)) == 1 + len(peers.PEER_NAMES)
    with pytest.raises(ValueError, match="unknown peer.*'nope'"):
        peers.select_impls(["nope"])
