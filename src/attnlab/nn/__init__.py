"""Modules built on :func:`attnlab.attention`.

- :class:`MultiheadAttention`: drop-in ``torch.nn.MultiheadAttention`` (batch_first) with
  patterns, score mods and grouped-query attention.
- :class:`NeighborhoodAttention1d` / ``2d`` / ``3d`` (and the generic
  :class:`NeighborhoodAttention`): NATTEN-style channels-last neighborhood attention layers.
- :class:`RelativeSelfAttention`: the Music Transformer's causal relative self-attention.
- Linear attention: :class:`LinearAttention`, :class:`Retention`, :class:`GatedLinearAttention`,
  :class:`AgentAttention`, :class:`FlowAttention`, :class:`NormAttention`.
- Spectral token mixers: :class:`FNetMixer`, :class:`GlobalFilter`, :class:`FFTNetMixer`,
  :class:`SpectFormerBlock`.
- Hybrid sparse attention (:mod:`attnlab.hybrids`): :class:`NativeSparseAttention`,
  :class:`HiLoAttention`, :class:`CombinerAttention`, :class:`CoreContextAwareAttention`,
  :class:`LandmarkAttention`; content-routed: :class:`MixtureOfSparseAttention` (MoSA).
- Softmax variants (:mod:`attnlab.variants`): :class:`SelectiveAttention`, :class:`CogAttention`,
  :class:`MultiTokenAttention`, :class:`TalkingHeadsAttention`, :class:`MixtureOfHeadAttention`,
  :class:`GaussianAdaptiveAttention`, :class:`SigmoidAttention`, :class:`ContextBroadcasting`,
  :class:`ReversedAttention`.
"""

from ..hybrids import (
    CombinerAttention,
    CoreContextAwareAttention,
    HiLoAttention,
    LandmarkAttention,
    NativeSparseAttention,
)
from ..patterns import MixtureOfSparseAttention
from ..variants import (
    CogAttention,
    ContextBroadcasting,
    GaussianAdaptiveAttention,
    MixtureOfHeadAttention,
    MultiTokenAttention,
    ReversedAttention,
    SelectiveAttention,
    SigmoidAttention,
    TalkingHeadsAttention,
)
from .agent import AgentAttention
from .flow import FlowAttention
from .linear import GatedLinearAttention, LinearAttention, Retention
from .multihead import MultiheadAttention
from .neighborhood import (
    NeighborhoodAttention,
    NeighborhoodAttention1d,
    NeighborhoodAttention2d,
    NeighborhoodAttention3d,
    NeighborhoodRelativeBias,
)
from .norm_attention import NormAttention
from .relative import RelativeSelfAttention
from .spectral import FFTNetMixer, FNetMixer, GlobalFilter, SpectFormerBlock

__all__ = [
    "MultiheadAttention", "NeighborhoodAttention", "NeighborhoodAttention1d",
    "NeighborhoodAttention2d", "NeighborhoodAttention3d", "NeighborhoodRelativeBias",
    "RelativeSelfAttention", "LinearAttention", "Retention", "GatedLinearAttention", "AgentAttention",
    "FlowAttention", "NormAttention", "FNetMixer", "GlobalFilter", "FFTNetMixer", "SpectFormerBlock",
    "NativeSparseAttention", "HiLoAttention", "CombinerAttention", "CoreContextAwareAttention",
    "LandmarkAttention", "MixtureOfSparseAttention", "SelectiveAttention", "CogAttention",
    "MultiTokenAttention", "TalkingHeadsAttention", "MixtureOfHeadAttention",
    "GaussianAdaptiveAttention", "SigmoidAttention", "ContextBroadcasting", "ReversedAttention",
]
