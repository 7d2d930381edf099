"""Static sparsity patterns: which (query, key) pairs interact."""

from .base import Causal, Full, Intersection, MaskMod, Pattern, Union, as_pattern
from .block_sparse import BlockSparse
from .document import Document, PrefixLM
from .layout import BlockLayout, Tiling
from .neighborhood import Neighborhood
from .radial import Radial
from .sinks import GlobalTokens, Sinks
from .sliding_window import SlidingWindow
from .strided import Strided
from .windows import Blocked, Grid, Halo

__all__ = [
    "Pattern", "Full", "Causal", "Union", "Intersection", "MaskMod", "as_pattern",
    "BlockLayout", "Tiling", "SlidingWindow", "Neighborhood", "Blocked", "Grid", "Halo",
    "Strided", "Sinks", "GlobalTokens", "Document", "PrefixLM", "BlockSparse", "Radial",
]
