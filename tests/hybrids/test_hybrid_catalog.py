"""The catalog rows of the hybrids are well formed and registered; tests/test_operators.py checks
every registered operator row's fast path against its reference (float64, outputs and gradients,
each claimed mode) and in float32."""

from __future__ import annotations

import pytest
import torch

import attnlab as al
from attnlab.registry import Mechanism
from attnlab.hybrids import hybrid_mechanisms

ROWS = hybrid_mechanisms()


def test_rows_are_well_formed():
    names = [m.name for m in ROWS]
    assert names == ["nsa", "hilo", "combiner", "cca", "landmark"]
    for m in ROWS:
        assert isinstance(m, Mechanism) and m.family == "adaptive" and m.kind == "operator" and not m.exact
        assert m.papers and all(p.year >= 2021 for p in m.papers) and m.operator is not None
        assert m.causal or m.noncausal
        assert m.name in {r.name for r in al.catalog()}, f"{m.name} is not registered"


@pytest.mark.parametrize("mech", ROWS, ids=[m.name for m in ROWS])
def test_bfloat16_runs_forward_and_backward(mech):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    op = mech.operator(64, 64, 2, 16, mech.causal)
    qb, kb, vb = (x.to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    out = op.fast(qb, kb, vb)
    ref = op.reference(q.double(), k.double(), v.double())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() <= 5e-2 * max(1.0, ref.abs().max().item())
    out.float().square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (qb, kb, vb))
