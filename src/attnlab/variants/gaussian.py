"""Gaussian Adaptive Attention (GAAM): features reweighted by learned Gaussians.

"Gaussian Adaptive Attention is All You Need: Robust Contextual Representations Across
Multiple Modalities" (Ioannides et al., 2024). The abstract gives learnable
means and variances per head; the formula below is our reading of the paper and its
released code (check before relying on it): no query/key dot product, each head reweights
its own features by a product of Gaussians of the normalised features, normalised along one
axis.

Semantics, for head ``h`` with features ``x (N, D)`` (``N`` tokens), ``G`` Gaussians with
learnable mean offsets ``delta[h, g]`` and scales ``c[h, g] > 0``, along ``axis`` (the
tokens by default)::

    mu    = mean_axis(x),  sigma^2 = var_axis(x) + eps          (population variance)
    y_g   = (x - mu - delta[h, g]) / sigma
    w     = prod_g exp(-y_g^2 / (2 c[h, g]^2))  /  sum_axis prod_g exp(-y_g^2 / (2 c[h, g]^2))
    out   = x * w

(``w`` is a distribution along ``axis`` for every position across it: over the tokens of
each feature channel by default; the Gaussians' normalising constants cancel in it.)

Fast path (:func:`gaussian_adaptive_attention`): ``w = softmax_axis(-sum_g y_g^2 / (2 c^2))``,
which stays finite where the densities underflow; linear memory. The reference is the product
of densities divided by their sum, as written above.
"""

from __future__ import annotations

import torch

__all__ = ["gaussian_adaptive_attention", "gaussian_adaptive_attention_reference", "gaussian_adaptive_weights"]

_AXES = {"tokens": -2, "features": -1}


def _prepare(x, mean_offset, scale, axis, eps):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (B, H, N, D), got {type(x).__name__}")
    if x.ndim != 4 or any(s == 0 for s in x.shape):
        raise ValueError(f"x must have shape (B, H, N, D) with no empty axis, got x.shape={tuple(x.shape)}")
    if axis not in _AXES:
        raise ValueError(f"axis must be one of {sorted(_AXES)}, got axis={axis!r}")
    H = x.shape[1]
    for name, t in (("mean_offset", mean_offset), ("scale", scale)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (H={H}, G), got {type(t).__name__}")
        if t.ndim != 2 or t.shape[0] != H or t.shape[1] < 1:
            raise ValueError(f"{name} must have shape (H={H}, G >= 1), got {name}.shape={tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if mean_offset.shape != scale.shape:
        raise ValueError(f"mean_offset.shape={tuple(mean_offset.shape)} and scale.shape={tuple(scale.shape)} differ")
    if not bool((scale > 0).all()):
        raise ValueError(f"scale must be positive, got min(scale)={scale.min().item()}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got eps={eps!r}")
    return _AXES[axis], mean_offset.to(x.dtype), scale.to(x.dtype)


def _normalised(x, mean_offset, scale, dim, eps):
    """``y (G, B, H, N, D)`` and ``c (G, 1, H, 1, 1)``."""
    mu = x.mean(dim, keepdim=True)
    sigma = torch.sqrt(x.var(dim, keepdim=True, correction=0) + eps)
    delta = mean_offset.t().reshape(-1, 1, x.shape[1], 1, 1)
    y = (x.unsqueeze(0) - mu.unsqueeze(0) - delta) / sigma.unsqueeze(0)
    return y, scale.t().reshape(-1, 1, x.shape[1], 1, 1)


def gaussian_adaptive_weights(
    x: torch.Tensor, mean_offset: torch.Tensor, scale: torch.Tensor, *, axis: str = "tokens", eps: float = 1e-8
) -> torch.Tensor:
    """The weights ``w`` ``(B, H, N, D)`` (each a distribution along ``axis``)."""
    dim, mean_offset, scale = _prepare(x, mean_offset, scale, axis, eps)
    y, c = _normalised(x, mean_offset, scale, dim, eps)
    return torch.softmax(-(y * y / (2 * c * c)).sum(0), dim)


def gaussian_adaptive_attention(
    x: torch.Tensor, mean_offset: torch.Tensor, scale: torch.Tensor, *, axis: str = "tokens", eps: float = 1e-8
) -> torch.Tensor:
    """GAAM ``x * w`` (module docstring) for per-head features ``x (B, H, N, D)``, with
    ``mean_offset`` and ``scale`` of shape ``(H, G)``. Returns ``(B, H, N, D)``."""
    return x * gaussian_adaptive_weights(x, mean_offset, scale, axis=axis, eps=eps)


def gaussian_adaptive_attention_reference(
    x: torch.Tensor, mean_offset: torch.Tensor, scale: torch.Tensor, *, axis: str = "tokens", eps: float = 1e-8
) -> torch.Tensor:
    """GAAM as written: product of Gaussian densities, divided by its sum along ``axis``."""
    dim, mean_offset, scale = _prepare(x, mean_offset, scale, axis, eps)
    y, c = _normalised(x, mean_offset, scale, dim, eps)
    dens = torch.ones_like(x)
    for gi in range(y.shape[0]):
        dens = dens * torch.exp(-(y[gi] ** 2) / (2 * c[gi] ** 2)) / torch.sqrt(2 * torch.pi * c[gi] ** 2)
    return x * (dens / dens.sum(dim, keepdim=True))
