"""Soak: sustained load at ~70% of the measured capacity against a real server (``ops_server``, after the
lifecycle tests: vit-soft at its new version).

Capacity is measured here, on this machine, with closed-loop clients; the soak then sends requests at
70% of it on a fixed schedule (open loop, so a slow server cannot slow the load down) for a bounded
period. Every request must succeed, and the server's resident memory (all its processes) must grow
less than 10% from after the warm-up to the end.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil

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
