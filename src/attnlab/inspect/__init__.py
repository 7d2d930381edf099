"""Look inside attention: capture maps, edit them, route Hugging Face models through attnlab.

- :func:`capture`: record the per-layer, per-head probabilities (or blockwise summaries) of
  every :func:`attnlab.attention` call in a block; :func:`layer_scope` names the layer of the
  calls in a block;
- :func:`intervene` with the edits :class:`HeadMask`, :class:`SinkCalibration` (ACT),
  :class:`RedistributeSinkMass` (VAR), :class:`AmplifyKeys`, :class:`Flatten` (HICD),
  :class:`TowardIdentity` (SoftPAG), :class:`Temperature`;
- :func:`register` and :func:`use_attnlab`: run a ``transformers`` model's attention through
  attnlab (any pattern, score mod or backend, training-free), so capture and interventions
  see it (:mod:`attnlab.inspect.hf`);
- metrics on maps ``(..., H, L, S)`` (or capture summaries), one value per head:
  :func:`head_entropy`, :func:`mean_attention_distance`, :func:`head_max_prob`,
  :func:`sink_score`, :func:`key_attention`, :func:`secondary_sinks`,
  :func:`retrieval_score` (with :func:`copy_targets`), :func:`cross_layer_similarity`,
  :func:`attention_rollout`; on hidden states :func:`massive_activations`,
  :func:`sink_alignment`; :func:`head_importance_by_masking` and
  :func:`head_importance_by_gradient`; plots (:mod:`attnlab.inspect.plots`), the HTML view
  (:mod:`attnlab.inspect.html`) and ``attnlab inspect`` (:mod:`attnlab.inspect.report`).

``import attnlab.inspect`` does not import ``transformers``.
"""

from .capture import AttentionRecord, Recording, capture, layer_scope
from .hf import AttnlabRoute, attnlab_attention_forward, register, use_attnlab
from .importance import head_importance_by_gradient, head_importance_by_masking
from .interventions import (
    AmplifyKeys, Edit, Flatten, HeadMask, RedistributeSinkMass, SinkCalibration, Temperature,
    TowardIdentity, intervene,
)
from .metrics import cross_layer_similarity, head_entropy, head_max_prob, mean_attention_distance, token_distances
from .metrics_retrieval import copy_targets, retrieval_score
from .metrics_sinks import (
    MassiveActivations, key_attention, massive_activations, secondary_sinks, sink_alignment, sink_score,
)
from .rollout import attention_rollout, fuse_heads

__all__ = [
    "AttentionRecord", "Recording", "capture", "layer_scope", "intervene", "Edit", "HeadMask",
    "SinkCalibration", "RedistributeSinkMass", "AmplifyKeys", "Flatten", "TowardIdentity",
    "Temperature", "register", "use_attnlab", "AttnlabRoute", "attnlab_attention_forward",
    "head_entropy", "mean_attention_distance", "head_max_prob", "token_distances",
    "cross_layer_similarity", "key_attention", "sink_score", "secondary_sinks", "MassiveActivations",
    "massive_activations", "sink_alignment", "retrieval_score", "copy_targets", "attention_rollout",
    "fuse_heads", "head_importance_by_masking", "head_importance_by_gradient",
]
