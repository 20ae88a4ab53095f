"""Hardening against real `kiln serve` processes: KILN_READ_TOKEN guards every read over HTTP and gRPC
(probes and /metrics stay open), and a state directory whose writers cannot write still serves, each
writer off with its reason."""

from __future__ import annotations

import shutil

import grpc
import httpx
import numpy as np
import pytest
from serverproc import start_server, stop_server

from serving.oip.proto import grpc_predict_v2_pb2 as pb
from serving.oip.proto import grpc_predict_v2_pb2_grpc as pb_grpc

DIGIT = [[0.0] * 8 for _ in range(8)]


def test_a_read_token_guards_every_read_and_leaves_the_probes_open(kiln_home):
    srv = start_server(
        kiln_home,
        "--models",
        "vit-soft",
        "--no-train",
        env={"KILN_READ_TOKEN": "rd", "KILN_ADMIN_TOKEN": "adm"},
    )
    try:
        read = {"Authorization": "Bearer rd"}
        assert httpx.get(f"{srv.http}/v2/health/ready", timeout=30).status_code == 200
        assert httpx.get(f"{srv.http}/metrics", timeout=30).status_code == 200
        body = {"image": DIGIT, "model": "vit-soft"}
        r = httpx.post(f"{srv.http}/classify", json=body, timeout=30)
        assert r.status_code == 401 and "KILN_READ_TOKEN" in r.json()["error"]
        assert (
            httpx.post(f"{srv.http}/classify", json=body, headers={"Authorization": "Bearer x"}).status_code
            == 403
        )
        assert httpx.post(f"{srv.http}/classify", json=body, headers=read, timeout=30).status_code == 200
        infer = {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": [0.0] * 1024}]
        }
        url = f"{srv.http}/v2/models/vit-soft/infer"
        assert httpx.post(url, json=infer, timeout=30).status_code == 401  # the infer fast path too
        assert httpx.post(url, json=infer, headers=read, timeout=30).status_code == 200
        load = f"{srv.http}/v2/repository/models/vit-soft/load"
        assert httpx.post(load, headers=read, timeout=30).status_code == 403  # a reader is no admin

        request = pb.ModelInferRequest(model_name="vit-soft")
        request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 32, 32])
        request.raw_input_contents.append(np.zeros((1, 1, 32, 32), np.float32).tobytes())
        with grpc.insecure_channel(srv.grpc) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = stub.ModelInfer(request, metadata=(("authorization", "Bearer rd"),), timeout=30)
            assert list(reply.outputs[0].shape) == [1, 10]
    finally:
        stop_server(srv.process)


def test_a_home_whose_writers_cannot_write_still_serves(kiln_home, tmp_path):
    """The agent's trajectory store, the galleries' Milvus Lite file and the admin-token file each find
    their path taken by something they cannot write through (a pod's read-only root filesystem, as far as
    they can tell); the server starts, serves, and each says why it is off."""
    home = tmp_path / "home"
    shutil.copytree(kiln_home / "bentoml" / "models", home / "bentoml" / "models")
    (home / "agent").write_text("")  # mkdir agent/ fails
    (home / "milvus").write_text("")  # mkdir milvus/ fails
    (home / "admin-token").mkdir()  # the token file cannot be made or read
    srv = start_server(home, "--models", "vit-soft,embed-old", "--no-train", env={"KILN_ADMIN_TOKEN": ""})
    try:
        r = httpx.post(f"{srv.http}/classify", json={"image": DIGIT, "model": "vit-soft"}, timeout=60)
        assert r.status_code == 200
        listed = httpx.get(f"{srv.http}/agent/trajectories", timeout=30).json()
        assert listed["count"] == 0 and "cannot be written" in listed["disabled"]
        galleries = httpx.get(f"{srv.http}/galleries", timeout=30)
        assert galleries.status_code == 503 and "writable KILN_HOME" in galleries.json()["error"]
        admin = httpx.post(
            f"{srv.http}/v2/repository/models/vit-soft/unload",
            headers={"Authorization": "Bearer x"},
            timeout=30,
        )
        assert admin.status_code == 403 and "KILN_ADMIN_TOKEN" in admin.json()["error"]
        assert httpx.get(f"{srv.http}/v2/health/ready", timeout=30).status_code == 200  # every model serves
        assert "cannot be written" in srv.log()  # the reason is logged too
    finally:
        stop_server(srv.process)
