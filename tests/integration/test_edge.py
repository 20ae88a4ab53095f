"""Overload shed at the edge, against a real `kiln serve` process: past the worker's in-flight bound a
request gets 429 (gRPC RESOURCE_EXHAUSTED) from the outermost ASGI layer, without its body being read
and without passing BentoML's middlewares, and the server keeps serving.

The server runs with ``--max-in-flight 1``. One HTTP request holds the slot by sending its headers and
half its body over a raw socket; the next request sends only its headers (a Content-Length, no body at
all), so an answer to it can only come from a layer that did not wait for the body.
"""

from __future__ import annotations

import json
import socket
import time

import grpc
import httpx
import numpy as np
import pytest
from serverproc import metric_total, start_server, stop_server

from serving.oip.proto import grpc_predict_v2_pb2 as pb
from serving.oip.proto import grpc_predict_v2_pb2_grpc as pb_grpc

MODEL = "vit-soft"


@pytest.fixture(scope="module")
def srv(server, kiln_home):
    """A second server on the session's store (the `server` fixture trained and exported the models)."""
    s = start_server(kiln_home, "--no-train", "--models", MODEL, "--max-in-flight", "1", timeout=300)
    yield s
    stop_server(s.process)


def _request(port: int) -> tuple[bytes, bytes]:
    """The head and the body of one binary-tensor infer request."""
    raw = np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32).astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 32, 32],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    body = header + raw
    head = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head, body


def _answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 answer (status, lower-cased headers, body) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection; got {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    return int(lines[0].split(" ", 2)[1]), headers, body


def _connect(srv) -> socket.socket:
    host, port = srv.http_hostport.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=60)


def test_a_request_over_the_in_flight_bound_gets_429_before_its_body_is_read(srv):
    port = int(srv.http_hostport.rsplit(":", 1)[1])
    head, body = _request(port)
    before = httpx.get(f"{srv.http}/metrics", timeout=30).text

    holder = _connect(srv)
    holder.sendall(head + body[: len(body) // 2])  # in flight: its handler waits for the rest

    # Until the server has read the holder's headers a whole request may still be admitted (and answered
    # 200); once one is refused, the holder is counted.
    deadline = time.monotonic() + 60
    while True:
        with _connect(srv) as probe:
            probe.sendall(head + body)
            status, _, answer = _answer(probe)
        if status == 429:
            break
        assert status == 200 and time.monotonic() < deadline, (status, answer)

    with _connect(srv) as refused:
        refused.sendall(head)  # headers only: this request's body is never sent
        status, headers, answer = _answer(refused)
    assert status == 429, answer
    assert headers["retry-after"] == "1" and headers["content-type"] == "application/json"
    assert "max_in_flight 1" in json.loads(answer)["error"]
    assert headers["server-timing"].startswith("edge;dur=")

    # gRPC shares the worker's bound: RESOURCE_EXHAUSTED while the HTTP request holds the slot.
    x = np.zeros((1, 1, 32, 32), dtype=np.float32)
    request = pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[x.tobytes()],
    )
    with grpc.insecure_channel(srv.grpc) as channel, pytest.raises(grpc.RpcError) as exhausted:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert exhausted.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    holder.sendall(body[len(body) // 2 :])  # the held request completes normally
    status, headers, answer = _answer(holder)
    holder.close()
    assert status == 200 and json.loads(answer)["model_name"] == MODEL
    assert headers["server-timing"].startswith("edge;dur=")

    # The server keeps serving once the slot is free, on a keep-alive connection too.
    with httpx.Client(timeout=60) as client:
        for _ in range(3):
            r = client.post(
                f"{srv.http}/v2/models/{MODEL}/infer",
                json={
                    "inputs": [
                        {"name": "input", "shape": [1, 1, 32, 32], "datatype": "FP32", "data": [0.0] * 1024}
                    ]
                },
            )
            assert r.status_code == 200, r.text

    after = httpx.get(f"{srv.http}/metrics", timeout=30).text
    rejected = metric_total(after, "kiln_inference_rejected_total", reason="server_in_flight") - metric_total(
        before, "kiln_inference_rejected_total", reason="server_in_flight"
    )
    assert rejected >= 2  # the HTTP and the gRPC refusal
    # The refusal came before BentoML's middlewares: its traffic metrics never saw a 429.
    assert metric_total(after, "bentoml_service_request_total", http_response_code="429") == 0
