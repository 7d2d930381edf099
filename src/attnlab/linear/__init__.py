"""Groundwork for linear attention (not wired into the public API yet).

* :mod:`~attnlab.linear.feature_maps`: ``Identity``, ``EluPlusOne``, ``ReLU``,
  ``PerformerRandomFeatures``.
* :mod:`~attnlab.linear.forms`: ``parallel_form``, ``chunked_form``, ``recurrent_step`` (with
  optional RetNet-style per-head decay) and ``LinearAttentionState``.
* :mod:`~attnlab.linear.reference`: ``naive_recurrence``, the exact loop reference.
"""

from attnlab.linear.feature_maps import EluPlusOne, Identity, PerformerRandomFeatures, ReLU
from attnlab.linear.forms import (
    EPS,
    LinearAttentionState,
    chunked_form,
    parallel_form,
    recurrent_step,
)
from attnlab.linear.reference import naive_recurrence

__all__ = [
    "EPS",
    "EluPlusOne",
    "Identity",
    "LinearAttentionState",
    "PerformerRandomFeatures",
    "ReLU",
    "chunked_form",
    "naive_recurrence",
    "parallel_form",
    "recurrent_step",
]
