"""Modules built on :func:`attnlab.attention`.

- :class:`MultiheadAttention`: drop-in ``torch.nn.MultiheadAttention`` (batch_first) with
  patterns, score mods and grouped-query attention.
- :class:`NeighborhoodAttention1d` / ``2d`` / ``3d`` (and the generic
  :class:`NeighborhoodAttention`): NATTEN-style channels-last neighborhood attention layers.
- :class:`RelativeSelfAttention`: the Music Transformer's causal relative self-attention.
"""

from .multihead import MultiheadAttention
from .neighborhood import (
    NeighborhoodAttention,
    NeighborhoodAttention1d,
    NeighborhoodAttention2d,
    NeighborhoodAttention3d,
    NeighborhoodRelativeBias,
)
from .relative import RelativeSelfAttention

__all__ = [
    "MultiheadAttention", "NeighborhoodAttention", "NeighborhoodAttention1d",
    "NeighborhoodAttention2d", "NeighborhoodAttention3d", "NeighborhoodRelativeBias",
    "RelativeSelfAttention",
]
