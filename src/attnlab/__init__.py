"""attnlab: the attention mechanisms of the research literature behind one PyTorch API."""

from .patterns import Causal, Full, MaskMod, Pattern

__version__ = "0.1.0"
