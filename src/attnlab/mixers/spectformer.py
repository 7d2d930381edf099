"""SpectFormer's spectral block, as a dense-DFT reference (the module is
:class:`attnlab.nn.spectral.SpectFormerBlock`).

Paper: "SpectFormer: Frequency and Attention is what you need in a Vision Transformer"
(Patro, Namboodiri, Agneeswaran, 2023). Its spectral layers are GFNet-style global filters
(learnable complex weights in the 2-D Fourier domain, see :mod:`attnlab.mixers.global_filter`)
used as the token mixer of a pre-norm transformer block::

    x = x + GF(LN_1(x))
    x = x + MLP(LN_2(x))        # MLP = Linear(C, hidden) -> GELU -> Linear(hidden, C)
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from .global_filter import global_filter_reference

__all__ = ["spectformer_block_reference"]


def spectformer_block_reference(
    x: Tensor,
    weight: Tensor,
    norm1: Callable[[Tensor], Tensor],
    norm2: Callable[[Tensor], Tensor],
    mlp: Callable[[Tensor], Tensor],
) -> Tensor:
    """``x + GF(norm1(x))``, then ``+ mlp(norm2(.))``, the global filter computed with
    :func:`attnlab.mixers.global_filter_reference` (dense DFT matrices).

    ``x (B, *tokens, C)``; ``weight`` the global filter's weight (complex ``(*freq, C)`` or
    real ``(*freq, C, 2)``, as for :func:`attnlab.mixers.global_filter`); ``norm1``,
    ``norm2``, ``mlp`` callables on channels-last tensors (e.g. the block's submodules).
    """
    x = x + global_filter_reference(norm1(x), weight)
    return x + mlp(norm2(x))
