"""One measurement across implementations: records, errors against the reference, failures."""

import pytest
import torch

import attnlab as al
from attnlab.bench import efficiency, peers
from attnlab._checks import SizeLimitError
from attnlab.bench.efficiency import RESULT_FIELDS, make_case, record_key, run_measurement
from attnlab.bench.memory import peak_memory_mib
from attnlab.bench.planner import Measurement
from attnlab.registry import Mechanism
from attnlab.testing import density, make_geometry

WINDOW = Mechanism("window", "core", "pattern", (), True, True, True, (1,), ("tiled",),
                   lambda s, h: (al.SlidingWindow(left=5, right=3), al.ALiBi(h)))
MEAS = Measurement("window", "noncausal-self", 67, 67, "float32", "cpu", 1, 2, 16)


class Failing(peers.Impl):
    def __init__(self, name, exc):
        self.name, self.exc = name, exc

    def prepare(self, case):
        raise self.exc


class ForwardOnly(peers.Impl):
    name = "fwd_only"

    def prepare(self, case):
        return peers.Prepared(lambda q, k, v: al.attention(q, k, v, case.pattern), backward="no backward here")


def _records(impls, **kw):
    return {key: (cfg, res) for key, cfg, res in run_measurement(MEAS, WINDOW, impls, repeats=1, **kw)}


def test_attnlab_record_has_every_field_and_a_small_error():
    recs = _records([peers.Attnlab(), peers.SDPADense()])
    assert set(recs) == {record_key(MEAS, "attnlab"), record_key(MEAS, "sdpa_dense")}
    cfg, res = recs[record_key(MEAS, "attnlab")]
    assert cfg == MEAS.config() | {"suite": "efficiency", "impl": "attnlab"}
    assert set(res) == set(RESULT_FIELDS)
    assert res["status"] == "ok" and res["backend"] == "tiled" and res["repeats"] == 1
    assert res["fwd_ms"] > 0 and res["fwdbwd_ms"] > 0 and res["peak_mib"] > 0
    assert 0 <= res["err_out"] < 1e-5 and 0 <= res["err_grad"] < 1e-4
    want = density(al.SlidingWindow(left=5, right=3), make_geometry((67,), q_heads=2))
    assert res["density"] == pytest.approx(want, abs=1e-12)
    assert recs[record_key(MEAS, "sdpa_dense")][1]["err_out"] is None


def test_error_is_left_out_when_the_reference_does_not_fit():
    recs = _records([peers.Attnlab()], error_limit_bytes=1000)
    res = recs[record_key(MEAS, "attnlab")][1]
    assert res["status"] == "ok" and res["err_out"] is None


def test_reference_error_sees_a_wrong_result(monkeypatch):
    case = make_case(MEAS, WINDOW, 1 << 30)
    real = efficiency.attention

    def off_by_a_bit(q, k, v, pattern, score_mod, backend="auto"):
        out = real(q, k, v, pattern, score_mod, backend=backend)
        return out if backend == "reference" else out * 1.01

    monkeypatch.setattr(efficiency, "attention", off_by_a_bit)
    err_out, _ = efficiency.reference_error(case)
    assert err_out > 1e-3


@pytest.mark.parametrize("exc,status", [
    (RuntimeError("kernel exploded"), "error"),
    (peers.Unsupported("cannot do cross"), "unsupported"),
    (peers.Skipped("too big"), "skipped"),
    (SizeLimitError("cubic: 10 multiply-adds, above max_work=5"), "unsupported"),
])
def test_peer_failures_are_recorded_not_raised(exc, status):
    recs = _records([peers.Attnlab(), Failing("bad", exc)])
    res = recs[record_key(MEAS, "bad")][1]
    assert res["status"] == status and str(exc) in res["reason"]
    assert res["fwd_ms"] is None
    assert recs[record_key(MEAS, "attnlab")][1]["status"] == "ok"


def test_missing_package_is_recorded_as_not_installed():
    impl = Failing("ghost", RuntimeError("never prepared"))
    impl.package = "no_such_package_for_attnlab"
    res = _records([impl])[record_key(MEAS, "ghost")][1]
    assert res["status"] == "not installed" and "pip install" in res["reason"]


def test_forward_only_impl_has_no_backward_timing():
    res = _records([ForwardOnly()])[record_key(MEAS, "fwd_only")][1]
    assert res["status"] == "ok" and res["fwd_ms"] > 0
    assert res["fwdbwd_ms"] is None and res["reason"] == "no backward here"


def test_done_keys_and_non_applying_peers_produce_no_record():
    assert _records([peers.Attnlab()], done_keys={record_key(MEAS, "attnlab")}) == {}
    assert _records([peers.Natten(), peers.FlaNaive()]) == {}


def test_a_failing_example_gives_error_records():
    broken = Mechanism("window", "core", "pattern", (), True, True, True, (1,), ("tiled",),
                       lambda s, h: (_ for _ in ()).throw(RuntimeError("bad example")))
    recs = {k: r for k, _, r in run_measurement(MEAS, broken, [peers.Attnlab()], repeats=1)}
    assert recs[record_key(MEAS, "attnlab")]["status"] == "error"
    assert "bad example" in recs[record_key(MEAS, "attnlab")]["reason"]


def test_peak_memory_counts_what_the_call_allocates():
    def hold(n):
        def fn():
            a = torch.empty(n, dtype=torch.float32).fill_(1)
            b = a + 1  # both alive: 2n floats
            return float(b[0])
        return fn

    one = peak_memory_mib(hold(1 << 20))
    four = peak_memory_mib(hold(1 << 22))
    assert one == pytest.approx(8.0, rel=0.05)
    assert four == pytest.approx(4 * one, rel=0.05)
    with pytest.raises(ValueError, match="device"):
        peak_memory_mib(hold(10), "meta")


def test_sparse_memory_grows_slower_than_dense():
    mech = Mechanism("w", "core", "pattern", (), True, True, True, (1,), ("tiled",),
                     lambda s, h: (al.SlidingWindow(left=16, right=0), None))
    peaks = {}
    for L in (512, 2048):
        m = Measurement("w", "causal-self", L, L, "float32", "cpu", 1, 2, 16)
        recs = {k.rsplit("|", 1)[1]: r for k, _, r in run_measurement(
            m, mech, [peers.Attnlab(), peers.SDPADense()], repeats=1, error_limit_bytes=0)}
        peaks[L] = (recs["attnlab"]["peak_mib"], recs["sdpa_dense"]["peak_mib"])
    ours_growth = peaks[2048][0] / peaks[512][0]
    dense_growth = peaks[2048][1] / peaks[512][1]
    assert ours_growth < 6 < dense_growth  # linear (x4) vs quadratic (x16)
