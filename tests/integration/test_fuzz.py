"""Bad input found by machines, against the session's real `kiln serve` process.

- ``/docs.json`` describes every route the server has (task routes, ``/v2``, admin), with schemas;
- schemathesis fuzzes every operation in it (bounded budget): no 5xx, and the server keeps serving;
- malformed tensors over HTTP and malformed / mutated protobufs over gRPC: 4xx-class answers only;
- the known holes: deeply nested JSON, truncated and decompression-bomb PNGs, undeclared content types.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from serving.admin import ADMIN_TOKEN_ENV
from serving.oip.proto import grpc_predict_v2_pb2 as pb
from serving.oip.proto import grpc_predict_v2_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
FUZZ_SECONDS = 50  # schemathesis' whole-run budget (--max-time)
# gRPC codes a bad request may get; INTERNAL and UNKNOWN would be server bugs.
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}


# POST routes that take no body (an action on the resource the path names).
POSTS_WITHOUT_BODY = {"/galleries/{name}/rollback"}


def _served_route_bodies() -> dict[tuple[str, str], bool]:
    """(method, path) → whether the route takes a request body, for every route the service mounts.

    Read in a child process: building the routers here (the task modules' import-time state) left the
    stateful gallery fuzz below unable to follow its OpenAPI links when it ran after this in one process.
    """
    code = (
        "import json, sys; sys.path.insert(0, 'tests/integration'); from test_fuzz import _route_bodies; "
        "print(json.dumps([[m, p, b] for (m, p), b in _route_bodies().items()]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, timeout=300
    )
    return {(m, p): b for m, p, b in json.loads(out.stdout.splitlines()[-1])}


def _route_bodies() -> dict[tuple[str, str], bool]:
    from serving.oip.http import create_oip_app
    from serving.repository import ModelRepository
    from serving.tasks import routers

    repo = ModelRepository()
    apps = [("", router) for router in routers(repo)]  # each task's APIRouter
    apps.append(("/v2", create_oip_app(repo, max_request_bytes=1024)))
    routes = {}
    for prefix, app in apps:
        for route in app.routes:
            if getattr(route, "include_in_schema", False):
                for m in route.methods - {"HEAD"}:
                    routes[(m.lower(), prefix + route.path)] = getattr(route, "body_field", None) is not None
    return routes


def test_docs_json_describes_every_route_with_schemas(server):
    doc = httpx.get(f"{server.http}/docs.json").json()
    assert doc["openapi"].startswith("3.1")
    served = _served_route_bodies()
    assert ("post", "/v2/repository/models/{name}/load") in served and ("post", "/classify") in served
    for (method, path), takes_body in served.items():
        assert path in doc["paths"] and method in doc["paths"][path], f"{method.upper()} {path} undocumented"
        operation = doc["paths"][path][method]
        ok = operation["responses"]["200"]
        if path not in ("/v2/health/live", "/v2/health/ready") and not path.endswith("/ready"):
            assert "schema" in ok["content"]["application/json"], (
                f"{method.upper()} {path}: no response schema"
            )
        if path in POSTS_WITHOUT_BODY:
            assert not takes_body and "requestBody" not in operation, f"{path}: a body it never reads"
        elif method == "post" and path != "/v2/repository/index":
            assert "schema" in operation["requestBody"]["content"]["application/json"], (
                f"{path}: no body schema"
            )
        for param in ("{name}", "{version}"):
            if param in path:
                assert any(p["name"] == param[1:-1] and p["in"] == "path" for p in operation["parameters"])
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]
    body = infer["requestBody"]["content"]["application/json"]["schema"]
    assert {"inputs", "outputs", "parameters"} <= set(body["properties"])
    assert "application/octet-stream" in infer["requestBody"]["content"]  # binary tensor extension


def test_schemathesis_fuzz_of_every_operation_finds_no_server_error(server, tmp_path):
    """Every operation of /docs.json, examples and generated (valid and invalid) cases, bounded time."""
    cmd = [
        str(Path(sys.executable).with_name("st")),
        "run",
        f"{server.http}/docs.json",
        "--checks",
        "not_a_server_error",
        # The session server has no LLM, so /agent/solve answers every request 503 by contract (issue 8:
        # "answer 503 with a message that says how to configure one"); test_agent.py tests its bad input
        # against the LLM test double.
        "--exclude-path",
        "/agent/solve",
        "--phases",
        "examples,fuzzing",
        "--max-examples",
        "15",
        "--max-time",
        str(FUZZ_SECONDS),
        "--seed",
        "20261130",
        "--request-timeout",
        "30",
        "--generation-database",
        "none",
        "--no-color",
    ]
    env = {k: v for k, v in os.environ.items() if k != ADMIN_TOKEN_ENV}
    run = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=FUZZ_SECONDS + 60
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Tested:" in run.stdout and "Server error" not in run.stdout
    assert server.process.poll() is None, "the server died under the fuzz"
    assert httpx.get(f"{server.http}/v2/health/ready").status_code == 200


def _tensor(shape, data, datatype="FP32", name="input"):
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}


MALFORMED_TENSORS = {
    "data shorter than shape": _tensor([1, 1, 32, 32], [0.0] * 10),
    "negative dimension": _tensor([-1, 1, 32, 32], [0.0] * 1024),
    "huge dimension": _tensor([2**40, 1, 32, 32], [0.0]),
    "wrong rank": _tensor([1, 1024], [0.0] * 1024),
    "strings as FP32": _tensor([1, 1, 32, 32], ["x"] * 1024),
    "NaN": _tensor([1, 1, 32, 32], [float("nan")] * 1024),
    "BYTES to a float input": _tensor([1, 1, 32, 32], ["a"] * 1024, "BYTES"),
    "unknown datatype": _tensor([1, 1, 32, 32], [0.0] * 1024, "FP128"),
    "shape not a list": _tensor("1x1x32x32", [0.0] * 1024),
    "ragged nested data": _tensor([1, 1, 32, 32], [[[0.0] * 32] * 31 + [[0.0]]]),
    "unknown input name": _tensor([1, 1, 32, 32], [0.0] * 1024, name="pixels"),
    "batch over max_batch_size": _tensor([65, 1, 32, 32], [0.0] * 65 * 1024),
}


@pytest.mark.parametrize("case", list(MALFORMED_TENSORS))
def test_malformed_tensor_is_a_4xx_naming_it(server, case):
    body = MALFORMED_TENSORS[case]
    r = httpx.post(f"{server.http}/v2/models/vit-soft/infer", content=json.dumps(body), timeout=30)
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text)
    assert r.json()["error"]


def test_known_holes_are_400s(server):
    base = server.http
    deep = b"[" * 100_000
    for path in ("/classify", "/v2/models/vit-soft/infer", "/v2/repository/index"):
        r = httpx.post(base + path, content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json(), (path, r.text)
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    for what, raw in (("truncated", png[: len(png) // 2]), ("bomb", _png_bomb()), ("header", png[:40])):
        r = httpx.post(f"{base}/classify", json={"image": base64.b64encode(raw).decode()}, timeout=30)
        assert r.status_code == 400, (what, r.text)
    for content_type in (
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "",
    ):
        r = httpx.post(
            f"{base}/classify", content=b'{"image": [[0.5]]}', headers={"content-type": content_type}
        )
        assert r.status_code in (400, 415), (content_type, r.status_code, r.text)
    assert httpx.post(f"{base}/classify", json={"image": base64.b64encode(png).decode()}).status_code == 200


def _png_bomb(side: int = 60_000) -> bytes:
    """A PNG whose header promises side × side pixels (3.6 Gpixel) over a few bytes of zlib: what a
    decompression bomb looks like to a decoder that trusts the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    rows = zlib.compress(b"\x00" * (1 + side // 8) * 64)  # the first 64 rows of a black image
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _valid_grpc_request() -> pb.ModelInferRequest:
    x = np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="vit-soft")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def test_malformed_and_mutated_protobufs_are_client_errors(server):
    """Garbage bytes, hand-made bad tensors and 300 random byte mutations of a valid request: every answer
    is OK or a client-error code, never INTERNAL/UNKNOWN; the stream RPC reports errors in-band."""
    valid = _valid_grpc_request()
    raw = valid.SerializeToString()
    rng = random.Random(7)
    mutants = [b"\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", raw[: len(raw) // 2]]
    for _ in range(300):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            op, at = rng.random(), rng.randrange(len(data))
            if op < 0.4:
                data[at] = rng.randrange(256)
            elif op < 0.7:
                del data[at : at + rng.randint(1, 8)]
            else:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        mutants.append(bytes(data))
    bad_shape = _valid_grpc_request()
    bad_shape.inputs[0].shape[:] = [2**40, 1, 32, 32]
    wrong_size = _valid_grpc_request()
    wrong_size.raw_input_contents[0] = b"\x00" * 7
    typed_and_raw = _valid_grpc_request()
    typed_and_raw.inputs[0].contents.fp32_contents.append(1.0)
    mutants += [m.SerializeToString() for m in (bad_shape, wrong_size, typed_and_raw)]

    with grpc.insecure_channel(server.grpc) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # raw bytes both ways
        codes = {}
        for data in mutants:
            try:
                infer(data, timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
                assert code in CLIENT_ERRORS, (code, err.details(), data[:64])
            codes[code] = codes.get(code, 0) + 1
        assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 10, codes
        for method in (
            "ModelMetadata",
            "ModelConfig",
            "ModelStatistics",
            "RepositoryIndex",
            "RepositoryModelLoad",
        ):
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary(f"/inference.GRPCInferenceService/{method}")(b"\xff\xff\xff", timeout=30)
            assert err.value.code() in CLIENT_ERRORS, (method, err.value.code())
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        answers = [
            pb.ModelStreamInferResponse.FromString(r)
            for r in stream(iter([b"\xff\xff\xff", wrong_size.SerializeToString(), raw]), timeout=60)
        ]
        assert "malformed" in answers[0].error_message and answers[1].error_message.startswith(
            "INVALID_ARGUMENT"
        )
        assert not answers[2].error_message and answers[2].infer_response.outputs[0].shape == [1, 10]
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelInfer(valid, timeout=30).outputs[0].shape == [1, 10]  # still serving


def test_schemathesis_stateful_gallery_lifecycle(server):
    """create → upsert → search → delete item → drop, chained by the gallery routes' OpenAPI links, with
    generated gallery names and item ids, against the real server (schemathesis' state machine): never a
    5xx, a deleted item or gallery is gone (use_after_free), a created one is there
    (ensure_resource_availability), and deleting one item never removes another (the filter-quote hole).

    The state machine runs in a child process: after the rest of the suite had run in this one, it
    walked no link at all (0 of 39 upserts reached a created gallery), while alone it walks them.
    """
    code = (
        "import sys; sys.path.insert(0, 'tests/integration'); from test_fuzz import _gallery_lifecycle; "
        f"_gallery_lifecycle({server.http!r})"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-6000:]
    assert server.process.poll() is None and httpx.get(f"{server.http}/v2/health/ready").status_code == 200


def _gallery_lifecycle(http: str) -> None:
    """The state machine of :func:`test_schemathesis_stateful_gallery_lifecycle` against ``http``."""
    import hypothesis
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import ensure_resource_availability, use_after_free

    from serving.admin import scope_token
    from serving.gallery.store import KEY_PATTERN

    auth = {"Authorization": f"Bearer {scope_token('admin')}"}  # drop is admin; the admin token also writes
    models = httpx.get(f"{http}/embedding-models", timeout=30).json()["models"]
    dim = next(m["dim"] for m in models if m["name"] == "embed-old")
    rng = np.random.default_rng(0)
    schema = schemathesis.openapi.from_url(f"{http}/docs.json").include(path_regex=r"^/galleries/")
    seen = {"created": 0, "deleted_items": 0}
    statuses: dict[tuple[str, str, int], int] = {}
    KEY = re.compile(KEY_PATTERN)

    def count(name: str) -> int | None:
        r = httpx.get(f"{http}/galleries/{name}", timeout=30)
        return sum(r.json()["spaces"].values()) if r.status_code == 200 else None

    def vector() -> list[float]:
        v = rng.normal(size=dim)
        return (v / np.linalg.norm(v)).tolist()

    class Lifecycle(schema.as_state_machine()):
        def before_call(self, case):
            params = case.path_parameters or {}
            if "name" in params and not str(params["name"]).startswith("fz."):
                params["name"] = f"fz.{params['name']}"[:100]  # never one of the demo galleries
            route = (case.method.upper(), case.path)
            if route == ("POST", "/galleries/{name}"):
                case.body = {"model": "embed-old"}
            elif route == ("POST", "/galleries/{name}/items"):
                generated = case.body.get("items") if isinstance(case.body, dict) else None
                ids = [it.get("id") for it in generated or [] if isinstance(it, dict)]
                ids = [i for i in ids if isinstance(i, str) and KEY.match(i) and len(i) <= 256][:3] or [
                    "item-0"
                ]
                case.body = {
                    "items": [{"id": i, "vector": vector(), "metadata": {}} for i in dict.fromkeys(ids)]
                }
            elif route == ("POST", "/galleries/{name}/search"):
                case.body = {"vector": vector(), "k": 3}
            elif route == ("DELETE", "/galleries/{name}/items/{item_id}"):
                self.before = count(params["name"])

        def get_call_kwargs(self, case):
            return {"headers": auth, "timeout": 60}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(
                response,
                checks=[not_a_server_error, use_after_free, ensure_resource_availability],
                transport_kwargs=kwargs or None,
                recorder=self.recorder,
            )
            route = (case.method.upper(), case.path)
            statuses[(*route, response.status_code)] = statuses.get((*route, response.status_code), 0) + 1
            if route == ("POST", "/galleries/{name}") and response.status_code == 200:
                seen["created"] += 1
            if route == ("DELETE", "/galleries/{name}/items/{item_id}"):
                after = count(case.path_parameters["name"])
                if response.status_code == 200:
                    seen["deleted_items"] += 1
                    assert after == self.before - 1, (case.path_parameters, self.before, after)
                elif self.before is not None:
                    assert after == self.before, (response.status_code, case.path_parameters)

    Lifecycle.run(
        settings=hypothesis.settings(
            max_examples=12,
            stateful_step_count=6,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
    )
    # The machine can chain: create links to upsert, upsert to delete item (by the id it wrote) and search.
    # Whether a given run reaches a delete after an upsert depends on the server's state (it did in some
    # runs, not in others); the delete-exactly-one check above runs whenever it does, and the quote-closing
    # id is a fixed regression test (test_retrieval_gallery.py's hostile-input case).
    paths = httpx.get(f"{http}/docs.json", timeout=30).json()["paths"]
    create_links = paths["/galleries/{name}"]["post"]["responses"]["200"]["links"]
    upsert_links = paths["/galleries/{name}/items"]["post"]["responses"]["200"]["links"]
    assert {link["operationId"] for link in create_links.values()} >= {"upsert_gallery_items"}
    assert {link["operationId"] for link in upsert_links.values()} >= {
        "delete_gallery_item",
        "search_gallery",
    }
    assert seen["created"] > 0, (seen, statuses)
