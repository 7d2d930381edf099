"""The catalog rows of the hybrids: well-formed, and every row's fast path equals its reference
in float64 (outputs and gradients) in each mode it claims, and runs in float32."""

from __future__ import annotations

import pytest
import torch

from attnlab.operators import Operator
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


def _modes():
    for m in ROWS:
        for causal in (False, True):
            if m.causal if causal else m.noncausal:
                for cross in (False, True):
                    if not cross or m.cross:
                        yield pytest.param(m, causal, cross, id=f"{m.name}-{'causal' if causal else 'full'}-"
                                                                f"{'cross' if cross else 'self'}")


@pytest.mark.parametrize("mech,causal,cross", list(_modes()))
def test_fast_matches_reference_in_float64(mech, causal, cross):
    B, H, L, D = 2, 2, 49, 8
    S = 61 if cross else L
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64, requires_grad=True) for n in (L, S, S))
    op = mech.operator(L, S, H, D, causal)
    assert isinstance(op, Operator) and op.note
    out, ref = op.fast(q, k, v), op.reference(q, k, v)
    assert out.shape == (B, H, L, D)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-10)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("mech", ROWS, ids=[m.name for m in ROWS])
def test_float32_is_close_to_float64(mech):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=g) for _ in range(3))
    op = mech.operator(64, 64, 2, 8, mech.causal)
    out = op.fast(q, k, v)
    ref = op.reference(q.double(), k.double(), v.double())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() <= 1e-4


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
