"""The Open Inference Protocol HTTP app, mounted at /v2 as BentoML mounts it, over test-double models."""

from __future__ import annotations

import json
import struct
import threading
import time
import warnings

import numpy as np
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount

from serving.oip import http as oip_http
from serving.oip.http import MountRootMiddleware, create_oip_app

with warnings.catch_warnings():  # Starlette 1.x deprecates its TestClient's httpx backend in favour of httpx2
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

LIMIT = 64 * 1024
X = [[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]]


def _parent(repo, *, root_middleware: bool = True, admin_token: str = "") -> Starlette:
    """A parent app mounting the OIP app at /v2, like ``bentoml.asgi_app(app, path="/v2")``."""
    middleware = [Middleware(MountRootMiddleware, prefix="/v2")] if root_middleware else []
    app = create_oip_app(repo, max_request_bytes=LIMIT, server_version="9.9", admin_token=admin_token)
    return Starlette(routes=[Mount("/v2", app)], middleware=middleware)


@pytest.fixture
def client(repo):
    with TestClient(_parent(repo), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def recorded(monkeypatch):
    calls = []
    monkeypatch.setattr(oip_http, "record_request", lambda *args: calls.append(args))
    return calls


def _infer_body(x=X, **extra):
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(np.shape(x)), "data": x}]}
    body.update(extra)
    return body


def _binary_request(header: dict, *chunks: bytes) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + b"".join(chunks), {"Inference-Header-Content-Length": str(len(head))}


def _split_binary_response(response) -> tuple[dict, bytes]:
    size = int(response.headers["inference-header-content-length"])
    return json.loads(response.content[:size]), response.content[size:]


# --- metadata, health, config, index ---------------------------------------------------------------


def test_server_metadata_with_and_without_trailing_slash(client):
    for path in ("/v2", "/v2/"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 200, path
        assert response.json() == {"name": "kiln", "version": "9.9", "extensions": oip_http.EXTENSIONS}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic deprecations inside BentoML's import
def test_bentoml_passive_mount(repo):
    """BentoML mounts ``bentoml.asgi_app`` apps with its own ``PassiveMount``; both forms of /v2 work."""
    from _bentoml_impl.server.mount import PassiveMount

    app = create_oip_app(repo, max_request_bytes=LIMIT)
    parent = Starlette(routes=[PassiveMount("/v2", app)], middleware=[Middleware(MountRootMiddleware)])
    with TestClient(parent) as c:
        assert c.get("/v2", follow_redirects=False).json()["name"] == "kiln"
        assert c.get("/v2/").json()["name"] == "kiln"
        assert c.post("/v2/models/linear/infer", json=_infer_body()).status_code == 200


def test_bare_v2_without_root_middleware_redirects_to_slash(repo):
    with TestClient(_parent(repo, root_middleware=False)) as c:
        response = c.get("/v2", follow_redirects=False)
        assert response.status_code == 307 and response.headers["location"].endswith("/v2/")
        assert c.get("/v2").json()["name"] == "kiln"  # redirect followed


def test_health(client, repo):
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 503  # "cold" is not ready
    repo.models.pop("cold")
    assert client.get("/v2/health/ready").status_code == 200


def test_model_metadata_default_and_explicit_version(client):
    body = client.get("/v2/models/linear").json()
    assert body == {
        "name": "linear",
        "versions": ["1", "2"],
        "platform": "numpy_test_double",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [-1, 2]},
            {"name": "argmax", "datatype": "INT64", "shape": [-1]},
        ],
    }
    assert client.get("/v2/models/linear/versions/1").status_code == 200


@pytest.mark.parametrize(
    ("path", "message"),
    [("/v2/models/nope", "unknown model 'nope'"), ("/v2/models/linear/versions/7", "has no version '7'")],
)
def test_unknown_model_or_version_is_404(client, path, message):
    for suffix in ("", "/ready", "/config"):
        response = client.get(path + suffix)
        assert response.status_code == 404 and message in response.json()["error"]
    response = client.post(path + "/infer", json=_infer_body())
    assert response.status_code == 404 and message in response.json()["error"]


def test_model_ready(client):
    assert client.get("/v2/models/linear/ready").status_code == 200
    assert client.get("/v2/models/linear/versions/1/ready").status_code == 200
    assert client.get("/v2/models/cold/ready").status_code == 503


def test_model_config_is_triton_like(client):
    config = client.get("/v2/models/linear/config").json()
    assert config["max_batch_size"] == 4
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [3]}]
    assert config["output"][1] == {"name": "argmax", "data_type": "TYPE_INT64", "dims": []}
    assert config["backends"] == ["numpy", "double"]
    echo = client.get("/v2/models/echo/config").json()
    assert echo["max_batch_size"] == 0 and echo["input"][0] == {
        "name": "text",
        "data_type": "TYPE_STRING",
        "dims": [-1],
    }


def test_repository_index(client):
    index = client.post("/v2/repository/index").json()
    assert [(m["name"], m["version"], m["state"]) for m in index] == [
        ("broken", "1", "READY"),
        ("cold", "1", "UNAVAILABLE"),
        ("echo", "1", "READY"),
        ("linear", "1", "READY"),
        ("linear", "2", "READY"),
    ]
    ready_only = client.post("/v2/repository/index", json={"ready": True}).json()
    assert "cold" not in {m["name"] for m in ready_only}


def test_unknown_route_and_method_are_json_errors(client):
    response = client.get("/v2/nothing/here")
    assert response.status_code == 404 and "error" in response.json()
    response = client.get("/v2/models/linear/infer")
    assert response.status_code == 405 and "error" in response.json()


# --- inference -------------------------------------------------------------------------------------


def test_json_infer(client, repo, linear_reference, recorded):
    response = client.post("/v2/models/linear/infer", json=_infer_body(id="req-7"))
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["model_name"] == "linear" and body["model_version"] == "2" and body["id"] == "req-7"
    y, argmax = body["outputs"]
    expected = linear_reference(np.array(X))
    assert y["name"] == "y" and y["datatype"] == "FP32" and y["shape"] == [2, 2]
    np.testing.assert_allclose(np.array(y["data"]).reshape(2, 2), expected, rtol=1e-6)
    assert argmax == {
        "name": "argmax",
        "datatype": "INT64",
        "shape": [2],
        "data": expected.argmax(1).tolist(),
    }
    assert repo.get("linear").calls == [None]
    assert recorded[0][:5] == ("linear", "2", "numpy", "http", True)


def test_json_infer_flat_data_explicit_version_and_selected_output(client):
    body = _infer_body(outputs=[{"name": "argmax"}])
    body["inputs"][0]["data"] = sum(X, [])  # flattened form is allowed too
    response = client.post("/v2/models/linear/versions/1/infer", json=body)
    assert response.status_code == 200
    outputs = response.json()["outputs"]
    assert [o["name"] for o in outputs] == ["argmax"] and response.json()["model_version"] == "1"


def test_backend_query_parameter(client, repo, linear_reference, recorded):
    response = client.post("/v2/models/linear/infer?backend=double", json=_infer_body())
    assert response.status_code == 200
    y = np.array(response.json()["outputs"][0]["data"]).reshape(2, 2)
    np.testing.assert_allclose(y, 2 * linear_reference(np.array(X)), rtol=1e-6)
    assert repo.get("linear").calls == ["double"]
    response = client.post("/v2/models/linear/infer?backend=tensorrt", json=_infer_body())
    assert response.status_code == 400 and "no backend 'tensorrt'" in response.json()["error"]
    assert recorded[-1][:5] == ("linear", "2", "_unknown_", "http", False)


def test_backend_request_parameter_and_deprecated_query_must_agree(client, repo, linear_reference):
    response = client.post("/v2/models/linear/infer", json=_infer_body(parameters={"backend": "double"}))
    assert response.status_code == 200
    y = np.array(response.json()["outputs"][0]["data"]).reshape(2, 2)
    np.testing.assert_allclose(y, 2 * linear_reference(np.array(X)), rtol=1e-6)
    response = client.post(
        "/v2/models/linear/infer?backend=numpy", json=_infer_body(parameters={"backend": "double"})
    )
    assert response.status_code == 400 and "disagree" in response.json()["error"]
    response = client.post("/v2/models/linear/infer", json=_infer_body(parameters={"backend": 3}))
    assert response.status_code == 400 and "'backend' must be a string" in response.json()["error"]


def test_classification_extension_returns_top_k_score_index(client, linear_reference):
    body = _infer_body(outputs=[{"name": "y", "parameters": {"classification": 1}}])
    response = client.post("/v2/models/linear/infer", json=body)
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    y = linear_reference(np.array(X))
    assert out["datatype"] == "BYTES" and out["shape"] == [2, 1]
    assert out["data"] == [f"{row.max():g}:{row.argmax()}" for row in y]
    body = _infer_body(outputs=[{"name": "argmax", "parameters": {"classification": 1}}])
    response = client.post("/v2/models/linear/infer", json=body)
    assert response.status_code == 400
    assert "needs a numeric (batch, classes) output" in response.json()["error"]


def test_deeply_nested_json_is_400_not_a_recursion_error(client):
    response = client.post("/v2/models/linear/infer", content=b"[" * 60_000)  # under the 64 KiB limit
    assert response.status_code == 400 and "nested too deeply" in response.json()["error"]


def test_model_control_needs_the_admin_token(repo):
    with TestClient(_parent(repo, admin_token="s3cret"), raise_server_exceptions=False) as c:
        missing = c.post("/v2/repository/models/linear/unload")
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        wrong = c.post("/v2/repository/models/linear/unload", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403 and wrong.json()["error"].startswith("wrong admin token")
        assert "KILN_ADMIN_TOKEN" in wrong.json()["error"] and "kiln token" in wrong.json()["error"]
        empty = c.post("/v2/repository/models/linear/unload", headers={"Authorization": "Bearer "})
        assert empty.status_code == 401 and empty.headers["www-authenticate"].startswith("Bearer")
        assert "linear" in repo.models  # nothing happened
    with TestClient(_parent(repo), raise_server_exceptions=False) as c:  # no token configured: off
        off = c.post("/v2/repository/models/linear/unload", headers={"Authorization": "Bearer s3cret"})
        assert off.status_code == 403 and "KILN_ADMIN_TOKEN" in off.json()["error"]


def test_binary_inputs_and_binary_outputs(client, linear_reference):
    x = np.array(X, dtype=np.float32)
    header = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": x.nbytes}}
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "argmax"}],
    }
    content, headers = _binary_request(header, x.tobytes())
    response = client.post("/v2/models/linear/infer", content=content, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    body, data = _split_binary_response(response)
    y, argmax = body["outputs"]
    assert y["parameters"] == {"binary_data_size": 16} and "data" not in y
    np.testing.assert_allclose(np.frombuffer(data, "<f4").reshape(2, 2), linear_reference(x), rtol=1e-6)
    assert argmax["data"] == linear_reference(x).argmax(1).tolist()


def test_binary_data_output_request_parameter_with_per_output_override(client):
    body = _infer_body(parameters={"binary_data_output": True}, outputs=[{"name": "y"}])
    body["outputs"].append({"name": "argmax", "parameters": {"binary_data": False}})
    response = client.post("/v2/models/linear/infer", json=body)
    header, data = _split_binary_response(response)
    assert header["outputs"][0]["parameters"]["binary_data_size"] == len(data) == 16
    assert "data" in header["outputs"][1]
    # No requested outputs: every output, all binary.
    response = client.post(
        "/v2/models/linear/infer", json=_infer_body(parameters={"binary_data_output": True})
    )
    header, data = _split_binary_response(response)
    assert [o["parameters"]["binary_data_size"] for o in header["outputs"]] == [16, 16]


def test_every_datatype_round_trips_binary_and_json(client):
    text = [b"hello", b"", "wörld".encode()]
    arrays = {
        "text": np.array(text, dtype=object),
        "flag": np.array([True, False, True]),
        "small": np.array([-128, 0, 127], dtype=np.int8),
        "big": np.array([0, 2**63, 2**64 - 1], dtype=np.uint64),
        "half": np.array([0.5, -1.0, 65504.0], dtype=np.float16),
    }
    specs = {"text": "BYTES", "flag": "BOOL", "small": "INT8", "big": "UINT64", "half": "FP16"}
    chunks = [b"".join(struct.pack("<I", len(t)) + t for t in text)]
    chunks += [arrays[n].tobytes() for n in ("flag", "small", "big", "half")]
    header = {
        "inputs": [
            {"name": n, "datatype": specs[n], "shape": [3], "parameters": {"binary_data_size": len(c)}}
            for n, c in zip(specs, chunks, strict=True)
        ],
        "parameters": {"binary_data_output": True},
    }
    content, headers = _binary_request(header, *chunks)
    response = client.post("/v2/models/echo/infer", content=content, headers=headers)
    assert response.status_code == 200, response.text
    body, data = _split_binary_response(response)
    assert [o["datatype"] for o in body["outputs"]] == list(specs.values())
    assert data == b"".join(chunks)

    json_body = {
        "inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["hello", "wörld"]},
            {"name": "flag", "datatype": "BOOL", "shape": [3], "data": [True, False, True]},
            {"name": "small", "datatype": "INT8", "shape": [3], "data": [-128, 0, 127]},
            {"name": "big", "datatype": "UINT64", "shape": [3], "data": [0, 2**63, 2**64 - 1]},
            {"name": "half", "datatype": "FP16", "shape": [3], "data": [0.5, -1.0, 65504.0]},
        ]
    }
    response = client.post("/v2/models/echo/infer", json=json_body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    assert outputs == {f"{i['name']}_out": i["data"] for i in json_body["inputs"]}


def _bad(**changes):
    """An inference body for ``linear`` with the one input's fields changed."""
    tensor = {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": X}
    tensor.update(changes)
    return {"inputs": [tensor]}


BAD_JSON_REQUESTS = {
    "wrong rank": (_bad(shape=[6], data=sum(X, [])), "of rank 1 but model 'linear' expects [-1, 3]"),
    "wrong non-batch dim": (_bad(shape=[3, 2]), "dimension 1 is wrong"),
    "batch over max_batch_size": (
        _bad(shape=[5, 3], data=[[0, 0, 0]] * 5),
        "over the max_batch_size 4 of model 'linear'",
    ),
    "batch of zero": (_bad(shape=[0, 3], data=[]), "batch size 0"),
    "negative dim": (_bad(shape=[-1, 3]), "shape must be a list of non-negative integers"),
    "unknown datatype": (_bad(datatype="FLOAT"), "unknown datatype 'FLOAT'"),
    "missing datatype": (_bad(datatype=None), "unknown datatype None"),
    "datatype mismatch": (_bad(datatype="FP64"), "has datatype FP64 but model 'linear' expects FP32"),
    "too few elements": (_bad(data=[1.0, 2.0]), "has 2 data elements but shape [2, 3] needs 6"),
    "ragged data": (_bad(data=[[1.0, 2.0, 3.0], [1.0]]), "not a rectangular array"),
    "strings in FP32": (_bad(data=[["1", "2", "3"], ["4", "5", "6"]]), "FP32 data must be numbers"),
    "data not a list": (_bad(data="123456"), "data must be a list"),
    "no data": ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3]}]}, "neither 'data'"),
    "extra input": (
        {"inputs": [_bad()["inputs"][0], {"name": "z", "datatype": "FP32", "shape": [1], "data": [1]}]},
        "unknown input 'z' for model 'linear'; its inputs are ['x']",
    ),
    "missing input": (
        {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1], "data": [1]}]},
        "unknown input 'z'",
    ),
    "duplicate input": ({"inputs": [_bad()["inputs"][0]] * 2}, "given more than once"),
    "no inputs": ({"inputs": []}, "'inputs' must be a non-empty list"),
    "unknown output": (_bad() | {"outputs": [{"name": "logits"}]}, "unknown output 'logits' requested"),
    "classification not a count": (
        _bad() | {"outputs": [{"name": "y", "parameters": {"classification": "two"}}]},
        "'classification' must be a positive integer",
    ),
    "classification negative": (
        _bad() | {"outputs": [{"name": "y", "parameters": {"classification": -1}}]},
        "'classification' must be a positive integer",
    ),
    "binary_data not bool": (
        _bad() | {"outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]},
        "'binary_data' must be a boolean",
    ),
}


@pytest.mark.parametrize("case", list(BAD_JSON_REQUESTS))
def test_bad_json_request_is_400_naming_the_problem(client, recorded, case):
    body, message = BAD_JSON_REQUESTS[case]
    response = client.post("/v2/models/linear/infer", json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    assert recorded[-1][:5] == ("linear", "2", "numpy", "http", False)


def test_missing_input_is_named(client):
    response = client.post(
        "/v2/models/echo/infer",
        json={"inputs": [{"name": "flag", "datatype": "BOOL", "shape": [1], "data": [True]}]},
    )
    assert response.status_code == 400
    assert "missing input(s) ['big', 'half', 'small', 'text'] for model 'echo'" in response.json()["error"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"inputs": [', "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps(_bad(data=[[1.0, float("nan"), 3.0], [0, 0, 0]])), "contains NaN or infinite values"),
        (json.dumps(_bad(data=[[1.0, float("inf"), 3.0], [0, 0, 0]])), "contains NaN or infinite values"),
        (
            json.dumps(_bad(data=[[1e39, 0, 0], [0, 0, 0]])),
            "contains NaN or infinite values",
        ),  # FP32 overflow
    ],
)
def test_malformed_json_and_non_finite_values_are_400(client, raw, message):
    response = client.post(
        "/v2/models/linear/infer", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and message in response.json()["error"]


def test_out_of_range_integer_is_400(client):
    body = {}
    body["inputs"] = [
        {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]},
        {"name": "flag", "datatype": "BOOL", "shape": [1], "data": [True]},
        {"name": "small", "datatype": "INT8", "shape": [1], "data": [300]},
        {"name": "big", "datatype": "UINT64", "shape": [1], "data": [1]},
        {"name": "half", "datatype": "FP16", "shape": [1], "data": [1.0]},
    ]
    response = client.post("/v2/models/echo/infer", json=body)
    assert response.status_code == 400 and "out of range for INT8" in response.json()["error"]


@pytest.mark.parametrize(
    ("declared", "actual", "header_length", "message"),
    [
        (20, 24, None, "24 bytes of binary data but its inputs' binary_data_size add up to 20"),
        (28, 24, None, "binary_data_size 28 runs past the 24 bytes"),
        (20, 20, None, "has 20 bytes of binary data but shape [2, 3] of FP32 needs 24"),
        (24, 24, "9999", "Inference-Header-Content-Length '9999' is not a length"),
        (24, 24, "abc", "Inference-Header-Content-Length 'abc' is not a length"),
    ],
)
def test_bad_binary_request_is_400(client, declared, actual, header_length, message):
    header = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": declared}}
        ]
    }
    content, headers = _binary_request(header, b"\x00" * actual)
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = header_length
    response = client.post("/v2/models/linear/infer", content=content, headers=headers)
    assert response.status_code == 400 and message in response.json()["error"]


def test_body_over_limit_is_413_by_content_length_and_while_streaming(client, recorded):
    big = b"x" * (LIMIT + 1)
    response = client.post("/v2/models/linear/infer", content=big)
    assert response.status_code == 413 and f"limit of {LIMIT} bytes" in response.json()["error"]

    def chunks():  # no Content-Length: sent chunked
        for _ in range(LIMIT // 1024 + 2):
            yield b"x" * 1024

    response = client.post("/v2/models/linear/infer", content=chunks())
    assert response.status_code == 413 and f"limit of {LIMIT} bytes" in response.json()["error"]
    assert recorded[-1][4] is False


def test_unready_model_is_503(client):
    response = client.post("/v2/models/cold/infer", json=_infer_body())
    assert response.status_code == 503 and "is not ready" in response.json()["error"]


def test_unexpected_error_is_500_and_server_keeps_serving(client, recorded):
    response = client.post("/v2/models/broken/infer", json=_infer_body())
    assert response.status_code == 500
    assert response.json()["error"] == "internal server error: RuntimeError: runtime exploded"
    assert recorded[-1][:5] == ("broken", "1", "numpy", "http", False)
    assert client.post("/v2/models/linear/infer", json=_infer_body()).status_code == 200


def test_unknown_model_metrics_use_the_unknown_label(client, recorded):
    client.post("/v2/models/nope/infer", json=_infer_body())
    assert recorded[-1][:5] == ("_unknown_", "", "", "http", False)


# --- an unmodified third-party client over a real socket ---------------------------------------------


def test_max_request_bytes_must_be_positive(repo):
    with pytest.raises(ValueError, match="max_request_bytes must be positive"):
        create_oip_app(repo, max_request_bytes=0)


@pytest.fixture(scope="module")
def http_server(module_repo, free_port):
    module_repo.models.pop("cold", None)  # so server readiness is true
    port = free_port()
    config = uvicorn.Config(
        _parent(module_repo), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)


def test_tritonclient_http(http_server, linear_reference):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(http_server)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("linear") and client.is_model_ready("linear", "1")
        assert client.get_server_metadata()["name"] == "kiln"
        assert client.get_model_metadata("linear")["inputs"][0]["shape"] == [-1, 3]
        assert client.get_model_config("linear")["max_batch_size"] == 4

        x = np.array(X, dtype=np.float32)
        for binary in (True, False):
            inp = httpclient.InferInput("x", [2, 3], "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            outputs = [httpclient.InferRequestedOutput("y", binary_data=binary)]
            result = client.infer("linear", [inp], outputs=outputs, request_id="r1")
            np.testing.assert_allclose(result.as_numpy("y"), linear_reference(x), rtol=1e-6)
            assert result.get_response()["id"] == "r1"
        result = client.infer("linear", [inp], query_params={"backend": "double"})  # every output, binary
        np.testing.assert_allclose(result.as_numpy("y"), 2 * linear_reference(x), rtol=1e-6)
        assert result.as_numpy("argmax").dtype == np.int64

        bad = httpclient.InferInput("x", [2, 2], "FP32")
        bad.set_data_from_numpy(np.zeros((2, 2), np.float32))
        with pytest.raises(InferenceServerException, match="dimension 1 is wrong"):
            client.infer("linear", [bad])
    finally:
        client.close()
