"""The bench report: crossover lengths, terminal summary, self-contained HTML, plots.

:func:`synthetic_records` builds a realistic record set (reusable: ``python -c "from
tests.bench.test_report import synthetic_records"`` or the ``synthetic`` fixture)."""

from __future__ import annotations

import json
import math
import random
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from attnlab.bench import report
from attnlab.bench.report import (
    aggregate_quality,
    crossover_details,
    crossovers,
    fmt_err,
    fmt_sig,
    load_records,
    summary_table,
    write_report,
)
from attnlab.bench.store import ResultStore

ENV = {
    "torch": "2.13.0+cpu",
    "attnlab": "0.1.0",
    "python": "3.11.7",
    "platform": "Linux-x86_64",
    "device": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
    "threads": 16,
    "commit": "0123456789abcdef0123456789abcdef01234567",
}
PATTERNS = ("noncausal-self", "causal-self", "noncausal-cross", "causal-cross")
FAST_NOTE = "dense, without the pattern: cost baseline"  # sdpa_fast's result["reason"]


# --------------------------------------------------------------------------- record builders


def eff(
    mechanism: str,
    L: int,
    impl: str = "attnlab",
    *,
    pattern: str = "causal-self",
    fwd: float | None = None,
    fwdbwd: float | None = None,
    status: str = "ok",
    reason: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    **result: Any,
) -> dict:
    """One efficiency record (unspecified result fields None)."""
    S = L // 2 if pattern.endswith("cross") else L
    config = {
        "suite": "efficiency",
        "mechanism": mechanism,
        "pattern": pattern,
        "L": L,
        "S": S,
        "dtype": dtype,
        "device": device,
        "batch": 1,
        "heads": 8,
        "head_dim": 64,
        "impl": impl,
    }
    res = {
        "status": status,
        "reason": reason,
        "backend": None,
        "fwd_ms": fwd,
        "fwd_spread": None,
        "fwdbwd_ms": fwdbwd,
        "fwdbwd_spread": None,
        "repeats": 5 if status == "ok" else None,
        "peak_mib": None,
        "compile_s": None,
        "err_out": None,
        "err_grad": None,
        "density": None,
    }
    res.update(result)
    key = f"{mechanism}|{pattern}|L={L}|S={S}|{dtype}|{device}|B1H8D64|{impl}"
    return {
        "key": key,
        "config": config,
        "result": res,
        "env": dict(ENV),
        "time": f"2025-06-01T12:{L % 60:02d}:00.000+00:00",
    }


def qual(
    task: str,
    variant: str,
    seed: int,
    value: float | None,
    *,
    metric: str = "accuracy",
    higher_is_better: bool = True,
    status: str = "ok",
    reason: str | None = None,
    mechanism: str | None = None,
) -> dict:
    config = {
        "suite": "quality",
        "task": task,
        "variant": variant,
        "mechanism": mechanism or variant,
        "seed": seed,
        "preset": "small",
        "steps": 400,
    }
    res = {
        "status": status,
        "reason": reason,
        "metric": metric,
        "value": value,
        "higher_is_better": higher_is_better,
        "train_s": 12.5 + seed,
        "params": 201_344,
        "final_train_loss": 0.1 if value is not None else None,
    }
    return {
        "key": f"quality|{task}|{variant}|seed={seed}",
        "config": config,
        "result": res,
        "env": dict(ENV),
        "time": "2025-06-01T13:00:00.000+00:00",
    }


def series(
    mechanism: str,
    att: dict[int, float],
    dense: dict[int, float],
    fast: dict[int, float] | None = None,
    **kw: Any,
) -> list[dict]:
    """attnlab and sdpa_dense (and sdpa_fast, given ``fast``) fwd+bwd times per length."""
    fast_recs = [
        eff(mechanism, L, "sdpa_fast", fwd=t / 3, fwdbwd=t, reason=FAST_NOTE, **kw)
        for L, t in (fast or {}).items()
    ]
    return (
        [eff(mechanism, L, fwd=t / 3, fwdbwd=t, **kw) for L, t in att.items()]
        + [eff(mechanism, L, "sdpa_dense", fwd=t / 3, fwdbwd=t, **kw) for L, t in dense.items()]
        + fast_recs
    )


# the mechanisms of the synthetic sweep: (name, visible fraction at L, causal-only, cross)
_MECHS: list[tuple[str, Any, bool, bool]] = [
    ("full", lambda L, S: 1.0, False, True),
    ("causal", lambda L, S: 0.5, True, True),
    ("sliding_window", lambda L, S: min(1.0, 257 / S), False, True),
    ("sliding_window+sinks", lambda L, S: min(1.0, 132 / S), True, True),
    ("neighborhood", lambda L, S: min(1.0, 127 / S), False, False),
    ("blocked", lambda L, S: min(1.0, 256 / S), False, True),
    ("halo", lambda L, S: min(1.0, 384 / S), False, False),
    ("strided", lambda L, S: min(1.0, 0.5 * (128 / S + 1 / 16)), False, True),
    ("s2_shards", lambda L, S: min(1.0, 0.15 + 64 / S), False, True),
    ("global_tokens", lambda L, S: min(1.0, 64 / S + 256 / S), False, True),
    ("document", lambda L, S: min(1.0, 1024 / S), False, False),
    ("prefix_lm", lambda L, S: 0.55, True, False),
    ("block_sparse", lambda L, S: 0.12, False, True),
    ("radial", lambda L, S: min(1.0, 2 * math.log2(S) / S * 16), False, True),
    ("alibi", lambda L, S: 1.0, False, True),
    ("relative_bias", lambda L, S: 1.0, False, True),
    ("softcap", lambda L, S: 1.0, False, True),
]


def synthetic_records(
    n_mechanisms: int = 15,
    lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384),
    patterns: tuple[str, ...] = PATTERNS,
    peers: bool = True,
    quality_seeds: int = 3,
    seed: int = 0,
) -> list[dict]:
    """A realistic record set: ``n_mechanisms`` attnlab mechanisms on the CAB patterns over
    ``lengths``, sdpa_dense everywhere (skipped over its memory budget at 16k), and with
    ``peers`` natten (forward only, unsupported on causal), flex_eager, flex_compiled,
    local_attention (one error), fla_naive (not installed); a quality set with
    ``quality_seeds`` seeds (none when 0), one failed seed."""
    rng = random.Random(seed)
    out: list[dict] = []
    D, H = 64, 8

    def jitter() -> float:
        return math.exp(rng.gauss(0, 0.06))

    def spread() -> float:
        return round(rng.uniform(0.45, 0.7) if rng.random() < 0.04 else rng.uniform(0.01, 0.12), 3)

    for name, dens, causal_only, cross in _MECHS[:n_mechanisms]:
        for pattern in patterns:
            if (
                causal_only
                and pattern.startswith("noncausal")
                or not cross
                and pattern.endswith("cross")
            ):
                continue
            for L in lengths:
                S = L // 2 if pattern.endswith("cross") else L
                d = dens(L, S) * (
                    0.5
                    if pattern.startswith("causal") and name not in ("causal", "prefix_lm")
                    else 1
                )
                d = min(1.0, d)
                work = L * S * H * D * 1e-9  # G multiply-adds of the dense problem
                dense_fb = (
                    0.25
                    + 95 * work * (1.05 if name in ("alibi", "relative_bias", "softcap") else 1.0)
                ) * jitter()
                dense_peak = L * S * H * (4 * 3 + 1) / 2**20 + L * H * D * 4 * 6 / 2**20
                att_peak = L * H * D * 4 * 7 / 2**20 + L * S * H * d * 12 / 2**20
                att_fb = (
                    1.1 + 210 * work * max(d, 1.6 * 128 / S if d < 1 else 0) + 0.0009 * L
                ) * jitter()
                if name in ("full", "causal"):  # attnlab dispatches these to SDPA
                    att_fb, att_peak = dense_fb * 1.03 * jitter(), dense_peak * 1.01
                att_fail = (
                    name == "radial"
                    and L == lengths[-1]
                    and pattern == "noncausal-self"
                    and len(lengths) > 2
                )
                base = dict(pattern=pattern, density=round(d, 5))
                if att_fail:
                    out.append(
                        eff(
                            name,
                            L,
                            status="error",
                            reason="RuntimeError: tile plan exceeds index range "
                            "(int32 overflow in block table)",
                            **base,
                        )
                    )
                else:
                    fits = L * S * H * 8 * 5 <= 2**33
                    eo = 10 ** rng.uniform(-7.3, -6.6) if fits else None
                    eg = eo * 10 ** rng.uniform(0.2, 0.7) if eo else None
                    backend = "sdpa" if name in ("full", "causal") else "tiled"
                    out.append(
                        eff(
                            name,
                            L,
                            fwd=round(att_fb / 2.9, 4),
                            fwdbwd=round(att_fb, 4),
                            fwd_spread=spread(),
                            fwdbwd_spread=spread(),
                            backend=backend,
                            peak_mib=round(att_peak, 2),
                            err_out=eo,
                            err_grad=eg,
                            **base,
                        )
                    )
                if L * S * H * 13 > 2**34 * 0.5 and len(lengths) > 2:
                    out.append(
                        eff(
                            name,
                            L,
                            "sdpa_dense",
                            status="skipped",
                            reason="dense mask needs 16.0 GiB, over the memory budget (8.0 GiB)",
                            **base,
                        )
                    )
                else:
                    out.append(
                        eff(
                            name,
                            L,
                            "sdpa_dense",
                            fwd=round(dense_fb / 2.7, 4),
                            fwdbwd=round(dense_fb, 4),
                            fwd_spread=spread(),
                            fwdbwd_spread=spread(),
                            peak_mib=round(dense_peak, 2),
                            **base,
                        )
                    )
                if not peers:
                    continue
                if name in ("neighborhood", "sliding_window", "halo"):
                    if pattern.startswith("causal") and name != "sliding_window":
                        out.append(
                            eff(
                                name,
                                L,
                                "natten",
                                status="unsupported",
                                reason="natten has no causal neighborhood with this window on CPU",
                                **base,
                            )
                        )
                    else:
                        out.append(
                            eff(
                                name,
                                L,
                                "natten",
                                fwd=round(att_fb / 2.9 * 0.7 * jitter(), 4),
                                reason="no backward on CPU",
                                peak_mib=round(att_peak * 0.6, 2),
                                **base,
                            )
                        )
                if name in ("sliding_window", "blocked", "document", "block_sparse", "causal"):
                    flex_eager = dense_fb * 1.8 * jitter()
                    out.append(
                        eff(
                            name,
                            L,
                            "flex_eager",
                            fwd=round(flex_eager / 2.8, 4),
                            fwdbwd=round(flex_eager, 4),
                            peak_mib=round(dense_peak * 1.1, 2),
                            **base,
                        )
                    )
                    flex_c = (0.6 + 120 * work * max(d, 0.05)) * jitter()
                    out.append(
                        eff(
                            name,
                            L,
                            "flex_compiled",
                            fwd=round(flex_c / 3, 4),
                            fwdbwd=round(flex_c, 4),
                            compile_s=round(rng.uniform(6, 14), 2),
                            peak_mib=round(att_peak * 0.9, 2),
                            **base,
                        )
                    )
                if name == "sliding_window" and pattern in ("noncausal-self", "causal-self"):
                    if L == lengths[-1]:
                        out.append(
                            eff(
                                name,
                                L,
                                "local_attention",
                                status="error",
                                reason="RuntimeError: shape '[1, 8, -1, 256, 64]' is invalid "
                                "for input of size 8388608 <script>alert(1)</script>",
                                **base,
                            )
                        )
                    else:
                        la = att_fb * 1.4 * jitter()
                        out.append(
                            eff(
                                name,
                                L,
                                "local_attention",
                                fwd=round(la / 3, 4),
                                fwdbwd=round(la, 4),
                                peak_mib=round(att_peak * 1.5, 2),
                                **base,
                            )
                        )
                if name in ("causal", "sliding_window") and pattern == "causal-self":
                    out.append(
                        eff(
                            name,
                            L,
                            "fla_naive",
                            status="not installed",
                            reason="No module named 'fla' (pip install flash-linear-attention)",
                            **base,
                        )
                    )
    if quality_seeds:
        tasks = {
            "mqar": ("accuracy", True, 0.97),
            "selective_copy": ("accuracy", True, 0.9),
            "digits": ("accuracy", True, 0.95),
            "bach_chorales": ("nll", False, 0.72),
        }
        variants = ["full", "sliding_window", "blocked", "alibi", "strided", "global_tokens"]
        for task, (metric, hib, top) in tasks.items():
            for k, variant in enumerate(variants):
                base = top * (1 - 0.06 * k) if hib else top * (1 + 0.05 * k)
                for s in range(quality_seeds):
                    if task == "mqar" and variant == "strided" and s == 2:
                        out.append(
                            qual(
                                task,
                                variant,
                                s,
                                None,
                                metric=metric,
                                higher_is_better=hib,
                                status="error",
                                reason="CUDA-free run diverged: loss is nan at step 312",
                            )
                        )
                        continue
                    v = base + rng.gauss(0, 0.012)
                    out.append(
                        qual(
                            task,
                            variant,
                            s,
                            round(min(v, 1.0) if hib else v, 4),
                            metric=metric,
                            higher_is_better=hib,
                        )
                    )
    return out


@pytest.fixture
def synthetic() -> list[dict]:
    return synthetic_records()


# --------------------------------------------------------------------------- crossovers


def _key(mech: str = "m") -> tuple[str, str, str, str]:
    return (mech, "causal-self", "float32", "cpu")


def test_crossover_mid_sweep() -> None:
    recs = series(
        "m",
        {256: 2.0, 512: 3.0, 1024: 5.0, 2048: 9.0},
        {256: 1.0, 512: 2.5, 1024: 6.0, 2048: 20.0},
    )
    assert crossovers(recs) == {_key(): 1024}
    c = crossover_details(recs)[_key()]
    assert c.compared == (256, 512, 1024, 2048) and c.faster == (1024, 2048) and not c.from_start
    assert c.label() == "1024"


def test_crossover_never() -> None:
    recs = series("m", {256: 2.0, 1024: 8.0}, {256: 1.0, 1024: 4.0})
    assert crossovers(recs) == {_key(): None}
    assert crossover_details(recs)[_key()].label() == "never"


def test_crossover_from_the_start_is_the_smallest_length() -> None:
    recs = series("m", {256: 0.5, 1024: 1.0, 4096: 2.0}, {256: 1.0, 1024: 4.0, 4096: 30.0})
    assert crossovers(recs) == {_key(): 256}
    c = crossover_details(recs)[_key()]
    assert c.from_start and c.label() == "≤ 256" and c.label(ascii=True) == "<=256"


def test_crossover_non_monotone() -> None:
    # faster at 512, slower at 1024, faster from 2048 on: the crossover is 2048
    recs = series(
        "m",
        {256: 2, 512: 1, 1024: 5, 2048: 4, 4096: 6},
        {256: 1, 512: 2, 1024: 4, 2048: 5, 4096: 9},
    )
    assert crossovers(recs) == {_key(): 2048}
    # overtakes, then loses again at the largest lengths: no crossover
    recs = series("m", {256: 2, 512: 1, 1024: 1, 2048: 8}, {256: 1, 512: 2, 1024: 2, 2048: 4})
    assert crossovers(recs) == {_key(): None}
    c = crossover_details(recs)[_key()]
    assert c.lost_again and c.faster == (512, 1024) and c.label() == "never*"


def test_crossover_ignores_failed_and_unmatched_lengths_and_ties() -> None:
    recs = series("m", {256: 2.0, 1024: 1.0, 4096: 3.0}, {256: 1.0, 1024: 2.0})
    recs.append(eff("m", 4096, "sdpa_dense", status="skipped", reason="over the memory budget"))
    recs.append(eff("m", 8192, fwd=1.0, fwdbwd=2.0))  # no dense at 8192
    assert crossovers(recs) == {_key(): 1024}
    tie = series("m", {256: 1.0}, {256: 1.0})
    assert crossovers(tie) == {_key(): None}  # equal is not below
    # no dense at all: the series has no crossover entry
    assert crossovers([eff("m", 256, fwd=1.0, fwdbwd=2.0)]) == {}


def test_crossover_uses_forward_where_a_side_has_no_backward() -> None:
    recs = [
        eff("m", 256, fwd=1.0, fwdbwd=None, reason="no backward on CPU"),
        eff("m", 256, "sdpa_dense", fwd=2.0, fwdbwd=0.5),
        eff("m", 1024, fwd=1.0, fwdbwd=9.0),
        eff("m", 1024, "sdpa_dense", fwd=2.0, fwdbwd=8.0),
    ]
    c = crossover_details(recs)[_key()]
    assert c.length is None and c.faster == (256,) and c.metrics == ("fwd", "fwd+bwd")


def test_crossover_keys_separate_patterns_dtypes_devices() -> None:
    recs = (
        series("m", {256: 1.0}, {256: 2.0})
        + series("m", {256: 3.0}, {256: 2.0}, pattern="noncausal-cross")
        + series("m", {256: 1.0}, {256: 2.0}, dtype="bfloat16", device="cuda")
    )
    assert crossovers(recs) == {
        ("m", "causal-self", "float32", "cpu"): 256,
        ("m", "noncausal-cross", "float32", "cpu"): None,
        ("m", "causal-self", "bfloat16", "cuda"): 256,
    }


def test_crossover_against_sdpa_fast() -> None:
    # faster than sdpa_dense from 1024, than sdpa_fast (no pattern) only from 4096
    recs = series(
        "m",
        {256: 2.0, 1024: 3.0, 4096: 6.0},
        {256: 1.0, 1024: 4.0, 4096: 40.0},
        fast={256: 0.5, 1024: 3.5, 4096: 10.0},
    )
    assert crossovers(recs) == crossovers(recs, baseline="sdpa_dense") == {_key(): 1024}
    assert crossovers(recs, baseline="sdpa_fast") == {_key(): 1024}
    recs += [eff("m", 8192, fwd=1.0, fwdbwd=30.0), eff("m", 8192, "sdpa_fast", fwdbwd=20.0)]
    c = crossover_details(recs, baseline="sdpa_fast")[_key()]
    assert c.length is None and c.lost_again and c.faster == (1024, 4096)
    assert c.compared == (256, 1024, 4096, 8192) and c.label() == "never*"
    assert crossovers(recs)[_key()] == 1024  # no sdpa_dense at 8192: unchanged
    # a series without sdpa_fast has no entry for that baseline
    only_dense = series("m", {256: 1.0}, {256: 2.0})
    assert crossovers(only_dense, baseline="sdpa_fast") == {}
    assert crossovers(only_dense) == {_key(): 256}
    with pytest.raises(TypeError):
        crossovers(recs, "sdpa_fast")  # type: ignore[misc]  # keyword only


# --------------------------------------------------------------------------- formatting, quality


def test_number_formatting() -> None:
    assert (
        fmt_sig(12.345) == "12.3" and fmt_sig(0.012345) == "0.0123" and fmt_sig(1234.5) == "1234"
    )
    assert fmt_sig(9.9996) == "10.0" and fmt_sig(None) == "—" and fmt_sig(0.0) == "0"
    assert fmt_sig(2.5e-5) == "2.50e-05" and fmt_err(3.14e-7) == "3.1e-07"


def test_quality_other_column_shows_only_varying_config() -> None:
    recs = []
    for lr in (1e-3, 3e-3):
        for s in range(2):
            r = qual("mqar", "full", s, 0.9 + lr)
            r["config"].update(layers=2, dim=64, lr=lr)
            recs.append(r)
    rows = aggregate_quality(recs)
    assert [(r.extra, r.n) for r in rows] == [("lr=0.001", 2), ("lr=0.003", 2)]


def test_quality_aggregation_over_seeds() -> None:
    recs = [qual("mqar", "full", s, v) for s, v in enumerate((0.9, 0.8, 0.7))]
    recs.append(qual("mqar", "full", 3, None, status="error", reason="nan loss"))
    recs += [qual("chorales", "full", 0, 0.7, metric="nll", higher_is_better=False)]
    rows = aggregate_quality(recs)
    assert [(r.task, r.n, r.failed) for r in rows] == [("mqar", 3, 1), ("chorales", 1, 0)]
    assert rows[0].mean == pytest.approx(0.8) and rows[0].std == pytest.approx(0.1)
    assert rows[0].min == 0.7 and rows[0].max == 0.9 and rows[1].std is None


# --------------------------------------------------------------------------- summary table


def test_summary_table_numbers_and_peers() -> None:
    recs = series("sliding_window", {256: 2.0, 4096: 12.34}, {256: 1.0, 4096: 98.7})
    recs[1]["result"].update(
        backend="tiled", peak_mib=33.3, err_out=3.14e-7, err_grad=6.2e-7, density=0.0625
    )
    recs += [
        eff("sliding_window", L, "natten", fwd=1.5, reason="no backward on CPU")
        for L in (256, 4096)
    ]
    recs += [
        eff(
            "sliding_window",
            L,
            "natten",
            pattern="noncausal-cross",
            status="unsupported",
            reason="backward",
        )
        for L in (256, 4096)
    ]
    recs += [
        eff(
            "sliding_window",
            256,
            "fla_naive",
            status="not installed",
            reason="No module named 'fla'",
        )
    ]
    recs += [qual("mqar", "sliding_window", s, v) for s, v in enumerate((0.91, 0.93, 0.95))]
    text = summary_table(recs)
    row = next(ln for ln in text.splitlines() if ln.startswith("sliding_window"))
    for expected in (
        "causal-self",
        "4096",
        "tiled",
        "4.11",
        "12.3",
        "0.13x",
        "33.3",
        "3.1e-07",
        "6.2e-07",
    ):
        assert expected in row, (expected, row)
    assert "natten: ok (fwd only) 2, unsupported (backward) 2" in text
    assert "fla_naive: not installed (No module named 'fla')" in text
    assert "sdpa_dense: ok 2" in text
    qline = next(ln for ln in text.splitlines() if ln.startswith("mqar"))
    assert "0.930 ± 0.020" in qline and " 3 " in qline
    assert max(len(ln) for ln in text.splitlines()) <= 125


def _columns(text: str, first: str) -> dict[str, str]:
    """The summary table's header names mapped to the cells of the row starting ``first``."""
    lines = text.splitlines()
    k = next(i for i, ln in enumerate(lines) if ln.startswith("mechanism "))
    head, rule = lines[k], lines[k + 1]
    row = next(ln for ln in lines[k + 2 :] if ln.startswith(first))
    spans, i = [], 0
    for width in map(len, rule.split("  ")):
        spans.append((i, i + width))
        i += width + 2
    return {head[a:b].strip(): row[a:b].strip() for a, b in spans}


def test_summary_table_flash_column() -> None:
    recs = series(
        "m",
        {256: 2.0, 1024: 3.0, 4096: 6.0},
        {256: 1.0, 1024: 4.0, 4096: 40.0},
        fast={256: 0.5, 1024: 3.5, 4096: 12.0},
    )
    text = summary_table(recs)
    cols = _columns(text, "m ")
    assert cols["t/dense"] == "0.15x" and cols["t/flash"] == "0.50x"
    assert cols["crossover"] == "1024" and cols["vs flash"] == "1024"
    assert "t/flash: time / sdpa_fast time, SDPA without the pattern" in text
    assert "vs flash: the same crossover against sdpa_fast" in text
    assert "sdpa_fast: ok 3" in text
    # the same metric rule as t/dense: forward where a side has no fwd+bwd, @L below L
    recs = series("m", {256: 2.0, 1024: 3.0}, {256: 1.0, 1024: 6.0})
    recs += [eff("m", 256, "sdpa_fast", fwd=2.0, reason=FAST_NOTE)]
    cols = _columns(summary_table(recs), "m ")
    assert cols["t/dense"] == "0.50x" and cols["t/flash"] == "0.33xf@256"
    assert cols["vs flash"] == "<=256"
    # without sdpa_fast records the columns are left out
    text = summary_table(series("m", {256: 2.0}, {256: 1.0}))
    assert "t/dense" in text and "t/flash" not in text and "vs flash" not in text


def test_summary_table_sections_and_empty(synthetic: list[dict]) -> None:
    assert "no records" in summary_table([])
    only_q = summary_table([qual("digits", "full", 0, 0.9)])
    assert "Quality" in only_q and "Efficiency" not in only_q and "Implementations" not in only_q
    only_e = summary_table(series("m", {256: 1.0}, {256: 2.0}))
    assert "Efficiency" in only_e and "Quality" not in only_e
    text = summary_table(synthetic)
    assert max(len(ln) for ln in text.splitlines()) <= 125
    assert "local_attention: ok 12, error (RuntimeError" in text
    assert "never" in text and "8192!" in text and "failed at a larger L" in text
    assert "0.0" in next(
        ln for ln in text.splitlines() if ln.startswith("sliding_window ")
    )  # t/dense < 0.1


def test_load_records_latest_per_key(tmp_path: Path) -> None:
    assert load_records(tmp_path / "missing") == []
    a, b = series("m", {256: 2.0}, {256: 1.0})
    with ResultStore(tmp_path).open_for_write(env=ENV) as s:
        s.append(a["key"], a["config"], a["result"])
        s.append(b["key"], b["config"], b["result"])
        s.append(a["key"], a["config"], {**a["result"], "fwdbwd_ms": 0.5})  # a re-measurement
    recs = load_records(tmp_path)
    assert len(recs) == 2 and crossovers(recs) == {("m", "causal-self", "float32", "cpu"): 256}


# --------------------------------------------------------------------------- html


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _self_contained(doc: str) -> list[str]:
    """Check that nothing is loaded from elsewhere; return the img sources."""
    assert doc.startswith("<!DOCTYPE html>")
    parser = _Tags()
    parser.feed(doc)
    names = {t for t, _ in parser.tags}
    assert not names & {"script", "link", "iframe", "object", "embed"}, names
    srcs = [a["src"] or "" for _, a in parser.tags if "src" in a]
    assert all(src.startswith("data:image/png;base64,") for src in srcs)
    assert all((a["href"] or "").startswith("#") for _, a in parser.tags if "href" in a)
    assert "@import" not in doc and "url(" not in doc
    return srcs


def test_html_escapes_and_is_self_contained_without_plots(tmp_path: Path, monkeypatch) -> None:
    from attnlab.bench import plots

    monkeypatch.setattr(plots, "available", lambda: False)
    bad = '<script>alert("x")</script> & <img src=http://evil/x.png>'
    recs = series("m<b>", {256: 2.0}, {256: 1.0})
    recs.append(eff("m<b>", 256, "natten", status="error", reason=bad))
    recs.append(qual("mqar", "v<i>", 0, 0.5))
    path = write_report(recs, tmp_path, title="t <x>")
    assert path == tmp_path / "report.html"
    doc = path.read_text()
    _self_contained(doc)
    assert (
        "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;img src=http://evil/x.png&gt;"
        in doc
    )
    assert "m&lt;b&gt;" in doc and "v&lt;i&gt;" in doc and "<title>t &lt;x&gt;</title>" in doc
    assert "<b>m<b>" not in doc
    assert "matplotlib is not installed" in doc and "data:image/png" not in doc
    assert not list(tmp_path.glob("*.png"))


def test_empty_records_report(tmp_path: Path) -> None:
    doc = write_report([], tmp_path).read_text()
    _self_contained(doc)
    assert "No records" in doc


def test_report_only_quality_or_only_efficiency(tmp_path: Path, monkeypatch) -> None:
    from attnlab.bench import plots

    monkeypatch.setattr(plots, "available", lambda: False)
    doc = write_report(
        [qual("mqar", "full", s, 0.9 + s / 100) for s in range(3)], tmp_path / "q"
    ).read_text()
    assert "Quality" in doc and "Efficiency" not in doc and "0.910 ± 0.010" in doc
    doc = write_report(
        series("m", {256: 2.0, 512: 1.0}, {256: 1.0, 512: 2.0}), tmp_path / "e"
    ).read_text()
    assert "Efficiency" in doc and "<h2>Quality" not in doc and "crossover" in doc.lower()
    # records of an unknown suite are counted, not fatal
    doc = write_report(
        [{"key": "x", "config": {"suite": "other"}, "result": {}, "env": {}}], tmp_path / "o"
    ).read_text()
    assert "skipped 1 record(s)" in doc


def test_report_html_compares_with_sdpa_fast(tmp_path: Path, monkeypatch) -> None:
    from attnlab.bench import plots

    monkeypatch.setattr(plots, "available", lambda: False)
    recs = series(
        "m",
        {256: 2.0, 1024: 3.0, 4096: 6.0},
        {256: 1.0, 1024: 4.0, 4096: 40.0},
        fast={256: 0.5, 1024: 3.5, 4096: 12.0},
    )
    doc = write_report(recs, tmp_path / "fast").read_text()
    _self_contained(doc)
    for expected in (
        "t / flash",
        "vs flash",
        "crossover length vs sdpa_fast: mechanisms",
        "0.50× sdpa_fast",  # the fastest mechanism's ratio in the key findings
        "0.50× flash",  # below attnlab's time in the per-pattern table
        "SDPA with the pattern as a dense boolean mask (the same function)",
        "torch SDPA without the pattern",
    ):
        assert expected in doc, expected
    doc = write_report(series("m", {256: 2.0}, {256: 1.0}), tmp_path / "dense").read_text()
    assert "t / dense" in doc and "flash" not in doc and "sdpa_fast" not in doc


def test_write_report_with_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    recs = synthetic_records(
        n_mechanisms=3, lengths=(256, 1024), patterns=("causal-self",), quality_seeds=2
    )
    path = write_report(recs, tmp_path)
    doc = path.read_text()
    _self_contained(doc)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert {
        "time_vs_length.png",
        "memory_vs_length.png",
        "errors.png",
        "quality.png",
        "time_causal-self_fwdbwd.png",
        "time_causal-self_fwd.png",
    } <= set(pngs)
    assert len(_self_contained(doc)) == len(pngs)
    for p in tmp_path.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the JSON of the records survives the round trip through the store format
    json.dumps(recs, allow_nan=False)


def test_time_plots_draw_sdpa_fast_as_a_reference_line(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    from attnlab.bench import plots

    figures = {}
    save = plots._save

    def keep(fig, path, dpi):
        figures[path.name] = fig
        return save(fig, path, dpi)

    monkeypatch.setattr(plots, "_save", keep)
    recs = series("m", {256: 2.0, 1024: 3.0}, {256: 1.0, 1024: 4.0}, fast={256: 0.5, 1024: 2.0})
    recs += [eff("m", L, "natten", fwd=1.0, fwdbwd=2.0) for L in (256, 1024)]
    plots.time_vs_length(recs, tmp_path)

    def legend(name: str) -> dict[str, Any]:
        (leg,) = figures[name].legends
        return {t.get_text(): h for t, h in zip(leg.get_texts(), leg.legend_handles)}

    overview = legend("time_vs_length.png")
    assert list(overview)[:2] == [
        "sdpa_dense (median over mechanisms)",
        "sdpa_fast, without the pattern (median)",
    ]
    assert "m · natten" in overview and "m · sdpa_fast" not in overview
    panels = legend("time_causal-self_fwdbwd.png")
    assert list(panels) == [
        "attnlab",
        "sdpa_dense (dense mask)",
        "sdpa_fast (without the pattern)",
        "natten",
    ]
    fast = panels["sdpa_fast (without the pattern)"]
    assert fast.get_color() == "black" and fast.get_linestyle() != "-"
    assert fast.get_color() != panels["sdpa_dense (dense mask)"].get_color()
    pngs, _ = plots.write_plots(recs, tmp_path / "all")
    assert any("black dashed: sdpa_fast" in caption for _, caption in pngs)


def test_plots_skip_missing_data(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from attnlab.bench import plots

    q = [qual("mqar", "full", 0, 0.9)]
    assert plots.time_vs_length(q, tmp_path) == [] and plots.errors(q, tmp_path) == []
    assert [p.name for p in plots.quality(q, tmp_path)] == ["quality.png"]
    assert plots.quality(series("m", {256: 1.0}, {256: 2.0}), tmp_path / "x") == []


def test_modules_import_matplotlib_lazily() -> None:
    import ast

    from attnlab.bench import plots

    files = sorted(Path(report.__file__).parent.glob("*.py")) + [Path(plots.__file__)]
    assert len(files) > 2  # report is a package of modules
    for file in files:
        tree = ast.parse(file.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top for a in n.names] + [
            n.module or "" for n in top if isinstance(n, ast.ImportFrom)
        ]
        assert not any(x.split(".")[0] == "matplotlib" for x in names), file.name
