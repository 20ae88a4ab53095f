"""A user's images in the ImageFolder layout: ``DIR/<class>/<image>.png|jpg``, split once with a seed.

The layout is torchvision's ``ImageFolder`` (one sub-folder per class, the folder names are the labels,
sorted), read with Pillow alone: torchvision is not a Kiln dependency (it is pinned to one torch build,
and the CPU wheel set Kiln installs has no use for the rest of it), and its ``ImageFolder`` has no
split to record. Images may be PNG or JPEG, grayscale or colour, of any size; each is resized on its own
to the recipe's image size with :func:`kiln.imaging.resize_bilinear`, the arithmetic serving uses.

The split is per class (stratified): ``VAL_FRACTION`` and ``TEST_FRACTION`` of each class's images,
at least one each, chosen by a seeded permutation of the class's sorted file names. The manifest records
the root, seed, fractions, sizes, every split's file list and a SHA-256 over the files' names and bytes,
so an export re-reads exactly the images the model was trained and tested on, and refuses a folder that
has changed since.

Bad data stops with :class:`ImageFolderError` naming the file or class: no class folders, one class
only, an empty class, a class with fewer images than the three splits, an image Pillow cannot read, a
file that is not PNG/JPEG.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.imaging import resize_bilinear

EXTENSIONS = (".png", ".jpg", ".jpeg")
_FORMATS = ("PNG", "JPEG")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
VAL_FRACTION = 0.15
TEST_FRACTION = 0.15
SPLITS = ("train", "val", "test")


class ImageFolderError(ValueError):
    """The folder is not a usable ImageFolder; the message names the file or class."""


@dataclass(frozen=True)
class ImageFolder:
    """The loaded splits: ``inputs[split] = (images (N, C, h, w) float32 in [0, 1], labels (N,) int64)``."""

    inputs: dict[str, tuple[np.ndarray, np.ndarray]]
    classes: list[str]
    channels: int
    record: dict[str, Any]  # the manifest's ``data`` block


def scan(root: str | Path) -> dict[str, list[Path]]:
    """Class name → its image files (sorted), after checking the layout."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ImageFolderError(f"{root} is not a directory (the layout is DIR/<class>/<image>.png|jpg)")
    classes: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            raise ImageFolderError(
                f"{entry}: images belong in one sub-folder per class (DIR/<class>/{entry.name})"
            )
        files = []
        for f in sorted(entry.rglob("*")):
            if f.name.startswith(".") or not f.is_file():
                continue
            if f.suffix.lower() not in EXTENSIONS:
                raise ImageFolderError(f"{f}: not a PNG/JPEG file (accepted: {', '.join(EXTENSIONS)})")
            files.append(f)
        classes[entry.name] = files
    if not classes:
        raise ImageFolderError(f"{root} has no class sub-folders (the layout is DIR/<class>/<image>.png|jpg)")
    empty = [c for c, files in classes.items() if not files]
    if empty:
        raise ImageFolderError(f"class {empty[0]!r} ({root / empty[0]}) has no PNG/JPEG images")
    if len(classes) < 2:
        raise ImageFolderError(f"{root} has one class only ({next(iter(classes))!r}); a classifier needs two")
    few = [c for c, files in classes.items() if len(files) < len(SPLITS)]
    if few:
        raise ImageFolderError(
            f"class {few[0]!r} has {len(classes[few[0]])} image(s); each class needs at least "
            f"{len(SPLITS)} (one each for the train, validation and test splits)"
        )
    return classes


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(path, formats=_FORMATS)
        im.load()
        return im
    except UnidentifiedImageError:
        raise ImageFolderError(f"{path}: not an image Pillow can read as PNG/JPEG") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageFolderError(f"{path}: truncated or corrupt image ({exc})") from None


def data_channels(files: list[Path]) -> int:
    """1 when every image is grayscale, else 3 (read from the headers only)."""
    from PIL import Image, UnidentifiedImageError

    for path in files:
        try:
            with Image.open(path, formats=_FORMATS) as im:
                if im.mode not in _GRAY_MODES:
                    return 3
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ImageFolderError(f"{path}: not an image Pillow can read as PNG/JPEG ({exc})") from None
    return 1


def load_image(path: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One image → ``(channels, h, w)`` float32 in [0, 1], resized bilinearly (half-pixel centres)."""
    im = _open(path)
    with im:
        if im.mode in ("I", "I;16", "F"):  # 16-bit / float grayscale: scale by the type's range
            arr = np.asarray(im, dtype=np.float32)
            arr = arr / (65535.0 if arr.max() > 255 else 255.0)
            arr = arr[None] if channels == 1 else np.repeat(arr[None], 3, axis=0)
        else:
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
            arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return resize_bilinear(np.clip(arr, 0.0, 1.0), size)


def _digest(root: Path, files: dict[str, list[str]]) -> str:
    h = hashlib.sha256()
    for split in SPLITS:
        for rel in files[split]:
            h.update(f"{split}/{rel}\0".encode())
            h.update((root / rel).read_bytes())
    return h.hexdigest()


def _load(
    root: Path, files: dict[str, list[str]], labels: dict[str, list[int]], channels: int,
    size: tuple[int, int], progress: bool,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    from tqdm.auto import tqdm

    total = sum(len(v) for v in files.values())
    bar = tqdm(total=total, desc=f"load {root.name}", unit="img", disable=not progress)
    out = {}
    for split in SPLITS:
        images = []
        for rel in files[split]:
            images.append(load_image(root / rel, channels, size))
            bar.update()
        out[split] = (np.stack(images).astype(np.float32), np.asarray(labels[split], dtype=np.int64))
    bar.close()
    return out


def load_image_folder(
    root: str | Path,
    image_size: tuple[int, int],
    *,
    channels: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> ImageFolder:
    """Scan, split (seeded, per class) and load ``root``; ``channels`` None = from the data (1 or 3)."""
    root = Path(root).expanduser().resolve()
    classes = scan(root)
    if channels is None:
        channels = data_channels([f for files in classes.values() for f in files])
    if channels not in (1, 3):
        raise ImageFolderError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    rng = np.random.default_rng(seed)
    files: dict[str, list[str]] = {s: [] for s in SPLITS}
    labels: dict[str, list[int]] = {s: [] for s in SPLITS}
    for index, paths in enumerate(classes.values()):
        n = len(paths)
        n_val = max(1, round(n * VAL_FRACTION))
        n_test = max(1, round(n * TEST_FRACTION))
        order = rng.permutation(n)
        parts = {
            "val": order[:n_val],
            "test": order[n_val : n_val + n_test],
            "train": order[n_val + n_test :],
        }
        for split, idx in parts.items():
            for i in sorted(idx):
                files[split].append(paths[i].relative_to(root).as_posix())
                labels[split].append(index)
    inputs = _load(root, files, labels, channels, tuple(image_size), progress)
    record = {
        "kind": "image-folder",
        "root": str(root),
        "classes": list(classes),
        "channels": channels,
        "split_seed": seed,
        "fractions": {"val": VAL_FRACTION, "test": TEST_FRACTION},
        "sizes": {s: len(files[s]) for s in SPLITS},
        "files": files,
        "sha256": _digest(root, files),
    }
    return ImageFolder(inputs, list(classes), channels, record)


def reload_image_folder(record: dict[str, Any], image_size: tuple[int, int]) -> ImageFolder:
    """The splits a manifest recorded, re-read from its folder; refuses a folder that has changed."""
    root = Path(record["root"])
    files = record["files"]
    missing = [rel for split in SPLITS for rel in files[split] if not (root / rel).is_file()]
    if missing:
        raise ImageFolderError(
            f"{root / missing[0]} was used in training but is gone; the splits can't be rebuilt"
        )
    if _digest(root, files) != record["sha256"]:
        raise ImageFolderError(
            f"the images in {root} changed since the model was trained (SHA-256 of its split files differs)"
        )
    index = {name: i for i, name in enumerate(record["classes"])}
    labels = {s: [index[Path(rel).parts[0]] for rel in files[s]] for s in SPLITS}
    inputs = _load(root, files, labels, record["channels"], tuple(image_size), progress=False)
    return ImageFolder(inputs, list(record["classes"]), record["channels"], record)
