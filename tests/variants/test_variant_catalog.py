"""The catalog rows of the softmax variants are well formed and registered; tests/test_operators.py
checks every registered operator row's fast path against its reference (float64, outputs and
gradients, each claimed mode)."""

from __future__ import annotations

import pytest
import torch

import attnlab as al
from attnlab.variants import variant_mechanisms

ROWS = variant_mechanisms()


def test_rows_are_well_formed_and_named_once():
    names = [m.name for m in ROWS]
    assert len(names) == len(set(names)) == 11
    registered = {m.name for m in al.catalog()}
    for m in ROWS:
        assert isinstance(m, al.Mechanism)
        assert m.family == "adaptive" and m.kind == "operator" and m.exact is False
        assert m.name == m.name.strip().lower() and m.ndims == (1,)
        assert m.papers and all(isinstance(p, al.Paper) and 1990 <= p.year <= 2030 for p in m.papers)
        assert callable(m.operator) and (m.causal or m.noncausal)
        assert m.example((8,), 2) == (None, None)
        assert m.summary
        assert m.name in registered, f"{m.name} is not registered"


@pytest.mark.parametrize("mech", ROWS, ids=[m.name for m in ROWS])
def test_operator_float32_is_close_to_float64_and_survives_a_reference_call(mech):
    causal = not mech.noncausal
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 50, 8, generator=g) for _ in range(3))
    q.requires_grad_()
    op = mech.operator(50, 50, 2, 8, causal)
    out = op.fast(q, k, v)
    ref = op.reference(q.double(), k.double(), v.double())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    out = op.fast(q, q, q)  # the benchmark's order: fast, float64 reference, fast backward
    op.reference(q.double(), q.double(), q.double())
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
