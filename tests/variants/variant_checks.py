"""Helpers of the variant tests: float64 inputs, fast-vs-reference comparison of outputs and
gradients, and a tiny training loop for the learned modules."""

from __future__ import annotations

import torch

TOL = dict(rtol=1e-7, atol=1e-9)


def qkv(B=2, Hq=4, Hkv=2, L=37, S=29, D=8, Dv=5, *, seed=0, tokens=None, kv_tokens=None, dtype=torch.float64):
    """Random ``q (B, Hq, *L, D)``, ``k (B, Hkv, *S, D)``, ``v (B, Hkv, *S, Dv)`` requiring grad."""
    g = torch.Generator().manual_seed(seed)
    lq = tuple(tokens) if tokens is not None else (L,)
    lk = tuple(kv_tokens) if kv_tokens is not None else (tokens if tokens is not None else (S,))
    lk = tuple(lk)
    q = torch.randn(B, Hq, *lq, D, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(B, Hkv, *lk, D, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(B, Hkv, *lk, Dv, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


def check_close(fast_out, ref_out, wrt, *, seed=1, msg="", **tol):
    """Outputs equal and gradients (for one random cotangent) over every tensor in ``wrt``."""
    tol = {**TOL, **tol}
    assert fast_out.shape == ref_out.shape, f"{msg}: shapes {fast_out.shape} vs {ref_out.shape}"
    assert torch.isfinite(fast_out).all(), f"{msg}: non-finite fast output"
    torch.testing.assert_close(fast_out, ref_out, **tol, msg=lambda m: f"{msg}: output\n{m}")
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(fast_out.shape, generator=g, dtype=fast_out.dtype)
    a = torch.autograd.grad(fast_out, wrt, go, allow_unused=True, retain_graph=True)
    b = torch.autograd.grad(ref_out, wrt, go, allow_unused=True, retain_graph=True)
    for i, (x, y) in enumerate(zip(a, b)):
        assert (x is None) == (y is None), f"{msg}: grad {i} used by one path only"
        if x is not None:
            assert torch.isfinite(x).all(), f"{msg}: non-finite grad {i}"
            torch.testing.assert_close(x, y, **tol, msg=lambda m, i=i: f"{msg}: grad {i}\n{m}")


def train_losses(module, steps=40, lr=1e-2, B=8, L=10, seed=0, target_fn=None):
    """Fit ``module`` on a fixed toy regression, ``target_fn(x)`` or by default a fixed random
    linear mixing of the tokens' running mean; returns (first loss, last loss)."""
    torch.manual_seed(seed)
    E = module.embed_dim
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, E, generator=g)
    if target_fn is not None:
        target = target_fn(x)
    else:
        W = torch.randn(E, E, generator=g) / E ** 0.5
        csum = x.cumsum(1) / torch.arange(1, L + 1).view(1, -1, 1)
        target = csum @ W
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(module(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]
