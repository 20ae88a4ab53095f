"""A real Prometheus scrapes a real `kiln serve` process; PromQL over its HTTP API checks what arrives.

Prometheus is Debian's ``prometheus`` package (``/usr/bin/prometheus``; ``.ci/run`` installs it). It
scrapes the server every second and evaluates ``k8s/monitoring/prometheus-rule.yaml``'s rules (their
group intervals shortened to one second). The server serves three models from copies of the session's
trained vit-soft: ``vit-soft``, ``vit-spare`` (unloaded by the test: a model going UNAVAILABLE while
scraped) and ``vit-corrupt`` (a corrupt ONNX graph: UNAVAILABLE from the start). Traffic is counted on
the client side, so the series must match it exactly, not merely exist. Every expression of the Grafana
dashboard is run against the same Prometheus and must return data.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import yaml
from modelstore import copy_model
from serverproc import free_port, start_server, stop_server

MONITORING = Path(__file__).resolve().parents[2] / "k8s" / "monitoring"
TOKEN = "prometheus-test-token"
MAX_QUEUE_SIZE = 4  # small, so a burst of concurrent requests meets admission control
BURST = 48


def prometheus_binary() -> str:
    """Path of the ``prometheus`` binary; skips (outside CI) or fails (in CI) when it is missing."""
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if found:
        return found
    message = (
        "the prometheus binary is not installed: `apt-get install -y prometheus` (Debian; .ci/run does it)"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _rules_for_test(dst: Path) -> Path:
    """prometheus-rule.yaml's spec as a plain rule file, every group evaluated each second."""
    spec = yaml.safe_load((MONITORING / "prometheus-rule.yaml").read_text())["spec"]
    for group in spec["groups"]:
        group["interval"] = "1s"
    path = dst / "kiln-rules.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


class Prometheus:
    def __init__(self, url: str, process: subprocess.Popen, log: Path):
        self.url, self.process, self.log = url, process, log

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {r.text}"
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: expected one series, got {result}"
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, check, timeout: float = 45.0):
        """Poll ``expr`` until ``check(result)`` is true; fails with the last result."""
        deadline, result = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            result = self.query(expr)
            if check(result):
                return result
            time.sleep(0.5)
        pytest.fail(f"{expr} never satisfied the check within {timeout}s; last result: {result}")


@pytest.fixture(scope="module")
def kiln(server, kiln_home, tmp_path_factory):
    """A `kiln serve` with vit-soft, vit-spare and a corrupt vit-corrupt, plus vit-soft's version."""
    home = tmp_path_factory.mktemp("prometheus-kiln")
    version = copy_model(kiln_home, "vit-soft", home).name
    copy_model(kiln_home, "vit-soft", home, as_name="vit-spare")
    corrupt = copy_model(kiln_home, "vit-soft", home, as_name="vit-corrupt")
    (corrupt / "model.onnx").write_bytes(b"\x08\x07 not an ONNX graph")
    srv = start_server(
        home,
        "--no-train",
        "--models",
        "vit-soft,vit-spare,vit-corrupt",
        "--batch-window-ms",
        "5",
        "--max-queue-size",
        str(MAX_QUEUE_SIZE),
        env={"KILN_ADMIN_TOKEN": TOKEN, "KILN_THREADS": "1"},
        ready_path="/v2/health/live",
        timeout=180,
    )
    srv.version = version
    yield srv
    stop_server(srv.process)


@pytest.fixture(scope="module")
def prometheus(kiln, tmp_path_factory):
    binary = prometheus_binary()
    work = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(_rules_for_test(work))],
        "scrape_configs": [
            {
                "job_name": "kiln",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [kiln.http_hostport]}],
            }
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = work / "prometheus.log"
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready in 60 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)
        prom = Prometheus(url, process, log)
        prom.wait_for('up{job="kiln"}', lambda r: r and r[0]["value"][1] == "1")
        yield prom
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _infer_json(rows: int, seed: int = 0, shape_ok: bool = True) -> dict:
    x = np.random.default_rng(seed).random((rows, 1, 32, 32), dtype=np.float32)
    shape = list(x.shape) if shape_ok else [rows, 1, 16, 64]  # same element count, wrong shape
    return {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": x.ravel().tolist()}]}


@pytest.fixture(scope="module")
def traffic(kiln, prometheus):
    """Drive known traffic at vit-soft and count it here: HTTP and gRPC successes, bad input, a burst."""
    url = f"{kiln.http}/v2/models/vit-soft/infer"
    counts = {"http_ok": 0, "rows_ok": 0, "bad": 0, "rejected": 0, "grpc_ok": 0}
    with httpx.Client(timeout=60) as client:
        for i in range(10):
            rows = 1 + i % 3
            r = client.post(url, json=_infer_json(rows, i))
            assert r.status_code == 200, r.text
            counts["http_ok"] += 1
            counts["rows_ok"] += rows
        for i in range(3):
            r = client.post(url, json=_infer_json(1, i, shape_ok=False))
            assert r.status_code == 400, r.text
            counts["bad"] += 1

    grpc = tgrpc.InferenceServerClient(kiln.grpc)
    for i in range(5):
        x = np.random.default_rng(100 + i).random((2, 1, 32, 32), dtype=np.float32)
        inp = tgrpc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        grpc.infer("vit-soft", [inp])
        counts["grpc_ok"] += 1
        counts["rows_ok"] += 2

    def one(i: int) -> int:
        with httpx.Client(timeout=60) as c:
            return c.post(url, json=_infer_json(4, 1000 + i)).status_code

    # Concurrent bursts: adaptive batching merges them, and past MAX_QUEUE_SIZE admission control answers 429.
    for _ in range(5):
        with ThreadPoolExecutor(BURST) as pool:
            statuses = list(pool.map(one, range(BURST)))
        assert set(statuses) <= {200, 429}, statuses
        counts["http_ok"] += statuses.count(200)
        counts["rows_ok"] += 4 * statuses.count(200)
        counts["rejected"] += statuses.count(429)
        if counts["rejected"]:
            break
    assert counts["rejected"], f"{5 * BURST} concurrent requests never filled a queue of {MAX_QUEUE_SIZE}"
    return counts


def _labels_of(result: list[dict]) -> list[dict]:
    return [{k: v for k, v in s["metric"].items() if k not in ("job", "instance")} for s in result]


def test_request_counts_arrive_with_model_version_backend_protocol_status(kiln, prometheus, traffic):
    sel = f'job="kiln",model="vit-soft",version="{kiln.version}",backend="onnxruntime"'
    ok = traffic["http_ok"] + traffic["grpc_ok"]
    prometheus.wait_for(
        f'sum(kiln_inference_requests_total{{{sel},status="success"}})',
        lambda r: r and float(r[0]["value"][1]) == ok,
    )
    by_protocol = prometheus.query(
        f'sum by (protocol) (kiln_inference_requests_total{{{sel},status="success"}})'
    )
    assert {s["metric"]["protocol"]: float(s["value"][1]) for s in by_protocol} == {
        "http": traffic["http_ok"],
        "grpc": traffic["grpc_ok"],
    }
    failures = prometheus.value('sum(kiln_inference_requests_total{model="vit-soft",status="failure"})')
    assert failures == traffic["bad"] + traffic["rejected"]  # 400s and 429s are failures


def test_latency_histogram_and_p99(kiln, prometheus, traffic):
    sel = 'job="kiln",model="vit-soft",backend="onnxruntime"'
    prometheus.wait_for(
        f"sum(kiln_inference_request_seconds_count{{{sel}}})",
        lambda r: r and float(r[0]["value"][1]) >= traffic["http_ok"] + traffic["grpc_ok"],
    )
    p99 = prometheus.value(
        f"histogram_quantile(0.99, sum by (le) (rate(kiln_inference_request_seconds_bucket{{{sel}}}[1m])))"
    )
    assert p99 is not None and 0 < p99 < 10 and math.isfinite(p99)
    buckets = prometheus.query(f'kiln_inference_request_seconds_bucket{{{sel},protocol="grpc"}}')
    assert {s["metric"]["le"] for s in buckets} >= {"0.001", "0.1", "1.0", "+Inf"}


def test_queue_batch_and_row_counts(kiln, prometheus, traffic):
    sel = 'job="kiln",model="vit-soft",backend="onnxruntime"'
    prometheus.wait_for(
        f"sum(kiln_inference_count_total{{{sel}}})",
        lambda r: r and float(r[0]["value"][1]) == traffic["rows_ok"],
    )
    executions = prometheus.value(f"sum(kiln_inference_exec_count_total{{{sel}}})")
    assert 0 < executions < traffic["http_ok"] + traffic["grpc_ok"], "the bursts were batched"
    assert prometheus.value(f"sum(kiln_inference_batch_size_count{{{sel}}})") == executions
    assert prometheus.value(f"sum(kiln_inference_batch_size_sum{{{sel}}})") == traffic["rows_ok"]
    assert prometheus.value(f"sum(kiln_inference_compute_seconds_count{{{sel}}})") == executions
    queued = prometheus.value(f"sum(kiln_inference_queue_seconds_count{{{sel}}})")
    assert queued >= traffic["http_ok"] + traffic["grpc_ok"]  # every admitted request waited in the queue
    rejected = prometheus.query(f"kiln_inference_rejected_total{{{sel}}}")
    assert sum(float(s["value"][1]) for s in rejected) == traffic["rejected"]
    assert {s["metric"]["reason"] for s in rejected} <= {"queue_full", "queue_delay"}
    assert prometheus.query(f"kiln_inference_queue_size{{{sel}}}"), "the queue-size gauge is exported"


def test_model_readiness_including_a_model_going_unavailable(kiln, prometheus, traffic):
    ready = prometheus.wait_for(
        'kiln_model_ready{job="kiln"}',
        lambda r: {s["metric"]["model"] for s in r} >= {"vit-soft", "vit-spare", "vit-corrupt"},
    )
    state = {(s["metric"]["model"], s["metric"]["backend"]): float(s["value"][1]) for s in ready}
    assert state[("vit-soft", "onnxruntime")] == 1 and state[("vit-spare", "onnxruntime")] == 1
    assert state[("vit-corrupt", "onnxruntime")] == 0  # the bad artifact, from its first scrape
    assert prometheus.value('max(kiln_model_load_seconds{model="vit-soft",backend="onnxruntime"})') > 0

    r = httpx.post(
        f"{kiln.http}/v2/repository/models/vit-spare/unload",
        headers={"Authorization": f"Bearer {TOKEN}"},
        json={},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    prometheus.wait_for(
        'max(kiln_model_ready{model="vit-spare"})', lambda r: r and float(r[0]["value"][1]) == 0
    )
    assert prometheus.value('max(kiln_model_ready{model="vit-soft"})') == 1


def test_recording_and_alerting_rules_see_the_live_series(kiln, prometheus, traffic):
    ratio = prometheus.wait_for(
        'model:kiln_inference_errors:ratio_rate5m{model="vit-soft"}', lambda r: bool(r)
    )
    assert 0 < float(ratio[0]["value"][1]) < 1
    assert prometheus.wait_for('model:kiln_inference_rejected:rate5m{model="vit-soft"}', bool)
    assert prometheus.wait_for('model:kiln_inference_batch_rows:mean_rate5m{model="vit-soft"}', bool)
    # KilnModelNotReady matches the corrupt model (pending: its `for` is 2 minutes), not vit-soft.
    alerts = prometheus.wait_for(
        'ALERTS{alertname="KilnModelNotReady"}',
        lambda r: any(s["metric"]["model"] == "vit-corrupt" for s in r),
    )
    assert "vit-soft" not in {s["metric"]["model"] for s in alerts}
    body = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()
    unhealthy = [
        (rule["name"], rule.get("lastError"))
        for group in body["data"]["groups"]
        for rule in group["rules"]
        if rule["health"] != "ok"
    ]
    assert not unhealthy, unhealthy


def test_every_dashboard_query_returns_data(kiln, prometheus, traffic):
    dashboard = json.loads((MONITORING / "dashboards" / "kiln-serving.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    prometheus.wait_for('model:kiln_inference_errors:ratio_rate5m{model="vit-soft"}', bool)
    empty = []
    for expr in exprs:
        live = expr.replace("$__rate_interval", "1m").replace('model=~"$model"', 'model=~".*"')
        assert "$" not in live, f"unsubstituted Grafana variable in {expr}"
        if not prometheus.query(live):
            empty.append(expr)
    assert not empty, f"dashboard queries with no data against a live server: {empty}"


def test_the_autoscaling_metrics_prometheus_adapter_serves_answer(kiln, prometheus, traffic):
    """prometheus-adapter's queries (k8s/monitoring/prometheus-adapter-values.yaml), with its template filled
    in as for this one scrape target (a cluster fills in namespace and pod), return a number per target."""
    values = yaml.safe_load((MONITORING / "prometheus-adapter-values.yaml").read_text())
    prometheus.wait_for("sum(rate(kiln_inference_queue_seconds_count[1m]))", bool)
    for rule in values["rules"]["custom"]:
        query = (
            rule["metricsQuery"]
            .replace("<<.LabelMatchers>>", 'job="kiln"')
            .replace("<<.GroupBy>>", "instance")
        )
        result = prometheus.query(query)
        assert [s["metric"] for s in result] == [{"instance": kiln.http_hostport}], (
            rule["name"]["as"],
            result,
        )
        assert math.isfinite(float(result[0]["value"][1])) and float(result[0]["value"][1]) >= 0
