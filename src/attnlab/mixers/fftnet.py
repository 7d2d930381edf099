"""FFTNet's adaptive spectral filter with the modReLU complex activation.

Paper: "The FFT Strikes Back: An Efficient Alternative to Self-Attention" (Fein-Ashley,
2025): global token mixing in ``O(n log n)`` through the FFT, "a learnable spectral filter
and modReLU activation" that adapt to the input. The abstract leaves the details open;
this implementation makes the following choices (``x (B, L, C)``, real)::

    X  = FFT(x, dim=tokens, norm="ortho")            # (B, L, C) complex, all L frequencies
    c  = mean_t x[:, t, :]                           # (B, C) global context
    dW = MLP(c).reshape(B, L, C)                     # real, per (frequency, channel)
    W  = W_base + dW                                 # W_base (L, C), real or complex
    Z  = modReLU(X * W, b)                           # b (C,) or scalar, real
    y  = Re(IFFT(Z, dim=tokens, norm="ortho"))       # (B, L, C) real

``norm="ortho"`` makes the DFT unitary, the orthogonality / energy preservation (Parseval)
the abstract builds on. The full complex FFT is used (not the real FFT), so ``W`` may treat
the frequencies ``k`` and ``L - k`` differently; taking the real part at the end then keeps
the Hermitian part of ``Z``. ``modReLU(z) = ReLU(|z| + b) z / |z|`` ("Unitary Evolution
Recurrent Neural Networks", Arjovsky, Shah, Bengio, 2016), defined as 0 where ``z == 0``.
Non-causal: every output token depends on every input token.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from ._common import (
    apply_along,
    check_same_device,
    check_tokens,
    complex_dtype,
    dft_matrix,
    real_dtype,
)

__all__ = ["adaptive_spectral_filter", "adaptive_spectral_filter_reference", "mod_relu"]


def mod_relu(z: Tensor, bias: Tensor | float) -> Tensor:
    """modReLU ``ReLU(|z| + b) z / |z|`` of a complex ``z``, 0 where ``z == 0``.

    Keeps the phase and shifts the magnitude by the real ``bias`` (broadcast against ``z``),
    zeroing entries with ``|z| <= -b``. Gradients are finite everywhere, ``z == 0``
    included (the ``z / |z|`` division only runs where ``|z| > 0``).
    """
    if not isinstance(z, Tensor):
        raise TypeError(f"z={type(z).__name__}, expected a complex torch.Tensor")
    if not z.is_complex():
        raise TypeError(f"z.dtype={z.dtype}, expected a complex dtype")
    mag = z.abs()
    nonzero = mag > 0
    safe = torch.where(nonzero, mag, torch.ones_like(mag))
    scale = torch.relu(mag + bias) / safe
    return torch.where(nonzero, z * scale, torch.zeros_like(z))


def _check_args(
    x: object, base_filter: object, mlp: object, bias: object
) -> tuple[int, int, int]:
    check_tokens("x", x, 1, 1)
    B, L, C = x.shape
    if not isinstance(base_filter, Tensor):
        raise TypeError(
            f"base_filter={type(base_filter).__name__}, expected a torch.Tensor ({L}, {C})"
        )
    if not (base_filter.is_floating_point() or base_filter.is_complex()):
        raise TypeError(
            f"base_filter.dtype={base_filter.dtype}, expected a float or complex dtype"
        )
    if tuple(base_filter.shape) != (L, C):
        raise ValueError(
            f"base_filter.shape={tuple(base_filter.shape)}, expected (L, C) = {(L, C)} "
            f"(one weight per frequency and channel) for x.shape={tuple(x.shape)}"
        )
    check_same_device("base_filter", base_filter, x)
    if mlp is not None and not callable(mlp):
        raise TypeError(
            f"mlp={type(mlp).__name__}, expected a callable (B, C) -> (B, L * C) or None"
        )
    if not isinstance(bias, Tensor) or not bias.is_floating_point():
        what = bias.dtype if isinstance(bias, Tensor) else type(bias).__name__
        raise TypeError(f"bias={what}, expected a real floating-point torch.Tensor ({C},) or ()")
    if tuple(bias.shape) not in ((C,), ()):
        raise ValueError(f"bias.shape={tuple(bias.shape)}, expected ({C},) or () for C={C}")
    check_same_device("bias", bias, x)
    return B, L, C


def _filter(x: Tensor, base_filter: Tensor, mlp: Optional[Callable[[Tensor], Tensor]]) -> Tensor:
    """``W = W_base + MLP(mean_t x)`` as ``(B|1, L, C)`` in the compute dtype."""
    B, L, C = x.shape
    rdtype = real_dtype(x.dtype)
    dtype = complex_dtype(x.dtype) if base_filter.is_complex() else rdtype
    w = base_filter.to(dtype)[None]
    if mlp is None:
        return w
    context = x.to(rdtype).mean(dim=1)
    dw = mlp(context.to(x.dtype))
    if not isinstance(dw, Tensor) or not dw.is_floating_point():
        what = dw.dtype if isinstance(dw, Tensor) else type(dw).__name__
        raise TypeError(f"mlp(context) returned {what}, expected a real floating-point tensor")
    if tuple(dw.shape) not in ((B, L * C), (B, L, C)):
        raise ValueError(
            f"mlp(context).shape={tuple(dw.shape)} for context (B, C) = {(B, C)}, "
            f"expected (B, L * C) = {(B, L * C)} or (B, L, C) = {(B, L, C)}"
        )
    return w + dw.reshape(B, L, C).to(rdtype)


def adaptive_spectral_filter(
    x: Tensor,
    base_filter: Tensor,
    mlp: Optional[Callable[[Tensor], Tensor]],
    bias: Tensor,
) -> Tensor:
    """FFTNet's adaptive spectral filtering of ``x (B, L, C)`` (see the module docstring).

    Args:
        x: real tokens ``(B, L, C)``.
        base_filter: ``W_base (L, C)``, real or complex, one weight per frequency/channel.
        mlp: callable mapping the context ``c = mean_t x`` ``(B, C)`` (passed in ``x``'s
            dtype) to the real modulation ``dW`` ``(B, L * C)`` or ``(B, L, C)``; None for
            a static filter (``dW = 0``).
        bias: the modReLU bias ``b``, real ``(C,)`` (per channel) or ``()``.

    Returns ``Re(IFFT(modReLU(FFT(x) * (W_base + dW), b)))`` (unitary transforms),
    ``(B, L, C)`` of ``x``'s dtype; float16/bfloat16 run in float32. ``O(B L C log L)``
    besides the MLP; no ``L x L`` matrix is formed.
    """
    _check_args(x, base_filter, mlp, bias)
    rdtype = real_dtype(x.dtype)
    spec = torch.fft.fft(x.to(rdtype), dim=1, norm="ortho")
    z = mod_relu(spec * _filter(x, base_filter, mlp), bias.to(rdtype))
    return torch.fft.ifft(z, dim=1, norm="ortho").real.to(x.dtype)


def adaptive_spectral_filter_reference(
    x: Tensor,
    base_filter: Tensor,
    mlp: Optional[Callable[[Tensor], Tensor]],
    bias: Tensor,
) -> Tensor:
    """Exact reference of :func:`adaptive_spectral_filter`: dense ``L x L`` DFT matrices.

    ``X = F x / sqrt(L)`` with ``F[k, n] = exp(-2j pi k n / L)``, the same filter and
    modReLU, then ``y = Re(conj(F) Z) / sqrt(L)``.
    """
    _check_args(x, base_filter, mlp, bias)
    L = x.shape[1]
    cdtype, rdtype = complex_dtype(x.dtype), real_dtype(x.dtype)
    scale = 1.0 / math.sqrt(L)
    spec = apply_along(x.to(cdtype), dft_matrix(L, dtype=cdtype, device=x.device), 1) * scale
    z = mod_relu(spec * _filter(x, base_filter, mlp), bias.to(rdtype))
    inv = dft_matrix(L, inverse=True, dtype=cdtype, device=x.device)
    return (apply_along(z, inv, 1).real * scale).to(x.dtype)
