"""Score mods: what is added to, or done with, the logits."""

from .base import CallableScoreMod, ScoreContext, ScoreMod, ScoreModChain, as_score_mod

__all__ = ["ScoreMod", "ScoreContext", "CallableScoreMod", "ScoreModChain", "as_score_mod"]
