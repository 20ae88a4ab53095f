import json

import pytest
import torch
from safetensors.torch import save_file

from kiln.artifacts import (
    ArtifactError,
    delete_artifact,
    get_artifact,
    list_artifacts,
    load_torch_model,
    save_artifact,
)
from model_zoo import create_model


@pytest.fixture
def weights(tmp_path):
    model = create_model("vit_softmax_tiny")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def _manifest(model):
    return {**model.kiln_config, "task": "image-classification", "metrics": {"test_accuracy": 0.5}}


def test_save_get_rebuild_roundtrip(weights):
    model, path = weights
    art = save_artifact("unit-roundtrip", path, _manifest(model))
    again = get_artifact(art.tag)
    assert again.manifest["architecture"] == "vit_softmax_tiny"
    assert again.manifest["code_version"].startswith("0.1.0")
    rebuilt = load_torch_model(again)
    x = torch.rand(2, 1, 32, 32)
    model.eval()
    torch.testing.assert_close(rebuilt(x), model(x))
    assert get_artifact("unit-roundtrip").version == art.version  # NAME alone = latest
    assert art.tag in [a.tag for a in list_artifacts()]


def test_update_is_merged_and_persisted(weights):
    model, path = weights
    art = save_artifact("unit-update", path, _manifest(model))
    art.update(exports={"onnx": {"file": "model.onnx"}})
    art.update(exports={"int8-static": {"file": "model.int8.onnx"}})
    on_disk = json.loads((art.path / "kiln.json").read_text())
    assert set(on_disk["exports"]) == {"onnx", "int8-static"}


def test_unknown_tag_names_what_exists(weights):
    model, path = weights
    save_artifact("unit-known", path, _manifest(model))
    with pytest.raises(ArtifactError, match="unit-known"):
        get_artifact("no-such-model")


def test_refuses_non_safetensors_weights(tmp_path, weights):
    model, _ = weights
    bad = tmp_path / "w.pt"
    torch.save(model.state_dict(), bad)  # a pickle
    with pytest.raises(ArtifactError, match="not a safetensors file"):
        save_artifact("unit-bad", bad, _manifest(model))


def test_refuses_artifact_with_pickle_files(weights):
    model, path = weights
    art = save_artifact("unit-pickle", path, _manifest(model))
    (art.path / "extra.pkl").write_bytes(b"\x80\x04.")
    with pytest.raises(ArtifactError, match="pickle"):
        get_artifact(art.tag)


def test_path_escape_refused(weights):
    model, path = weights
    art = save_artifact("unit-escape", path, _manifest(model))
    with pytest.raises(ArtifactError, match="escapes"):
        art.file("../../etc/passwd")


def test_delete(weights):
    model, path = weights
    art = save_artifact("unit-delete", path, _manifest(model))
    delete_artifact(art.tag)
    with pytest.raises(ArtifactError):
        get_artifact(art.tag)
