"""Start and stop a real `kiln serve` process on free ports (integration and e2e tests).

The process handling lives in :mod:`benchmarks._server` (the benchmarks start servers too); the tests
add a small request-size limit so the 413 path is cheap to exercise.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks._server import Server, free_port, metric_total, stop_server
from benchmarks._server import start_server as _start_server

__all__ = ["MAX_REQUEST_BYTES", "Server", "free_port", "metric_total", "start_server", "stop_server"]

MAX_REQUEST_BYTES = 1024 * 1024  # small, so the 413 path is cheap to exercise


def start_server(home: Path, *extra: str, timeout: float = 900, **kwargs) -> Server:
    """Run `kiln serve` as its own process on free ports; returns once /v2/health/ready (or
    ``ready_path``) answers 200. ``kwargs`` go to :func:`benchmarks._server.start_server`."""
    return _start_server(
        home, "--max-request-bytes", str(MAX_REQUEST_BYTES), *extra, timeout=timeout, **kwargs
    )
