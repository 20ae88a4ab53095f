"""One error behaviour for every HTTP front-end: InferenceError with its headers, a 500 with a request id
that is never re-raised into the server (the keep-alive connection survives), and JSON bodies without
bare NaN / Infinity."""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import warnings

import numpy as np
import pytest
import uvicorn
from fastapi import APIRouter, Header
from starlette.applications import Starlette
from starlette.routing import Mount

from serving.admin import require_admin
from serving.oip.http import create_oip_app
from serving.routes import create_task_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


def _strict_json(text: str):
    """Parse like a strict client: NaN / Infinity literals are an error."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _task_app():
    api = APIRouter()

    @api.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("kaboom")

    @api.get("/guarded")
    async def guarded(authorization: str | None = Header(None)) -> dict:
        require_admin(authorization)
        return {"ok": True}

    @api.get("/nan")
    async def nan() -> dict:
        return {"values": [1.0, float("nan"), float("inf"), -float("inf")], "nested": {"x": float("nan")}}

    return create_task_app([api])


def test_a_task_route_crash_is_a_500_with_a_request_id_not_re_raised(caplog):
    # raise_server_exceptions=True (the default): a re-raised exception would fail this test right here
    with TestClient(_task_app()) as client, caplog.at_level(logging.ERROR, "kiln.serving"):
        response = client.get("/boom")
        assert response.status_code == 500
        body = response.json()
        assert body["error"] == "internal server error: RuntimeError: kaboom"
        assert len(body["request_id"]) == 32 and response.headers["x-request-id"] == body["request_id"]
        assert body["request_id"] in caplog.text and "kaboom" in caplog.text
        given = client.get("/boom", headers={"X-Request-Id": "trace-42"})
        assert given.json()["request_id"] == "trace-42"
        hostile = client.get("/boom", headers={"X-Request-Id": "a\tb" + "x" * 300})
        assert hostile.json()["request_id"] != "a\tb" + "x" * 300  # not echoed into the log as sent


def test_a_task_route_keeps_the_error_headers(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_ADMIN_TOKEN", "s3cret")
    with TestClient(_task_app()) as client:
        missing = client.get("/guarded")
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        assert client.get("/guarded", headers={"Authorization": "Bearer s3cret"}).json() == {"ok": True}


def test_non_finite_floats_are_null_in_task_responses():
    with TestClient(_task_app()) as client:
        response = client.get("/nan")
        assert response.status_code == 200
        assert _strict_json(response.text) == {"values": [1.0, None, None, None], "nested": {"x": None}}


def test_non_finite_outputs_are_null_in_oip_json_and_kept_in_binary(repo):
    app = Starlette(routes=[Mount("/v2", create_oip_app(repo, max_request_bytes=1 << 20))])
    x = [[3e38, 3e38, 0.0]]  # finite input, y overflows float32 to inf
    body = {"id": "r1", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": x}]}
    with TestClient(app) as client:
        response = client.post("/v2/models/linear/infer", json=body)
        assert response.status_code == 200
        y = next(o for o in _strict_json(response.text)["outputs"] if o["name"] == "y")
        assert None in y["data"]
        binary = client.post(
            "/v2/models/linear/infer",
            json={**body, "outputs": [{"name": "y", "parameters": {"binary_data": True}}]},
        )
        header_len = int(binary.headers["inference-header-content-length"])
        values = np.frombuffer(binary.content[header_len:], dtype="<f4")
        assert np.isinf(values).any()  # binary keeps what the model computed
        lenient = client.post(
            "/v2/models/linear/infer",
            content=b'{"id": NaN, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], '
            b'"data": [[1, 2, 3]]}]}',
        )
        assert lenient.status_code == 200 and _strict_json(lenient.text)["id"] is None


@pytest.fixture
def task_server(free_port):
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(_task_app(), host="127.0.0.1", port=port, log_level="critical", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    yield port
    server.should_exit = True
    thread.join(timeout=5)


def test_the_keep_alive_connection_survives_a_500(task_server):
    """uvicorn closes the connection when an exception reaches it (Starlette's catch-all re-raises)."""
    conn = http.client.HTTPConnection("127.0.0.1", task_server, timeout=10)
    for path, status in [("/boom", 500), ("/nan", 200), ("/boom", 500), ("/nan", 200)]:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        assert response.status == status
        assert response.getheader("connection", "").lower() != "close"
    conn.close()


def test_a_client_gone_mid_body_is_no_logged_500(caplog):
    """A client that disconnects while its body streams (ClientDisconnect from Starlette) is no server error:
    nothing logged at ERROR (one wrk run logged 876 tracebacks before), the OIP front-end answers 499."""
    from starlette.requests import ClientDisconnect

    from serving.routes import internal_error_response

    with caplog.at_level(logging.DEBUG, "kiln.serving"):
        response = internal_error_response("POST", "/v2/models/m/infer", ClientDisconnect())
    assert response.status_code == 499
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    crash = internal_error_response("POST", "/v2/models/m/infer", RuntimeError("kaboom"))
    assert crash.status_code == 500
