"""Start and stop a real ``kiln serve`` process on free loopback ports (benchmarks and integration tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    http: str  # http://127.0.0.1:PORT
    http_hostport: str  # 127.0.0.1:PORT (tritonclient.http form)
    grpc: str  # 127.0.0.1:PORT
    process: subprocess.Popen
    log_path: Path
    startup_seconds: float

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


def start_server(
    home: Path,
    *extra: str,
    timeout: float = 900,
    log_dir: Path | None = None,
    env: dict[str, str] | None = None,
    ready_path: str = "/v2/health/ready",
) -> Server:
    """Run ``kiln serve`` as its own process on free ports; returns once ``ready_path`` answers 200.

    Args:
        home: KILN_HOME of the server (its model store).
        extra: further ``kiln serve`` arguments.
        timeout: seconds to wait for readiness (a first run on an empty store trains models).
        log_dir: where the server's log goes (default: ``home``).
        env: further environment variables for the server.
        ready_path: what to wait for (``/v2/health/live`` for a server that is not meant to be ready).
    """
    import httpx

    http_port, grpc_port = free_port(), free_port()
    log_path = Path(log_dir or home) / f"server-{http_port}.log"
    env = {**os.environ, **(env or {}), "KILN_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "kiln.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{http_port}"
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"kiln serve exited with {proc.returncode}:\n{log_path.read_text()[-6000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}{ready_path}", timeout=2).status_code == 200:
                return Server(
                    url,
                    f"127.0.0.1:{http_port}",
                    f"127.0.0.1:{grpc_port}",
                    proc,
                    log_path,
                    time.perf_counter() - t0,
                )
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"kiln serve was not ready within {timeout}s:\n{log_path.read_text()[-6000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group; SIGKILL it if it has not exited after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def metric_total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` in a Prometheus text exposition whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
