"""Score mods: what is added to, or done with, the logits."""

from .alibi import ALiBi, alibi_slopes
from .base import CallableScoreMod, ScoreContext, ScoreMod, ScoreModChain, as_score_mod
from .relative_bias import RelativeBias, relative_position_bucket
from .relative_embedding import RelativeEmbedding
from .softcap import Softcap, Temperature

__all__ = [
    "ScoreMod", "ScoreContext", "CallableScoreMod", "ScoreModChain", "as_score_mod",
    "ALiBi", "alibi_slopes", "RelativeBias", "relative_position_bucket", "RelativeEmbedding",
    "Softcap", "Temperature",
]
