"""The sweep planner: CAB's four patterns per mechanism, keys, resume, problem building."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

import attnlab as al
from attnlab.bench.planner import (
    ALL_FOUR, CAUSAL_CROSS, CAUSAL_SELF, NONCAUSAL_CROSS, NONCAUSAL_SELF, Measurement,
    build_problem, cross_length, example_is_causal, pending, plan_sweep, supported_patterns,
)
from attnlab.bench.store import ResultStore
from attnlab.registry import Mechanism

LENGTHS = [64, 256]


def _fake(name: str, *, causal: bool, cross: bool, ndims=(1,), kind="pattern", example=None) -> Mechanism:
    return Mechanism(name, "core", kind, (), True, causal, cross, ndims, ("tiled",),
                     example or (lambda s, h: (al.Full(), None)))


def test_counts_follow_catalog_flags() -> None:
    plan = plan_sweep(al.catalog(), LENGTHS)
    per = Counter(m.mechanism for m in plan)
    for mech in al.catalog():
        got = {m.pattern for m in plan if m.mechanism == mech.name}
        assert per[mech.name] == len(got) * len(LENGTHS)
        if 1 not in mech.ndims or mech.kind == "function":
            assert not got, mech.name
            continue
        assert got, f"{mech.name} gets no pattern at all"
        if not mech.cross:
            assert not got & {NONCAUSAL_CROSS, CAUSAL_CROSS}, mech.name
        if not mech.causal:
            assert not got & {CAUSAL_SELF, CAUSAL_CROSS}, mech.name
        if example_is_causal(mech):
            assert not got & {NONCAUSAL_SELF, NONCAUSAL_CROSS}, mech.name
    by_name = {n: {m.pattern for m in plan if m.mechanism == n} for n in per}
    assert by_name["full"] == {NONCAUSAL_SELF, NONCAUSAL_CROSS}
    assert by_name["causal"] == {CAUSAL_SELF, CAUSAL_CROSS}
    assert by_name["sliding_window"] == {CAUSAL_SELF, CAUSAL_CROSS}  # its example is causal
    assert by_name["neighborhood"] == {NONCAUSAL_SELF, CAUSAL_SELF}  # cross=False
    assert by_name["blocked"] == {NONCAUSAL_SELF}
    assert by_name["document"] == {CAUSAL_SELF}  # its example refuses S != L
    assert "merge_attentions" not in per


def test_synthetic_mechanisms() -> None:
    assert supported_patterns(_fake("a", causal=True, cross=False)) == (NONCAUSAL_SELF, CAUSAL_SELF)
    assert supported_patterns(_fake("b", causal=False, cross=True)) == (NONCAUSAL_SELF, NONCAUSAL_CROSS)
    assert supported_patterns(_fake("c", causal=True, cross=True)) == ALL_FOUR
    assert supported_patterns(_fake("d", causal=True, cross=True, ndims=(2, 3))) == ()
    two_sided = _fake("w", causal=True, cross=True, example=lambda s, h: (al.SlidingWindow(4, 4), None))
    assert not example_is_causal(two_sided)
    one_sided = _fake("w", causal=True, cross=True, example=lambda s, h: (al.SlidingWindow(4) | al.Causal(), None))
    assert example_is_causal(one_sided)  # causal by its mask, not by naming Causal
    causal_ex = _fake("e", causal=True, cross=True, example=lambda s, h: (al.Strided(4) & al.Causal(), None))
    assert example_is_causal(causal_ex)
    assert supported_patterns(causal_ex) == (CAUSAL_SELF, CAUSAL_CROSS)
    assert supported_patterns(causal_ex, patterns=(NONCAUSAL_SELF, CAUSAL_CROSS)) == (CAUSAL_CROSS,)
    plan = plan_sweep([_fake("s", causal=True, cross=True, kind="score_mod")], [64], kinds=("pattern",))
    assert plan == []


def test_keys_unique_stable_and_readable() -> None:
    plan = plan_sweep(al.catalog(), [4096, 64])
    keys = [m.key for m in plan]
    assert len(set(keys)) == len(keys)
    assert keys == [m.key for m in plan_sweep(al.catalog(), [4096, 64])]
    assert "sliding_window|causal-self|L=4096|S=4096|float32|cpu|B1H8D64" in keys
    assert "full|noncausal-cross|L=4096|S=2048|float32|cpu|B1H8D64" in keys
    assert [m.L for m in plan] == sorted((m.L for m in plan), reverse=True)  # lengths outermost
    other = plan_sweep(["causal"], [64], dtype="bfloat16", device="cuda", batch=2, heads=4, head_dim=32)
    assert [m.key for m in other] == ["causal|causal-self|L=64|S=64|bfloat16|cuda|B2H4D32",
                                      "causal|causal-cross|L=64|S=32|bfloat16|cuda|B2H4D32"]
    assert other[0].config() == {"mechanism": "causal", "pattern": "causal-self", "L": 64, "S": 64,
                                 "dtype": "bfloat16", "device": "cuda", "batch": 2, "heads": 4, "head_dim": 32}


def test_pending_removes_done_keys(tmp_path: Path) -> None:
    plan = plan_sweep(al.catalog(), LENGTHS)
    assert pending(plan, set()) == plan
    assert pending(plan, [m.key for m in plan]) == []
    with ResultStore(tmp_path).open_for_write(env={}) as s:
        for m in plan[::3]:
            s.append(m.key, m.config(), {"median": 1.0})
    todo = pending(plan, ResultStore(tmp_path).done_keys())
    assert todo == [m for i, m in enumerate(plan) if i % 3]


def test_build_problem_runs_for_every_planned_measurement() -> None:
    plan = plan_sweep(al.catalog(), [64])
    assert len({m.mechanism for m in plan}) >= 15
    torch.manual_seed(123)  # a state that build_problem's own seeding could not reproduce
    rng = torch.get_rng_state()
    for m in plan:
        q, k, v, pattern, score_mod = build_problem(m, m.mechanism)
        S = cross_length(64) if m.cross else 64
        assert m.S == S and S == (32 if m.cross else 64)
        assert q.shape == (1, 8, 64, 64) and k.shape == v.shape == (1, 8, S, 64), m.key
        out = al.attention(q, k, v, pattern, score_mod)
        assert out.shape == q.shape and bool(torch.isfinite(out).all()), m.key
    assert torch.equal(rng, torch.get_rng_state())  # examples' tables do not consume the global RNG


def test_causal_cross_is_bottom_right_aligned() -> None:
    for name in ("sliding_window+sinks", "temperature", "causal"):
        m = next(x for x in plan_sweep([name], [64]) if x.pattern == CAUSAL_CROSS)
        q, k, v, pattern, score_mod = build_problem(m, name)
        w = al.attention_weights(q, k, v, pattern, score_mod)[0, 0]  # (L, S)
        i, j = torch.arange(m.L)[:, None], torch.arange(m.S)[None, :]
        assert bool((w[j > i + m.S - m.L] == 0).all()), name
        assert bool((w[m.L - m.S:].sum(-1) - 1).abs().max() < 1e-4), name  # the rest see keys
    m = next(x for x in plan_sweep(["temperature"], [64]) if x.pattern == NONCAUSAL_CROSS)
    q, k, v, pattern, score_mod = build_problem(m, "temperature")
    assert bool((al.attention_weights(q, k, v, pattern, score_mod) > 0).all())


def test_build_problem_is_deterministic() -> None:
    m = plan_sweep(["relative_bias"], [64], dtype="float64")[0]
    a, b = build_problem(m, "relative_bias", requires_grad=True), build_problem(m, "relative_bias")
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))
    assert a[0].dtype == torch.float64 and a[0].requires_grad and not b[0].requires_grad
    assert torch.equal(a[4].table, b[4].table)
    c = build_problem(m, "relative_bias", seed=1)
    assert not torch.equal(a[0].detach(), c[0]) and not torch.equal(a[4].table, c[4].table)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lengths=[1]), ValueError, "lengths entry"),
    (dict(lengths=[True]), TypeError, "lengths entry"),
    (dict(lengths=[64, 64]), ValueError, "lengths has a duplicate"),
    (dict(patterns=("causal",)), ValueError, "'causal'"),
    (dict(kinds=("function",)), ValueError, "kinds"),
    (dict(dtype="float8"), ValueError, "dtype='float8'"),
    (dict(device="gpu0"), ValueError, "device='gpu0'"),
    (dict(heads=0), ValueError, "heads=0"),
    (dict(mechanisms=["nope"]), ValueError, "nope"),
    (dict(mechanisms=[3]), TypeError, "mechanisms entry"),
    (dict(mechanisms=["full", "full"]), ValueError, "mechanisms has a duplicate"),
])
def test_plan_sweep_errors(kwargs: dict, error: type, match: str) -> None:
    args = {"mechanisms": ["full"], "lengths": [64], **kwargs}
    with pytest.raises(error, match=match):
        plan_sweep(args.pop("mechanisms"), args.pop("lengths"), **args)


def test_build_problem_errors() -> None:
    m = plan_sweep(["full"], [64])[0]
    with pytest.raises(ValueError, match="does not match"):
        build_problem(m, "causal")
    with pytest.raises(TypeError, match="measurement"):
        build_problem(m.key, "full")  # type: ignore[arg-type]
    assert isinstance(m, Measurement) and m.S == 64 and not m.causal and not m.cross
