"""scikit-learn's bundled handwritten digits (1,797 real 8×8 scans, 10 classes), split once with a fixed seed.

The split is stratified 70 / 15 / 15 (train / val / test) with seed 0; model selection uses val only,
and the test split is read once per trained model to report its accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from kiln.imaging import to_model_input

DIGITS_MAX = 16.0  # digits pixels are integers 0..16 (ink = 16)
SPLIT_SEED = 0


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, 8, 8) float32 in [0, 1], ink = 1
    labels: np.ndarray  # (N,) int64


def digits_splits(seed: int = SPLIT_SEED) -> dict[str, Split]:
    """Train / val / test splits of the bundled digits."""
    ds = load_digits()
    images = (ds.images / DIGITS_MAX).astype(np.float32)
    labels = ds.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, rest = train_test_split(idx, test_size=0.3, stratify=labels, random_state=seed)
    val_idx, test_idx = train_test_split(rest, test_size=0.5, stratify=labels[rest], random_state=seed)
    return {
        k: Split(images[i], labels[i])
        for k, i in (("train", train_idx), ("val", val_idx), ("test", test_idx))
    }


def split_inputs(split: str, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs ``(N, 1, h, w)`` and labels of one split, resized as the model needs."""
    s = digits_splits()[split]
    return to_model_input(s.images, image_size), s.labels
