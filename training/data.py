"""scikit-learn's bundled handwritten digits (1,797 real 8×8 scans, 10 classes), split once with a fixed seed.

The split is stratified 70 / 15 / 15 (train / val / test) with seed 0; model selection uses val only,
and the test split is read once per trained model to report its accuracy.

:func:`image_data` is what the image trainers read: the digits, or a user's ImageFolder directory
(:mod:`training.imagefolder`, split the same way); :func:`recorded_image_data` gives an export the
splits an artifact's manifest recorded.
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


@dataclass(frozen=True)
class ImageData:
    """An image recipe's data: model inputs ``(N, C, h, w)`` in [0, 1] and labels per split."""

    inputs: dict[str, tuple[np.ndarray, np.ndarray]]
    labels: list[str]  # class names, in label-index order
    channels: int
    record: dict  # the manifest's ``data`` block: where the images came from and how they were split


def image_data(
    dataset: str, image_size: tuple[int, int], *, channels: int = 0, progress: bool = False
) -> ImageData:
    """The bundled ``digits`` or an ImageFolder directory (:mod:`training.imagefolder`), split and resized.

    ``channels`` 0 = from the data (digits: 1); 1 or 3 converts.
    """
    if dataset == "digits":
        if channels not in (0, 1):
            raise ValueError(f"the bundled digits are grayscale (1 channel), not {channels}")
        splits = digits_splits()
        inputs = {s: split_inputs(s, tuple(image_size)) for s in splits}
        sizes = {s: len(v.labels) for s, v in splits.items()}
        record = {"kind": "digits", "split_seed": SPLIT_SEED, "sizes": sizes}
        return ImageData(inputs, [str(i) for i in range(10)], 1, record)
    from training.imagefolder import load_image_folder

    folder = load_image_folder(
        dataset, tuple(image_size), channels=channels or None, seed=SPLIT_SEED, progress=progress
    )
    return ImageData(folder.inputs, folder.classes, folder.channels, folder.record)


_RECORDED: dict[tuple, ImageData] = {}


def recorded_image_data(manifest: dict, image_size: tuple[int, int]) -> ImageData:
    """The data an artifact was trained on, from its manifest's ``data`` block (no block: the digits).

    A user's folder is re-read from the recorded file lists (cached per process: export reads the splits
    several times) and refused if its files changed since training.
    """
    record = manifest.get("data") or {"kind": "digits"}
    if record["kind"] == "digits":
        return image_data("digits", image_size)
    key = (record["sha256"], tuple(image_size))
    if key not in _RECORDED:
        from training.imagefolder import reload_image_folder

        folder = reload_image_folder(record, tuple(image_size))
        _RECORDED[key] = ImageData(folder.inputs, folder.classes, folder.channels, record)
    return _RECORDED[key]
