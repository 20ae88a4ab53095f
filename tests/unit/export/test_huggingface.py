"""``kiln import``'s task detection, its offline-only refusal of hub ids, and the parity gate that
discards a drifted graph (export.huggingface), on tiny random models saved in the test."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from hfmodels import bert_classifier, bert_feature_extractor, sentence_transformer, vit_classifier
from onnx import TensorProto, helper

from export import huggingface as hf
from kiln.artifacts import list_artifacts


def _stored() -> set[str]:
    return {a.name for a in list_artifacts()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "st": sentence_transformer(root / "st"),
        "fx": bert_feature_extractor(root / "fx"),
        "clf": bert_classifier(root / "clf"),
        "vit": vit_classifier(root / "vit"),
    }


def test_task_is_detected_from_the_model_config(models, tmp_path):
    assert hf.detect_task(models["st"]) == ("embedding", "sentence-transformers")
    assert hf.detect_task(models["fx"]) == ("embedding", "transformers")
    assert hf.detect_task(models["clf"]) == ("text-classification", "transformers")
    assert hf.detect_task(models["vit"]) == ("image-classification", "transformers")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    assert hf.detect_task(tmp_path / "m.onnx") == ("onnx", "onnx")


def test_unsupported_directories_are_refused_with_the_reason(models, tmp_path):
    with pytest.raises(hf.ImportError_, match="not a save_pretrained directory"):
        hf.detect_task(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(hf.ImportError_, match="GPT2LMHeadModel"):
        hf.detect_task(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(hf.ImportError_, match="not an .onnx graph"):
        hf.detect_task(tmp_path / "weights.bin")
    with pytest.raises(hf.ImportError_, match="cannot be imported as text-classification"):
        hf.import_model(models["vit"], "vit", task="text-classification")
    with pytest.raises(hf.ImportError_, match="unknown task 'translation'"):
        hf.import_model(models["vit"], "vit", task="translation")
    with pytest.raises(hf.ImportError_, match="classifiers only"):
        hf.import_model(models["st"], "st", eval_data=tmp_path / "eval.jsonl")


def test_a_hub_id_is_refused_with_how_to_save_the_model_locally(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no such directory here
    with pytest.raises(hf.ImportError_) as err:
        hf.import_model("sentence-transformers/all-MiniLM-L6-v2", "minilm")
    message = str(err.value)
    assert "local directories only" in message and "never downloads" in message
    assert "save_pretrained" in message
    assert "minilm" not in _stored()


def test_parity_gate_verdicts():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 8))
    assert hf.parity_gate("embedding", ref * 3.0, ref)["passed"]  # cosine ignores scale
    drifted = hf.parity_gate("embedding", ref + rng.standard_normal((4, 8)) * 0.5, ref)
    assert not drifted["passed"] and "min cosine" in drifted["reason"]
    assert not hf.parity_gate("embedding", np.full((4, 8), np.nan), ref)["passed"]
    assert hf.parity_gate("text-classification", ref + 1e-5, ref)["passed"]
    logits = hf.parity_gate("text-classification", ref + 0.01, ref)
    assert not logits["passed"] and "logits" in logits["reason"]
    assert not hf.parity_gate("text-classification", ref[:, :4], ref)["passed"]


def test_the_parity_gate_discards_a_drifted_graph_and_stores_nothing(models, monkeypatch):
    import torch

    class Drift(torch.nn.Module):  # the exported graph adds a bias the original does not have
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            out = self.inner(input_ids, attention_mask, token_type_ids)
            return out + torch.linspace(-1.0, 1.0, out.shape[-1])

    monkeypatch.setattr(hf, "_wrap", Drift)
    with pytest.raises(hf.ImportError_, match=r"parity gate: .*discarded.*min cosine"):
        hf.import_model(models["fx"], "drifted")
    assert "drifted" not in _stored()


def test_an_import_records_the_graph_tokenizer_pooling_and_parity(models):
    art = hf.import_model(models["st"], "tiny-st")
    m = art.manifest
    assert m["task"] == "embedding" and m["source"]["kind"] == "sentence-transformers"
    assert m["embedding"] == {"modality": "text", "dim": 32, "pooling": "mean", "normalize": True}
    parity = m["exports"]["onnx"]["parity"]
    assert parity["passed"] and parity["min_cosine"] >= hf.MIN_COSINE
    assert m["text"]["max_length"] == 32 and m["text"]["inputs"][:2] == ["input_ids", "attention_mask"]
    assert art.file("model.onnx").is_file() and art.file("tokenizer.json").is_file()
    assert art.file("source/modules.json").is_file() and art.file("source/1_Pooling/config.json").is_file()


def test_a_transformers_feature_extractor_is_imported_mean_pooled(models):
    art = hf.import_model(models["fx"], "tiny-fx")
    m = art.manifest
    assert m["task"] == "embedding" and m["source"] == {
        "path": str(models["fx"].resolve()),
        "kind": "transformers",
        "architecture": "BertModel",
    }
    assert m["embedding"]["pooling"] == "mean" and m["embedding"]["normalize"] is False
    assert m["exports"]["onnx"]["parity"]["min_cosine"] >= hf.MIN_COSINE
