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
    a = p.parse_args(argv)
    for addr in (a.http, a.grpc):
        if addr and "127.0.0.1" not in addr and "localhost" not in addr:
            raise SystemExit(f"the load generator only drives loopback servers, got {addr!r}")
    print(
        json.dumps(
            asyncio.run(
                drive(a.protocol, a.http, a.grpc, a.model, a.concurrency, a.duration, a.warmup, a.channels)
            )
        )
    )


if __name__ == "__main__":
    main()
