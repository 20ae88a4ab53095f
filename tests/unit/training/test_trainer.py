import json

import pytest
import torch
from safetensors.torch import load_file

from kiln.artifacts import get_artifact, load_torch_model
from training.data import digits_splits, split_inputs
from training.recipes import RECIPES, get_recipe
from training.trainer import train


def test_splits_are_fixed_disjoint_and_stratified():
    a, b = digits_splits(), digits_splits()
    sizes = {k: len(v.labels) for k, v in a.items()}
    assert sum(sizes.values()) == 1797 and sizes["train"] > sizes["val"] > 0
    for k in a:
        assert (a[k].labels == b[k].labels).all() and (a[k].images == b[k].images).all()
    flat = {k: {img.tobytes() for img in v.images} for k, v in a.items()}
    assert not (flat["train"] & flat["test"]) or len(flat["train"] & flat["test"]) < 5  # digits has few dupes
    for k in a:
        assert set(a[k].labels.tolist()) == set(range(10))
    x, y = split_inputs("val", (32, 32))
    assert x.shape == (sizes["val"], 1, 32, 32) and x.min() >= 0 and x.max() <= 1


def test_unknown_recipe_lists_valid_ones():
    with pytest.raises(ValueError, match="vit-soft"):
        get_recipe("resnet")


@pytest.fixture(scope="module")
def trained():
    return train("vit-softmax", epochs=1, progress=False)


def test_train_saves_a_complete_artifact(trained):
    art = get_artifact(trained.artifact.tag)
    m = art.manifest
    assert m["architecture"] == RECIPES["vit-softmax"].architecture
    assert m["args"]["num_classes"] == 10 and m["preprocess"]["size"] == [32, 32]
    assert m["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 1, 32, 32]}
    assert m["metrics"]["val_accuracy"] == trained.metrics["val_accuracy"]
    assert (
        0 <= m["metrics"]["test_accuracy"] <= 1
        and m["training"]["seed"] == 0
        and m["training"]["epochs"] == 1
    )
    assert json.loads((art.path / "kiln.json").read_text())["code_version"].startswith("0.1.0")
    x, _ = split_inputs("test", (32, 32))
    assert load_torch_model(art)(torch.from_numpy(x[:4])).shape == (4, 10)


def test_same_seed_same_weights(trained):
    again = train("vit-softmax", epochs=1, progress=False)
    w1 = load_file(str(get_artifact(trained.artifact.tag).weights_path))
    w2 = load_file(str(get_artifact(again.artifact.tag).weights_path))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=0)


def test_rejects_zero_epochs():
    with pytest.raises(ValueError, match="epochs"):
        train("vit-softmax", epochs=0, progress=False)
