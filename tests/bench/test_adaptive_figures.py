"""The speed part of ``attnlab.bench.adaptive_figures`` on a tiny problem: every row names the
backend and kernel that ran and gives consistent densities, ratios and per-pair rates."""

from __future__ import annotations

import pytest

from attnlab.bench.adaptive_figures import speed


def test_speed_rows_are_consistent():
    rows = speed(L=2048, heads=1, dim=16, repeats=1)
    assert set(rows) == {"10% of all pairs", "10% of the causal pairs", "10% of all pairs, query blocks of 2x64"}
    for label, row in rows.items():
        assert row["backend"] == "block_flash", label
        assert row["kernel"].startswith("kernel:"), label
        assert 0 < row["density_of_all_pairs"] <= 0.6, label
        assert row["speedup"] == pytest.approx(row["sdpa_causal_fwd_bwd_s"] / row["attnlab_fwd_bwd_s"])
        ours_pairs = row["attnlab_gpairs_per_s"] * row["attnlab_fwd_bwd_s"]
        assert ours_pairs == pytest.approx(row["density_of_all_pairs"] * 2048 * 2048 / 1e9)
    # fewer blocks kept: fewer pairs
    assert rows["10% of the causal pairs"]["density_of_all_pairs"] < rows["10% of all pairs"]["density_of_all_pairs"]
