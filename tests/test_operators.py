"""Every operator row of the catalog (linear, spectral, ...): its fast path against its exact
reference in float64, outputs and gradients, in each mode the row claims (causal or not, self or
cross), on lengths that are not multiples of any chunk or block size."""

from __future__ import annotations

import pytest
import torch

import attnlab as al

OPERATORS = [m for m in al.catalog() if m.kind == "operator"]


def _modes():
    for m in OPERATORS:
        for causal in (False, True):
            if (m.causal if causal else m.noncausal):
                for cross in (False, True):
                    if not cross or m.cross:
                        yield pytest.param(m, causal, cross, id=f"{m.name}-{'causal' if causal else 'full'}"
                                                              f"-{'cross' if cross else 'self'}")


@pytest.mark.parametrize("mech,causal,cross", list(_modes()))
def test_fast_path_matches_reference_in_float64(mech, causal, cross):
    B, H, L, D = 2, 2, 37, 8
    S = 29 if cross else L
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, H, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    op = mech.operator(L, S, H, D, causal)
    out = op.fast(q, k, v)
    ref = op.reference(q, k, v)
    assert out.shape == ref.shape and out.shape[:2] == (B, H)
    torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-9)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    fast_grads = torch.autograd.grad(out, (q, k, v), go, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go, allow_unused=True)
    for name, a, b in zip("qkv", fast_grads, ref_grads):
        assert (a is None) == (b is None), f"d{name} used by one path only"
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=f"d{name} of {mech.name}")


@pytest.mark.parametrize("mech", OPERATORS, ids=[m.name for m in OPERATORS])
def test_float32_runs_and_is_close_to_float64(mech):
    B, H, L, D = 1, 2, 50, 8
    causal = not mech.noncausal
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    op = mech.operator(L, L, H, D, causal)
    out = op.fast(q, k, v)
    ref = op.reference(q.double(), k.double(), v.double())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("mech", OPERATORS, ids=[m.name for m in OPERATORS])
def test_reference_call_does_not_break_a_pending_fast_backward(mech):
    """The benchmark runs the fast path, then the float64 reference, then the fast backward:
    operators with parameters must not cast them in place."""
    causal = not mech.noncausal
    q = torch.randn(1, 2, 20, 8, requires_grad=True)
    op = mech.operator(20, 20, 2, 8, causal)
    out = op.fast(q, q, q)
    op.reference(q.double(), q.double(), q.double())
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
