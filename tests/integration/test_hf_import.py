"""Models imported with ``kiln import`` and served by a real ``kiln serve``: a tiny sentence-transformers
model (Pooling + Normalize), a BERT sequence classifier, a ViT image classifier (all randomly initialised
and saved with ``save_pretrained`` here) and a plain ONNX file. Called with the ``openai`` client,
unmodified ``tritonclient.http`` and the task routes; outputs compared with sentence-transformers /
transformers / onnxruntime in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hfmodels import bert_classifier, sentence_transformer, vit_classifier
from onnx import TensorProto, helper
from serverproc import start_server, stop_server

TEXTS = ["the cat sat on the mat", "hello world", "a very good movie", "kiln is not slow"]
WRITER = "hf-import-writer"
MODELS = "hf-st,hf-clf,hf-vit,plain-onnx"


def _kiln_import(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILN_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli", "import", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _relu_graph(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-models")
    home = tmp_path_factory.mktemp("hf-home")
    paths = {
        "st": sentence_transformer(root / "st"),
        "clf": bert_classifier(root / "clf"),
        "vit": vit_classifier(root / "vit"),
        "onnx": _relu_graph(root / "relu.onnx"),
    }
    eval_data = root / "eval.jsonl"
    eval_data.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(TEXTS)))
    for name, args in {
        "hf-st": [str(paths["st"])],
        "hf-clf": [str(paths["clf"]), "--eval-data", str(eval_data)],
        "hf-vit": [str(paths["vit"]), "--task", "image-classification"],
        "plain-onnx": [str(paths["onnx"])],
    }.items():
        done = _kiln_import(home, *args, "--name", name)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"stored {name}:" in done.stdout
    return home, paths


@pytest.fixture(scope="module")
def served(imported):
    home, paths = imported
    srv = start_server(
        home, timeout=600, env={"KILN_MODELS": MODELS, "KILN_DEMO_GALLERIES": "", "KILN_WRITE_TOKEN": WRITER}
    )
    yield srv, paths, home
    stop_server(srv.process)


def _cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_a_hub_id_is_refused_by_the_cli(tmp_path):
    done = _kiln_import(tmp_path, "sentence-transformers/all-MiniLM-L6-v2", "--name", "minilm")
    assert done.returncode == 1
    assert "local directories only" in done.stderr and "save_pretrained" in done.stderr


def test_imports_are_recorded_with_parity_and_accuracy(imported):
    home, _ = imported
    env = {**os.environ, "KILN_HOME": str(home)}
    show = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "models", "show", "hf-clf"],
        env=env,
        capture_output=True,
        text=True,
    )
    manifest = json.loads(show.stdout)
    assert manifest["exports"]["onnx"]["parity"]["passed"] is True
    metrics = manifest["metrics"]
    assert metrics["eval_samples"] == len(TEXTS)
    assert metrics["eval_accuracy"] == metrics["eval_accuracy_original"]  # same argmax as transformers


def test_openai_embeddings_match_sentence_transformers(served):
    from openai import OpenAI
    from sentence_transformers import SentenceTransformer

    srv, paths, _ = served
    client = OpenAI(base_url=f"{srv.http}/v1", api_key="unused")
    got = client.embeddings.create(model="hf-st", input=TEXTS)
    vectors = np.array([d.embedding for d in got.data])
    expected = SentenceTransformer(str(paths["st"]), device="cpu").encode(TEXTS)
    assert vectors.shape == expected.shape == (len(TEXTS), 32)
    assert _cosine(vectors, expected).min() >= 0.999
    listed = {m.id for m in client.models.list().data}
    assert "hf-st" in listed

    embed = httpx.post(f"{srv.http}/embed", json={"model": "hf-st", "texts": TEXTS[:2]}, timeout=60).json()
    assert _cosine(embed["vectors"], expected[:2]).min() >= 0.999


def test_an_imported_embedder_indexes_a_gallery(served):
    srv, _, _ = served
    auth = {"Authorization": f"Bearer {WRITER}"}  # gallery create and upsert need the write scope
    post = lambda path, body: httpx.post(f"{srv.http}{path}", json=body, timeout=120, headers=auth)  # noqa: E731
    assert post("/galleries/texts", {"model": "hf-st"}).status_code == 200
    items = [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)]
    assert post("/galleries/texts/items", {"items": items}).status_code == 200
    hits = post("/galleries/texts/search", {"text": TEXTS[2], "k": 2}).json()["results"]
    assert hits[0]["id"] == "t2"


def test_text_classifier_over_oip_bytes_and_the_task_route(served):
    import tritonclient.http as triton
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    srv, paths, _ = served
    model = AutoModelForSequenceClassification.from_pretrained(str(paths["clf"])).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(paths["clf"]))
    import torch

    with torch.no_grad():
        expected = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits.numpy()

    client = triton.InferenceServerClient(srv.http_hostport)
    meta = client.get_model_metadata("hf-clf")
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    text = triton.InferInput("text", [len(TEXTS)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
    result = client.infer("hf-clf", [text])
    np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-4)
    top = client.infer("hf-clf", [text], outputs=[triton.InferRequestedOutput("logits", class_count=1)])
    names = [s.decode().split(":")[2] for s in top.as_numpy("logits").reshape(-1)]
    assert names == [model.config.id2label[int(i)] for i in expected.argmax(1)]

    r = httpx.post(f"{srv.http}/classify-text", json={"model": "hf-clf", "text": TEXTS[0]}, timeout=60)
    assert r.status_code == 200, r.text
    probs = np.exp(expected[0]) / np.exp(expected[0]).sum()
    assert r.json()["probabilities"] == pytest.approx(
        dict(zip(["negative", "positive"], probs, strict=True)), abs=1e-4
    )
    bad = httpx.post(f"{srv.http}/classify-text", json={"model": "hf-clf", "text": "  "}, timeout=60)
    assert bad.status_code == 400 and "empty" in bad.text
    wrong = httpx.post(f"{srv.http}/classify-text", json={"model": "hf-st", "text": "x"}, timeout=60)
    assert wrong.status_code == 400


def test_image_classifier_on_classify_matches_transformers(served):
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    srv, paths, _ = served
    model = AutoModelForImageClassification.from_pretrained(str(paths["vit"])).eval()
    processor = AutoImageProcessor.from_pretrained(str(paths["vit"]))
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        logits = model(**processor(images=[Image.fromarray(pixels)], return_tensors="pt")).logits[0].numpy()
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    r = httpx.post(
        f"{srv.http}/classify", json={"model": "hf-vit", "image": (pixels / 255.0).tolist()}, timeout=60
    )
    assert r.status_code == 200, r.text
    got = r.json()["probabilities"]
    assert list(got) == ["red", "green", "blue"]
    np.testing.assert_allclose(list(got.values()), expected, atol=1e-4)
    assert r.json()["label"] == ["red", "green", "blue"][int(expected.argmax())]


def test_an_imported_onnx_file_serves_as_a_generic_model(served):
    import tritonclient.http as triton

    srv, paths, _ = served
    client = triton.InferenceServerClient(srv.http_hostport)
    config = client.get_model_config("plain-onnx")
    assert config["max_batch_size"] > 0 and config["input"][0]["name"] == "x"
    x = np.array([[-1.0, 0.5, 2.0], [3.0, -4.0, 0.0]], dtype=np.float32)
    inp = triton.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    expected = ort.InferenceSession(str(paths["onnx"])).run(None, {"x": x})[0]
    np.testing.assert_array_equal(client.infer("plain-onnx", [inp]).as_numpy("y"), expected)
