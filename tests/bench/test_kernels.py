"""The kernel benchmark's pieces on tiny sizes (the timings themselves are not asserted)."""

import json

import pytest
import torch

import attnlab as al
from attnlab.bench import kernels
from attnlab.bench.timing import Timing, forward_backward, forward_only, measure, peak_rss_gib
from attnlab.testing import density, make_geometry


@pytest.mark.parametrize(
    "pattern,shape",
    [(al.SlidingWindow(left=5), (37,)), (al.Neighborhood((3, 5)), (6, 7)), (al.Causal(), (20,))],
    ids=["sliding", "neighborhood2d", "causal"],
)
def test_visible_fraction_counts_the_mask(pattern, shape):
    want = density(pattern, make_geometry(shape))
    assert kernels.visible_fraction(pattern, shape) == pytest.approx(want, abs=1e-12)


def test_measure_returns_median_and_runs_the_closure():
    calls = []
    t = measure(lambda: calls.append(1), repeats=4, warmup=2)
    assert isinstance(t, Timing) and t.repeats == 4 and t.median >= 0
    assert len(calls) == 6


def test_forward_backward_produces_gradients_and_resets_them():
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    run = forward_backward(lambda a, b, c: al.attention(a, b, c, al.Causal()), q, k, v)
    run()
    first = q.grad.clone()
    run()
    assert torch.equal(q.grad, first)  # reset, not accumulated
    forward_only(lambda a, b, c: al.attention(a, b, c), q, k, v)()


def test_dense_figures_compare_with_sdpa():
    figs = kernels.dense_figures(64, repeats=1, device="cpu")
    assert [f.measure for f in figs] == ["fwd / SDPA", "fwd+bwd / SDPA"] * 2
    for f in figs:
        assert f.ratio == pytest.approx(f.ours / f.baseline)
        assert f.passed is (f.ratio <= f.target)


def test_figure_rows_with_and_without_verdict():
    f = kernels.Figure("p", "m", 1.0, 2.0, 0.5, 1.0)
    assert "ok" in f.row() and "0.500" in f.row()
    assert "ok" not in f.row(verdict=False)
    missing = kernels.Figure("p", "m", None, None, None, 1.0, "peer not installed")
    assert missing.passed is None and "n/a" in missing.row()


def test_memory_figure_runs_in_a_fresh_process():
    f = kernels.memory_figure(2048, 63, "cpu")
    assert f.ratio is not None and 0.05 < f.ratio < 2.5, f.note
    assert peak_rss_gib() > 0


def test_main_quick_json(tmp_path, monkeypatch):
    calls = {}

    def fake_run(sizes, repeats, device, progress):
        calls["args"] = (sizes, repeats, device)
        return [kernels.Figure("p", "m", 1.0, 2.0, 0.5, 1.0)]

    monkeypatch.setattr(kernels, "run", fake_run)
    out = tmp_path / "figs.json"
    assert kernels.main(["--quick", "--repeats", "2", "--json", str(out)]) == 0
    assert calls["args"] == ("quick", 2, "cpu")
    data = json.loads(out.read_text())
    assert data["figures"][0]["ratio"] == 0.5 and data["figures"][0]["passed"] is True
    assert data["environment"]["torch"] == torch.__version__
