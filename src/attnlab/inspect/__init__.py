"""Look inside attention: capture maps, edit them, route Hugging Face models through attnlab.

- :func:`capture`: record the per-layer, per-head probabilities (or blockwise summaries) of
  every :func:`attnlab.attention` call in a block;
- :func:`layer_scope`: name the layer of the calls in a block.

``import attnlab.inspect`` does not import ``transformers``.
"""

from .capture import AttentionRecord, Recording, capture, layer_scope

__all__ = ["AttentionRecord", "Recording", "capture", "layer_scope"]
