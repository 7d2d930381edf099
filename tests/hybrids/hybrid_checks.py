"""Shared checks of the hybrid-attention tests: fast path against the dense reference in
float64 (outputs and gradients), causality by perturbing the future, and a tiny training loop."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

import attnlab as al

F64 = torch.float64


def randn(*shape: int, gen: torch.Generator, grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64).requires_grad_(grad)


def qkv(B: int, Hq: int, Hkv: int, L: int, S: int, D: int, Dv: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return randn(B, Hq, L, D, gen=g), randn(B, Hkv, S, D, gen=g), randn(B, Hkv, S, Dv or D, gen=g)


def assert_matches_reference(fast: Callable[[], torch.Tensor], ref: Callable[[], torch.Tensor],
                             inputs: Sequence[torch.Tensor], names: Sequence[str] | None = None,
                             rtol: float = 1e-8, atol: float = 1e-10) -> None:
    """Outputs equal, and the gradients of a random cotangent w.r.t. every input equal (and are
    not all zero, so the comparison means something)."""
    out, expect = fast(), ref()
    assert out.shape == expect.shape and out.dtype == expect.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expect, rtol=rtol, atol=atol)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    gf = torch.autograd.grad(out, inputs, go, allow_unused=True)
    gr = torch.autograd.grad(expect, inputs, go, allow_unused=True)
    names = names or [f"input {i}" for i in range(len(inputs))]
    for name, a, b in zip(names, gf, gr):
        assert (a is None) == (b is None), f"d{name} reached by one path only"
        if a is None:
            continue
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"d{name}: {m}")
    assert any(a is not None and a.abs().max() > 0 for a in gf), "no gradient reached any input"


def causal_reference(q, k, v):
    return al.attention(q, k, v, al.Causal(), backend="reference")


def assert_causal(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], q, k, v, cut: int) -> None:
    """Changing the queries, keys and values at positions ``>= cut`` (self-attention) leaves the
    outputs of the positions ``< cut`` unchanged, while it does change some later output."""
    with torch.no_grad():
        base = fn(q, k, v)
        g = torch.Generator().manual_seed(3)
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, cut:] = torch.randn(x[:, :, cut:].shape, generator=g, dtype=x.dtype)
        pert = fn(q2, k2, v2)
    torch.testing.assert_close(pert[:, :, :cut], base[:, :, :cut], rtol=0, atol=1e-12)
    assert (pert[:, :, cut:] - base[:, :, cut:]).abs().max() > 1e-3


def train_loss_drops(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor,
                     forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
                     steps: int = 40, lr: float = 1e-2) -> tuple[float, float]:
    """Adam on the MSE to ``target``; returns (first loss, last loss)."""
    forward = forward or (lambda m, inp: m(inp))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(forward(model, x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    return losses[0], losses[-1]


def module_matches_reference(module: torch.nn.Module, x: torch.Tensor, **kw) -> None:
    """``module(x)`` against ``module(x, reference=True)`` in float64: outputs, and the gradients
    of ``x`` and of every parameter."""
    module = module.double()
    x = x.double().requires_grad_()
    params = [p for p in module.parameters()]
    names = ["x"] + [n for n, _ in module.named_parameters()]
    assert_matches_reference(lambda: module(x, **kw), lambda: module(x, reference=True, **kw), [x, *params], names)
