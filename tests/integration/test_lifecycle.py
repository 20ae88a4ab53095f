"""Per-model isolation and model control against a real `kiln serve` process.

The server's store holds copies of the session's trained vit-soft: the model itself (pinned to its
version), one copy whose ONNX graph is corrupt and one whose int8 graph file is missing. The two broken
ones must be UNAVAILABLE with their reasons while vit-soft serves; model control (load/unload with the
admin token) then switches vit-soft to a new version under load without a failed request.
"""

from __future__ import annotations

import grpc
import httpx
import numpy as np
import pytest
from modelstore import copy_model
from serverproc import metric_total, start_server, stop_server

from serving.oip.proto import grpc_predict_v2_pb2 as pb
from serving.oip.proto import grpc_predict_v2_pb2_grpc as pb_grpc

TOKEN = "lifecycle-test-token"
NEW_VERSION = "zzzznewversion01"  # sorts after BentoML's generated versions; 16 characters like them


@pytest.fixture(scope="module")
def lifecycle(server, kiln_home, tmp_path_factory):
    """(server, vit-soft's first version) for a server with one good and two broken models."""
    home = tmp_path_factory.mktemp("lifecycle-home")
    first = copy_model(kiln_home, "vit-soft", home).name
    corrupt = copy_model(kiln_home, "vit-soft", home, as_name="vit-corrupt")
    (corrupt / "model.onnx").write_bytes(b"\x08\x07 this is not an ONNX graph")
    missing = copy_model(kiln_home, "vit-soft", home, as_name="vit-missing")
    (missing / "model.int8.onnx").unlink()
    srv = start_server(
        home,
        "--no-train",
        "--models",
        f"vit-soft:{first},vit-corrupt,vit-missing",
        "--batch-window-ms",
        "2",
        env={"KILN_ADMIN_TOKEN": TOKEN, "KILN_THREADS": "1"},
        ready_path="/v2/health/live",
        timeout=180,
    )
    srv.home = home
    yield srv, first
    stop_server(srv.process)


def _request(n: int = 1, seed: int = 0) -> dict:
    x = np.random.default_rng(seed).random((n, 1, 32, 32), dtype=np.float32)
    return {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]
    }


def test_bad_artifacts_are_unavailable_with_reasons_and_others_serve(lifecycle):
    srv, first = lifecycle
    base = srv.http
    ready = httpx.get(f"{base}/v2/health/ready")
    assert ready.status_code == 503  # strict readiness: configured models failed
    assert "vit-corrupt" in ready.json()["error"] and "vit-missing" in ready.json()["error"]
    assert httpx.get(f"{base}/v2/health/live").status_code == 200

    index = {row["name"]: row for row in httpx.post(f"{base}/v2/repository/index").json()}
    assert index["vit-soft"]["state"] == "READY" and index["vit-soft"]["version"] == first
    for name, file in (("vit-corrupt", "model.onnx"), ("vit-missing", "model.int8.onnx")):
        assert index[name]["state"] == "UNAVAILABLE"
        assert file in index[name]["reason"], index[name]
        r = httpx.post(f"{base}/v2/models/{name}/infer", json=_request())
        assert r.status_code == 503 and "UNAVAILABLE" in r.json()["error"]
        assert httpx.get(f"{base}/v2/models/{name}/ready").status_code == 503
        assert f"model {name} is UNAVAILABLE" in srv.log()

    assert httpx.get(f"{base}/v2/models/vit-soft/ready").status_code == 200
    r = httpx.post(f"{base}/v2/models/vit-soft/infer", json=_request(2))
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [2, 10]
    img = np.zeros((8, 8)).tolist()
    assert httpx.post(f"{base}/classify", json={"image": img, "model": "vit-soft"}).status_code == 200

    metrics = httpx.get(f"{base}/metrics").text
    assert metric_total(metrics, "kiln_model_ready", model="vit-soft", backend="onnxruntime") == 1
    for name in ("vit-corrupt", "vit-missing"):
        assert _gauge_present(metrics, name)  # a 0 that was read, not a series that is absent
        assert metric_total(metrics, "kiln_model_ready", model=name) == 0

    with grpc.insecure_channel(srv.grpc) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(pb.ServerReadyRequest()).ready is False
        assert stub.ModelReady(pb.ModelReadyRequest(name="vit-soft")).ready is True
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelReady(pb.ModelReadyRequest(name="vit-corrupt"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def _gauge_present(metrics: str, name: str) -> bool:
    """The gauge has a sample for ``name`` (so the 0 is a reading, not an absent series)."""
    return any(
        line.startswith("kiln_model_ready{") and f'model="{name}"' in line for line in metrics.splitlines()
    )
