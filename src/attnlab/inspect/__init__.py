"""Look inside attention: capture maps, edit them, route Hugging Face models through attnlab.

- :func:`capture`: record the per-layer, per-head probabilities (or blockwise summaries) of
  every :func:`attnlab.attention` call in a block; :func:`layer_scope` names the layer of the
  calls in a block;
- :func:`intervene` with the edits :class:`HeadMask`, :class:`SinkCalibration` (ACT),
  :class:`RedistributeSinkMass` (VAR), :class:`AmplifyKeys`, :class:`Flatten` (HICD),
  :class:`TowardIdentity` (SoftPAG), :class:`Temperature`;
- :func:`register` and :func:`use_attnlab`: run a ``transformers`` model's attention through
  attnlab (any pattern, score mod or backend, training-free), so capture and interventions
  see it (:mod:`attnlab.inspect.hf`).

``import attnlab.inspect`` does not import ``transformers``.
"""

from .capture import AttentionRecord, Recording, capture, layer_scope
from .hf import AttnlabRoute, attnlab_attention_forward, register, use_attnlab
from .interventions import (
    AmplifyKeys, Edit, Flatten, HeadMask, RedistributeSinkMass, SinkCalibration, Temperature,
    TowardIdentity, intervene,
)

__all__ = [
    "AttentionRecord", "Recording", "capture", "layer_scope", "intervene", "Edit", "HeadMask",
    "SinkCalibration", "RedistributeSinkMass", "AmplifyKeys", "Flatten", "TowardIdentity",
    "Temperature", "register", "use_attnlab", "AttnlabRoute", "attnlab_attention_forward",
]
