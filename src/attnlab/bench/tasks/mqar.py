"""Multi-query associative recall (MQAR).

Arora, Eyuboglu, Timalsina, Johnson, Poli, Zou, Rudra and Re, "Zoology: Measuring and
Improving Recall in Efficient Language Models" (2023), section 3 and its reference
generator ``zoology/data/multiquery_ar.py``.
"""

from __future__ import annotations

import numpy as np

from attnlab._checks import check_int

from .base import IGNORE_INDEX, TaskData, default_test_count, synthetic_task


def _check_power(power_a: object) -> float:
    if isinstance(power_a, bool) or not isinstance(power_a, (int, float)):
        raise TypeError(f"power_a must be a float in (0, 1], got power_a={power_a!r}")
    if not 0.0 < float(power_a) <= 1.0:
        raise ValueError(f"power_a must be in (0, 1], got power_a={power_a!r}")
    return float(power_a)


def mqar(
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int,
    *,
    seed: int,
    num_queries: int | None = None,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    num_test_examples: int | None = None,
) -> TaskData:
    """MQAR sequences as in Zoology (Arora et al., 2023).

    Construction of one sequence of length ``seq_len`` with ``P = num_kv_pairs`` and
    ``Q = num_queries`` (default ``P``):

    * keys: ``P`` distinct ids from ``[1, vocab_size // 2)``; values: ``P`` distinct ids
      from ``[vocab_size // 2, vocab_size)`` (disjoint ranges; id 0 is never a key).
    * positions ``0 .. 2P-1`` list the pairs ``k_1 v_1 k_2 v_2 ... k_P v_P``.
    * the rest is ``(seq_len - 2P) // 2`` two-token slots; ``Q`` of the keys (a random
      subset, in random order) are repeated as queries at the start of ``Q`` distinct slots
      drawn without replacement with probability ``proportional to power_a * s**(power_a-1)``
      for slot ``s = 1, 2, ...`` (Zoology's power law: gaps are mostly short).
    * targets are ``-100`` everywhere except at each query position, where the target is the
      value paired with that key (the model reads the key and must emit its value next).
    * other positions hold random ids from ``[0, vocab_size)`` when ``random_non_queries``
      (Zoology's default; such a filler may equal a key, which is then simply not scored),
      and 0 otherwise.

    Train and test come from two independent streams spawned from ``seed``; test sequences
    identical to a train sequence are redrawn. ``num_test_examples`` defaults to
    ``max(1, num_examples // 4)``.
    """
    check_int("num_examples", num_examples, 1)
    check_int("seq_len", seq_len, 1)
    pairs = check_int("num_kv_pairs", num_kv_pairs, 1)
    check_int("vocab_size", vocab_size, 1)
    queries = pairs if num_queries is None else check_int("num_queries", num_queries, 1)
    if queries > pairs:
        raise ValueError(
            f"num_queries must be <= num_kv_pairs={pairs} (each query asks a distinct key), "
            f"got num_queries={queries}"
        )
    if seq_len < 2 * pairs + 2 * queries:
        raise ValueError(
            f"seq_len={seq_len} is too short for {pairs} key-value pairs and {queries} queries: "
            f"need seq_len >= 2*num_kv_pairs + 2*num_queries = {2 * pairs + 2 * queries}"
        )
    if vocab_size < 2 * pairs + 2:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for {pairs} distinct keys in "
            f"[1, vocab_size//2) and values in [vocab_size//2, vocab_size): need vocab_size "
            f">= 2*num_kv_pairs + 2 = {2 * pairs + 2}"
        )
    power = _check_power(power_a)
    if not isinstance(random_non_queries, bool):
        raise TypeError(f"random_non_queries must be a bool, got {random_non_queries!r}")
    num_test = default_test_count(num_examples, num_test_examples)

    half = vocab_size // 2
    space = (seq_len - 2 * pairs) // 2
    log_p = np.log(power) + (power - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))

    def make(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        keys = np.empty((n, pairs), dtype=np.int64)
        values = np.empty((n, pairs), dtype=np.int64)
        for i in range(n):
            keys[i] = rng.choice(half - 1, pairs, replace=False) + 1
            values[i] = rng.choice(vocab_size - half, pairs, replace=False) + half
        if random_non_queries:
            x = rng.integers(0, vocab_size, size=(n, seq_len), dtype=np.int64)
        else:
            x = np.zeros((n, seq_len), dtype=np.int64)
        x[:, 0 : 2 * pairs : 2] = keys
        x[:, 1 : 2 * pairs : 2] = values
        asked = np.argsort(rng.random((n, pairs)), axis=1)[:, :queries]
        # Gumbel top-k: Q slots without replacement, weights p_s (as numpy's choice(p=...)).
        slots = np.argsort(-(log_p + rng.gumbel(size=(n, space))), axis=1)[:, :queries]
        pos = 2 * pairs + 2 * slots
        rows = np.arange(n)[:, None]
        y = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
        x[rows, pos] = np.take_along_axis(keys, asked, axis=1)
        y[rows, pos] = np.take_along_axis(values, asked, axis=1)
        return x, y

    return synthetic_task("mqar", make, num_examples, num_test, seed, vocab_size, {
            "num_kv_pairs": pairs,
            "num_queries": queries,
            "power_a": power,
            "random_non_queries": random_non_queries,
            "seed": seed,
        })
