"""A real `kiln serve` process (BentoML HTTP + gRPC), driven by unmodified third-party OIP clients.

Served outputs are compared with onnxruntime run in this process on the same artifact's graph.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from PIL import Image
from serverproc import MAX_REQUEST_BYTES, metric_total
from tritonclient.utils import InferenceServerException

from kiln.artifacts import get_artifact
from kiln.imaging import to_model_input
from training.data import digits_splits

MODELS = ("vit-soft", "vit-softmax")


@pytest.fixture(scope="module")
def digits():
    s = digits_splits()["test"]
    return s.images[:8], s.labels[:8]


@pytest.fixture(scope="module")
def reference(server):
    """In-process onnxruntime sessions on each served artifact's fp32 graph."""
    out = {}
    for name in MODELS:
        art = get_artifact(name)
        out[name] = (
            art,
            ort.InferenceSession(
                str(art.file(art.export("onnx")["file"])), providers=["CPUExecutionProvider"]
            ),
        )
    return out


def _x(n=2, seed=0):
    return np.random.default_rng(seed).random((n, 1, 32, 32), dtype=np.float32)


def _assert_still_serving(server):
    r = httpx.post(f"{server.http}/v2/models/vit-soft/infer", json=_json_request(_x(1)), timeout=30)
    assert r.status_code == 200, r.text


def _json_request(x, name="input", datatype="FP32"):
    return {
        "inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}]
    }


# --- task endpoint --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_classify_nested_list_matches_in_process_onnxruntime(server, reference, digits, model):
    images, _ = digits
    art, sess = reference[model]
    r = httpx.post(f"{server.http}/classify", json={"image": images[0].tolist(), "model": model}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == model and body["version"] == art.version and body["backend"] == "onnxruntime"
    logits = sess.run(None, {"input": to_model_input(images[:1], (32, 32))})[0][0]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    served = np.array([body["probabilities"][str(i)] for i in range(10)])
    np.testing.assert_allclose(served, probs, atol=1e-5)
    assert body["label"] == str(int(probs.argmax()))


def test_classify_base64_png(server, digits):
    images, _ = digits
    png = io.BytesIO()
    Image.fromarray((images[0] * 255).round().astype(np.uint8), mode="L").save(png, format="PNG")
    r = httpx.post(
        f"{server.http}/classify", json={"image": base64.b64encode(png.getvalue()).decode()}, timeout=30
    )
    assert r.status_code == 200, r.text
    listed = httpx.post(f"{server.http}/classify", json={"image": images[0].tolist()}, timeout=30).json()
    assert r.json()["label"] == listed["label"]  # 8-bit PNG rounding does not change the answer


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        ({"image": [[0.1, "x"]]}, 400, "nested list"),
        ({"image": [[0.1, 2.0]]}, 400, r"\[0, 1\]"),
        ({"image": [[[[0.1]]]]}, 400, "2-D"),
        ({"image": "not base64!"}, 400, "base64"),
        ({"image": base64.b64encode(b"hello").decode()}, 400, "PNG"),
        ({"image": [[0.1]], "model": "nope"}, 404, "unknown model 'nope'"),
        ({"image": [[0.1]], "version": "nope"}, 404, "no version 'nope'"),
        ({"image": [[0.1]], "backend": "tensorflow"}, 400, "no backend 'tensorflow'"),
        ({"imag": [[0.1]]}, 400, "image"),
    ],
)
def test_classify_bad_input(server, payload, status, message):
    r = httpx.post(f"{server.http}/classify", json=payload, timeout=30)
    assert r.status_code == status, r.text
    assert re.search(message, r.text), r.text
    _assert_still_serving(server)


# --- Open Inference Protocol over HTTP -------------------------------------------------------------


def test_http_server_metadata_and_health(server):
    for path in ("/v2", "/v2/"):
        r = httpx.get(server.http + path, timeout=10)
        assert r.status_code == 200 and r.json()["name"] == "kiln", (path, r.status_code, r.text)
    client = thttp.InferenceServerClient(server.http_hostport)
    assert client.is_server_live() and client.is_server_ready()
    for name in MODELS:
        assert client.is_model_ready(name)
        meta = client.get_model_metadata(name)
        assert meta["inputs"][0]["name"] == "input" and meta["inputs"][0]["datatype"] == "FP32"
        config = client.get_model_config(name)
        assert config["max_batch_size"] >= 32


def test_repository_index_lists_every_model_version_and_state(server):
    r = httpx.post(f"{server.http}/v2/repository/index", timeout=10)
    assert r.status_code == 200
    rows = {(m["name"], m["state"]) for m in r.json()}
    assert {("vit-soft", "READY"), ("vit-softmax", "READY")} <= rows
    assert all(m["version"] for m in r.json())


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("model", MODELS)
def test_http_infer_matches_in_process(server, reference, model, binary):
    art, sess = reference[model]
    x = _x(3, seed=1)
    client = thttp.InferenceServerClient(server.http_hostport)
    inp = thttp.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = thttp.InferRequestedOutput("logits", binary_data=binary)
    result = client.infer(model, [inp], outputs=[out], model_version=art.version)
    np.testing.assert_allclose(result.as_numpy("logits"), sess.run(None, {"input": x})[0], atol=1e-5)


def test_http_backend_selection(server, reference):
    art, sess = reference["vit-soft"]
    x = _x(4, seed=2)
    expected = sess.run(None, {"input": x})[0]
    for backend, atol in (("pytorch", 1e-4), ("onnxruntime-int8", None)):
        r = httpx.post(
            f"{server.http}/v2/models/vit-soft/infer?backend={backend}", json=_json_request(x), timeout=30
        )
        assert r.status_code == 200, r.text
        got = np.array(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(expected.shape)
        if atol:
            np.testing.assert_allclose(got, expected, atol=atol)
        else:  # 8-bit: close, not equal
            assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.9
    r = httpx.post(f"{server.http}/v2/models/vit-soft/infer?backend=nope", json=_json_request(x), timeout=30)
    assert r.status_code == 400 and "nope" in r.text


def _binary_request(x: np.ndarray, declared: int | None = None) -> tuple[bytes, dict]:
    raw = x.tobytes()
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": declared if declared is not None else len(raw)},
            }
        ]
    }
    h = json.dumps(header).encode()
    return h + raw, {
        "Inference-Header-Content-Length": str(len(h)),
        "Content-Type": "application/octet-stream",
    }


BAD_HTTP = {
    "wrong shape": (_json_request(np.zeros((1, 1, 16, 16), np.float32)), 400, "shape"),
    "wrong rank": (_json_request(np.zeros((1, 32, 32), np.float32)), 400, "shape"),
    "unknown datatype": (_json_request(_x(1), datatype="FLOAT99"), 400, "FLOAT99"),
    "datatype mismatch": (_json_request(_x(1), datatype="INT32"), 400, "INT32"),
    "data length": (
        {"inputs": [{"name": "input", "shape": [1, 1, 32, 32], "datatype": "FP32", "data": [0.0] * 10}]},
        400,
        "10",
    ),
    "missing input": ({"inputs": []}, 400, "input"),
    "extra input": (
        {
            "inputs": [
                *_json_request(_x(1))["inputs"],
                {"name": "bogus", "shape": [1], "datatype": "FP32", "data": [1.0]},
            ]
        },
        400,
        "bogus",
    ),
    "NaN": (
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 32, 32],
                    "datatype": "FP32",
                    "data": [float("nan")] + [0.0] * 1023,
                }
            ]
        },
        400,
        "(?i)nan",
    ),
    "batch too large": (_json_request(np.zeros((65, 1, 32, 32), np.float32)), 400, "(?i)batch"),
}


@pytest.mark.parametrize("case", list(BAD_HTTP))
def test_http_bad_input(server, case):
    body, status, message = BAD_HTTP[case]
    raw = json.dumps(body, allow_nan=True).encode()
    if len(raw) > MAX_REQUEST_BYTES:
        pytest.fail("test payload must stay under the server limit")
    r = httpx.post(
        f"{server.http}/v2/models/vit-soft/infer",
        content=raw,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == status, r.text
    assert re.search(message, r.json()["error"]), r.text
    _assert_still_serving(server)


def test_http_malformed_json(server):
    r = httpx.post(f"{server.http}/v2/models/vit-soft/infer", content=b'{"inputs": [', timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    _assert_still_serving(server)


def test_http_binary_length_mismatch(server):
    body, headers = _binary_request(_x(1), declared=100)
    r = httpx.post(f"{server.http}/v2/models/vit-soft/infer", content=body, headers=headers, timeout=30)
    assert r.status_code == 400, r.text
    _assert_still_serving(server)


def test_http_payload_over_limit_is_413(server):
    big = np.zeros((MAX_REQUEST_BYTES // 4096 + 8, 1, 32, 32), np.float32)
    body, headers = _binary_request(big)
    r = httpx.post(f"{server.http}/v2/models/vit-soft/infer", content=body, headers=headers, timeout=30)
    assert r.status_code == 413 and str(MAX_REQUEST_BYTES) in r.text

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    r = httpx.post(f"{server.http}/v2/models/vit-soft/infer", content=chunks(), headers=headers, timeout=30)
    assert r.status_code == 413, r.text
    _assert_still_serving(server)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/v2/models/nope/infer", "unknown model 'nope'"),
        ("/v2/models/vit-soft/versions/nope/infer", "no version 'nope'"),
    ],
)
def test_http_unknown_model_or_version_is_404(server, path, message):
    r = httpx.post(server.http + path, json=_json_request(_x(1)), timeout=30)
    assert r.status_code == 404 and message in r.json()["error"]
    assert httpx.get(server.http + path.replace("/infer", "/ready"), timeout=10).status_code == 404


# --- Open Inference Protocol over gRPC -------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_grpc_infer_matches_in_process(server, reference, model):
    art, sess = reference[model]
    client = tgrpc.InferenceServerClient(server.grpc)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)
    assert client.get_server_metadata().name == "kiln"
    meta = client.get_model_metadata(model)
    assert meta.inputs[0].name == "input" and list(meta.inputs[0].shape) == [-1, 1, 32, 32]
    x = _x(5, seed=3)
    inp = tgrpc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp], model_version=art.version)
    np.testing.assert_allclose(result.as_numpy("logits"), sess.run(None, {"input": x})[0], atol=1e-5)


def _grpc_infer(server, model="vit-soft", x=None, datatype="FP32", shape=None, version=""):
    client = tgrpc.InferenceServerClient(server.grpc)
    x = _x(1) if x is None else x
    inp = tgrpc.InferInput("input", list(shape or x.shape), datatype)
    inp._raw_content = x.tobytes()  # raw_input_contents as any client may send it, matching or not
    inp._input.ClearField("contents")
    return client.infer(model, [inp], model_version=version)


@pytest.mark.parametrize(
    ("kwargs", "code", "message"),
    [
        (
            {"shape": [1, 1, 16, 16], "x": np.zeros((1, 1, 16, 16), np.float32)},
            "StatusCode.INVALID_ARGUMENT",
            "shape",
        ),
        ({"shape": [2, 1, 32, 32]}, "StatusCode.INVALID_ARGUMENT", ""),  # bytes for 1 image, shape says 2
        (
            {"datatype": "INT32", "x": np.zeros((1, 1, 32, 32), np.int32)},
            "StatusCode.INVALID_ARGUMENT",
            "INT32",
        ),
        ({"x": np.full((1, 1, 32, 32), np.inf, np.float32)}, "StatusCode.INVALID_ARGUMENT", "(?i)inf"),
        ({"model": "nope"}, "StatusCode.NOT_FOUND", "nope"),
        ({"version": "nope"}, "StatusCode.NOT_FOUND", "nope"),
        (
            {"x": np.zeros((MAX_REQUEST_BYTES // 4096 + 8, 1, 32, 32), np.float32)},
            "StatusCode.RESOURCE_EXHAUSTED",
            "",
        ),
    ],
    ids=["shape", "length", "datatype", "inf", "model", "version", "too-large"],
)
def test_grpc_bad_input(server, kwargs, code, message):
    with pytest.raises(InferenceServerException) as info:
        _grpc_infer(server, **kwargs)
    assert info.value.status() == code, info.value
    assert re.search(message, info.value.message()), info.value
    _assert_still_serving(server)


def test_grpc_malformed_protobuf(server):
    with grpc.insecure_channel(server.grpc) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff\xff garbage", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # not INTERNAL: parsed by the servicer
    _assert_still_serving(server)


# --- batching and metrics -------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_metrics_say_so(server):
    before = httpx.get(f"{server.http}/metrics", timeout=10).text
    x = _x(1)

    def one(_):
        return httpx.post(
            f"{server.http}/v2/models/vit-softmax/infer", json=_json_request(x), timeout=60
        ).status_code

    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(one, range(96)))
    assert codes == [200] * 96
    after = httpx.get(f"{server.http}/metrics", timeout=10).text
    lab = {"model": "vit-softmax", "backend": "onnxruntime"}
    inferred = metric_total(after, "kiln_inference_count_total", **lab) - metric_total(
        before, "kiln_inference_count_total", **lab
    )
    executed = metric_total(after, "kiln_inference_exec_count_total", **lab) - metric_total(
        before, "kiln_inference_exec_count_total", **lab
    )
    assert inferred == 96
    assert 1 <= executed < 96  # some requests shared a batch


def test_metrics_cover_success_failure_queue_compute_load_ready(server):
    httpx.post(f"{server.http}/v2/models/vit-soft/infer", json=_json_request(_x(1)), timeout=30)
    httpx.post(f"{server.http}/v2/models/vit-soft/infer", json={"inputs": []}, timeout=30)
    _grpc_infer(server)
    text = httpx.get(f"{server.http}/metrics", timeout=10).text
    assert (
        metric_total(
            text, "kiln_inference_requests_total", model="vit-soft", status="success", protocol="http"
        )
        >= 1
    )
    assert (
        metric_total(
            text, "kiln_inference_requests_total", model="vit-soft", status="failure", protocol="http"
        )
        >= 1
    )
    assert (
        metric_total(
            text, "kiln_inference_requests_total", model="vit-soft", status="success", protocol="grpc"
        )
        >= 1
    )
    assert metric_total(text, "kiln_inference_queue_seconds_count", model="vit-soft") >= 1
    assert metric_total(text, "kiln_inference_compute_seconds_count", model="vit-soft") >= 1
    assert metric_total(text, "kiln_model_load_seconds", model="vit-soft", backend="onnxruntime") > 0
    for name in MODELS:
        for backend in ("onnxruntime", "onnxruntime-int8", "pytorch"):
            assert metric_total(text, "kiln_model_ready", model=name, backend=backend) == 1
    assert "bentoml_service_request_total" in text or "bentoml_" in text  # BentoML's defaults are there too


def test_second_start_reuses_the_store_and_is_fast(server, kiln_home, tmp_path):
    from serverproc import start_server, stop_server

    versions = {name: get_artifact(name).version for name in MODELS}
    r = httpx.post(f"{server.http}/classify", json={"image": [[0.0, 1.0], [1.0, 0.0]]}, timeout=30)
    assert r.status_code == 200
    scrape = lambda: httpx.get(f"{server.http}/metrics", timeout=30).text  # noqa: E731
    before = metric_total(scrape(), "kiln_inference_requests_total", model="vit-soft")
    assert before >= 1
    t0 = time.perf_counter()
    # Its own galleries file: Milvus Lite serves one process per file; the session server holds the default
    again = start_server(kiln_home, "--no-train", env={"KILN_MILVUS_URI": str(tmp_path / "galleries.db")})
    try:
        assert {name: get_artifact(name).version for name in MODELS} == versions  # nothing retrained
        r = httpx.post(f"{again.http}/classify", json={"image": [[0.0, 1.0], [1.0, 0.0]]}, timeout=30)
        assert r.status_code == 200
        # Each server keeps its own metrics (serving.launch): starting this one on the same store left the
        # first one's counters alone (BentoML empties its multiprocess directory at every start).
        assert metric_total(scrape(), "kiln_inference_requests_total", model="vit-soft") >= before
    finally:
        stop_server(again.process)
    print(f"second start ready in {time.perf_counter() - t0:.1f}s")  # reported, not asserted (timing)


def test_start_fails_clearly_for_a_model_not_in_the_store(kiln_home):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "serve", "--models", "vit-soft:doesnotexist", "--no-train"],
        env={**os.environ, "KILN_HOME": str(kiln_home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "no model 'vit-soft:doesnotexist'" in r.stderr
