"""The served path: a real ``kiln serve --no-train`` process under load, alone and beside peer servers.

Load generators, chosen to cost the server's cores as little CPU as possible, each its own process:

* HTTP (JSON and the binary tensor extension): ``wrk`` (compiled C, one thread, ``-c`` keep-alive
  connections) with ``benchmarks/wrk/oip.lua``, which sends a body prepared here byte for byte;
* gRPC: :mod:`benchmarks.load` (grpc.aio; no compiled gRPC load generator such as ``ghz`` is
  packaged for this machine).

Every cell records the client's own CPU use: user + system seconds of the load-generator process
(``os.wait4``'s rusage) over its wall time, so a reader sees how much of the machine the client took;
and the server's: CPU seconds of its whole process tree (``/proc``) per completed request, which
depends less than req/s on how much of a shared machine the server happened to get.

:func:`run_served` measures Kiln alone (batching on / off x protocol x concurrency);
:func:`run_comparison` runs interleaved rounds of Kiln (JSON, binary, gRPC) and the peers of
:mod:`benchmarks.peers` (FastAPI, LitServe, Ray Serve) on the same graph, body, concurrency and thread
budget, and reports each one's median over the rounds.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import peers
from benchmarks._server import Server, start_server, stop_server
from benchmarks.load import PROTOCOLS

# name -> extra `kiln serve` arguments. "on" is the CLI's default batching, spelled out for the record.
BATCH_MAX_SIZE, BATCH_WINDOW_MS = 32, 2.0
BATCHING = {
    "on": ("--batch-max-size", str(BATCH_MAX_SIZE), "--batch-window-ms", f"{BATCH_WINDOW_MS:g}"),
    "off": ("--batch-max-size", "1"),
}
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk" / "oip.lua"
KILN_CELLS = ("kiln-json", "kiln-binary", "kiln-grpc")
_HEADER_LENGTH = "Inference-Header-Content-Length"


class LoadError(RuntimeError):
    """A load generator failed or is missing."""


# --------------------------------------------------------------------------------------------------
# request bodies
# --------------------------------------------------------------------------------------------------


def json_body(input_name: str, x: np.ndarray) -> bytes:
    """The OIP JSON request for one input tensor (``data`` flat, as Kiln's clients send it)."""
    tensor = {"name": input_name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def binary_body(input_name: str, output_name: str, x: np.ndarray) -> tuple[bytes, int]:
    """The binary tensor extension's request (JSON header + raw FP32) and its header length."""
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": input_name,
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + raw, len(header)


# --------------------------------------------------------------------------------------------------
# load generators
# --------------------------------------------------------------------------------------------------


def _run_child(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[str, str, int, float, float]:
    """Run a load generator; returns stdout, stderr, exit code, wall seconds and its CPU seconds."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        deadline = t0 + timeout
        while True:  # os.wait4 gives this child's own rusage (RUSAGE_CHILDREN would sum every child)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            proc.returncode,
            wall,
            usage.ru_utime + usage.ru_stime,
        )


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds used so far by process ``root`` and all its descendants (``/proc``).

    A server's own CPU per request is steadier than its throughput on a shared machine, where how much
    of the cores a server gets depends on what else runs.
    """
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    used: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        used[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime (stat fields 14, 15)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += used.get(pid, 0.0)
        todo += children.get(pid, [])
    return total


def _with_server_cpu(cell: dict[str, Any], server_pid: int | None, cpu_before: float, wall: float) -> None:
    if server_pid is None:
        return
    cpu = tree_cpu_seconds(server_pid) - cpu_before
    done = cell["requests"] + cell["errors"]
    cell["server_cpu_cores"] = round(cpu / wall, 3)
    cell["server_cpu_ms_per_request"] = round(cpu * 1e3 / done, 3) if done else None


def wrk_path() -> str:
    """The ``wrk`` binary, or a LoadError saying how to install it."""
    path = shutil.which("wrk")
    if not path:
        raise LoadError("wrk is not installed: apt-get install wrk (Debian's package; see README set-up)")
    return path


def wrk_cell(
    url: str,
    body: bytes,
    header_length: int | None,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """Drive ``url`` with wrk (one thread, ``concurrency`` connections): warm-up, then the measured run."""
    with tempfile.NamedTemporaryFile(prefix="kiln-wrk-", suffix=".body") as f:
        f.write(body)
        f.flush()
        env = {**os.environ, "KILN_WRK_BODY": f.name, "KILN_WRK_HEADER_LENGTH": str(header_length or "")}
        results = []
        for seconds in (warmup_s, duration_s):
            if seconds <= 0:
                continue
            cmd = [
                wrk_path(),
                "-t1",
                f"-c{concurrency}",
                f"-d{max(1, round(seconds))}s",  # wrk counts whole seconds
                "--timeout",
                "60s",
                "-s",
                str(WRK_SCRIPT),
                url,
            ]
            server_cpu = tree_cpu_seconds(server_pid) if server_pid is not None else 0.0
            out, err, rc, wall, cpu = _run_child(cmd, env, seconds + 90)
            line = next((ln for ln in out.splitlines() if ln.startswith("KILN_WRK ")), None)
            if rc != 0 or line is None:
                raise LoadError(f"wrk failed ({rc}): {out[-2000:]}\n{err[-2000:]}")
            results.append((json.loads(line.removeprefix("KILN_WRK ")), wall, cpu, server_cpu))
    r, wall, cpu, server_cpu = results[-1]
    errors = r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["status_errors"] + r["timeouts"]
    duration = r["duration_us"] / 1e6
    ok = r["requests"] - r["status_errors"]  # wrk counts non-2xx answers among its requests
    cell = {
        "client": "wrk -t1",
        "concurrency": concurrency,
        "duration_s": round(duration, 3),
        "warmup_s": warmup_s,
        "requests": ok,
        "errors": errors,
        "req_per_s": ok / duration,
        "latency_ms_p50": r["latency_us_p50"] / 1e3,
        "latency_ms_p99": r["latency_us_p99"] / 1e3,
        "client_cpu_s": round(cpu, 3),
        "client_cpu_share": round(cpu / wall, 4),  # of one core
    }
    _with_server_cpu(cell, server_pid, server_cpu, wall)
    return cell


def grpc_cell(
    server: Server, model: str, concurrency: int, duration_s: float, warmup_s: float, protocol: str = "grpc"
) -> dict[str, Any]:
    """Drive the server with :mod:`benchmarks.load` (one process); adds the client's CPU use."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.load",
        "--protocol",
        protocol,
        "--http",
        server.http,
        "--grpc",
        server.grpc,
        "--model",
        model,
        "--concurrency",
        str(concurrency),
        "--duration",
        str(duration_s),
        "--warmup",
        str(warmup_s),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server_cpu = tree_cpu_seconds(server.process.pid)
    out, err, rc, wall, cpu = _run_child(cmd, env, warmup_s + duration_s + 120)
    if rc != 0:
        raise LoadError(f"load generator failed ({rc}):\n{err[-3000:]}\nserver log:\n{server.log()}")
    cell = json.loads(out.splitlines()[-1])
    cell.update(
        client="benchmarks.load (grpc.aio)",
        client_cpu_s=round(cpu, 3),
        client_cpu_share=round(cpu / wall, 4),
    )
    # Over the client's whole run: warm-up requests included (load.py counts them), start-up idle.
    cpu_used = tree_cpu_seconds(server.process.pid) - server_cpu
    cell["server_cpu_cores"] = round(cpu_used / wall, 3)
    sent = cell.get("requests_with_warmup", 0)
    cell["server_cpu_ms_per_request"] = round(cpu_used * 1e3 / sent, 3) if sent else None
    return cell


# --------------------------------------------------------------------------------------------------
# Kiln alone
# --------------------------------------------------------------------------------------------------


def _model_io(server: Server, model: str) -> tuple[str, str]:
    import httpx

    meta = httpx.get(f"{server.http}/v2/models/{model}", timeout=30).raise_for_status().json()
    return meta["inputs"][0]["name"], meta["outputs"][0]["name"]


def _kiln_cell(
    server: Server,
    model: str,
    kind: str,
    image: np.ndarray,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
) -> dict[str, Any]:
    """One Kiln cell: ``kind`` is a protocol of :data:`benchmarks.load.PROTOCOLS`."""
    if kind == "grpc":
        return grpc_cell(server, model, concurrency, duration_s, warmup_s)
    input_name, output_name = _model_io(server, model)
    url = f"{server.http}/v2/models/{model}/infer"
    pid = server.process.pid
    if kind == "http-json":
        return wrk_cell(url, json_body(input_name, image), None, concurrency, duration_s, warmup_s, pid)
    body, header_length = binary_body(input_name, output_name, image)
    return wrk_cell(url, body, header_length, concurrency, duration_s, warmup_s, pid)


def run_served(
    home: Path,
    model: str,
    concurrencies: tuple[int, ...],
    duration_s: float,
    warmup_s: float,
    image: np.ndarray,
    log=print,
) -> list[dict[str, Any]]:
    """Every (batching, protocol, concurrency) cell; one server per batching mode, one client per cell."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-serve-") as logs:
        for mode, extra in BATCHING.items():
            server = start_server(
                home, "--no-train", "--models", model, *extra, log_dir=Path(logs), timeout=300
            )
            try:
                for protocol in PROTOCOLS:
                    for c in concurrencies:
                        cell = {
                            "batching": mode,
                            "server_args": list(extra),
                            "protocol": protocol,
                            **_kiln_cell(server, model, protocol, image, c, duration_s, warmup_s),
                        }
                        rows.append(cell)
                        log(f"  served batching {mode:<3} {protocol:<11} c={c:>2}: {_describe(cell)}")
            finally:
                stop_server(server.process)
    return rows


def _describe(cell: dict[str, Any]) -> str:
    p50, per_request = cell["latency_ms_p50"], cell.get("server_cpu_ms_per_request")
    return (
        f"{cell['req_per_s']:8.1f} req/s  p50 {p50 if p50 is None else round(p50, 2)} ms  "
        f"errors {cell['errors']}  client CPU {cell['client_cpu_share']:.0%} of a core"
        + (f"  server CPU {per_request:.2f} ms/request" if per_request is not None else "")
    )


# --------------------------------------------------------------------------------------------------
# Kiln beside the peers
# --------------------------------------------------------------------------------------------------


def _median_of(cells: list[dict[str, Any]], key: str) -> float | None:
    values = [c[key] for c in cells if c.get(key) is not None]
    return statistics.median(values) if values else None


def predictions(url: str, body: bytes, header_length: int | None = None) -> np.ndarray:
    """The logits one server answers for ``body`` (JSON or binary response)."""
    import httpx

    headers = {"Content-Type": "application/json"}
    if header_length is not None:
        headers = {"Content-Type": "application/octet-stream", _HEADER_LENGTH: str(header_length)}
    r = httpx.post(url, content=body, headers=headers, timeout=30)
    r.raise_for_status()
    if _HEADER_LENGTH.lower() in r.headers:
        size = int(r.headers[_HEADER_LENGTH])
        out = json.loads(r.content[:size])["outputs"][0]
        return np.frombuffer(r.content[size:], dtype="<f4").reshape(out["shape"])
    out = r.json()["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def run_comparison(
    home: Path,
    model: str,
    onnx: Path,
    image: np.ndarray,
    *,
    concurrency: int,
    rounds: int,
    duration_s: float,
    warmup_s: float,
    threads: int,
    kiln_workers: int = 1,
    log=print,
) -> dict[str, Any]:
    """Interleaved rounds (Kiln JSON, Kiln binary, Kiln gRPC, then each peer; repeat) at one concurrency.

    Every server runs the graph at ``onnx`` with ``threads`` onnxruntime intra-op threads in total and
    batches of at most :data:`BATCH_MAX_SIZE` within :data:`BATCH_WINDOW_MS` (the FastAPI peer does not
    batch). Kiln runs ``kiln_workers`` worker processes with ``threads // kiln_workers`` threads each (the
    same thread budget split over event loops; each worker has its own batcher).
    All servers stay up for the whole comparison; an idle one costs the others little.
    Returns ``{"cells": [...], "summary": [...], "skipped": {peer: reason}, "agreement": {...}}``.
    """
    cells: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    started: dict[str, peers.Peer] = {}
    agreement: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-peers-") as logs:
        kiln_threads = max(1, threads // kiln_workers)
        server = start_server(
            home,
            "--no-train",
            "--models",
            model,
            "--workers",
            str(kiln_workers),
            *BATCHING["on"],
            log_dir=Path(logs),
            timeout=300,
            env={"KILN_THREADS": str(kiln_threads)},
        )
        try:
            input_name, output_name = _model_io(server, model)
            body = json_body(input_name, image)
            binary, header_length = binary_body(input_name, output_name, image)
            url = f"{server.http}/v2/models/{model}/infer"
            reference = predictions(url, body)
            agreement["kiln-binary"] = float(
                np.abs(predictions(url, binary, header_length) - reference).max()
            )
            for name in peers.PEERS:
                why = peers.missing(name)
                if why:
                    skipped[name] = why
                    log(f"  peer {name}: skipped ({why})")
                    continue
                try:
                    started[name] = peers.start_peer(
                        name,
                        onnx,
                        model=model,
                        threads=threads,
                        max_batch_size=BATCH_MAX_SIZE,
                        batch_window_ms=BATCH_WINDOW_MS,
                        body=body,
                        log_dir=Path(logs),
                    )
                except RuntimeError as exc:
                    skipped[name] = f"did not start: {str(exc)[-600:]}"
                    log(f"  peer {name}: skipped ({skipped[name]})")
                    continue
                diff = float(np.abs(predictions(started[name].url, body) - reference).max())
                agreement[name] = diff
                log(f"  peer {name}: up in {started[name].startup_seconds:.1f}s, max |logit diff| {diff:.1e}")
            for r in range(rounds):
                for name in (*KILN_CELLS, *started):
                    pid = server.process.pid
                    if name == "kiln-json":
                        cell = wrk_cell(url, body, None, concurrency, duration_s, warmup_s, pid)
                    elif name == "kiln-binary":
                        cell = wrk_cell(url, binary, header_length, concurrency, duration_s, warmup_s, pid)
                    elif name == "kiln-grpc":
                        cell = grpc_cell(server, model, concurrency, duration_s, warmup_s)
                    else:
                        peer = started[name]
                        cell = wrk_cell(
                            peer.url, body, None, concurrency, duration_s, warmup_s, peer.process.pid
                        )
                    cells.append({"server": name, "round": r, **cell})
                    log(f"  round {r + 1}/{rounds} {name:<11} c={concurrency}: {_describe(cell)}")
        finally:
            for peer in started.values():
                peers.stop_peer(peer)
            stop_server(server.process)
    summary = []
    for name in (*KILN_CELLS, *started):
        mine = [c for c in cells if c["server"] == name]
        summary.append(
            {
                "server": name,
                "req_per_s": statistics.median(c["req_per_s"] for c in mine),
                "req_per_s_min": min(c["req_per_s"] for c in mine),
                "req_per_s_max": max(c["req_per_s"] for c in mine),
                "latency_ms_p50": statistics.median(c["latency_ms_p50"] for c in mine),
                "errors": sum(c["errors"] for c in mine),
                "client_cpu_share": statistics.median(c["client_cpu_share"] for c in mine),
                "server_cpu_ms_per_request": _median_of(mine, "server_cpu_ms_per_request"),
                "server_cpu_cores": _median_of(mine, "server_cpu_cores"),
                "client": mine[0]["client"],
            }
        )
    return {
        "concurrency": concurrency,
        "rounds": rounds,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "threads": threads,
        "kiln_workers": kiln_workers,
        "kiln_threads_per_worker": max(1, threads // kiln_workers),
        "batch_max_size": BATCH_MAX_SIZE,
        "batch_window_ms": BATCH_WINDOW_MS,
        "cells": cells,
        "summary": summary,
        "skipped": skipped,
        "agreement": agreement,
    }
