"""Admission control in the batcher, per-model settings, and the HTTP request-lifecycle middleware.

The batcher runs a real thread-pool executor over a blocking function (a stand-in runtime that sleeps
while it "computes"), so queueing, deadlines and cancellation happen as on the server.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest

from serving import metrics
from serving.admission import Drain, EdgeGate, RequestLifecycleMiddleware, outermost
from serving.batching import (
    AdaptiveBatcher,
    DeadlineExceeded,
    Overloaded,
    request_timeout,
    timeout_parameter,
)
from serving.config import ConfigError, ServeConfig
from serving.repository import InferenceError

_count = iter(range(10**6))


def _labels() -> dict[str, str]:
    return {"model": f"unit-admission-{next(_count)}", "version": "1", "backend": "numpy"}


class Slow:
    """y = 2x after ``seconds``; records the rows of every batch it computed."""

    def __init__(self, seconds: float = 0.05):
        self.seconds = seconds
        self.batches: list[int] = []
        self.concurrent = 0
        self.most_concurrent = 0
        self._lock = threading.Lock()

    def __call__(self, inputs):
        with self._lock:
            self.concurrent += 1
            self.most_concurrent = max(self.most_concurrent, self.concurrent)
        time.sleep(self.seconds)
        with self._lock:
            self.concurrent -= 1
        self.batches.append(len(inputs["x"]))
        return {"y": 2 * inputs["x"]}


def _x(rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.ones((rows, 2), np.float32)}


def _value(metric, **labels) -> float:
    return metric.labels(**labels)._value.get()


def test_full_queue_is_refused_at_once_with_retry_after():
    run, labels = Slow(0.1), _labels()
    batcher = AdaptiveBatcher(run, max_batch_size=1, window_ms=0, labels=labels, max_queue_size=2)

    async def scenario():
        tasks = [asyncio.ensure_future(batcher.submit(_x()))]
        await asyncio.sleep(0.02)  # computing: no longer waiting
        tasks += [asyncio.ensure_future(batcher.submit(_x())) for _ in range(5)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    t0 = time.monotonic()
    results = asyncio.run(scenario())
    refused = [r for r in results if isinstance(r, Overloaded)]
    # one computes at once, two wait, the other three are refused
    assert len(refused) == 3 and all(isinstance(r, dict) for r in results[:3])
    assert all(
        r.status == 429 and "max_queue_size 2" in r.message and int(r.retry_after) >= 1 for r in refused
    )
    assert time.monotonic() - t0 < 1.0
    assert _value(metrics.REJECTED, **labels, reason="queue_full") == 3
    batcher.close()


def test_estimated_queue_time_over_the_bound_is_refused():
    run, labels = Slow(0.05), _labels()
    batcher = AdaptiveBatcher(
        run, max_batch_size=1, window_ms=0, labels=labels, max_queue_size=100, max_queue_delay_ms=120
    )

    async def scenario():
        await batcher.submit(_x())  # one batch: ~50 ms, the estimate's basis
        tasks = [asyncio.ensure_future(batcher.submit(_x())) for _ in range(10)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(scenario())
    refused = [r for r in results if isinstance(r, Overloaded)]
    # ~50 ms a batch (more on a busy machine): the first few fit within 120 ms of queueing, the rest
    # would wait longer
    assert 1 <= len(results) - len(refused) <= 5 and len(refused) >= 5, results
    assert all("max_queue_delay_ms 120" in r.message for r in refused)
    batcher.close()


def test_timeout_drops_a_queued_request_without_computing_it():
    run, labels = Slow(0.5), _labels()
    batcher = AdaptiveBatcher(run, max_batch_size=1, window_ms=0, labels=labels)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(_x(3)))
        await asyncio.sleep(0.02)
        with request_timeout(0.05):
            late = asyncio.ensure_future(batcher.submit(_x(1)))
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded) as err:
            await late
        waited = time.monotonic() - t0
        await first
        return err.value, waited

    err, waited = asyncio.run(scenario())
    assert err.status == 504 and "queued" in err.message
    assert waited < 0.4  # answered at its deadline (50 ms), not when the batch ahead finished (~0.5 s)
    assert run.batches == [3]  # the timed-out request was never computed
    assert _value(metrics.DROPPED, **labels, reason="timeout") == 1
    assert _value(metrics.QUEUE_SIZE, **labels) == 0
    batcher.close()


def test_cancelled_requests_leave_the_queue_uncomputed():
    run, labels = Slow(0.2), _labels()
    batcher = AdaptiveBatcher(run, max_batch_size=1, window_ms=0, labels=labels, max_queue_size=3)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(_x(2)))
        await asyncio.sleep(0.02)
        gone = [asyncio.ensure_future(batcher.submit(_x(1))) for _ in range(3)]
        await asyncio.sleep(0.02)
        for task in gone:
            task.cancel()
        await asyncio.gather(*gone, return_exceptions=True)
        # their slots are free at once: three more fit in the queue of 3
        more = [asyncio.ensure_future(batcher.submit(_x(1))) for _ in range(3)]
        return await first, await asyncio.gather(*more)

    asyncio.run(scenario())
    assert run.batches == [2, 1, 1, 1]  # the cancelled rows never reached the runtime
    assert _value(metrics.DROPPED, **labels, reason="cancelled") == 3
    batcher.close()


def test_session_is_admitted_once_and_its_steps_are_never_refused():
    run, labels = Slow(0.01), _labels()
    batcher = AdaptiveBatcher(run, max_batch_size=4, window_ms=1, labels=labels, max_queue_size=2)

    async def loop(steps: int) -> int:
        with batcher.session():
            for _ in range(steps):
                await batcher.submit(_x(1))
        return steps

    async def scenario():
        tasks = [asyncio.ensure_future(loop(5)) for _ in range(4)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(scenario())
    assert results[:2] == [5, 5]  # two sampling loops in progress: the bound
    assert all(isinstance(r, Overloaded) for r in results[2:])
    batcher.close()


def test_instances_compute_batches_concurrently():
    run, labels = Slow(0.1), _labels()
    batcher = AdaptiveBatcher([run, run], max_batch_size=1, window_ms=0, labels=labels)

    async def scenario():
        await asyncio.gather(*(batcher.submit(_x()) for _ in range(4)))

    asyncio.run(scenario())
    assert run.most_concurrent == 2 and run.batches == [1, 1, 1, 1]
    batcher.close()


@pytest.mark.parametrize(("value", "seconds"), [(None, None), (0, None), (250_000, 0.25)])
def test_timeout_parameter_is_microseconds(value, seconds):
    assert timeout_parameter({} if value is None else {"timeout": value}) == seconds


@pytest.mark.parametrize("value", [-1, 1.5, "10", True])
def test_bad_timeout_parameter_is_a_400(value):
    with pytest.raises(InferenceError) as err:
        timeout_parameter({"timeout": value})
    assert err.value.status == 400 and "timeout" in err.value.message


# --- per-model settings -------------------------------------------------------------------------------


def test_per_model_settings_override_the_global_ones(monkeypatch, tmp_path):
    config = tmp_path / "models.yaml"
    config.write_text("vit-soft:\n  backend: pytorch\n  batch_max_size: 8\n  instances: 2\n")
    monkeypatch.setenv("KILN_MODEL_CONFIG", str(config))
    monkeypatch.setenv("KILN_MODEL_SETTINGS", json.dumps({"vit-soft": {"max_queue_size": 16}}))
    monkeypatch.setenv("KILN_MAX_QUEUE_DELAY_MS", "250")
    cfg = ServeConfig.from_env()
    soft = cfg.settings_for("vit-soft")
    assert (soft.backend, soft.batch_max_size, soft.instances, soft.max_queue_size) == ("pytorch", 8, 2, 16)
    assert soft.max_queue_delay_ms == 250 and soft.explicit == {
        "backend",
        "batch_max_size",
        "instances",
        "max_queue_size",
    }
    other = cfg.settings_for("vit-softmax")
    assert (other.backend, other.batch_max_size, other.max_queue_size) == ("onnxruntime", 32, 256)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"vit-soft": {"batch_size": 8}}, "unknown settings \\['batch_size'\\]; valid"),
        ({"vit-soft": {"backend": "tensorflow"}}, "vit-soft.*not a backend"),
        ({"vit-soft": {"max_queue_size": 0}}, "max_queue_size=0 must be >= 1"),
        ({"vit-soft": {"instances": 1.5}}, "instances must be an integer"),
        ({"vit-soft": {"batch_window_ms": "fast"}}, "batch_window_ms must be a number"),
        (["vit-soft"], "must map model names to settings"),
    ],
)
def test_bad_model_settings_fail_at_startup(monkeypatch, settings, message):
    monkeypatch.setenv("KILN_MODEL_SETTINGS", json.dumps(settings))
    with pytest.raises(ConfigError, match=message):
        ServeConfig.from_env()


def test_missing_or_malformed_model_config_file(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_MODEL_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="no such file"):
        ServeConfig.from_env()
    bad = tmp_path / "bad.yaml"
    bad.write_text("vit-soft: [unclosed\n")
    monkeypatch.setenv("KILN_MODEL_CONFIG", str(bad))
    with pytest.raises(ConfigError, match="not valid YAML"):
        ServeConfig.from_env()


# --- the HTTP middleware ------------------------------------------------------------------------------


def test_middleware_cancels_the_request_when_the_client_disconnects():
    cancelled = asyncio.Event()

    async def app(scope, receive, send):
        await receive()  # the body
        try:
            await asyncio.sleep(10)  # "queued"
        except asyncio.CancelledError:
            cancelled.set()
            raise

    drain = Drain()
    middleware = EdgeGate(RequestLifecycleMiddleware(app), drain)  # as the service stacks them

    async def scenario():
        messages = asyncio.Queue()
        await messages.put({"type": "http.request", "body": b"{}", "more_body": False})
        sent = []

        async def send(message):
            sent.append(message)

        task = asyncio.ensure_future(middleware({"type": "http", "path": "/classify"}, messages.get, send))
        await asyncio.sleep(0.05)
        assert drain.in_flight == 1
        await messages.put({"type": "http.disconnect"})
        await asyncio.wait_for(task, 2)
        return sent

    sent = asyncio.run(scenario())
    assert cancelled.is_set() and drain.in_flight == 0
    assert [m.get("status") for m in sent] == [499, None]  # ends the request for the outer layers


def test_middleware_refuses_new_requests_while_draining_but_answers_health():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    drain = Drain()
    drain.begin()
    middleware = EdgeGate(app, drain)

    async def call(path):
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await middleware({"type": "http", "path": path}, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    status, body = asyncio.run(call("/v2/models/vit-soft/infer"))
    assert status == 503 and b"shutting down" in body
    assert asyncio.run(call("/v2/health/live"))[0] == 200


def test_edge_bound_refuses_past_max_in_flight_before_reading_the_body():
    release = asyncio.Event()

    async def app(scope, receive, send):
        await receive()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    drain = Drain(max_in_flight=2)
    middleware = EdgeGate(app, drain)

    async def call():
        sent = []
        reads = 0

        async def receive():
            nonlocal reads
            reads += 1
            if reads > 1:
                await asyncio.sleep(10)
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            sent.append(message)

        await middleware({"type": "http", "path": "/v2/models/m/infer"}, receive, send)
        return sent[0]["status"], dict(sent[0]["headers"]), reads

    async def scenario():
        first = [asyncio.ensure_future(call()) for _ in range(2)]
        await asyncio.sleep(0.05)
        refused = await call()
        release.set()
        return refused, await asyncio.gather(*first)

    (status, headers, reads), served = asyncio.run(scenario())
    assert status == 429 and headers[b"retry-after"] == b"1" and reads == 0
    assert [s for s, _, _ in served] == [200, 200]


def test_kiln_serve_stops_at_a_bad_model_config_with_the_fix(tmp_path):
    import os

    from typer.testing import CliRunner

    from kiln.cli import app

    bad = tmp_path / "models.yaml"
    bad.write_text("vit-soft:\n  instances: 0\n")
    saved = dict(os.environ)
    try:
        result = CliRunner().invoke(app, ["serve", "--no-train", "--model-config", str(bad)])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert result.exit_code == 1
    assert "vit-soft" in result.output and "instances=0 must be >= 1" in result.output


def _call(app, path: str = "/v2/models/m/infer", scope_type: str = "http"):
    """Run one request through ``app``; returns (sent messages, how many times the body was read)."""
    sent: list[dict] = []
    reads = 0

    async def receive():
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": scope_type, "path": path}, receive, send))
    return sent, reads


def _ok_app(calls: list):
    async def app(scope, receive, send):
        calls.append(scope["path"])
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def test_edge_gate_refusal_is_a_json_429_with_retry_after_and_never_reaches_the_app():
    calls: list[str] = []
    drain = Drain(max_in_flight=1)
    drain.in_flight = 1  # one request already in progress in this worker
    before = metrics.REJECTED.labels(
        model=metrics.UNKNOWN_MODEL, version="", backend="", reason="server_in_flight"
    )._value.get()
    sent, reads = _call(EdgeGate(_ok_app(calls), drain))
    start, body = sent
    headers = dict(start["headers"])
    assert start["status"] == 429 and headers[b"retry-after"] == b"1"
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body["body"])
    assert "max_in_flight 1" in json.loads(body["body"])["error"]
    assert headers[b"server-timing"].startswith(b"edge;dur=")
    assert calls == [] and reads == 0 and drain.in_flight == 1  # nothing below the gate ran
    after = metrics.REJECTED.labels(
        model=metrics.UNKNOWN_MODEL, version="", backend="", reason="server_in_flight"
    )._value.get()
    assert after == before + 1


def test_edge_gate_counts_admitted_requests_and_stamps_server_timing():
    seen: list[int] = []
    drain = Drain(max_in_flight=1)

    async def app(scope, receive, send):
        seen.append(drain.in_flight)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]})
        await send({"type": "http.response.body", "body": b"ok"})

    sent, _ = _call(EdgeGate(app, drain))
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 200 and headers[b"x-app"] == b"1"
    assert float(headers[b"server-timing"].split(b"edge;dur=")[1]) >= 0
    assert seen == [1] and drain.in_flight == 0


def test_edge_gate_lets_health_metrics_and_non_http_through_when_full_or_draining():
    calls: list[str] = []
    drain = Drain(max_in_flight=1)
    drain.in_flight = 5
    gate = EdgeGate(_ok_app(calls), drain)
    assert _call(gate, "/metrics")[0][0]["status"] == 200
    drain.begin()
    assert _call(gate, "/v2/health/ready")[0][0]["status"] == 200
    assert _call(gate, "/v2/models/m/infer")[0][0]["status"] == 503
    assert calls == ["/metrics", "/v2/health/ready"]

    async def lifespan(scope, receive, send):
        calls.append(scope["type"])

    _call(EdgeGate(lifespan, drain), "", scope_type="lifespan")
    assert calls[-1] == "lifespan"


def test_edge_gate_releases_its_slot_when_the_app_raises():
    drain = Drain(max_in_flight=1)

    async def failing(scope, receive, send):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        _call(EdgeGate(failing, drain))
    assert drain.in_flight == 0
    assert _call(EdgeGate(_ok_app([]), drain))[0][0]["status"] == 200


def test_outermost_puts_the_gate_outside_bentomls_own_middlewares():
    """A real BentoML service: its app (with BentoML's metrics, tracing, access log and timeout
    middlewares) is what the gate wraps; a refusal never reaches it, an admitted request does."""
    import bentoml
    from starlette.testclient import TestClient

    @bentoml.service(name="edge-gate-unit")
    class Plain:
        @bentoml.api
        def echo(self, text: str) -> str:
            return text

    drain = Drain(max_in_flight=1)
    outermost(Plain, EdgeGate, drain=drain)
    app = Plain.to_asgi()
    assert isinstance(app, EdgeGate) and type(Plain).__name__ == "Service"
    inner_types = []
    stack = app.app
    while stack is not None and len(inner_types) < 50:  # BentoML's Starlette app, built on first call
        inner_types.append(type(stack).__name__)
        stack = getattr(stack, "app", None)

    with TestClient(app) as client:  # runs the lifespan (through the gate) that creates the service
        ok = client.post("/echo", json={"text": "hi"})
        drain.in_flight = 1
        refused = client.post("/echo", json={"text": "hi"})
        drain.in_flight = 0
    assert inner_types[0] == "Starlette"
    assert ok.status_code == 200 and ok.text == "hi" and "edge;dur=" in ok.headers["server-timing"]
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert "max_in_flight" in refused.json()["error"]


def test_edge_bound_defaults_to_what_the_models_hold(monkeypatch):
    for name in ("KILN_MAX_IN_FLIGHT", "KILN_MODEL_SETTINGS", "KILN_MODEL_CONFIG", "KILN_BATCH_MAX_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KILN_MODELS", "vit-soft")
    monkeypatch.setenv("KILN_MAX_QUEUE_SIZE", "64")
    assert ServeConfig.from_env().edge_bound() == 64 + 32  # the queue plus one batch in computation
    monkeypatch.setenv("KILN_MODELS", "vit-soft,vit-softmax:v1")
    monkeypatch.setenv(
        "KILN_MODEL_SETTINGS", json.dumps({"vit-softmax": {"max_queue_size": 8, "instances": 2}})
    )
    assert ServeConfig.from_env().edge_bound() == (64 + 32) + (8 + 2 * 32)
    monkeypatch.setenv("KILN_MAX_QUEUE_SIZE", "1000")  # many or deep queues: at most 512
    assert ServeConfig.from_env().edge_bound() == 512
    monkeypatch.setenv("KILN_MAX_IN_FLIGHT", "auto")
    assert ServeConfig.from_env().edge_bound() == 512
    monkeypatch.setenv("KILN_MAX_IN_FLIGHT", "7")
    assert ServeConfig.from_env().edge_bound() == 7
    monkeypatch.setenv("KILN_MAX_IN_FLIGHT", "0")  # no bound
    assert ServeConfig.from_env().edge_bound() == 0
    monkeypatch.setenv("KILN_MAX_IN_FLIGHT", "many")
    with pytest.raises(ConfigError, match=r"KILN_MAX_IN_FLIGHT='many' is not an integer.*'auto'"):
        ServeConfig.from_env()
    monkeypatch.setenv("KILN_MAX_IN_FLIGHT", "-1")
    with pytest.raises(ConfigError, match="must be >= 0"):
        ServeConfig.from_env()
