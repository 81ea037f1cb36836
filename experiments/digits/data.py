"""digits: scikit-learn's bundled 8x8 handwritten digits as a tiny image benchmark (no download).

1,797 grey-scale images with integer intensities 0..16 and 10 classes. Images are mapped to EDM's range [-1, 1]
by ``x / 16 * 2 - 1`` and stored as ``[N, 1, 8, 8]`` float32. The split is fixed: a NumPy permutation with seed 0;
the first 1,400 indices are the training set (teacher and classifier), the remaining 397 the held-out test set
(FID/KID/precision/recall reference).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = ["DigitsSplit", "load_digits_split", "split_indices", "NUM_CLASSES", "NUM_IMAGES", "IMG_RESOLUTION",
           "IMG_CHANNELS"]

NUM_CLASSES = 10
IMG_RESOLUTION = 8
IMG_CHANNELS = 1
NUM_IMAGES = 1797
NUM_TRAIN = 1400


@dataclass(frozen=True)
class DigitsSplit:
    """Train/test tensors. images: ``[N, 1, 8, 8]`` float32 in [-1, 1]; labels: ``[N]`` int64 in 0..9."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    train_index: np.ndarray
    test_index: np.ndarray


def split_indices(n: int = NUM_IMAGES, num_train: int = NUM_TRAIN, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic disjoint (train, test) index arrays: ``np.random.default_rng(seed).permutation(n)``."""
    if not 0 < num_train < n:
        raise ValueError(f"digits.data.num_train must be in (0, {n}), got {num_train}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:num_train]), np.sort(perm[num_train:])


@lru_cache(maxsize=4)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def load_digits_split(seed: int = 0, num_train: int = NUM_TRAIN) -> DigitsSplit:
    """The benchmark's data: images scaled to [-1, 1] as ``[N, 1, 8, 8]`` float32, fixed split (see module doc)."""
    images, labels = _load_raw()
    x = torch.from_numpy(images / 16.0 * 2.0 - 1.0).float().unsqueeze(1)
    y = torch.from_numpy(labels)
    tr, te = split_indices(len(x), num_train, seed)
    return DigitsSplit(x[tr], y[tr], x[te], y[te], tr, te)
