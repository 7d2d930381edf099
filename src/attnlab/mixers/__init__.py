"""Spectral token mixers: Fourier-domain replacements of self-attention.

- :func:`fnet_mixing`: FNet's parameter-free ``Re(FFT_tokens(FFT_hidden(x)))`` (2022).
- :func:`global_filter`: GFNet's learnable global filter ``irfftn(rfftn(x) * W)`` (2021).
- :func:`adaptive_spectral_filter`: FFTNet's input-adaptive spectral filter with modReLU
  (2025); :func:`mod_relu` the complex activation.
- :func:`spectformer_block_reference`: SpectFormer's spectral block (2023), reference only;
  the module is :class:`attnlab.nn.spectral.SpectFormerBlock`.

Every fast path (``torch.fft``) has an exact ``*_reference`` built from dense DFT matrices.
Inputs are channels-last ``x (B, *tokens, C)``.
"""

from .fftnet import adaptive_spectral_filter, adaptive_spectral_filter_reference, mod_relu
from .fnet import fnet_mixing, fnet_mixing_reference
from .global_filter import global_filter, global_filter_reference, global_filter_weight_shape
from .spectformer import spectformer_block_reference

__all__ = [
    "adaptive_spectral_filter", "adaptive_spectral_filter_reference", "fnet_mixing",
    "fnet_mixing_reference", "global_filter", "global_filter_reference",
    "global_filter_weight_shape", "mod_relu", "spectformer_block_reference",
]
