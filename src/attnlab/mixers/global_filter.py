"""GFNet's global filter: an elementwise learnable filter in the 2-D (or 1-D) Fourier domain.

Paper: "Global Filter Networks for Image Classification" (Rao, Zhao, Zhu, Lu, Zhou, NeurIPS
2021). For channels-last tokens ``x (B, *tokens, C)``::

    y = irfftn(rfftn(x, dim=tokens, norm="ortho") * W, s=tokens, dim=tokens, norm="ortho")

``W`` is a learnable complex filter of shape ``(*tokens[:-1], tokens[-1] // 2 + 1, C)`` (the
real-FFT half spectrum along the last token axis, one filter per channel). ``norm="ortho"``
on both transforms, as GFNet does, so the two scalings cancel (1 / prod(tokens) overall).
When ``W`` is the (unnormalised) DFT of a real kernel ``h``, ``y`` is the circular
convolution of ``x`` with ``h`` over the token axes. For a general ``W`` the inverse is the
real inverse transform of a half spectrum: along the last token axis, the frequencies
``1 .. ceil(n / 2) - 1`` count twice (their implicit conjugate mirror), the DC bin and, for
even ``n``, the Nyquist bin once, and only the real part of the result is kept.
"""

from __future__ import annotations

import math

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

__all__ = ["global_filter", "global_filter_reference", "global_filter_weight_shape"]


def global_filter_weight_shape(tokens: tuple[int, ...], channels: int) -> tuple[int, ...]:
    """The complex filter shape ``(*tokens[:-1], tokens[-1] // 2 + 1, channels)``."""
    return (*tokens[:-1], tokens[-1] // 2 + 1, channels)


def _complex_weight(x: Tensor, tokens: tuple[int, ...], weight: object) -> Tensor:
    """``weight`` as a complex tensor in the compute dtype, its shape checked against ``x``."""
    if not isinstance(weight, Tensor):
        raise TypeError(
            f"weight={type(weight).__name__}, expected a complex torch.Tensor or a real one "
            "with a trailing (real, imag) axis of size 2"
        )
    expected = global_filter_weight_shape(tokens, x.shape[-1])
    rfft_note = (
        f"for x.shape={tuple(x.shape)} (the last token axis of size {tokens[-1]} holds "
        f"{tokens[-1]} // 2 + 1 = {expected[-2]} rfft frequencies)"
    )
    if weight.is_complex():
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"weight.shape={tuple(weight.shape)}, expected {expected} (complex) {rfft_note}"
            )
        w = weight.to(complex_dtype(x.dtype))
    elif weight.is_floating_point():
        if tuple(weight.shape) != (*expected, 2):
            raise ValueError(
                f"weight.shape={tuple(weight.shape)}, expected {(*expected, 2)} (real, imag) "
                f"{rfft_note}"
            )
        w = weight.to(real_dtype(x.dtype))
        w = torch.complex(w[..., 0], w[..., 1])
    else:
        raise TypeError(f"weight.dtype={weight.dtype}, expected a complex or real floating dtype")
    check_same_device("weight", weight, x)
    return w


def global_filter(x: Tensor, weight: Tensor) -> Tensor:
    """GFNet global filter of ``x (B, *tokens, C)`` (one or more token axes, e.g. ``(B, L,
    C)`` or ``(B, H, W, C)``) by ``weight``.

    ``weight``: complex ``(*tokens[:-1], tokens[-1] // 2 + 1, C)``, or real with a trailing
    ``(real, imag)`` axis of size 2, as GFNet stores its ``complex_weight``. Computes
    ``irfftn(rfftn(x) * W, s=tokens)`` over the token axes with ``norm="ortho"`` (GFNet's
    choice; see the module docstring for the exact semantics). Non-causal (global, circular).
    Returns a real tensor of ``x``'s shape and dtype; float16/bfloat16 run in float32. Cost
    ``O(N log N)`` for ``N = prod(tokens)`` per channel: no ``N x N`` matrix is formed.
    """
    tokens = check_tokens("x", x)
    w = _complex_weight(x, tokens, weight)
    dims = tuple(range(1, x.dim() - 1))
    spec = torch.fft.rfftn(x.to(real_dtype(x.dtype)), dim=dims, norm="ortho")
    y = torch.fft.irfftn(spec * w, s=tokens, dim=dims, norm="ortho")
    return y.to(x.dtype)


def global_filter_reference(x: Tensor, weight: Tensor) -> Tensor:
    """Exact reference of :func:`global_filter` with dense DFT matrices (no ``torch.fft``).

    Forward: the full DFT matrix along every token axis but the last, the first
    ``n // 2 + 1`` rows of the ``n x n`` DFT matrix along the last one; multiply by ``W``;
    inverse: the conjugate DFT matrices, the last axis' columns weighted ``c_k`` (1 for the
    DC bin and, ``n`` even, the Nyquist bin; 2 otherwise); real part; both transforms
    scaled ``1 / sqrt(prod(tokens))`` (``"ortho"``).
    """
    tokens = check_tokens("x", x)
    w = _complex_weight(x, tokens, weight)
    cdtype, dev = complex_dtype(x.dtype), x.device
    n, half, last = tokens[-1], tokens[-1] // 2 + 1, x.dim() - 2
    scale = 1.0 / math.sqrt(math.prod(tokens))
    z = x.to(cdtype)
    for axis, size in enumerate(tokens, start=1):
        fwd = dft_matrix(size, dtype=cdtype, device=dev)
        z = apply_along(z, fwd[:half] if axis == last else fwd, axis)
    z = z * scale * w
    for axis, size in enumerate(tokens, start=1):
        inv = dft_matrix(size, inverse=True, dtype=cdtype, device=dev)
        if axis == last:
            c = torch.full((half,), 2.0, dtype=torch.float64, device=dev)
            c[0] = 1.0
            if n % 2 == 0:
                c[-1] = 1.0
            inv = inv[:, :half] * c.to(cdtype)
        z = apply_along(z, inv, axis)
    return (z.real * scale).to(x.dtype)
