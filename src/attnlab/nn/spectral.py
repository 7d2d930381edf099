"""Spectral token-mixing layers (channels-last): FNet, GFNet, FFTNet and SpectFormer.

- :class:`FNetMixer`: "FNet: Mixing Tokens with Fourier Transforms" (2022), no parameters.
- :class:`GlobalFilter`: "Global Filter Networks for Image Classification" (2021).
- :class:`FFTNetMixer`: "The FFT Strikes Back: An Efficient Alternative to Self-Attention"
  (2025).
- :class:`SpectFormerBlock`: "SpectFormer: Frequency and Attention is what you need in a
  Vision Transformer" (2023), its spectral (global-filter) block.

The math lives in :mod:`attnlab.mixers`, each function with a dense-DFT reference.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..mixers import adaptive_spectral_filter, fnet_mixing, global_filter
from ..mixers.global_filter import global_filter_weight_shape

__all__ = ["FFTNetMixer", "FNetMixer", "GlobalFilter", "SpectFormerBlock"]


def _check_size(size: object) -> tuple[int, ...]:
    """``size`` (an int or an ``(h, w)`` tuple of positive ints) as a tuple."""
    sizes = tuple(size) if isinstance(size, (tuple, list)) else (size,)
    ok = len(sizes) in (1, 2) and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes
    )
    if not ok:
        raise ValueError(
            f"size={size!r}, expected a positive int (sequence length) or a tuple (h, w) of "
            "positive ints"
        )
    return sizes


def _check_x(x: object, dim: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x={type(x).__name__}, expected a torch.Tensor (B, *tokens, {dim})")
    if x.dim() < 3 or x.shape[-1] != dim:
        raise ValueError(f"x.shape={tuple(x.shape)}, expected (B, *tokens, {dim}) (channels last)")
    return x


class FNetMixer(nn.Module):
    """FNet's Fourier mixing sublayer ``Re(FFT_tokens(FFT_hidden(x)))``, no parameters.

    "FNet: Mixing Tokens with Fourier Transforms" (Lee-Thorp et al., 2022): replaces the
    self-attention sublayer of a transformer encoder. ``x (B, L, C)`` or ``(B, *tokens, C)``
    -> same shape and dtype (:func:`attnlab.mixers.fnet_mixing`; unnormalised DFTs,
    non-causal).
    """

    def reset_parameters(self) -> None:
        """Nothing to reset: FNet mixing has no parameters."""

    def forward(self, x: Tensor) -> Tensor:
        return fnet_mixing(x)

    def extra_repr(self) -> str:
        return "dims=(tokens..., hidden), norm=None"


class GlobalFilter(nn.Module):
    """GFNet's global filter layer: ``irfftn(rfftn(x) * W, s=size)`` over the token axes.

    "Global Filter Networks for Image Classification" (Rao et al., 2021). One learnable
    complex filter per frequency and channel, stored like GFNet's ``complex_weight`` as a
    real parameter ``(*size[:-1], size[-1] // 2 + 1, dim, 2)`` (real, imag), initialised
    normal with std 0.02; transforms with ``norm="ortho"``
    (:func:`attnlab.mixers.global_filter`). Non-causal (circular, global).

    Args:
        dim: channels ``C``.
        size: the token grid, an int ``L`` (sequences ``x (B, L, C)``) or ``(h, w)``
            (images ``x (B, h, w, C)``, or flattened row-major ``x (B, h * w, C)``).

    Shapes: ``x`` as above -> the same shape and dtype (float16/bfloat16 run in float32).
    """

    def __init__(
        self, dim: int, size: Any, *, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, 1)
        self.size = _check_size(size)
        shape = (*global_filter_weight_shape(self.size, dim), 2)
        self.complex_weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GFNet's init: real and imaginary parts normal, std 0.02."""
        nn.init.normal_(self.complex_weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        _check_x(x, self.dim)
        tokens = tuple(x.shape[1:-1])
        if tokens == self.size:
            return global_filter(x, self.complex_weight)
        if len(self.size) > 1 and tokens == (math.prod(self.size),):
            grid = x.reshape(x.shape[0], *self.size, self.dim)
            return global_filter(grid, self.complex_weight).reshape(x.shape)
        flat = f" or (B, {math.prod(self.size)}, {self.dim})" if len(self.size) > 1 else ""
        raise ValueError(
            f"x.shape={tuple(x.shape)}, expected (B, {', '.join(map(str, self.size))}, "
            f"{self.dim}){flat}: this GlobalFilter was built for size={self.size}"
        )

    def extra_repr(self) -> str:
        size = self.size[0] if len(self.size) == 1 else self.size
        return f"dim={self.dim}, size={size}, norm='ortho'"


class FFTNetMixer(nn.Module):
    """FFTNet's adaptive spectral filtering layer on sequences ``x (B, seq_len, dim)``.

    "The FFT Strikes Back: An Efficient Alternative to Self-Attention" (Fein-Ashley, 2025):
    ``y = Re(IFFT(modReLU(FFT(x) * (W_base + MLP(mean_t x)), b)))`` with unitary FFTs over
    the tokens (:func:`attnlab.mixers.adaptive_spectral_filter` states every choice).

    Parameters: ``base_filter (seq_len, dim)`` (real, init 1: the identity filter), ``mlp``
    = ``Linear(dim, hidden) -> GELU -> Linear(hidden, seq_len * dim)`` producing the real
    per-(frequency, channel) modulation (torch's default init for the first layer; the last
    layer normal std 0.02 with zero bias, so the initial modulation is small),
    ``modrelu_bias (dim,)`` (init 0, where modReLU is the identity). At init the layer is
    close to the identity map. The MLP has ``hidden * seq_len * dim`` output weights: pick a
    small ``hidden`` for long sequences.

    Args:
        dim: channels ``C``.
        seq_len: sequence length ``L`` (number of frequencies).
        hidden: the MLP's hidden width, ``dim`` when None.

    Shapes: ``x (B, seq_len, dim)`` -> ``(B, seq_len, dim)``, non-causal.
    """

    def __init__(
        self, dim: int, seq_len: int, hidden: int | None = None, *,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int("dim", dim, 1)
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.hidden = dim if hidden is None else check_int("hidden", hidden, 1)
        self.base_filter = nn.Parameter(torch.empty(seq_len, dim, **fk))
        self.mlp = nn.Sequential(
            nn.Linear(dim, self.hidden, **fk),
            nn.GELU(),
            nn.Linear(self.hidden, seq_len * dim, **fk),
        )
        self.modrelu_bias = nn.Parameter(torch.empty(dim, **fk))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity base filter, small modulation MLP output, zero modReLU bias."""
        nn.init.ones_(self.base_filter)
        self.mlp[0].reset_parameters()
        nn.init.normal_(self.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.mlp[2].bias)
        nn.init.zeros_(self.modrelu_bias)

    def forward(self, x: Tensor) -> Tensor:
        _check_x(x, self.dim)
        if x.dim() != 3 or x.shape[1] != self.seq_len:
            raise ValueError(
                f"x.shape={tuple(x.shape)}, expected (B, {self.seq_len}, {self.dim}): this "
                f"FFTNetMixer was built for seq_len={self.seq_len}"
            )
        return adaptive_spectral_filter(x, self.base_filter, self.mlp, self.modrelu_bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, seq_len={self.seq_len}, hidden={self.hidden}, norm='ortho'"


class SpectFormerBlock(nn.Module):
    """SpectFormer's spectral block: ``x + GF(LN(x))``, then ``x + MLP(LN(x))``.

    "SpectFormer: Frequency and Attention is what you need in a Vision Transformer" (Patro
    et al., 2023): its spectral layers are GFNet-style global filters (:class:`GlobalFilter`,
    learnable complex weights) in a pre-norm block with an MLP ``Linear(dim, hidden) ->
    GELU -> Linear(hidden, dim)``, ``hidden = int(dim * mlp_ratio)``. Submodules ``norm1``,
    ``filter``, ``norm2``, ``mlp``. Linear weights truncated-normal std 0.02 with zero
    biases (as GFNet), LayerNorms ones/zeros, the filter as :class:`GlobalFilter`.
    :func:`attnlab.mixers.spectformer_block_reference` is its dense-DFT reference.

    Args:
        dim: channels ``C``.
        size: token grid, an int ``L`` or ``(h, w)`` (see :class:`GlobalFilter`).
        mlp_ratio: MLP hidden width over ``dim`` (positive; ``int(dim * mlp_ratio) >= 1``).

    Shapes: ``x (B, L, dim)``, ``(B, h, w, dim)`` or ``(B, h * w, dim)`` -> same shape.
    """

    def __init__(
        self, dim: int, size: Any, mlp_ratio: float = 4.0, *,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dim = check_int("dim", dim, 1)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)):
            raise TypeError(f"mlp_ratio={mlp_ratio!r}, expected a positive float")
        if not (mlp_ratio > 0 and int(dim * mlp_ratio) >= 1):
            raise ValueError(
                f"mlp_ratio={mlp_ratio!r}, expected a positive float with int(dim * mlp_ratio) "
                f">= 1 for dim={dim}"
            )
        self.mlp_ratio = float(mlp_ratio)
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, **fk)
        self.filter = GlobalFilter(dim, size, **fk)
        self.norm2 = nn.LayerNorm(dim, **fk)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden, **fk), nn.GELU(), nn.Linear(hidden, dim, **fk)
        )
        self.reset_parameters()

    @property
    def size(self) -> tuple[int, ...]:
        return self.filter.size

    def reset_parameters(self) -> None:
        """LayerNorms ones/zeros, the filter normal std 0.02, Linear truncated-normal 0.02."""
        self.norm1.reset_parameters()
        self.norm2.reset_parameters()
        self.filter.reset_parameters()
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        _check_x(x, self.dim)
        x = x + self.filter(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def extra_repr(self) -> str:
        size = self.size[0] if len(self.size) == 1 else self.size
        return f"dim={self.dim}, size={size}, mlp_ratio={self.mlp_ratio}"
