"""KILN_READ_TOKEN: every read needs a token of any scope over HTTP (middleware, before the body) and gRPC
(interceptor, in metadata); the probes and /metrics stay open; without the setting nothing changes."""

from __future__ import annotations

import asyncio
import threading
import warnings

import grpc
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from serving.admin import ReadTokenMiddleware, read_token_interceptor
from serving.config import Tokens
from serving.oip import grpc_server
from serving.oip.http import create_oip_app
from serving.oip.proto import grpc_predict_v2_pb2 as pb
from serving.oip.proto import grpc_predict_v2_pb2_grpc as pb_grpc

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

TOKENS = Tokens(admin="adm", write="wrt", read="rd")
BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [[1, 2, 3]]}]}


def _app(repo, tokens: Tokens):
    app = Starlette(routes=[Mount("/v2", create_oip_app(repo, max_request_bytes=1 << 20))])
    return ReadTokenMiddleware(app, tokens=tokens)


@pytest.mark.parametrize("token", ["rd", "wrt", "adm"])
def test_http_reads_need_a_token_of_any_scope(repo, token):
    with TestClient(_app(repo, TOKENS)) as client:
        missing = client.post("/v2/models/linear/infer", json=BODY)
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        assert "KILN_READ_TOKEN" in missing.json()["error"]
        wrong = client.post("/v2/models/linear/infer", json=BODY, headers={"Authorization": "Bearer x"})
        assert wrong.status_code == 403
        ok = client.post("/v2/models/linear/infer", json=BODY, headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
        assert client.get("/v2/health/live").status_code == 200  # probes stay open


def test_http_reads_stay_open_without_a_read_token(repo):
    with TestClient(_app(repo, Tokens(admin="adm"))) as client:
        assert client.post("/v2/models/linear/infer", json=BODY).status_code == 200


@pytest.fixture
def grpc_target(repo, free_port):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    port = free_port()
    start = grpc_server.start_grpc_server(
        repo,
        host="127.0.0.1",
        port=port,
        max_message_bytes=1 << 20,
        interceptors=[read_token_interceptor(TOKENS)],
    )
    server = asyncio.run_coroutine_threadsafe(start, loop).result(timeout=10)
    yield f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.close()


def test_grpc_reads_need_a_token_in_metadata(grpc_target):
    request = pb.ModelInferRequest(model_name="linear")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    request.raw_input_contents.append(np.array([[1, 2, 3]], np.float32).tobytes())
    with grpc.insecure_channel(grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live  # the probe stays open
        for metadata, code in [
            ((), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", "Bearer x"),), grpc.StatusCode.PERMISSION_DENIED),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request, metadata=metadata, timeout=10)
            assert err.value.code() == code and "KILN_READ_TOKEN" in err.value.details()
        reply = stub.ModelInfer(request, metadata=(("authorization", "Bearer rd"),), timeout=10)
        assert list(reply.outputs[0].shape) == [1, 2]
