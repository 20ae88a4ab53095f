"""Load generator for a running ``kiln serve``: ``python -m benchmarks.load --protocol grpc ...``.

Runs in its own process (so the server's CPU time is not the client's) with asyncio: ``--concurrency``
workers, each sending one single-image request (batch 1) at a time to ``/v2/models/MODEL/infer`` over

* ``http-json``: Open Inference Protocol JSON (``data`` as a flat list of floats);
* ``http-binary``: Triton's binary tensor extension (JSON header, ``Inference-Header-Content-Length``,
  raw little-endian FP32 bytes; the output asked back in binary too);
* ``grpc``: ``inference.GRPCInferenceService/ModelInfer`` over grpc.aio with ``raw_input_contents``,
  spread over ``--channels`` connections (default one per 8 concurrent requests).

Requests in the first ``--warmup`` seconds are not counted; then every worker stops at the deadline
(``--duration`` seconds later), so a cell is bounded. Prints one JSON line: completed requests, errors,
req/s over the measured window, p50/p99 latency.

``--connections N`` instead opens N keep-alive HTTP/1.1 connections at once (``http-binary`` requests,
raw asyncio protocols, so the client's own cost per request stays small) and keeps one request in flight
on each: a connection answered 429 waits the answer's ``Retry-After`` before its next request (as the
protocol asks; ``--ignore-retry-after`` retries at once, the worst case). It reports, by outcome, the
latency the client saw and the server's own time from each answer's ``Server-Timing: edge;dur=`` header,
and the client's event-loop lag (how late a 5 ms timer fires: what the client adds to a latency).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import numpy as np

from benchmarks.report import percentile

PROTOCOLS = ("http-json", "http-binary", "grpc")
_HEADER_LENGTH = "Inference-Header-Content-Length"


def _image(shape: list[int]) -> np.ndarray:
    shape = [1 if d < 0 else d for d in shape]
    return np.random.default_rng(0).random(shape, dtype=np.float32)


async def _http_sender(protocol: str, http: str, model: str, meta: dict[str, Any]):
    import httpx

    inp, out = meta["inputs"][0], meta["outputs"][0]
    x = _image(inp["shape"])
    url = f"{http}/v2/models/{model}/infer"
    if protocol == "http-json":
        body = {
            "inputs": [
                {"name": inp["name"], "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
            ]
        }
        content, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
    else:
        raw = x.astype("<f4").tobytes()
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": inp["name"],
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ],
                "outputs": [{"name": out["name"], "parameters": {"binary_data": True}}],
            }
        ).encode()
        content = header + raw
        headers = {"Content-Type": "application/octet-stream", _HEADER_LENGTH: str(len(header))}
    client = httpx.AsyncClient(
        timeout=60, limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)
    )

    async def send() -> bool:
        r = await client.post(url, content=content, headers=headers)
        return r.status_code == 200

    return send, client.aclose


async def _grpc_sender(grpc_addr: str, model: str, meta: dict[str, Any], channels: int):
    import grpc

    from serving.oip.proto import grpc_predict_v2_pb2 as pb
    from serving.oip.proto import grpc_predict_v2_pb2_grpc as pb_grpc

    inp = meta["inputs"][0]
    x = _image(inp["shape"])
    request = pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name=inp["name"], datatype="FP32", shape=list(x.shape))
        ],
        raw_input_contents=[x.astype("<f4").tobytes()],
    )
    # Several HTTP/2 connections, as several clients would open: a server with more than one worker
    # process shares its gRPC port (SO_REUSEPORT), which spreads connections, not the streams of one.
    opened = [grpc.aio.insecure_channel(grpc_addr) for _ in range(channels)]
    stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in opened]
    turn = 0

    async def send() -> bool:
        nonlocal turn
        turn += 1
        await stubs[turn % len(stubs)].ModelInfer(request, timeout=60)
        return True

    async def close() -> None:
        for c in opened:
            await c.close()

    return send, close


async def drive(
    protocol: str,
    http: str,
    grpc_addr: str,
    model: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    channels: int | None = None,
) -> dict[str, Any]:
    """Run the load for ``warmup_s + duration_s`` seconds; statistics cover the last ``duration_s``."""
    import httpx

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {list(PROTOCOLS)}")
    async with httpx.AsyncClient(timeout=30) as c:
        meta = (await c.get(f"{http}/v2/models/{model}")).raise_for_status().json()
    channels = channels or max(1, concurrency // 8)  # 8 streams per connection
    if protocol == "grpc":
        send, close = await _grpc_sender(grpc_addr, model, meta, channels)
    else:
        send, close = await _http_sender(protocol, http, model, meta)
    t_begin = time.perf_counter()
    t_measure, t_end = t_begin + warmup_s, t_begin + warmup_s + duration_s
    latencies: list[float] = []
    errors: list[str] = []
    sent = 0  # every answered request, warm-up included (the server's CPU per request is over all of them)

    async def worker() -> None:
        nonlocal sent
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            try:
                ok = await send()
                error = None if ok else "non-200 response"
            except Exception as exc:  # counted and reported, never retried
                error = f"{type(exc).__name__}: {exc}"[:200]
            t1 = time.perf_counter()
            sent += 1
            if t0 >= t_measure and t1 <= t_end:
                if error:
                    errors.append(error)
                else:
                    latencies.append(t1 - t0)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await close()
    return {
        "protocol": protocol,
        "concurrency": concurrency,
        "grpc_channels": channels if protocol == "grpc" else None,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": sorted(set(errors))[:3],
        "requests_with_warmup": sent,
        "req_per_s": len(latencies) / duration_s,
        "latency_ms_p50": percentile(latencies, 50) * 1e3 if latencies else None,
        "latency_ms_p99": percentile(latencies, 99) * 1e3 if latencies else None,
    }


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with one request in flight; answers are parsed just enough:
    status, Content-Length, Retry-After and Server-Timing's ``edge;dur``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.head: tuple[int, int, float | None, float] | None = None  # status, length, edge ms, retry s

    def connection_made(self, transport) -> None:
        self.transport = transport

    def request(self, raw: bytes) -> asyncio.Future:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.head is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = bytes(self.buffer[:end]).split(b"\r\n")
                del self.buffer[: end + 4]
                status, length, edge_ms, retry_s = int(lines[0].split(b" ", 2)[1]), 0, None, 0.0
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"retry-after":
                        retry_s = float(value)
                    elif name == b"server-timing" and b"edge;dur=" in value:
                        edge_ms = float(value.split(b"edge;dur=", 1)[1].split(b",", 1)[0])
                self.head = (status, length, edge_ms, retry_s)
            status, length, edge_ms, retry_s = self.head
            if len(self.buffer) < length:
                return
            del self.buffer[:length]
            self.head = None
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result((status, edge_ms, retry_s))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("the server closed the connection"))


def _binary_infer_request(host: str, port: int, model: str, meta: dict[str, Any]) -> bytes:
    """The raw bytes of one HTTP/1.1 binary-tensor infer request (keep-alive)."""
    inp, out = meta["inputs"][0], meta["outputs"][0]
    raw = _image(inp["shape"]).astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": inp["name"],
                    "shape": [1 if d < 0 else d for d in inp["shape"]],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": out["name"], "parameters": {"binary_data": True}}],
        }
    ).encode()
    body = header + raw
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/octet-stream\r\n{_HEADER_LENGTH}: {len(header)}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def storm(
    http: str,
    model: str,
    connections: int,
    duration_s: float,
    warmup_s: float,
    honor_retry_after: bool = True,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """``connections`` keep-alive connections, one request in flight on each, for ``warmup_s +
    duration_s``; statistics cover requests sent in the last ``duration_s`` and answered by its end."""
    import httpx

    async with httpx.AsyncClient(timeout=30) as c:
        meta = (await c.get(f"{http}/v2/models/{model}")).raise_for_status().json()
    url = httpx.URL(http)
    host, port = url.host, url.port or 80
    raw = _binary_infer_request(host, port, model, meta)
    loop = asyncio.get_running_loop()
    t_begin = time.perf_counter()
    t_measure, t_end = t_begin + warmup_s, t_begin + warmup_s + duration_s
    outcomes: dict[str, list[tuple[float, float | None]]] = {}  # status -> (client s, server ms)
    errors: dict[str, int] = {}
    lags: list[float] = []
    opened = 0

    def error(kind: str, t0: float) -> None:
        if t0 >= t_measure:
            errors[kind] = errors.get(kind, 0) + 1

    async def connection() -> None:
        nonlocal opened
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            try:
                transport, proto = await asyncio.wait_for(
                    loop.create_connection(_Connection, host, port), timeout_s
                )
            except (OSError, asyncio.TimeoutError) as exc:
                error(f"connect: {type(exc).__name__}", t0)
                await asyncio.sleep(1.0)
                continue
            opened += 1
            try:
                while time.perf_counter() < t_end:
                    t0 = time.perf_counter()
                    try:
                        status, edge_ms, retry_s = await asyncio.wait_for(proto.request(raw), timeout_s)
                    except asyncio.TimeoutError:
                        error("timeout", t0)
                        break
                    except OSError as exc:
                        error(f"connection: {type(exc).__name__}", t0)
                        break
                    t1 = time.perf_counter()
                    if t0 >= t_measure and t1 <= t_end:
                        outcomes.setdefault(str(status), []).append((t1 - t0, edge_ms))
                    if status == 429 and honor_retry_after and retry_s:
                        await asyncio.sleep(retry_s)
            finally:
                transport.close()

    async def lag_probe() -> None:
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            await asyncio.sleep(0.005)
            if t0 >= t_measure:
                lags.append(max(0.0, time.perf_counter() - t0 - 0.005))

    await asyncio.gather(lag_probe(), *(connection() for _ in range(connections)))
    return summarize_storm(
        outcomes, errors, lags, connections, opened, duration_s, warmup_s, honor_retry_after
    )


def summarize_storm(
    outcomes: dict[str, list[tuple[float, float | None]]],
    errors: dict[str, int],
    lags: list[float],
    connections: int,
    opened: int,
    duration_s: float,
    warmup_s: float,
    honor_retry_after: bool,
) -> dict[str, Any]:
    """The storm's figures (milliseconds): per outcome the client's latency, the server's time and what
    was neither — the wait before the server read the request (the listening socket's accept queue and
    the connection's receive buffer while the worker's event loop was busy), less the client's lag."""

    def ms(values: list[float], q: float) -> float | None:
        return percentile(values, q) * 1e3 if values else None

    lag_p50 = percentile(lags, 50) if lags else 0.0
    out: dict[str, Any] = {
        "connections": connections,
        "connections_opened": opened,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "honor_retry_after": honor_retry_after,
        "status_counts": {k: len(v) for k, v in sorted(outcomes.items())},
        "errors": dict(sorted(errors.items())),
        "client_lag_ms_p50": ms(lags, 50),
        "client_lag_ms_p99": ms(lags, 99),
    }
    for name, status in (("admitted", "200"), ("rejected", "429")):
        rows = outcomes.get(status, [])
        client = [c for c, _ in rows]
        server = [e / 1e3 for _, e in rows if e is not None]
        before = [max(0.0, c - e / 1e3 - lag_p50) for c, e in rows if e is not None]
        out[f"{name}_per_s"] = len(rows) / duration_s
        out[f"{name}_ms_p50"], out[f"{name}_ms_p99"] = ms(client, 50), ms(client, 99)
        out[f"{name}_ms_max"] = max(client) * 1e3 if client else None
        out[f"{name}_server_ms_p50"], out[f"{name}_server_ms_p99"] = ms(server, 50), ms(server, 99)
        out[f"{name}_before_server_ms_p50"] = ms(before, 50)
        out[f"{name}_before_server_ms_p99"] = ms(before, 99)
    out["server_errors_5xx"] = sum(len(v) for k, v in outcomes.items() if k.startswith("5"))
    out["connection_errors"] = sum(errors.values())
    return out


def raise_open_files(needed: int) -> None:
    """Lift this process's open-file soft limit to cover ``needed`` sockets (up to the hard limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + 256
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            raise SystemExit(
                f"{needed} connections need {want} open files; the hard limit is {hard} (ulimit -Hn)"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", choices=PROTOCOLS, required=True)
    p.add_argument("--http", required=True, help="http://127.0.0.1:PORT")
    p.add_argument("--grpc", default="", help="127.0.0.1:PORT")
    p.add_argument("--model", default="vit-soft")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument(
        "--channels", type=int, default=None, help="gRPC connections (default: one per 8 concurrent requests)"
    )
    p.add_argument(
        "--connections",
        type=int,
        default=0,
        help="open this many keep-alive connections, one request in flight on each (http-binary only)",
    )
    p.add_argument(
        "--ignore-retry-after", action="store_true", help="with --connections: retry a 429 at once"
    )
    a = p.parse_args(argv)
    for addr in (a.http, a.grpc):
        if addr and "127.0.0.1" not in addr and "localhost" not in addr:
            raise SystemExit(f"the load generator only drives loopback servers, got {addr!r}")
    if a.connections:
        if a.protocol != "http-binary":
            raise SystemExit("--connections drives http-binary requests only")
        raise_open_files(a.connections)
        try:
            import uvloop  # the client's own overhead per request is part of what is measured: keep it small
        except ImportError:
            uvloop = None
        run = uvloop.run if uvloop else asyncio.run
        result = run(storm(a.http, a.model, a.connections, a.duration, a.warmup, not a.ignore_retry_after))
        print(json.dumps(result))
        return
    print(
        json.dumps(
            asyncio.run(
                drive(a.protocol, a.http, a.grpc, a.model, a.concurrency, a.duration, a.warmup, a.channels)
            )
        )
    )


if __name__ == "__main__":
    main()
