"""Shared pieces of the spectral token mixers: input checks, compute dtypes, dense DFTs.

The dense DFT helpers serve the ``*_reference`` functions only: they build the explicit
``N x N`` matrix ``F[k, n] = exp(-2j * pi * k * n / N)`` instead of calling ``torch.fft``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_tokens(
    name: str, x: object, min_axes: int = 1, max_axes: int | None = None
) -> tuple[int, ...]:
    """The token shape of a real channels-last ``x (B, *tokens, C)``; clear errors otherwise.

    ``x`` must be a real floating-point tensor with ``min_axes``..``max_axes`` token axes,
    every token axis and the channel axis non-empty.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}={type(x).__name__}, expected a torch.Tensor (B, *tokens, C)")
    if not x.is_floating_point():
        raise TypeError(f"{name}.dtype={x.dtype}, expected a real floating-point dtype")
    n = x.dim() - 2
    if n < min_axes or (max_axes is not None and n > max_axes):
        if max_axes == min_axes == 1:
            want = "(B, L, C)"
        else:
            most = "any number of" if max_axes is None else f"at most {max_axes}"
            want = f"(B, *tokens, C) with at least {min_axes} and {most} token axes"
        raise ValueError(f"{name}.shape={tuple(x.shape)}, expected {want}")
    if any(s == 0 for s in x.shape[1:]):
        raise ValueError(
            f"{name}.shape={tuple(x.shape)}, expected non-empty token and channel axes"
        )
    return tuple(x.shape[1:-1])


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype the spectral math runs in: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    """The complex counterpart of :func:`real_dtype`: complex128 or complex64."""
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def check_same_device(name: str, t: Tensor, x: Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name}.device={t.device}, expected x.device={x.device}")


def dft_matrix(
    n: int, *, inverse: bool = False, dtype: torch.dtype = torch.complex128,
    device: torch.device | str | None = None,
) -> Tensor:
    """The dense unnormalised ``n x n`` DFT matrix ``exp(-2j pi k m / n)`` (``+`` if inverse)."""
    k = torch.arange(n, dtype=torch.float64, device=device)
    km = torch.remainder(k[:, None] * k[None, :], n)  # exact integers: keeps the angle small
    sign = 1.0 if inverse else -1.0
    return torch.exp(sign * 2j * math.pi * km / n).to(dtype)


def apply_along(z: Tensor, mat: Tensor, axis: int) -> Tensor:
    """``out[..., k, ...] = sum_m mat[k, m] z[..., m, ...]`` along ``axis`` (dense matmul)."""
    return torch.movedim(torch.movedim(z, axis, -1) @ mat.transpose(0, 1), -1, axis)
