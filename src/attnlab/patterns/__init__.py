"""Sparsity patterns: which (query, key) pairs interact, static or chosen from q and k."""

from .base import Causal, Full, Intersection, MaskMod, Pattern, Union, as_pattern
from .block_sparse import BlockSparse
from .content import ContentPattern, SelectionContext, has_content, resolve_pattern
from .document import Document, PrefixLM
from .layout import BlockLayout, Tiling
from .neighborhood import Neighborhood
from .radial import Radial
from .sinks import GlobalTokens, Sinks
from .sliding_window import SlidingWindow
from .strided import Strided
from .key_set import KeySet
from .top_blocks import TopKBlocks, TopPBlocks
from .top_keys import TopKPerQuery, TopTheta, calibrate_thresholds
from .seer_gate import SeerGate, block_attention_mass, seer_gate_loss
from .windows import Blocked, Grid, Halo
from .routing_kmeans import ClusterMask, KMeansRouter, KMeansRouting
from .region_routing import RegionMask, RegionRouting
from .linear_estimate import LinearEstimateTopK
from .hierarchical_topk import HierarchicalTopK
from .expert_choice import ExpertChoice, MixtureOfSparseAttention, TokenSubset

__all__ = [
    "Pattern", "Full", "Causal", "Union", "Intersection", "MaskMod", "as_pattern",
    "BlockLayout", "Tiling", "SlidingWindow", "Neighborhood", "Blocked", "Grid", "Halo",
    "Strided", "Sinks", "GlobalTokens", "Document", "PrefixLM", "BlockSparse", "Radial",
    "ContentPattern", "SelectionContext", "has_content", "resolve_pattern", "KeySet", "TopKBlocks",
    "TopPBlocks", "TopKPerQuery", "TopTheta", "calibrate_thresholds", "SeerGate",
    "block_attention_mass", "seer_gate_loss",
    "ClusterMask", "KMeansRouter", "KMeansRouting", "RegionMask", "RegionRouting", "LinearEstimateTopK",
    "HierarchicalTopK", "ExpertChoice", "MixtureOfSparseAttention", "TokenSubset",
]
