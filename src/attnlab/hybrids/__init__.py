"""Hybrid sparse attention: exact pieces on :func:`attnlab.attention` combined by gates, joint
softmaxes (merged by log-sum-exp) or grouped softmaxes.

* :func:`native_sparse_attention` / :class:`NativeSparseAttention`: NSA's compressed, selected
  and sliding-window branches with sigmoid gates.
* :func:`hilo_attention` / :class:`HiLoAttention`: Hi heads in local windows, Lo heads on
  window-pooled keys and values (LITv2).
* :func:`combiner_attention` / :class:`CombinerAttention`: Combiner-Fixed, direct attention in
  the local region plus one abstraction per other region.
* :func:`core_context_aware_attention` / :class:`CoreContextAwareAttention`: CCA's
  significance-weighted core tokens plus a local window, one softmax.
* :func:`landmark_attention` / :class:`LandmarkAttention`: landmark tokens gate their blocks
  (grouped softmax), optional top-k block retrieval.

Each function has an exact dense ``*_reference`` beside it; :func:`hybrid_mechanisms` gives
their catalog rows.
"""

from .catalog import hybrid_mechanisms
from .cca import (
    CoreContextAwareAttention, core_context_aware_attention, core_context_aware_attention_reference,
)
from .combiner import CombinerAttention, combiner_attention, combiner_attention_reference
from .hilo import HiLoAttention, hilo_attention, hilo_attention_reference
from .landmark import (
    LandmarkAttention, insert_landmarks, landmark_attention, landmark_attention_reference, landmark_mask,
    remove_landmarks,
)
from .nsa import (
    BlockCompressor, NativeSparseAttention, native_sparse_attention, native_sparse_attention_reference,
)

__all__ = [
    "native_sparse_attention", "native_sparse_attention_reference", "NativeSparseAttention",
    "BlockCompressor",
    "hilo_attention", "hilo_attention_reference", "HiLoAttention",
    "combiner_attention", "combiner_attention_reference", "CombinerAttention",
    "core_context_aware_attention", "core_context_aware_attention_reference", "CoreContextAwareAttention",
    "landmark_attention", "landmark_attention_reference", "LandmarkAttention", "insert_landmarks",
    "remove_landmarks", "landmark_mask", "hybrid_mechanisms",
]
