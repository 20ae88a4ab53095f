"""Image budgets before work (issue 16): the count, then the pixels read from the headers, then decoding,
off the event loop."""

from __future__ import annotations

import asyncio
import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image

import serving.images as images
from serving.images import decode_images
from serving.repository import InferenceError


def _png(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_count_is_checked_before_anything_is_decoded(monkeypatch):
    seen = []
    monkeypatch.setattr(images, "_decode_within", lambda *a: seen.append(a))
    with pytest.raises(InferenceError, match="1001 images; at most 1000"):
        asyncio.run(decode_images([_png(8, 8)] * 1001, 10**9, max_items=1000))
    assert not seen


def test_pixel_budget_is_read_from_the_headers_before_any_image_is_decoded(monkeypatch):
    decoded = []
    real = images._decode_bytes
    monkeypatch.setattr(images, "_decode_bytes", lambda raw: decoded.append(raw) or real(raw))
    # 20 images of 1000×1000 pixels, a few kB of PNG each: 20 M pixels, over a budget of 16 M
    with pytest.raises(InferenceError, match=r"at most 16000000 per request \(max_image_pixels\)") as err:
        asyncio.run(decode_images([_png(1000, 1000)] * 20, 16_000_000))
    assert err.value.status == 400 and not decoded  # refused from the headers alone


def test_images_within_the_budget_decode_off_the_event_loop(monkeypatch):
    threads = []
    real = images._decode_bytes
    monkeypatch.setattr(
        images, "_decode_bytes", lambda raw: threads.append(threading.current_thread()) or real(raw)
    )

    async def scenario():
        return threading.current_thread(), await decode_images(
            [_png(4, 3), [[0.0, 1.0], [0.5, 0.25]]], 10_000
        )

    loop_thread, out = asyncio.run(scenario())
    assert [a.shape for a in out] == [(3, 4), (2, 2)]
    np.testing.assert_allclose(out[1], [[0.0, 1.0], [0.5, 0.25]])
    assert threads and all(t is not loop_thread for t in threads)


def test_nested_lists_count_their_pixels_too():
    with pytest.raises(InferenceError, match="max_image_pixels"):
        asyncio.run(decode_images([np.zeros((100, 100)).tolist()] * 3, 25_000))
