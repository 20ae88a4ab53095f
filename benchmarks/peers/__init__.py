"""Comparison servers for ``kiln bench vit``: the same ONNX graph behind other Python serving stacks.

Each peer answers ``POST /v2/models/<model>/infer`` with the Open Inference Protocol JSON body Kiln
takes (one ``inputs`` tensor, ``data`` a flat list of floats) and returns Kiln's response shape
(``outputs[0]`` = the logits), so the load generator sends byte-identical requests to every server:

* ``fastapi``: a hand-written FastAPI + onnxruntime server, one uvicorn worker, pydantic request
  models, a synchronous endpoint that FastAPI runs in its thread pool; no batching.
* ``litserve``: LitServe with batching (``max_batch_size`` / ``batch_timeout`` as Kiln's), one
  inference worker (``workers_per_device=1``) and one API server process, as LitServe runs them.
* ``ray``: Ray Serve, one replica with ``@serve.batch`` (same batch size and wait), behind Ray's HTTP
  proxy actor; optional (the ``ray`` extra) and skipped with the reason when Ray is not installed.

Every peer builds its onnxruntime session like :class:`serving.runtime.OnnxRuntime` (``threads``
intra-op threads, one inter-op thread, all graph optimisations, no spinning), so the engine and its
thread budget are the same and what differs is the serving stack around it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks._server import free_port

PEERS = ("fastapi", "litserve", "ray")
_PACKAGES = {"fastapi": ("fastapi", "uvicorn"), "litserve": ("litserve",), "ray": ("ray.serve",)}
# Seconds to wait for a peer to answer its first request: Ray starts a cluster (GCS, raylet, proxy).
_START_TIMEOUT = {"fastapi": 60.0, "litserve": 90.0, "ray": 180.0}


def missing(name: str) -> str | None:
    """Why peer ``name`` can not run here (a package is not installed), or None when it can."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; valid: {list(PEERS)}")
    for module in _PACKAGES[name]:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"{module} is not installed (pip install -e '.[bench]')"
    if name == "ray":  # ray without its serve extra imports ray.serve's spec but fails on import
        proc = subprocess.run(
            [sys.executable, "-c", "import ray.serve"], capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            return f"ray.serve does not import ({last[:200]}; pip install -e '.[bench]')"
    return None


@dataclass
class Peer:
    name: str
    url: str  # http://127.0.0.1:PORT/v2/models/MODEL/infer
    process: subprocess.Popen
    log_path: Path
    startup_seconds: float

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


def start_peer(
    name: str,
    onnx: Path,
    *,
    model: str,
    threads: int,
    max_batch_size: int,
    batch_window_ms: float,
    body: bytes,
    log_dir: Path,
) -> Peer:
    """Start peer ``name`` on a free port; returns once it answers ``body`` with 200.

    Raises:
        RuntimeError: the peer exited or did not answer in time (the message carries its log).
    """
    why = missing(name)
    if why:
        raise RuntimeError(f"peer {name} can not run: {why}")
    port = free_port()
    log_path = log_dir / f"peer-{name}-{port}.log"
    config = {
        "onnx": str(onnx),
        "model": model,
        "port": port,
        "threads": threads,
        "max_batch_size": max_batch_size,
        "batch_window_ms": batch_window_ms,
    }
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(threads),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
    }
    cmd = [sys.executable, "-m", f"benchmarks.peers.{name}_server", json.dumps(config)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
    peer = Peer(name, url, proc, log_path, 0.0)
    import httpx

    while time.perf_counter() - t0 < _START_TIMEOUT[name]:
        if proc.poll() is not None:
            raise RuntimeError(f"peer {name} exited with {proc.returncode}:\n{peer.log()}")
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=10)
            if r.status_code == 200:
                peer.startup_seconds = time.perf_counter() - t0
                return peer
        time.sleep(0.5)
    stop_peer(peer)
    raise RuntimeError(f"peer {name} did not answer within {_START_TIMEOUT[name]:g}s:\n{peer.log()}")


def stop_peer(peer: Peer) -> None:
    """SIGTERM the peer's process group (Ray: its whole local cluster); SIGKILL after 30 s."""
    proc = peer.process
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (Ray's workers, LitServe's)
