"""The catalog: every entry is well formed, and its example runs through ``attention``."""

from __future__ import annotations

import pytest
import torch

import attnlab as al
from attnlab.backends.registry import all_backends
from attnlab.registry import format_table, get

ENTRIES = al.catalog()
NO_PAPER = {"document", "prefix_lm"}
KINDS = {"pattern", "score_mod", "operator", "function"}


def test_catalog_is_not_empty_and_names_are_unique():
    names = [m.name for m in ENTRIES]
    assert len(names) >= 10
    assert len(names) == len(set(names))


@pytest.mark.parametrize("mech", ENTRIES, ids=[m.name for m in ENTRIES])
def test_entry_is_well_formed(mech):
    assert isinstance(mech, al.Mechanism)
    assert mech.name and mech.name == mech.name.strip().lower()
    assert isinstance(mech.family, str) and mech.family.isidentifier()
    assert mech.kind in KINDS
    if mech.name in NO_PAPER:
        assert mech.papers == ()
    else:
        assert len(mech.papers) >= 1, f"{mech.name} cites no paper"
    for p in mech.papers:
        assert isinstance(p, al.Paper)
        assert isinstance(p.title, str) and len(p.title) > 5
        assert isinstance(p.year, int) and 1990 <= p.year <= 2030
        assert str(p.year) in str(p)
    assert all(isinstance(x, bool) for x in (mech.exact, mech.causal, mech.cross))
    assert len(mech.ndims) >= 1 and set(mech.ndims) <= {1, 2, 3}
    assert list(mech.ndims) == sorted(set(mech.ndims))
    if mech.kind == "operator":  # its own execution forms, not attention() backends
        assert callable(mech.operator) and (mech.causal or mech.noncausal)
    else:
        assert set(mech.backends) <= set(all_backends()) and mech.operator is None
    if mech.kind in ("pattern", "score_mod"):
        assert "reference" in mech.backends and "tiled" in mech.backends
    assert callable(mech.example)
    row = mech.as_row()
    assert row["name"] == mech.name and row["family"] == mech.family


def test_catalog_family_filter_and_get():
    for family in {m.family for m in ENTRIES}:
        sub = al.catalog(family)
        assert sub and all(m.family == family for m in sub)
    assert al.catalog("no-such-family") == []
    assert get("sliding_window").name == "sliding_window"
    with pytest.raises(ValueError, match="unknown mechanism 'nope'"):
        get("nope")


def test_format_table_lists_every_entry():
    text = format_table(ENTRIES)
    for m in ENTRIES:
        assert m.name in text


SHAPES = [(40,), (6, 7), (4, 5, 6)]


def example_cases():
    for m in ENTRIES:
        if m.kind not in ("pattern", "score_mod"):
            continue
        for shape in SHAPES:
            if len(shape) in m.ndims:
                yield pytest.param(m, shape, id=f"{m.name}-L{'x'.join(map(str, shape))}")


@pytest.mark.parametrize("mech,shape", list(example_cases()))
def test_example_runs_through_attention(mech, shape):
    heads = 2
    pattern, score_mod = mech.example(shape, heads)
    D = 64 if mech.name == "relative_embedding" else 8
    q = torch.randn(1, heads, *shape, D, requires_grad=True)
    k = torch.randn(1, heads, *shape, D, requires_grad=True)
    v = torch.randn(1, heads, *shape, 4, requires_grad=True)
    out, lse = al.attention(q, k, v, pattern, score_mod, return_lse=True)
    assert out.shape == (1, heads, *shape, 4) and out.dtype == torch.float32
    assert lse.shape == (1, heads, *shape)
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.parametrize("mech", [m for m in ENTRIES if m.kind in ("pattern", "score_mod")],
                         ids=[m.name for m in ENTRIES if m.kind in ("pattern", "score_mod")])
def test_listed_backends_can_run_the_example(mech):
    """Backends an entry lists accept its example (flex: CPU inference on request); the
    others refuse it."""
    shape = (40,) if 1 in mech.ndims else (6, 7)
    pattern, score_mod = mech.example(shape, 2)
    D = 64 if mech.name == "relative_embedding" else 8
    q, k, v = (torch.randn(1, 2, *shape, D) for _ in range(3))
    with torch.no_grad():
        e = al.explain(q, k, v, pattern, score_mod, options={"allow_cpu": True})
    for name, why in e.reasons.items():
        if name in mech.backends:
            assert why == [], f"{mech.name} lists {name}, which refuses: {why}"
        else:
            assert why, f"{mech.name} does not list {name}, which would run it"


def test_function_entries_have_no_example_problem():
    for m in ENTRIES:
        if m.kind == "function":
            assert m.example((8,), 2) == (None, None)
    assert get("merge_attentions").kind == "function"
