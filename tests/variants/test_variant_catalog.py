"""The catalog rows of the softmax variants: well formed, and every row's fast path equals its
reference in float64 (outputs and gradients) in each mode it claims, the same checks that
tests/test_operators.py runs on every operator row once the rows are registered."""

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
        assert m.name not in registered or m in al.catalog(), f"{m.name} clashes with another row"


def _modes():
    for m in ROWS:
        for causal in (False, True):
            if m.causal if causal else m.noncausal:
                for cross in (False, True):
                    if not cross or m.cross:
                        yield pytest.param(m, causal, cross, id=f"{m.name}-{'causal' if causal else 'full'}-"
                                                              f"{'cross' if cross else 'self'}")


@pytest.mark.parametrize("mech,causal,cross", list(_modes()))
def test_operator_fast_matches_reference_in_float64(mech, causal, cross):
    B, H, L, D = 2, 2, 37, 8
    S = 29 if cross else L
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, H, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    op = mech.operator(L, S, H, D, causal)
    out, ref = op.fast(q, k, v), op.reference(q, k, v)
    assert out.shape == ref.shape and out.shape[:2] == (B, H)
    assert out.abs().max() > 0
    torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-9)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    fg = torch.autograd.grad(out, (q, k, v), go, allow_unused=True)
    rg = torch.autograd.grad(ref, (q, k, v), go, allow_unused=True)
    for name, a, b in zip("qkv", fg, rg):
        assert (a is None) == (b is None), f"d{name} used by one path only"
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=f"d{name} of {mech.name}")


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
