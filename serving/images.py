"""Images at the edge of the task endpoints: a nested list or a base64 PNG/JPEG → a grayscale array.

Shared by every task that takes an image (``/classify``, ``/invert``, the gallery endpoints). Bad input
raises :class:`~serving.repository.InferenceError` 400 naming the problem.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Any

import numpy as np

from serving.repository import InferenceError

MAX_IMAGE_SIDE = 1024
_FORMATS = ("PNG", "JPEG")  # the decoders PIL may use; no exotic formats from untrusted input


def decode_image(image: Any, channels: int = 1) -> np.ndarray:
    """A nested list (H×W, values in [0, 1], ink = 1) or a base64 PNG/JPEG → (H, W) float32 in [0, 1].

    ``channels=3`` (a model trained on RGB images): a nested list 3×H×W or a PNG/JPEG → (3, H, W).
    """
    if isinstance(image, str):
        return _decode_png_jpeg(image, channels)
    try:
        arr = np.asarray(image, dtype=np.float32)
    except (ValueError, TypeError):
        raise InferenceError(400, "`image` must be a rectangular nested list of numbers (H×W)") from None
    if channels == 3:
        if arr.ndim != 3 or arr.shape[0] != 3 or min(arr.shape) < 1:
            raise InferenceError(400, f"`image` must be 3×H×W (RGB planes); got shape {list(arr.shape)}")
    else:
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 2 or min(arr.shape) < 1:
            raise InferenceError(400, f"`image` must be 2-D (H×W) grayscale; got shape {list(arr.shape)}")
    if max(arr.shape[-2:]) > MAX_IMAGE_SIDE:
        raise InferenceError(
            400, f"image is {arr.shape[-1]}×{arr.shape[-2]}; the limit is {MAX_IMAGE_SIDE} a side"
        )
    if not np.isfinite(arr).all():
        raise InferenceError(400, "`image` contains NaN or Inf")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise InferenceError(400, f"`image` values must lie in [0, 1]; got [{arr.min():g}, {arr.max():g}]")
    return arr


def _decode_png_jpeg(text: str, channels: int = 1) -> np.ndarray:
    """A base64 PNG/JPEG → (H, W) (or (3, H, W)) float32 in [0, 1]; every way the bytes can be bad is a 400.

    The size is checked from the header before any pixel is decoded, so a decompression bomb (a small
    file that inflates to billions of pixels) is refused without inflating it; PIL's own bomb check
    (``Image.MAX_IMAGE_PIXELS``) fires first for the largest ones. Truncated or corrupt pixel data
    surfaces as ``OSError``/``SyntaxError``/``ValueError`` while decoding.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InferenceError(400, f"`image` is a string but not valid base64: {exc}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, don't just log
            im = Image.open(io.BytesIO(raw), formats=_FORMATS)
        with im:
            if max(im.size) > MAX_IMAGE_SIDE:
                raise InferenceError(
                    400, f"image is {im.size[0]}×{im.size[1]}; the limit is {MAX_IMAGE_SIDE} a side"
                )
            if channels == 3:
                return np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise InferenceError(400, "`image` is base64 but not a PNG/JPEG image PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InferenceError(400, f"`image` is too large to decode: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InferenceError(400, f"`image` is a truncated or corrupt PNG/JPEG: {exc}") from None
