"""Images at the edge of the task endpoints: a nested list or a base64 PNG/JPEG → a grayscale array.

Shared by every task that takes an image (``/classify``, ``/invert``, ``/embed``, the gallery
endpoints). Bad input raises :class:`~serving.repository.InferenceError` 400 naming the problem.

Work budgets before work (issue 16): :func:`decode_images` checks the count first, then the pixels of
every image — read from the PNG/JPEG headers (or a nested list's dimensions) — against the request's
budget, and only then decodes any of them, in a worker thread: a body of many small compressed images
can not inflate to gigabytes of float32 on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import warnings
from typing import Any

import numpy as np

from serving.repository import InferenceError

MAX_IMAGE_SIDE = 1024
_FORMATS = ("PNG", "JPEG")  # the decoders PIL may use; no exotic formats from untrusted input


async def decode_images(
    images: list[Any],
    max_pixels: int,
    what: str = "images",
    max_items: int | None = None,
    rgb: bool = False,
) -> list[np.ndarray]:
    """:func:`decode_image` (``rgb``: :func:`decode_rgb_image`) of each, within budgets checked before any
    is decoded, off the event loop.

    Args:
        images: nested lists or base64 PNG/JPEG strings.
        max_pixels: most pixels of all the images together (the model's ``max_image_pixels``).
        what: the request field, for the messages.
        max_items: most images (checked first, before anything else is looked at).
        rgb: decode to (3, H, W) for an RGB model (:func:`decode_rgb_image`), else (H, W) grayscale.

    Raises:
        InferenceError: 400 naming the budget that is exceeded or the image that is bad.
    """
    if max_items is not None and len(images) > max_items:
        raise InferenceError(400, f"{len(images)} {what}; at most {max_items} per request")
    return await asyncio.to_thread(_decode_within, images, max_pixels, what, rgb)


async def check_image_budget(images: list[Any], max_pixels: int, what: str = "images") -> None:
    """Refuse (400) ``images`` whose pixels together, read from their headers, exceed ``max_pixels``,
    without decoding any (off the event loop): for callers that decode later, one image at a time."""
    await asyncio.to_thread(_within_budget, images, max_pixels, what)


def _decode_within(images: list[Any], max_pixels: int, what: str, rgb: bool = False) -> list[np.ndarray]:
    raws = _within_budget(images, max_pixels, what)
    if rgb:
        return [
            _decode_bytes(r, "RGB").transpose(2, 0, 1) if isinstance(r, bytes) else decode_rgb_image(r)
            for r in raws
        ]
    return [_decode_bytes(r) if isinstance(r, bytes) else decode_image(r) for r in raws]


def _within_budget(images: list[Any], max_pixels: int, what: str) -> list[Any]:
    """The images' raw forms (PNG/JPEG bytes or the nested list), once their pixels fit the budget."""
    raws: list[Any] = []
    total = 0
    for i, image in enumerate(images):
        if isinstance(image, str):
            raw = _base64(image)
            width, height = _header_size(raw)
        else:
            raw = image
            height, width = _list_size(image)
        total += width * height
        if total > max_pixels:
            raise InferenceError(
                400,
                f"{what}: the first {i + 1} images hold {total} pixels; at most {max_pixels} per request "
                "(max_image_pixels)",
            )
        raws.append(raw)
    return raws


def _list_size(image: Any) -> tuple[int, int]:
    """(H, W) of a nested list as its outer lengths (a 1×H×W list counts its inner image); decode_image
    checks the shape itself."""
    rows = image[0] if isinstance(image, list) and len(image) == 1 and isinstance(image[0], list) else image
    if not isinstance(rows, list) or not rows:
        return 0, 0
    first = rows[0]
    if not isinstance(first, list):
        return len(rows), 1
    depth = len(first[0]) if first and isinstance(first[0], list) else 1  # 3×H×W or H×W×3: every value
    return len(rows), len(first) * depth


def decode_image(image: Any, channels: int = 1) -> np.ndarray:
    """A nested list (H×W, values in [0, 1], ink = 1) or a base64 PNG/JPEG → (H, W) float32 in [0, 1].

    ``channels=3`` (an RGB model: trained on the user's colour images, or an imported image classifier):
    :func:`decode_rgb_image`, → (3, H, W).
    """
    if channels == 3:
        return decode_rgb_image(image)
    if isinstance(image, str):
        return _decode_bytes(_base64(image))
    try:
        arr = np.asarray(image, dtype=np.float32)
    except (ValueError, TypeError):
        raise InferenceError(400, "`image` must be a rectangular nested list of numbers (H×W)") from None
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise InferenceError(400, f"`image` must be 2-D (H×W) grayscale; got shape {list(arr.shape)}")
    return _checked_values(arr)


def _checked_values(arr: np.ndarray) -> np.ndarray:
    """``arr`` (…×H×W) once its sides, finiteness and [0, 1] range are within bounds; else a 400."""
    if max(arr.shape[-2:]) > MAX_IMAGE_SIDE:
        raise InferenceError(
            400, f"image is {arr.shape[-1]}×{arr.shape[-2]}; the limit is {MAX_IMAGE_SIDE} a side"
        )
    if not np.isfinite(arr).all():
        raise InferenceError(400, "`image` contains NaN or Inf")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise InferenceError(400, f"`image` values must lie in [0, 1]; got [{arr.min():g}, {arr.max():g}]")
    return arr


def decode_rgb_image(image: Any) -> np.ndarray:
    """For RGB models: a base64 PNG/JPEG (grayscale files are converted) or a nested list of values in
    [0, 1], 3×H×W (planes) or H×W×3 (pixels, as PIL and numpy hold images) → (3, H, W) float32."""
    if isinstance(image, str):
        return _decode_bytes(_base64(image), "RGB").transpose(2, 0, 1)
    try:
        arr = np.asarray(image, dtype=np.float32)
    except (ValueError, TypeError):
        raise InferenceError(400, "`image` must be a rectangular nested list of numbers (3×H×W)") from None
    if arr.ndim == 3 and arr.shape[0] != 3 and arr.shape[-1] == 3:
        arr = arr.transpose(2, 0, 1)  # H×W×3 pixels → planes
    if arr.ndim != 3 or arr.shape[0] != 3 or min(arr.shape) < 1:
        raise InferenceError(
            400, f"`image` must be 3×H×W (RGB planes) or H×W×3; got shape {list(arr.shape)}"
        )
    return _checked_values(arr)


def _base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InferenceError(400, f"`image` is a string but not valid base64: {exc}") from None


def _header_size(raw: bytes) -> tuple[int, int]:
    """(width, height) from a PNG/JPEG header, without decoding a pixel."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=_FORMATS) as im:
                return im.size
    except UnidentifiedImageError:
        raise InferenceError(400, "`image` is base64 but not a PNG/JPEG image PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InferenceError(400, f"`image` is too large to decode: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InferenceError(400, f"`image` is a truncated or corrupt PNG/JPEG: {exc}") from None


def _decode_bytes(raw: bytes, mode: str = "L") -> np.ndarray:
    """PNG/JPEG bytes → (H, W) (``mode="RGB"``: (H, W, 3)) float32 in [0, 1]; every way the bytes can be
    bad is a 400.

    The size is checked from the header before any pixel is decoded, so a decompression bomb (a small
    file that inflates to billions of pixels) is refused without inflating it; PIL's own bomb check
    (``Image.MAX_IMAGE_PIXELS``) fires first for the largest ones. Truncated or corrupt pixel data
    surfaces as ``OSError``/``SyntaxError``/``ValueError`` while decoding.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, don't just log
            im = Image.open(io.BytesIO(raw), formats=_FORMATS)
        with im:
            if max(im.size) > MAX_IMAGE_SIDE:
                raise InferenceError(
                    400, f"image is {im.size[0]}×{im.size[1]}; the limit is {MAX_IMAGE_SIDE} a side"
                )
            return np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise InferenceError(400, "`image` is base64 but not a PNG/JPEG image PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InferenceError(400, f"`image` is too large to decode: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InferenceError(400, f"`image` is a truncated or corrupt PNG/JPEG: {exc}") from None
