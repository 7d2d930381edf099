"""Context-parallel attention on ``torch.distributed``: a sequence sharded over the ranks of a
process group, attended exactly.

- :func:`ring_attention`: softmax attention with key/value shards travelling between ranks,
  pattern-aware (shards nobody needs are never sent), load-balanced causal sharding.
- :func:`ring_linear_attention`: linear attention with the recurrent state passed along.
- :func:`shard` / :func:`unshard`: cut a whole-sequence tensor into a rank's shard, and back.
- :class:`ContextParallelAttention` / :func:`context_parallel`: make
  :class:`attnlab.nn.MultiheadAttention` layers of a model context-parallel.

See ``docs/distributed.md`` for running under ``torchrun`` with gloo (CPU) or NCCL (GPU).
"""

from ._group import PeerFailure
from .collectives import unshard
from .comm import CommStats
from .linear import ring_linear_attention
from .module import ContextParallelAttention, context_parallel
from .ring import ring_attention
from .schedule import RingSchedule, chunk_visibility
from .sharding import LAYOUTS, assemble, chunk_ranges, padded_length, shard

__all__ = [
    "ring_attention", "ring_linear_attention", "shard", "unshard", "assemble", "chunk_ranges",
    "padded_length", "LAYOUTS", "CommStats", "PeerFailure", "RingSchedule", "chunk_visibility",
    "ContextParallelAttention", "context_parallel",
]
