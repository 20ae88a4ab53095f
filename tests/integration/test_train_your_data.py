"""Train on your own images, end to end as the README's "Train on your own images" section runs it (its
blocks as written, in a scratch directory with its own store): make the demo RGB folder, `kiln train
vit-soft --data my-images --name my-model`, `kiln export my-model`, then a real `kiln serve` with
KILN_MODELS naming it — alone, to stay cheap (the README's line names defaults beside it, which a fresh
store would spend minutes training; the line is checked to name my-model). Then the README's requests,
and OIP metadata and infer over unmodified tritonclient (HTTP and gRPC) with the classification extension
answering the folder names, compared with onnxruntime in this process on the artifact's graph.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from serverproc import start_server, stop_server

from export.sessions import open_session
from training.imagefolder import reload_image_folder

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Train on your own images"
NAME = "my-model"
CLASSES = ["circle", "square", "triangle"]


def _blocks(lang: str) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    start = readme.index(SECTION)
    end = readme.index("\n## ", start)
    return re.findall(rf"```{lang}\n(.*?)```", readme[start:end], flags=re.S)


def _rewrite(code: str, srv) -> str:
    return code.replace("localhost:3000", srv.http_hostport)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The README's flow: the demo folder, train, export; then `kiln serve` with KILN_MODELS=my-model."""
    work = tmp_path_factory.mktemp("train-your-data")
    home = work / "home"
    env = {
        **os.environ,
        "KILN_HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    train, serve, *_ = _blocks("bash")
    r = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", train],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=work,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"saved {NAME}:" in r.stdout
    assert re.fullmatch(rf"KILN_MODELS=\S*\b{NAME}\b\S* kiln serve\n", serve)
    model_dir = home / "bentoml" / "models" / NAME
    version_dir = model_dir / (model_dir / "latest").read_text().strip()
    manifest = json.loads((version_dir / "kiln.json").read_text())
    srv = start_server(home, env={"KILN_MODELS": NAME})
    yield srv, manifest, version_dir, work
    stop_server(srv.process)


def test_the_trained_model_records_its_data_and_exports(served):
    _, manifest, _, work = served
    assert manifest["name"] == NAME and manifest["labels"] == CLASSES
    assert manifest["inputs"][0]["shape"] == [-1, 3, 32, 32]
    rec = manifest["data"]
    assert rec["kind"] == "image-folder" and rec["root"] == str((work / "my-images").resolve())
    assert rec["split_seed"] == 0 and rec["sizes"] == {"train": 18, "val": 6, "test": 6}
    assert len(rec["sha256"]) == 64
    onnx, int8 = manifest["exports"]["onnx"], manifest["exports"]["int8-static"]
    assert onnx["max_abs_diff"] <= onnx["atol"] and onnx["parity_inputs"] == "6 validation-split images"
    assert 0.0 <= onnx["test_accuracy"] <= 1.0  # on its own test split (6 images), not the digits'
    assert int8["gate"]["checks"][0]["metric"] == "val_accuracy" and "passed" in int8["gate"]


def test_readme_requests_answer_folder_names(served):
    srv, _, _, work = served
    _, _, curl, *more = _blocks("bash")
    (client,) = _blocks("python")
    r = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", _rewrite(curl, srv)], capture_output=True, text=True, timeout=120,
        cwd=work,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == NAME and out["label"] == "square" and set(out["probabilities"]) == set(CLASSES)
    r = subprocess.run(
        [sys.executable, "-c", _rewrite(client, srv)], capture_output=True, text=True, timeout=120, cwd=work
    )
    assert r.returncode == 0, r.stderr
    assert ":1:square" in r.stdout, r.stdout
    assert all(line.startswith("kiln train ") for block in more for line in block.strip().splitlines())


def test_oip_classification_extension_answers_folder_names(served):
    srv, manifest, version_dir, _ = served
    x = reload_image_folder(manifest["data"], (32, 32)).inputs["test"][0]  # the recorded test split
    sess = open_session(version_dir / manifest["exports"]["onnx"]["file"])
    logits = sess.run(None, {"input": x})[0]
    expected = [CLASSES[i] for i in logits.argmax(-1)]

    http = thttp.InferenceServerClient(srv.http_hostport)
    assert http.get_model_metadata(NAME)["inputs"][0]["shape"] == [-1, 3, 32, 32]
    inp = thttp.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out = thttp.InferRequestedOutput("logits", class_count=1)
    rows = http.infer(NAME, [inp], outputs=[out]).as_numpy("logits")
    assert [row[0].decode().split(":")[2] for row in rows] == expected
    scores = [float(row[0].decode().split(":")[0]) for row in rows]
    np.testing.assert_allclose(scores, logits.max(-1), rtol=1e-4, atol=1e-4)

    grpc = tgrpc.InferenceServerClient(srv.grpc)
    ginp = tgrpc.InferInput("input", list(x.shape), "FP32")
    ginp.set_data_from_numpy(x)
    gout = tgrpc.InferRequestedOutput("logits", class_count=3)
    grows = grpc.infer(NAME, [ginp], outputs=[gout]).as_numpy("logits")
    assert [r[0].decode().split(":")[2] for r in grows] == expected
    assert all({v.decode().split(":")[2] for v in r} == set(CLASSES) for r in grows)


def test_a_grayscale_list_is_refused_by_an_rgb_model(served):
    srv = served[0]
    bad = httpx.post(f"{srv.http}/classify", json={"image": [[0.5] * 4] * 4, "model": NAME}, timeout=60)
    assert bad.status_code == 400 and "3×H×W" in bad.text
    assert httpx.get(f"{srv.http}/v2/models/{NAME}/ready", timeout=10).status_code == 200
