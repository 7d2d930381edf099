"""Sequential image classification on scikit-learn's 8x8 digits.

The pixel-by-pixel reading of an image as a token sequence follows sequential MNIST
(Le, Jaitly and Hinton, "A Simple Way to Initialize Recurrent Networks of Rectified Linear
Units", 2015), on the small UCI handwritten-digits set that ships with scikit-learn (Alpaydin
and Kaynak, "Optical Recognition of Handwritten Digits", 1998).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import TaskData, check_fraction, split_indices

PIXEL_LEVELS = 17
"""Pixel values are the integers 0..16 (counts of set pixels in 4x4 blocks of a 32x32 bitmap)."""


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the digits task needs scikit-learn (its digits data ship with it, no download): "
            "pip install scikit-learn"
        ) from exc
    data = load_digits()
    return np.asarray(data.data), np.asarray(data.target)


def digits(*, seed: int, test_fraction: float = 0.25) -> TaskData:
    """The 1797 digits of ``sklearn.datasets.load_digits`` as sequences of 64 pixel tokens.

    Each 8x8 image is read in row-major order (row 0 left to right, then row 1, ...); the
    token is the pixel's integer intensity 0..16, so ``vocab_size = 17``. The target is the
    digit, ``num_classes = 10``. The split is stratified by digit and seeded
    (:func:`split_indices` with ``strata`` = labels): every image is in exactly one of train
    and test, and ``train_source`` / ``test_source`` give each example's index in
    ``load_digits()``. The data set has no two identical images.
    """
    frac = check_fraction("test_fraction", test_fraction)
    pixels, labels = _load_digits()
    tokens = torch.from_numpy(np.rint(pixels).astype(np.int64))
    if int(tokens.min()) < 0 or int(tokens.max()) >= PIXEL_LEVELS:
        raise ValueError(
            f"load_digits returned pixel values outside 0..{PIXEL_LEVELS - 1}: "
            f"[{int(tokens.min())}, {int(tokens.max())}]"
        )
    targets = torch.from_numpy(labels.astype(np.int64))
    train, test = split_indices(len(tokens), frac, seed, strata=labels.tolist())
    return TaskData(
        name="digits",
        train_inputs=tokens[train].contiguous(),
        train_targets=targets[train].contiguous(),
        test_inputs=tokens[test].contiguous(),
        test_targets=targets[test].contiguous(),
        vocab_size=PIXEL_LEVELS,
        num_classes=10,
        train_source=train,
        test_source=test,
        details={"image": "8x8 row-major", "test_fraction": frac, "seed": seed},
    )
