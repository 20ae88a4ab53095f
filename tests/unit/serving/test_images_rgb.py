"""decode_image for a model trained on RGB images (channels=3): colour PNG/JPEG and 3×H×W lists."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from serving.images import decode_image
from serving.repository import InferenceError


def _b64(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_colour_png_keeps_its_planes_in_rgb_order():
    image = Image.new("RGB", (5, 3), (255, 0, 128))
    x = decode_image(_b64(image), channels=3)
    assert x.shape == (3, 3, 5) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0], [1.0, 0.0, 128 / 255])
    gray = decode_image(_b64(image))  # a grayscale model sees the same file as luminance
    assert gray.shape == (3, 5)
    assert decode_image(_b64(image.convert("L"), "JPEG"), channels=3).shape == (3, 3, 5)


def test_nested_lists_must_be_three_planes():
    x = decode_image(np.full((3, 4, 6), 0.5).tolist(), channels=3)
    assert x.shape == (3, 4, 6)
    with pytest.raises(InferenceError, match="3×H×W"):
        decode_image([[0.5] * 4] * 4, channels=3)
    with pytest.raises(InferenceError, match=r"\[0, 1\]"):
        decode_image(np.full((3, 2, 2), 2.0).tolist(), channels=3)
    with pytest.raises(InferenceError, match="image is 1025×2; the limit is"):
        decode_image(np.zeros((3, 2, 1025)).tolist(), channels=3)
