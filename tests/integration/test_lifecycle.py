"""Per-model isolation, model control, Triton's clients and a soak against a real `kiln serve` process.

The server (tests/opsserver.py) has copies of the session's trained vit-soft: the model itself (pinned to
its version), one copy whose ONNX graph is corrupt and one whose int8 graph file is missing. The two
broken ones must be UNAVAILABLE with their reasons while vit-soft serves; model control (load/unload with
the admin token) then switches vit-soft to a new version under load without a failed request; Triton's
HTTP and gRPC clients exercise every call Kiln advertises; last, the soak: sustained load at ~70% of the
capacity measured here, on a fixed schedule (open loop, so a slow server cannot slow the load down), for
a bounded period: every request must succeed and the server's resident memory (all its processes) must
grow less than 10% from after the warm-up to the end. The tests run in file order and build on each
other's state.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import psutil
import pytest
from modelstore import copy_model
from opsserver import NEW_VERSION, TOKEN, start_ops_server
from serverproc import metric_total, stop_server

from serving.oip.proto import grpc_predict_v2_pb2 as pb
from serving.oip.proto import grpc_predict_v2_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def ops_server(server, kiln_home, tmp_path_factory):
    """(server, vit-soft's first version). Depends on ``server`` for the session's trained models."""
    srv, first = start_ops_server(kiln_home, tmp_path_factory.mktemp("ops-home"))
    yield srv, first
    stop_server(srv.process)


def _request(n: int = 1, seed: int = 0) -> dict:
    x = np.random.default_rng(seed).random((n, 1, 32, 32), dtype=np.float32)
    return {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]
    }


def test_bad_artifacts_are_unavailable_with_reasons_and_others_serve(ops_server):
    srv, first = ops_server
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


class _Load:
    """Clients sending vit-soft inference requests in a loop (HTTP) until stopped; records every answer."""

    def __init__(self, base: str, clients: int = 3):
        self.base = base
        self.answers: list[tuple[float, int, str]] = []  # (time, status, model_version or error)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def __enter__(self) -> _Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _run(self, seed: int) -> None:
        body = _request(1, seed)
        with httpx.Client(base_url=self.base, timeout=30) as client:
            while not self._stop.is_set():
                r = client.post("/v2/models/vit-soft/infer", json=body)
                what = r.json()["model_version"] if r.status_code == 200 else r.text
                self.answers.append((time.monotonic(), r.status_code, what))


def _admin(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_model_control_needs_the_token_on_both_protocols(ops_server):
    srv, _ = ops_server
    url = f"{srv.http}/v2/repository/models/vit-soft/load"
    assert httpx.post(url).status_code == 401
    assert httpx.post(url, headers=_admin("wrong")).status_code == 403
    with grpc.insecure_channel(srv.grpc) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.RepositoryModelUnloadRequest(model_name="vit-soft")
        for metadata, code in (
            (None, grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", "Bearer x"),), grpc.StatusCode.PERMISSION_DENIED),
        ):
            with pytest.raises(grpc.RpcError) as err:
                stub.RepositoryModelUnload(request, metadata=metadata)
            assert err.value.code() == code
    assert httpx.get(f"{srv.http}/v2/models/vit-soft/ready").status_code == 200  # nothing was unloaded


def test_new_version_loads_beside_the_old_and_takes_over_with_no_failed_request(ops_server, kiln_home):
    srv, first = ops_server
    copy_model(kiln_home, "vit-soft", srv.home, as_version=NEW_VERSION)  # the store's latest is now new
    with _Load(srv.http) as load:
        time.sleep(1.0)
        loaded = httpx.post(f"{srv.http}/v2/repository/models/vit-soft/load", headers=_admin(), timeout=120)
        switched = time.monotonic()
        assert loaded.status_code == 200, loaded.text
        assert loaded.json() == {"name": "vit-soft", "version": NEW_VERSION, "state": "READY"}
        time.sleep(1.0)
        body = {"parameters": {"version": first}}
        unloaded = httpx.post(
            f"{srv.http}/v2/repository/models/vit-soft/unload", headers=_admin(), json=body, timeout=60
        )
        assert unloaded.status_code == 200 and unloaded.json()["unloaded_versions"] == [first]
        time.sleep(1.0)
    failed = [a for a in load.answers if a[1] != 200]
    assert not failed, failed[:5]
    versions = [v for _, _, v in load.answers]
    assert versions[0] == first and versions[-1] == NEW_VERSION
    assert all(v == NEW_VERSION for t, _, v in load.answers if t > switched + 0.5)  # the default switched
    assert len(load.answers) > 20

    index = {(r["name"], r["version"]): r for r in httpx.post(f"{srv.http}/v2/repository/index").json()}
    assert index[("vit-soft", NEW_VERSION)]["state"] == "READY"
    assert (
        index[("vit-soft", first)]["state"] == "UNAVAILABLE"
        and index[("vit-soft", first)]["reason"] == "unloaded"
    )
    gone = httpx.post(f"{srv.http}/v2/models/vit-soft/versions/{first}/infer", json=_request())
    assert gone.status_code == 503 and "unloaded" in gone.json()["error"]
    metrics = httpx.get(f"{srv.http}/metrics").text
    assert metric_total(metrics, "kiln_model_ready", model="vit-soft", version=first) == 0
    assert (
        metric_total(
            metrics, "kiln_model_ready", model="vit-soft", version=NEW_VERSION, backend="onnxruntime"
        )
        == 1
    )


def test_a_failing_load_reports_why_and_unloading_the_broken_models_makes_the_server_ready(ops_server):
    srv, _ = ops_server
    again = httpx.post(f"{srv.http}/v2/repository/models/vit-corrupt/load", headers=_admin(), timeout=60)
    assert again.status_code == 400 and "model.onnx" in again.json()["error"]
    assert httpx.get(f"{srv.http}/v2/health/ready").status_code == 503
    for name in ("vit-corrupt", "vit-missing"):
        r = httpx.post(f"{srv.http}/v2/repository/models/{name}/unload", headers=_admin())
        assert r.status_code == 200, r.text
    assert httpx.get(f"{srv.http}/v2/health/ready").status_code == 200
    index = {r["name"]: r for r in httpx.post(f"{srv.http}/v2/repository/index").json()}
    assert index["vit-corrupt"]["reason"] == "unloaded"


def test_tritonclient_http_and_grpc_every_advertised_call(ops_server):
    """Triton's own clients, every call they offer that Kiln advertises, against the real server."""
    import queue

    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    srv, _ = ops_server
    x = np.random.default_rng(1).random((2, 1, 32, 32), dtype=np.float32)
    for module, client in (
        (thttp, thttp.InferenceServerClient(srv.http_hostport)),
        (tgrpc, tgrpc.InferenceServerClient(srv.grpc)),
    ):
        as_json = {"as_json": True} if module is tgrpc else {}
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("vit-soft")
        meta = client.get_server_metadata(**as_json)
        assert {"classification", "statistics", "model_repository"} <= set(meta["extensions"])
        assert client.get_model_metadata("vit-soft", **as_json)["inputs"][0]["name"] == "input"
        config = client.get_model_config("vit-soft", **as_json)
        config = config.get("config", config)
        assert int(config["max_batch_size"]) == 64 and config["input"][0]["data_type"] == "TYPE_FP32"
        rows = client.get_model_repository_index(**as_json)
        index = {m["name"]: m for m in (rows["models"] if module is tgrpc else rows)}
        assert index["vit-soft"]["state"] == "READY"

        inp = module.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        top = module.InferRequestedOutput("logits", class_count=3)
        result = client.infer("vit-soft", [inp], outputs=[top], parameters={"backend": "pytorch"})
        labels = result.as_numpy("logits")
        assert labels.shape == (2, 3)
        scores = [[float(v.decode().split(":")[0]) for v in row] for row in labels]
        assert all(row == sorted(row, reverse=True) for row in scores)
        plain = client.infer("vit-soft", [inp], parameters={"backend": "onnxruntime"}).as_numpy("logits")
        assert [int(v.decode().split(":")[1]) for v in labels[:, 0]] == plain.argmax(1).tolist()

        stats = client.get_inference_statistics("vit-soft", **as_json)["model_stats"]
        assert int(stats[0]["inference_stats"]["success"]["count"]) >= 2
        assert int(stats[0]["execution_count"]) >= 1

        headers = {"authorization": f"Bearer {TOKEN}"}  # gRPC metadata keys are lowercase
        client.load_model("vit-soft", headers=headers)  # a reload of the loaded version
        assert client.is_model_ready("vit-soft")
        with pytest.raises(Exception, match="admin token"):
            client.unload_model("vit-soft")

    # async and streaming (gRPC), standard health service
    client = tgrpc.InferenceServerClient(srv.grpc)
    done: queue.Queue = queue.Queue()
    client.async_infer("vit-soft", [inp], callback=lambda result, error: done.put((result, error)))
    result, error = done.get(timeout=30)
    assert error is None and result.as_numpy("logits").shape == (2, 10)
    client.start_stream(callback=lambda result, error: done.put((result, error)))
    client.async_stream_infer("vit-soft", [inp])
    client.async_stream_infer("no-such-model", [inp])
    answers = [done.get(timeout=30) for _ in range(2)]
    client.stop_stream()
    assert answers[0][1] is None and answers[0][0].as_numpy("logits").shape == (2, 10)
    assert answers[1][0] is None and "no-such-model" in str(answers[1][1])
    with grpc.insecure_channel(srv.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "vit-soft"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service
        status = health.Check(health_pb2.HealthCheckRequest(service="vit-corrupt")).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING  # unloaded
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="no-such-model"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


# --- soak ----------------------------------------------------------------------------------------

CAPACITY_SECONDS = 5.0
WARMUP_SECONDS = 3.0
SOAK_SECONDS = 30.0
LOAD_FRACTION = 0.7
CLIENTS = 8


def _bodies() -> list[tuple[str, dict]]:
    rng = np.random.default_rng(3)
    x = rng.random((1, 1, 32, 32), dtype=np.float32)
    infer = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": x.ravel().tolist()}]
    }
    classify = {"image": rng.random((8, 8)).round(3).tolist(), "model": "vit-soft"}
    return [("/v2/models/vit-soft/infer", infer), ("/classify", classify)]


def _rss(pid: int) -> int:
    """Resident bytes of the server: its process and every child (BentoML's workers)."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


def _capacity(base: str) -> float:
    """Requests per second that CLIENTS closed-loop clients get through."""
    bodies = _bodies()
    done = [0] * CLIENTS
    stop = time.monotonic() + CAPACITY_SECONDS

    def client(i: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            while time.monotonic() < stop:
                path, body = bodies[done[i] % len(bodies)]
                c.post(path, json=body).raise_for_status()
                done[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / CAPACITY_SECONDS


def _paced(base: str, rate: float, seconds: float) -> tuple[int, list[str]]:
    """Send ``rate`` requests per second for ``seconds`` on a fixed schedule; returns (sent, failures)."""
    bodies = _bodies()
    failures: list[str] = []
    local = threading.local()

    def one(i: int) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=base, timeout=30)
        path, body = bodies[i % len(bodies)]
        try:
            r = local.client.post(path, json=body)
            if r.status_code != 200:
                failures.append(f"{path}: {r.status_code} {r.text[:200]}")
        except httpx.HTTPError as exc:
            failures.append(f"{path}: {type(exc).__name__}: {exc}")

    n = int(rate * seconds)
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=4 * CLIENTS) as pool:
        for i in range(n):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, i)
    return n, failures


def test_soak_at_70_percent_of_capacity_no_failures_no_memory_growth(ops_server):
    """Last in the module: vit-soft at its new version, the broken models unloaded."""
    server, _ = ops_server
    capacity = _capacity(server.http)
    rate = LOAD_FRACTION * capacity
    assert rate > 5, f"measured capacity {capacity:.1f} req/s is too low to soak"
    _, warmup_failures = _paced(server.http, rate, WARMUP_SECONDS)  # opens the connections; not judged
    before = _rss(server.process.pid)
    sent, failures = _paced(server.http, rate, SOAK_SECONDS)
    after = _rss(server.process.pid)
    growth = after / before - 1
    print(
        f"soak: capacity {capacity:.1f} req/s, {sent} requests at {rate:.1f} req/s "
        f"over {SOAK_SECONDS:.0f} s, "
        f"{len(failures)} failed, RSS {before / 2**20:.0f} → {after / 2**20:.0f} MiB ({growth:+.1%})"
    )
    assert not failures, failures[:5]
    assert growth < 0.10, (
        f"resident memory grew {growth:.1%} ({before / 2**20:.0f} → {after / 2**20:.0f} MiB)"
    )
    assert server.process.poll() is None


def test_schemathesis_fuzz_of_model_control_with_the_token(ops_server, tmp_path):
    """The admin operations with a valid token, fuzzed (names, versions, bodies): no 5xx. Last: it may
    unload anything."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    srv, _ = ops_server
    cmd = [
        str(Path(sys.executable).with_name("st")),
        "run",
        f"{srv.http}/docs.json",
        "--include-path-regex",
        "/repository/",
        "--checks",
        "not_a_server_error",
        "--phases",
        "examples,fuzzing",
        "--max-examples",
        "10",
        "--max-time",
        "20",
        "--seed",
        "7",
        "--request-timeout",
        "60",
        "--generation-database",
        "none",
        "-H",
        f"Authorization: Bearer {TOKEN}",
        "--no-color",
    ]
    run = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert srv.process.poll() is None
    assert httpx.get(f"{srv.http}/v2/health/live").status_code == 200
