"""Data of the quality suite: small tasks on which models are trained from scratch on a CPU.

* :func:`mqar` -- multi-query associative recall (Zoology, Arora et al., 2023);
* :func:`selective_copy` -- selective copying (Mamba, Gu and Dao, 2023);
* :func:`digits` -- sequential classification of scikit-learn's 8x8 digits (needs scikit-learn);
* :func:`bach_chorales` -- next-event prediction on J.S. Bach's chorales (Music Transformer,
  Huang et al., 2018; needs music21).

Each returns a :class:`TaskData` with int64 train/test tensors and its vocabulary.
"""

from .base import IGNORE_INDEX, TaskData, split_indices
from .chorales import bach_chorales
from .digits import digits
from .mqar import mqar
from .selective_copy import selective_copy

__all__ = [
    "IGNORE_INDEX",
    "TaskData",
    "bach_chorales",
    "digits",
    "mqar",
    "selective_copy",
    "split_indices",
]
