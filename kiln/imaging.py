"""Image preprocessing shared by training and serving, in numpy so serving needs no torch for it.

The resize is bilinear with half-pixel centres, the same arithmetic as
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False)``, so a model
sees identical pixels in training and behind ``/classify`` (a unit test checks the two agree).
"""

from __future__ import annotations

import numpy as np


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.clip(src, 0.0, None)  # torch clamps negative source coordinates to 0
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32)
    return lo, hi, frac


def resize_bilinear(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``(..., H, W)`` images to ``size`` = (h, w); returns float32."""
    images = np.asarray(images, dtype=np.float32)
    h_in, w_in = images.shape[-2:]
    h_out, w_out = size
    if (h_in, w_in) == (h_out, w_out):
        return images.copy()
    lo, hi, f = _axis_weights(h_in, h_out)
    rows = images[..., lo, :] * (1.0 - f)[:, None] + images[..., hi, :] * f[:, None]
    lo, hi, f = _axis_weights(w_in, w_out)
    return (rows[..., lo] * (1.0 - f) + rows[..., hi] * f).astype(np.float32)


def to_model_input(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(N, H, W)`` grayscale or ``(N, C, H, W)`` images in [0, 1] → ``(N, C, h, w)`` float32 model input."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 4:
        return resize_bilinear(images, size)
    if images.ndim != 3:
        raise ValueError(f"expected (N, H, W) or (N, C, H, W) images, got shape {images.shape}")
    return resize_bilinear(images, size)[:, None, :, :]
