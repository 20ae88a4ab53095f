"""Images at the edge of the task endpoints: a nested list or a base64 PNG/JPEG → a grayscale array.

Shared by every task that takes an image (``/classify``, ``/invert``, the gallery endpoints). Bad input
raises :class:`~serving.repository.InferenceError` 400 naming the problem.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np

from serving.repository import InferenceError

MAX_IMAGE_SIDE = 1024


def decode_image(image: Any) -> np.ndarray:
    """A nested list (H×W, values in [0, 1], ink = 1) or a base64 PNG/JPEG → (H, W) float32 in [0, 1]."""
    if isinstance(image, str):
        from PIL import Image, UnidentifiedImageError

        try:
            raw = base64.b64decode(image, validate=True)
            with Image.open(io.BytesIO(raw)) as im:
                if max(im.size) > MAX_IMAGE_SIDE:
                    raise InferenceError(
                        400, f"image is {im.size[0]}×{im.size[1]}; the limit is {MAX_IMAGE_SIDE} a side"
                    )
                arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        except (binascii.Error, ValueError) as exc:
            raise InferenceError(400, f"`image` is a string but not valid base64: {exc}") from None
        except UnidentifiedImageError:
            raise InferenceError(400, "`image` is base64 but not a PNG/JPEG image PIL can read") from None
        return arr
    try:
        arr = np.asarray(image, dtype=np.float32)
    except (ValueError, TypeError):
        raise InferenceError(400, "`image` must be a rectangular nested list of numbers (H×W)") from None
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise InferenceError(400, f"`image` must be 2-D (H×W) grayscale; got shape {list(arr.shape)}")
    if max(arr.shape) > MAX_IMAGE_SIDE:
        raise InferenceError(
            400, f"image is {arr.shape[1]}×{arr.shape[0]}; the limit is {MAX_IMAGE_SIDE} a side"
        )
    if not np.isfinite(arr).all():
        raise InferenceError(400, "`image` contains NaN or Inf")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise InferenceError(400, f"`image` values must lie in [0, 1]; got [{arr.min():g}, {arr.max():g}]")
    return arr
