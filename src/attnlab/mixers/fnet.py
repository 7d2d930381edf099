"""FNet's parameter-free Fourier token mixing.

Paper: "FNet: Mixing Tokens with Fourier Transforms" (Lee-Thorp, Ainslie, Eckstein, Ontanon,
NAACL 2022). The self-attention sublayer is replaced by ``y = Re(FFT_seq(FFT_hidden(x)))``: a
1-D DFT along the hidden (channel) axis, then along the sequence axis, keeping the real part.
The DFTs are unnormalised (``norm="backward"``, forward direction), as in the paper.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import apply_along, check_tokens, complex_dtype, dft_matrix, real_dtype

__all__ = ["fnet_mixing", "fnet_mixing_reference"]


def fnet_mixing(x: Tensor) -> Tensor:
    """FNet mixing ``Re(FFT_tokens(FFT_hidden(x)))`` of ``x (B, *tokens, C)``.

    ``y[b, t, c] = Re(sum_{s, d} x[b, s, d] exp(-2j pi (t s / L + c d / C)))`` for ``x (B, L,
    C)``; with several token axes (``(B, H, W, C)``, ...) the DFT runs over every token axis
    and the channel axis (an n-D DFT). Unnormalised, non-causal, no parameters. Real in,
    real out of ``x``'s shape and dtype; float16/bfloat16 are computed in float32. Cost
    ``O(N log N)`` per batch element for ``N = prod(tokens) * C``.
    """
    check_tokens("x", x)
    xf = x.to(real_dtype(x.dtype))
    return torch.fft.fftn(xf, dim=tuple(range(1, x.dim()))).real.to(x.dtype)


def fnet_mixing_reference(x: Tensor) -> Tensor:
    """Exact reference of :func:`fnet_mixing`: dense DFT matrices ``exp(-2j pi k n / N)``.

    Multiplies by the explicit ``C x C`` DFT matrix along the hidden axis, then by each
    token axis' ``L x L`` matrix, and keeps the real part (complex128 for float64 inputs).
    """
    check_tokens("x", x)
    cdtype = complex_dtype(x.dtype)
    z = x.to(cdtype)
    for axis in (x.dim() - 1, *range(1, x.dim() - 1)):
        z = apply_along(z, dft_matrix(x.shape[axis], dtype=cdtype, device=x.device), axis)
    return z.real.to(x.dtype)
