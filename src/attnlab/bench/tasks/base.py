"""The container every quality task returns, and the helpers the tasks share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from attnlab._checks import check_int

IGNORE_INDEX = -100
"""Target value that losses and metrics skip (``torch.nn.functional.cross_entropy``'s default)."""


@dataclass(frozen=True)
class TaskData:
    """Train and test tensors of one quality task.

    ``*_inputs`` are ``int64`` token ids of shape ``(N, L)``, all in ``[0, vocab_size)``.
    For classification (``num_classes`` set) ``*_targets`` are ``int64`` labels of shape
    ``(N,)`` in ``[0, num_classes)``; for sequence tasks (``num_classes is None``) they have
    the inputs' shape and hold a token id in ``[0, vocab_size)`` where there is something to
    predict and ``ignore_index`` elsewhere. ``*_source`` (optional) give, for every example,
    the index of the item it was made from (a digit image, a chorale), so that the absence of
    overlap between train and test can be checked. ``details`` records the task's settings.
    """

    name: str
    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor
    vocab_size: int
    num_classes: int | None = None
    ignore_index: int = IGNORE_INDEX
    train_source: torch.Tensor | None = None
    test_source: torch.Tensor | None = None
    details: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x = getattr(self, f"{split}_inputs")
            y = getattr(self, f"{split}_targets")
            for what, t in (("inputs", x), ("targets", y)):
                if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
                    raise TypeError(f"{split}_{what} must be an int64 tensor, got {t!r:.80}")
            if x.dim() != 2:
                raise ValueError(f"{split}_inputs must be (N, L), got shape {tuple(x.shape)}")
            want = x.shape[:1] if self.num_classes is not None else x.shape
            if y.shape != want:
                raise ValueError(
                    f"{split}_targets must have shape {tuple(want)}, got {tuple(y.shape)}"
                )
        if self.train_inputs.shape[1] != self.test_inputs.shape[1]:
            raise ValueError(
                f"train and test sequence lengths differ: {self.train_inputs.shape[1]} "
                f"vs {self.test_inputs.shape[1]}"
            )

    @property
    def seq_len(self) -> int:
        """Length ``L`` of every input sequence."""
        return int(self.train_inputs.shape[1])

    def describe(self) -> str:
        """One line: sizes, vocabulary, kind of target, and the task's settings."""
        kind = (
            f"{self.num_classes} classes"
            if self.num_classes is not None
            else f"per-position targets (ignore_index={self.ignore_index})"
        )
        settings = ", ".join(f"{k}={v}" for k, v in self.details.items() if k != "pieces")
        return (
            f"{self.name}: {len(self.train_inputs)} train / {len(self.test_inputs)} test "
            f"sequences of length {self.seq_len}, vocab {self.vocab_size}, {kind}"
            + (f"; {settings}" if settings else "")
        )


def check_fraction(name: str, value: object) -> float:
    """``value`` as a float strictly between 0 and 1; TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1), got {name}={value!r}")
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {name}={value!r}")
    return float(value)


def split_indices(
    n: int, test_fraction: float, seed: int, *, strata: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint, sorted ``int64`` index tensors ``(train, test)`` that together cover ``range(n)``.

    A permutation drawn from ``numpy.random.default_rng(seed)`` puts
    ``round(n * test_fraction)`` items (at least one, at most ``n - 1``) in the test set.
    With ``strata`` (one label per item) the split is stratified: each label contributes
    ``round(count * test_fraction)`` of its items, in the order of one shared permutation.
    """
    check_int("n", n, 2)
    frac = check_fraction("test_fraction", test_fraction)
    check_int("seed", seed, 0)
    order = np.random.default_rng(seed).permutation(n)
    if strata is None:
        test = order[: min(n - 1, max(1, round(n * frac)))]
    else:
        labels = np.asarray(strata)
        if labels.shape != (n,):
            raise ValueError(f"strata must have {n} entries, got shape {labels.shape}")
        picked = [
            order[labels[order] == c][: round(int((labels == c).sum()) * frac)]
            for c in np.unique(labels)
        ]
        test = np.concatenate(picked)
        if len(test) == 0 or len(test) == n:
            raise ValueError(
                f"test_fraction={test_fraction} leaves an empty split with strata of sizes "
                f"{np.unique(labels, return_counts=True)[1].tolist()}"
            )
    in_test = np.zeros(n, dtype=bool)
    in_test[test] = True
    return (
        torch.from_numpy(np.flatnonzero(~in_test).astype(np.int64)),
        torch.from_numpy(np.flatnonzero(in_test).astype(np.int64)),
    )


def seed_streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Two independent generators (train, test) spawned from ``SeedSequence(seed)``."""
    check_int("seed", seed, 0)
    train, test = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(train), np.random.default_rng(test)


def disjoint_test_set(
    train_inputs: np.ndarray,
    make: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]],
    num: int,
    rng: np.random.Generator,
    max_rounds: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """``num`` examples from ``make(rng, count)``, none with an input identical to a train row.

    Colliding rows are redrawn from ``rng`` (so the result stays a function of the seed);
    after ``max_rounds`` redraws a ValueError says that the settings admit too few
    distinct sequences.
    """
    seen = {row.tobytes() for row in train_inputs}
    inputs, targets = make(rng, num)
    for _ in range(max_rounds):
        clash = np.fromiter((row.tobytes() in seen for row in inputs), bool, len(inputs))
        if not clash.any():
            return inputs, targets
        new_x, new_y = make(rng, int(clash.sum()))
        inputs[clash], targets[clash] = new_x, new_y
    raise ValueError(
        f"could not draw {num} test sequences distinct from the {len(train_inputs)} train "
        f"sequences in {max_rounds} rounds: the settings allow too few distinct sequences; "
        "enlarge seq_len or vocab_size"
    )


def synthetic_task(
    name: str,
    make: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]],
    num_examples: int,
    num_test: int,
    seed: int,
    vocab_size: int,
    details: dict,
) -> TaskData:
    """A sequence-to-sequence task drawn by ``make(rng, count) -> (inputs, targets)``:
    train and test come from independent streams of ``seed`` and share no input sequence."""
    train_rng, test_rng = seed_streams(seed)
    train_x, train_y = make(train_rng, num_examples)
    test_x, test_y = disjoint_test_set(train_x, make, num_test, test_rng)
    return TaskData(
        name=name,
        train_inputs=torch.from_numpy(train_x),
        train_targets=torch.from_numpy(train_y),
        test_inputs=torch.from_numpy(test_x),
        test_targets=torch.from_numpy(test_y),
        vocab_size=vocab_size,
        num_classes=None,
        details=details,
    )


def default_test_count(num_examples: int, num_test_examples: int | None) -> int:
    """``num_test_examples`` checked, or ``max(1, num_examples // 4)`` when it is None."""
    if num_test_examples is None:
        return max(1, num_examples // 4)
    return check_int("num_test_examples", num_test_examples, 1)
