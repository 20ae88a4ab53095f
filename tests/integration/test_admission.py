"""Admission control and SIGTERM drain against a real `kiln serve` process (HTTP and gRPC).

The server runs vit-soft and vit-softmax on the PyTorch backend with batching off (one request per
batch, so a 64-row request holds the model for a while) and small per-model queue bounds, set through
``KILN_MODEL_SETTINGS`` — the per-model settings path itself. Waits are on the server's own metrics
(``kiln_inference_queue_size``), not on sleeps, so the order of events is known.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import grpc
import httpx
import numpy as np
import pytest
from serverproc import metric_total, start_server, stop_server

from serving.oip.proto import grpc_predict_v2_pb2 as pb
from serving.oip.proto import grpc_predict_v2_pb2_grpc as pb_grpc

SETTINGS = {
    # queue bound by count only: 4 waiting requests
    "vit-soft": {"backend": "pytorch", "batch_max_size": 1, "max_queue_size": 4, "max_queue_delay_ms": 0},
    # queue bound by time only: a request that would wait over 5 ms is refused
    "vit-softmax": {
        "backend": "pytorch",
        "batch_max_size": 1,
        "max_queue_size": 1000,
        "max_queue_delay_ms": 5,
    },
}
BIG = 64  # rows of a request that keeps the model busy (the OIP max_batch_size)


@pytest.fixture(scope="module")
def srv(server, kiln_home):
    """A second server on the session's store (the `server` fixture trained and exported the models)."""
    s = start_server(
        kiln_home,
        "--no-train",
        "--models",
        "vit-soft,vit-softmax",
        "--drain-timeout-s",
        "60",
        "--max-request-bytes",  # a 64-row JSON tensor is 1.3 MB (the suite's default limit is 1 MiB)
        str(4 * 1024 * 1024),
        env={"KILN_MODEL_SETTINGS": json.dumps(SETTINGS), "KILN_THREADS": "1"},
        timeout=300,
    )
    yield s
    stop_server(s.process)


def _body(rows: int, seed: int = 0, timeout_us: int | None = None) -> dict:
    x = np.random.default_rng(seed).random((rows, 1, 32, 32), dtype=np.float32)
    body = {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }
    if timeout_us is not None:
        body["parameters"] = {"timeout": timeout_us}
    return body


def _grpc_request(model: str, rows: int = 1) -> pb.ModelInferRequest:
    x = np.random.default_rng(rows).random((rows, 1, 32, 32), dtype=np.float32)
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[x.astype("<f4").tobytes()],
    )


async def _metric(client: httpx.AsyncClient, srv, name: str, **labels: str) -> float:
    text = (await client.get(f"{srv.http}/metrics")).text
    return metric_total(text, name, **labels)


async def _wait_queued(client: httpx.AsyncClient, srv, model: str, n: int, timeout: float = 30) -> None:
    """Until at least ``n`` requests wait in ``model``'s PyTorch queue (read from /metrics)."""
    t0 = time.monotonic()
    while await _metric(client, srv, "kiln_inference_queue_size", model=model, backend="pytorch") < n:
        assert time.monotonic() - t0 < timeout, f"{model}: fewer than {n} requests ever queued"
        await asyncio.sleep(0.01)


async def _hold(client: httpx.AsyncClient, srv, model: str = "vit-soft", n: int = 2) -> list[asyncio.Task]:
    """``n`` big requests: one computing, the others queued behind it."""
    url = f"{srv.http}/v2/models/{model}/infer"
    bigs = [asyncio.create_task(client.post(url, json=_body(BIG, seed=i))) for i in range(n)]
    await _wait_queued(client, srv, model, 1)
    return bigs


def test_full_queue_gets_429_with_retry_after_on_http_routes(srv):
    async def scenario():
        async with httpx.AsyncClient(timeout=60) as c:
            oip = [c.post(f"{srv.http}/v2/models/vit-soft/infer", json=_body(1, i)) for i in range(30)]
            image = [[0, 1, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0]]
            task = [
                c.post(f"{srv.http}/classify", json={"image": image, "model": "vit-soft"}) for _ in range(30)
            ]
            return [*await asyncio.gather(*oip), *await asyncio.gather(*task)]  # one route, then the other

    responses = asyncio.run(scenario())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    for route in (responses[:30], responses[30:]):  # the OIP route and the task route each
        assert any(r.status_code == 429 for r in route) and any(r.status_code == 200 for r in route)
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert "max_queue_size 4" in r.json()["error"]


def test_full_queue_gets_resource_exhausted_over_grpc(srv):
    async def scenario():
        async with grpc.aio.insecure_channel(srv.grpc) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def call():
                try:
                    await stub.ModelInfer(_grpc_request("vit-soft"), timeout=60)
                    return grpc.StatusCode.OK, ""
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), exc.details()

            return await asyncio.gather(*(call() for _ in range(30)))

    results = asyncio.run(scenario())
    codes = [code for code, _ in results]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, results
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
    assert all("max_queue_size" in d for code, d in results if code != grpc.StatusCode.OK)


def test_queue_time_bound_refuses_with_429(srv):
    async def scenario():
        async with httpx.AsyncClient(timeout=60) as c:
            url = f"{srv.http}/v2/models/vit-softmax/infer"
            assert (await c.post(url, json=_body(1))).status_code == 200  # a batch time to estimate from
            before = await _metric(
                c, srv, "kiln_inference_rejected_total", model="vit-softmax", reason="queue_delay"
            )
            responses = await asyncio.gather(*(c.post(url, json=_body(1, i)) for i in range(40)))
            after = await _metric(
                c, srv, "kiln_inference_rejected_total", model="vit-softmax", reason="queue_delay"
            )
            return responses, after - before

    responses, rejected = asyncio.run(scenario())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and 429 in statuses, statuses
    assert rejected == statuses.count(429)
    assert all("max_queue_delay_ms 5" in r.json()["error"] for r in responses if r.status_code == 429)


def test_timeouts_are_honoured_and_expired_requests_not_computed(srv):
    async def scenario():
        async with httpx.AsyncClient(timeout=60) as c:
            labels = {"model": "vit-soft", "backend": "pytorch"}
            count0 = await _metric(c, srv, "kiln_inference_count_total", **labels)
            timeouts0 = await _metric(c, srv, "kiln_inference_timeouts_total", **labels)
            bigs = await _hold(c, srv)

            # Sent together, both queued behind the second big request (a whole 64-row batch), whatever
            # the machine's speed: OIP `parameters.timeout` (microseconds) of 5 ms, and a gRPC deadline.
            async def http_late():
                t0 = time.monotonic()
                r = await c.post(f"{srv.http}/v2/models/vit-soft/infer", json=_body(1, timeout_us=5_000))
                return r, time.monotonic() - t0

            async def grpc_late():
                async with grpc.aio.insecure_channel(srv.grpc) as channel:
                    stub = pb_grpc.GRPCInferenceServiceStub(channel)
                    try:
                        await stub.ModelInfer(_grpc_request("vit-soft"), timeout=0.01)
                    except grpc.aio.AioRpcError as exc:
                        return exc.code()
                    return grpc.StatusCode.OK

            (late, late_s), code = await asyncio.gather(http_late(), grpc_late())
            assert all(r.status_code == 200 for r in await asyncio.gather(*bigs))
            count = await _metric(c, srv, "kiln_inference_count_total", **labels) - count0
            timeouts = await _metric(c, srv, "kiln_inference_timeouts_total", **labels) - timeouts0
            return late, late_s, code, count, timeouts

    late, late_s, code, count, timeouts = asyncio.run(scenario())
    assert late.status_code == 504 and "timeout" in late.json()["error"], late.text
    assert late_s < 5
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert timeouts >= 1  # the server answered the HTTP one itself (gRPC's may be cancelled by grpc first)
    assert count == 2 * BIG  # only the two big requests were computed


def test_cancelled_requests_are_not_computed(srv):
    async def scenario():
        async with httpx.AsyncClient(timeout=60) as c:
            labels = {"model": "vit-soft", "backend": "pytorch"}
            count0 = await _metric(c, srv, "kiln_inference_count_total", **labels)
            cancelled0 = await _metric(c, srv, "kiln_inference_dropped_total", reason="cancelled", **labels)
            url = f"{srv.http}/v2/models/vit-soft/infer"
            bodies = [json.dumps(_body(1, i)).encode() for i in range(3)]  # encoded before the clock runs
            gone = httpx.AsyncClient(timeout=60, headers={"content-type": "application/json"})
            bigs = await _hold(c, srv)
            smalls = [asyncio.create_task(gone.post(url, content=b)) for b in bodies]
            # All three small ones wait behind a big one: while the first big one computes, the second
            # waits too (queue 4); once it finished, the second computes (queue 3). One scrape gives both
            # figures, so the count says which big one is computing; two scrapes in a row must agree (the
            # count and the queue gauge move a moment apart when the second big one starts).
            t0, agreed = time.monotonic(), 0
            while agreed < 2:
                text = (await c.get(f"{srv.http}/metrics")).text
                done = metric_total(text, "kiln_inference_count_total", **labels) - count0
                queued = metric_total(text, "kiln_inference_queue_size", **labels)
                assert done < 2 * BIG, "both big requests finished before the small ones were queued"
                agreed = agreed + 1 if queued - (1 if done == 0 else 0) >= 3 else 0
                assert time.monotonic() - t0 < 30, f"small ones never queued (queue {queued}, done {done})"
                await asyncio.sleep(0.005)
            for task in smalls:
                task.cancel()  # the client goes away: its connections close
            await asyncio.gather(*smalls, return_exceptions=True)
            await gone.aclose()
            assert all(r.status_code == 200 for r in await asyncio.gather(*bigs))
            t0 = time.monotonic()
            while True:
                cancelled = await _metric(
                    c, srv, "kiln_inference_dropped_total", reason="cancelled", **labels
                )
                if cancelled - cancelled0 >= 3 or time.monotonic() - t0 > 10:
                    break
                await asyncio.sleep(0.05)
            count = await _metric(c, srv, "kiln_inference_count_total", **labels) - count0
            return cancelled - cancelled0, count

    cancelled, count = asyncio.run(scenario())
    assert cancelled == 3
    assert count == 2 * BIG  # the cancelled rows were never computed


def test_sigterm_drains_accepted_requests_then_exits(srv):
    """SIGTERM to the server's main process (as the kubelet sends it) under load: readiness 503 at once,
    new requests refused (503 / UNAVAILABLE), every request accepted before the signal succeeds, exit."""
    proc = srv.process
    signalled: list[float] = []

    async def background(c: httpx.AsyncClient, outcomes: list, stop: asyncio.Event) -> None:
        url = f"{srv.http}/v2/models/vit-softmax/infer"
        while proc.poll() is None and not stop.is_set():
            sent = time.monotonic()
            try:
                r = await c.post(url, json=_body(1))
                outcomes.append((sent, time.monotonic(), r.status_code, r.text[:200]))
            except httpx.HTTPError as exc:
                outcomes.append((sent, time.monotonic(), type(exc).__name__, str(exc)[:200]))
                await asyncio.sleep(0.05)

    async def scenario():
        outcomes: list = []
        stop = asyncio.Event()
        async with httpx.AsyncClient(timeout=60) as c, httpx.AsyncClient(timeout=10) as probe:
            load = [asyncio.create_task(background(c, outcomes, stop)) for _ in range(4)]
            await asyncio.sleep(0.5)
            bigs = await _hold(c, srv, n=3)  # accepted: one computing, two queued
            url = f"{srv.http}/v2/models/vit-soft/infer"
            small = asyncio.create_task(c.post(url, json=_body(1)))
            async with grpc.aio.insecure_channel(srv.grpc) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                rpc = asyncio.ensure_future(stub.ModelInfer(_grpc_request("vit-soft"), timeout=60))
                await asyncio.sleep(0.2)  # both in flight (queued, or still being decoded): accepted
                os.kill(proc.pid, signal.SIGTERM)
                signalled.append(time.monotonic())
                t0 = time.monotonic()
                while (await probe.get(f"{srv.http}/v2/health/ready")).status_code != 503:
                    assert time.monotonic() - t0 < 5, "readiness did not flip within 5 s of SIGTERM"
                ready_flip_s = time.monotonic() - t0
                refused = await probe.post(url, json=_body(1))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ModelInfer(_grpc_request("vit-soft"), timeout=30)
                accepted = await asyncio.gather(*bigs, small)
                grpc_reply = await rpc
            stop.set()
            await asyncio.gather(*load)
        return outcomes, ready_flip_s, refused, err.value, accepted, grpc_reply

    outcomes, ready_flip_s, refused, grpc_err, accepted, grpc_reply = asyncio.run(scenario())
    t_signal = signalled[0]
    assert proc.wait(timeout=60) is not None  # the whole process tree exits
    assert ready_flip_s < 5
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
    assert grpc_err.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in grpc_err.details()
    assert [r.status_code for r in accepted] == [200, 200, 200, 200]
    assert grpc_reply.outputs[0].name == "logits"
    assert outcomes, "the background load sent nothing"
    for _sent, done, status, text in outcomes:
        if done < t_signal:
            assert status in (200, 429), (status, text)  # before the signal: served or queue-bounded
        else:  # after: served (accepted before), queue-bounded, refused, or the port closed at exit
            assert status in (200, 429, 503, "ConnectError", "ReadError", "RemoteProtocolError"), (
                status,
                text,
            )
