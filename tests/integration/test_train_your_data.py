"""Train on your own images, end to end as a user would: `kiln train vit-soft --data DIR --name my-model`
on a generated RGB ImageFolder, `kiln export my-model`, then a real `kiln serve` with KILN_MODELS naming
it (alone, to stay cheap): OIP metadata and infer over unmodified tritonclient (HTTP and gRPC) with the
classification extension answering the folder names, compared with onnxruntime in this process on the
artifact's graph, and /classify on a colour PNG.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from imagefolders import make_folder
from PIL import Image
from serverproc import start_server, stop_server

from export.sessions import open_session
from training.imagefolder import reload_image_folder

NAME = "my-model"
CLASSES = ["circle", "square", "triangle"]


def _kiln(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILN_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli", *args], env=env, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The user's flow: train on the folder, export, serve it by name."""
    home = tmp_path_factory.mktemp("train-your-data-home")
    data = make_folder(tmp_path_factory.mktemp("my-images"))
    r = _kiln(home, "train", "vit-soft", "--data", str(data), "--name", NAME, "--epochs", "2",
              "--image-size", "16")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"saved {NAME}:" in r.stdout
    r = _kiln(home, "export", NAME)
    assert r.returncode == 0, r.stderr[-3000:]
    model_dir = home / "bentoml" / "models" / NAME
    manifest = json.loads((model_dir / (model_dir / "latest").read_text().strip() / "kiln.json").read_text())
    srv = start_server(home, env={"KILN_MODELS": NAME})
    yield srv, manifest, model_dir, data
    stop_server(srv.process)


def test_the_trained_model_records_its_data_and_exports(served):
    _, manifest, _, data = served
    assert manifest["name"] == NAME and manifest["labels"] == CLASSES
    assert manifest["inputs"][0]["shape"] == [-1, 3, 16, 16]
    rec = manifest["data"]
    assert rec["kind"] == "image-folder" and rec["root"] == str(data.resolve()) and rec["split_seed"] == 0
    assert rec["sizes"] == {"train": 18, "val": 6, "test": 6} and len(rec["sha256"]) == 64
    onnx, int8 = manifest["exports"]["onnx"], manifest["exports"]["int8-static"]
    assert onnx["max_abs_diff"] <= onnx["atol"] and onnx["parity_inputs"] == "6 validation-split images"
    assert 0.0 <= onnx["test_accuracy"] <= 1.0  # on its own test split (6 images), not the digits'
    assert int8["gate"]["checks"][0]["metric"] == "val_accuracy" and "passed" in int8["gate"]


def test_oip_classification_extension_answers_folder_names(served):
    srv, manifest, model_dir, _ = served
    x = reload_image_folder(manifest["data"], (16, 16)).inputs["test"][0]  # the recorded test split
    version_dir = model_dir / (model_dir / "latest").read_text().strip()
    sess = open_session(version_dir / manifest["exports"]["onnx"]["file"])
    logits = sess.run(None, {"input": x})[0]
    expected = [CLASSES[i] for i in logits.argmax(-1)]

    http = thttp.InferenceServerClient(srv.http.removeprefix("http://"))
    meta = http.get_model_metadata(NAME)
    assert meta["inputs"][0]["shape"] == [-1, 3, 16, 16]
    inp = thttp.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out = thttp.InferRequestedOutput("logits", class_count=1)
    rows = http.infer(NAME, [inp], outputs=[out]).as_numpy("logits")
    got = [row[0].decode().split(":")[2] for row in rows]
    assert got == expected and set(got) <= set(CLASSES)
    scores = [float(row[0].decode().split(":")[0]) for row in rows]
    np.testing.assert_allclose(scores, logits.max(-1), rtol=1e-4, atol=1e-4)

    grpc = tgrpc.InferenceServerClient(srv.grpc)
    ginp = tgrpc.InferInput("input", list(x.shape), "FP32")
    ginp.set_data_from_numpy(x)
    gout = tgrpc.InferRequestedOutput("logits", class_count=3)
    grows = grpc.infer(NAME, [ginp], outputs=[gout]).as_numpy("logits")
    assert [r[0].decode().split(":")[2] for r in grows] == expected
    assert all({v.decode().split(":")[2] for v in r} == set(CLASSES) for r in grows)


def test_classify_route_takes_a_colour_png(served):
    srv, manifest, _, data = served
    path = data / manifest["data"]["files"]["test"][0]
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="PNG")
    body = {"image": base64.b64encode(buf.getvalue()).decode(), "model": NAME}
    r = httpx.post(f"{srv.http}/classify", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == NAME and out["label"] in CLASSES and set(out["probabilities"]) == set(CLASSES)
    bad = httpx.post(f"{srv.http}/classify", json={"image": [[0.5] * 4] * 4, "model": NAME}, timeout=60)
    assert bad.status_code == 400 and "3×H×W" in bad.text
