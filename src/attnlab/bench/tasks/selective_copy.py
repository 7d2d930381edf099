"""Selective copying.

Gu and Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (2023),
section 3.1 / 4.1.1 and Figure 2, whose generator extends the copying task of the S4
repository (``copying.py`` with ``variable=True``).
"""

from __future__ import annotations

import numpy as np

from attnlab._checks import check_int

from .base import IGNORE_INDEX, TaskData, default_test_count, synthetic_task

BLANK = 0
"""Id of the blank (noise) token that fills the gaps between data tokens."""


def selective_copy(
    num_examples: int,
    seq_len: int,
    num_tokens: int,
    vocab_size: int,
    *,
    seed: int,
    num_test_examples: int | None = None,
) -> TaskData:
    """Selective-copying sequences as in Mamba (Gu and Dao, 2023).

    With ``M = num_tokens`` and ``A = vocab_size``, one sequence of length ``seq_len`` is:

    * a region of ``seq_len - M`` positions holding the blank token 0 except at ``M``
      distinct positions drawn uniformly at random, which hold the data tokens, i.i.d.
      uniform in ``[1, A - 2]``, in the order of their positions;
    * then ``M`` marker tokens ``A - 1``, one per token to recall.

    Targets are ``-100`` on the first region and, at the ``i``-th marker, the ``i``-th data
    token: the model must output the data tokens, in order, after the markers. The number
    of blanks is ``seq_len - 2 * M``; the Mamba paper uses ``M = 16``, ``A = 16`` and about
    4096 blanks.

    Train and test come from two independent streams spawned from ``seed``; test sequences
    identical to a train sequence are redrawn. ``num_test_examples`` defaults to
    ``max(1, num_examples // 4)``.
    """
    check_int("num_examples", num_examples, 1)
    check_int("seq_len", seq_len, 1)
    m = check_int("num_tokens", num_tokens, 1)
    check_int("vocab_size", vocab_size, 1)
    if seq_len < 2 * m:
        raise ValueError(
            f"seq_len={seq_len} is too short for {m} data tokens and {m} markers: "
            f"need seq_len >= 2*num_tokens = {2 * m}"
        )
    if vocab_size < 3:
        raise ValueError(
            f"vocab_size must be >= 3 (blank, marker and at least one data token), "
            f"got vocab_size={vocab_size}"
        )
    num_test = default_test_count(num_examples, num_test_examples)
    region = seq_len - m
    marker = vocab_size - 1

    def make(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = rng.integers(1, vocab_size - 1, size=(n, m), dtype=np.int64)
        pos = np.empty((n, m), dtype=np.int64)
        for i in range(n):
            pos[i] = np.sort(rng.choice(region, m, replace=False))
        x = np.full((n, seq_len), BLANK, dtype=np.int64)
        x[np.arange(n)[:, None], pos] = tokens
        x[:, region:] = marker
        y = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
        y[:, region:] = tokens
        return x, y

    return synthetic_task("selective_copy", make, num_examples, num_test, seed, vocab_size, {
            "num_tokens": m,
            "blank": BLANK,
            "marker": marker,
            "seed": seed,
        })
