"""attnlab: the attention mechanisms of the research literature behind one PyTorch API.

    import attnlab as al
    out = al.attention(q, k, v, pattern=al.SlidingWindow(left=511) | al.Sinks(4))
"""

from .api import attention, attention_weights, explain
from .linear import LinearAttentionState, linear_attention, linear_attention_weights
from .merge import merge_attentions
from .patterns import (
    BlockLayout, Blocked, BlockSparse, Causal, Document, ExpertChoice, Full, GlobalTokens, Grid, Halo,
    HierarchicalTopK, KMeansRouting, LinearEstimateTopK, RegionRouting,
    KeySet, MaskMod, Neighborhood, Pattern, PrefixLM, Radial, SeerGate, Sinks, SlidingWindow, Strided,
    Tiling, TopKBlocks, TopKPerQuery, TopPBlocks, TopTheta, calibrate_thresholds, resolve_pattern,
)
from .fidelity import attention_fidelity
from .registry import Mechanism, Paper, catalog
from .scores import (
    ALiBi, RelativeBias, RelativeEmbedding, ScoreContext, ScoreMod, Softcap, Temperature,
)

__version__ = "0.1.0"

__all__ = [
    "attention", "attention_weights", "explain", "merge_attentions", "catalog", "Mechanism",
    "Paper", "Pattern", "MaskMod", "BlockLayout", "Tiling", "Full", "Causal", "SlidingWindow",
    "Neighborhood", "Blocked", "Grid", "Halo", "Strided", "Sinks", "GlobalTokens", "Document",
    "PrefixLM", "BlockSparse", "Radial", "ScoreMod", "ScoreContext", "ALiBi", "RelativeBias",
    "RelativeEmbedding", "Softcap", "Temperature", "linear_attention", "linear_attention_weights",
    "LinearAttentionState", "KeySet", "TopKBlocks", "TopPBlocks", "TopKPerQuery", "TopTheta",
    "SeerGate", "calibrate_thresholds", "resolve_pattern", "attention_fidelity", "KMeansRouting",
    "RegionRouting", "LinearEstimateTopK", "HierarchicalTopK", "ExpertChoice",
]
