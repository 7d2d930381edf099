"""Static sparsity patterns: which (query, key) pairs interact."""

from .base import Causal, Full, Intersection, MaskMod, Pattern, Union, as_pattern
from .layout import BlockLayout, Tiling

__all__ = ["Pattern", "Full", "Causal", "Union", "Intersection", "MaskMod", "as_pattern", "BlockLayout", "Tiling"]
