"""Generated ImageFolder directories for the tests of training on a user's images (unit and integration)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"circle": (230, 40, 40), "square": (40, 60, 230), "triangle": (40, 200, 60)}


def make_folder(root: Path, per_class: int = 10, classes=tuple(COLOURS), gray: bool = False) -> Path:
    """Coloured shapes, one class a shape, on black: RGB PNGs of different sizes and one JPEG a class."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(20, 48, size=2))
            im = Image.new("RGB", (w, h))
            d, box = ImageDraw.Draw(im), (3, 3, w - 3, h - 3)
            colour = COLOURS[name]
            if name == "circle":
                d.ellipse(box, fill=colour)
            elif name == "square":
                d.rectangle(box, fill=colour)
            else:
                d.polygon([(w // 2, 3), (3, h - 3), (w - 3, h - 3)], fill=colour)
            if gray:
                im = im.convert("L")
            im.save(root / name / (f"{i:02d}.jpg" if i == 0 else f"{i:02d}.png"))
    return root
