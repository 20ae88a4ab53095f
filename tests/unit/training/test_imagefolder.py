"""Training on a user's images: the ImageFolder loader (layout, resize, channels, the seeded split and its
record, every bad-data error naming its file or class), and the classifier, diffusion and embedding
trainers on a generated folder with tiny configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from imagefolders import make_folder
from PIL import Image
from typer.testing import CliRunner

from kiln.artifacts import get_artifact, load_torch_model
from kiln.cli import app
from training.data import image_data, recorded_image_data
from training.imagefolder import ImageFolderError, load_image_folder, reload_image_folder, scan
from training.recipes import RECIPES
from training.retrieval import TINY_RECIPES
from training.trainer import train


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("shapes"))


# ------------------------------------------------------------------------------------ the loader


def test_layout_labels_channels_and_resize(shapes):
    data = load_image_folder(shapes, (12, 12))
    assert data.classes == ["circle", "square", "triangle"] and data.channels == 3
    x, y = data.inputs["train"]
    assert x.shape[1:] == (3, 12, 12) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    # the red circles are red, the blue squares blue (RGB order kept through the resize)
    centre = x[:, :, 6, 6]
    assert (centre[y == 0, 0] > 0.8).all() and (centre[y == 1, 2] > 0.8).all()
    gray = load_image_folder(shapes, (8, 8), channels=1)
    assert gray.channels == 1 and gray.inputs["test"][0].shape[1:] == (1, 8, 8)


def test_grayscale_folder_has_one_channel(tmp_path):
    data = load_image_folder(make_folder(tmp_path, 3, ("circle", "square"), gray=True), (8, 8))
    assert data.channels == 1 and data.record["channels"] == 1


def test_split_is_seeded_stratified_and_recorded(shapes):
    a, b = load_image_folder(shapes, (8, 8)), load_image_folder(shapes, (8, 8))
    other = load_image_folder(shapes, (8, 8), seed=1)
    rec = a.record
    assert rec["files"] == b.record["files"] and rec["sha256"] == b.record["sha256"]
    assert rec["files"] != other.record["files"]
    assert rec["split_seed"] == 0 and rec["root"] == str(shapes.resolve())
    assert rec["sizes"] == {"train": 18, "val": 6, "test": 6}  # 10 a class: 15% (1.5 → 2) val and test
    files = [f for s in ("train", "val", "test") for f in rec["files"][s]]
    assert len(files) == len(set(files)) == 30
    for split in ("train", "val", "test"):
        assert set(a.inputs[split][1]) == {0, 1, 2}  # every class in every split
        for rel, label in zip(rec["files"][split], a.inputs[split][1], strict=True):
            assert rel.split("/")[0] == a.classes[label]
    again = reload_image_folder(rec, (8, 8))
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(again.inputs[split][0], a.inputs[split][0])
        np.testing.assert_array_equal(again.inputs[split][1], a.inputs[split][1])


def test_a_changed_folder_is_refused_on_reload(tmp_path):
    root = make_folder(tmp_path / "d", 3, ("circle", "square"))
    rec = load_image_folder(root, (8, 8)).record
    Image.new("RGB", (9, 9), (1, 2, 3)).save(root / rec["files"]["test"][0])
    with pytest.raises(ImageFolderError, match="changed since the model was trained"):
        reload_image_folder(rec, (8, 8))
    (root / rec["files"]["val"][0]).unlink()
    with pytest.raises(ImageFolderError, match=rec["files"]["val"][0]):
        reload_image_folder(rec, (8, 8))


def test_bad_data_names_the_file_or_class(tmp_path):
    with pytest.raises(ImageFolderError, match="is not a directory"):
        scan(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageFolderError, match="no class sub-folders"):
        scan(tmp_path / "empty")

    one = make_folder(tmp_path / "one", 3, ("circle",))
    with pytest.raises(ImageFolderError, match="one class only \\('circle'\\)"):
        scan(one)

    root = make_folder(tmp_path / "bad", 3, ("circle", "square"))
    (root / "triangle").mkdir()
    with pytest.raises(ImageFolderError, match="class 'triangle' .* has no PNG/JPEG images"):
        scan(root)
    (root / "triangle").rmdir()

    (root / "square" / "02.png").unlink()
    with pytest.raises(ImageFolderError, match=r"class 'square' has 2 image\(s\); each class needs"):
        scan(root)
    make_folder(root, 3, ("square",))

    (root / "circle" / "notes.txt").write_text("hi")
    with pytest.raises(ImageFolderError, match="notes.txt: not a PNG/JPEG file"):
        scan(root)
    (root / "circle" / "notes.txt").unlink()

    (root / "stray.png").write_bytes(b"")
    with pytest.raises(ImageFolderError, match="stray.png: images belong in one sub-folder per class"):
        scan(root)
    (root / "stray.png").unlink()

    (root / "square" / "01.png").write_bytes(b"not a png at all")
    with pytest.raises(ImageFolderError, match="square/01.png: not an image Pillow can read"):
        load_image_folder(root, (8, 8))
    good = (root / "circle" / "01.png").read_bytes()
    (root / "square" / "01.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ImageFolderError, match="square/01.png: truncated or corrupt"):
        load_image_folder(root, (8, 8), channels=3)


def test_recorded_data_of_a_digits_manifest_is_the_digits():
    digits = image_data("digits", (8, 8))
    assert digits.labels == [str(i) for i in range(10)] and digits.record["kind"] == "digits"
    np.testing.assert_array_equal(recorded_image_data({}, (8, 8)).inputs["val"][0], digits.inputs["val"][0])


# ---------------------------------------------------------------------------------- the trainers


def test_classifier_trains_on_the_folder(shapes):
    recipe = dataclasses.replace(RECIPES["vit-soft"], dataset=str(shapes), image_size=(16, 16))
    result = train("my-shapes-vit", epochs=2, progress=False, recipe=recipe)
    art = get_artifact(result.artifact.tag)
    m = art.manifest
    assert m["labels"] == ["circle", "square", "triangle"]
    assert m["args"]["num_classes"] == 3 and m["args"]["in_chans"] == 3 and m["args"]["img_size"] == 16
    assert m["inputs"][0]["shape"] == [-1, 3, 16, 16] and m["outputs"][0]["shape"] == [-1, 3]
    assert m["preprocess"]["kind"] == "rgb-image" and m["preprocess"]["channels"] == 3
    assert m["data"]["kind"] == "image-folder" and m["data"]["sizes"] == {"train": 18, "val": 6, "test": 6}
    assert m["training"]["dataset"] == str(shapes)
    assert 0.0 <= m["metrics"]["test_accuracy"] <= 1.0
    assert load_torch_model(art)(torch.zeros(1, 3, 16, 16)).shape == (1, 3)


def test_diffusion_trains_on_the_folder_in_grayscale(shapes):
    recipe = dataclasses.replace(
        RECIPES["diffusion-digits"],
        dataset=str(shapes),
        image_size=(8, 8),
        model_args={"block_out_channels": (8, 16), "norm_num_groups": 4, "attention_head_dim": 8},
    )
    art = get_artifact(train("my-shapes-diffusion", epochs=1, progress=False, recipe=recipe).artifact.tag)
    m = art.manifest
    assert m["labels"] == ["circle", "square", "triangle"] and m["null_label"] == 3
    assert m["args"]["num_classes"] == 3 and m["args"]["image_size"] == 8
    assert m["inputs"][0]["shape"] == [-1, 1, 8, 8] and m["data"]["channels"] == 1
    with pytest.raises(ValueError, match="1-channel"):
        train("my-shapes-diffusion", epochs=1, progress=False, recipe=dataclasses.replace(recipe, channels=3))


def test_embedding_trains_on_the_folder(tmp_path):
    root = make_folder(tmp_path / "d", 14, ("circle", "square"))
    recipe = dataclasses.replace(TINY_RECIPES["tiny-embed-new-independent"], dataset=str(root))
    art = get_artifact(train("my-shapes-embed", epochs=1, progress=False, recipe=recipe).artifact.tag)
    m = art.manifest
    assert m["labels"] == ["circle", "square"] and m["args"]["num_classes"] == 2
    assert m["data"]["sizes"] == {"train": 20, "val": 4, "test": 4}
    assert "val_self_top1" in m["metrics"]
    bct = dataclasses.replace(TINY_RECIPES["tiny-embed-new-bct"], dataset=str(root))
    with pytest.raises(ValueError, match="old / independent"):
        train("my-shapes-bct", epochs=1, progress=False, recipe=bct)
    few = make_folder(tmp_path / "few", 5, ("circle", "square"))
    with pytest.raises(ValueError, match="class 'circle' has 1 val-split image"):
        train("my-few", epochs=1, progress=False, recipe=dataclasses.replace(recipe, dataset=str(few)))


# ----------------------------------------------------------------------------------------- the CLI


def test_cli_refuses_data_without_a_new_name(shapes):
    runner = CliRunner()
    r = runner.invoke(app, ["train", "vit-soft", "--data", str(shapes)])
    assert r.exit_code == 1 and "--data needs --name" in r.output
    r = runner.invoke(app, ["train", "vit-soft", "--data", str(shapes), "--name", "vit-softmax"])
    assert r.exit_code == 1 and "never replaces a default one" in r.output
    r = runner.invoke(app, ["train", "vit-soft", "--data", str(shapes / "nope"), "--name", "mine"])
    assert r.exit_code == 1 and "nope is not a directory" in r.output
    r = runner.invoke(app, ["train", "vit-soft", "--channels", "3"])
    assert r.exit_code == 1 and "apply with --data" in r.output
