"""The served path: a real ``kiln serve --no-train`` process driven by :mod:`benchmarks.load` processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._server import start_server, stop_server
from benchmarks.load import PROTOCOLS

# name -> extra `kiln serve` arguments. "on" is the CLI's default batching, spelled out for the record.
BATCHING = {"on": ("--batch-max-size", "32", "--batch-window-ms", "2"), "off": ("--batch-max-size", "1")}


def run_served(
    home: Path, model: str, concurrencies: tuple[int, ...], duration_s: float, warmup_s: float, log=print
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
                            str(c),
                            "--duration",
                            str(duration_s),
                            "--warmup",
                            str(warmup_s),
                        ]
                        proc = subprocess.run(
                            cmd,
                            capture_output=True,
                            text=True,
                            timeout=warmup_s + duration_s + 120,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                        )
                        if proc.returncode != 0:
                            raise RuntimeError(
                                f"load generator failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n"
                                f"server log:\n{server.log()}"
                            )
                        cell = {
                            "batching": mode,
                            "server_args": list(extra),
                            **json.loads(proc.stdout.splitlines()[-1]),
                        }
                        rows.append(cell)
                        p50 = cell["latency_ms_p50"]
                        log(
                            f"  served batching {mode:<3} {protocol:<11} c={c:>2}: "
                            f"{cell['req_per_s']:8.1f} req/s  "
                            f"p50 {p50 if p50 is None else round(p50, 2)} ms  errors {cell['errors']}"
                        )
            finally:
                stop_server(server.process)
    return rows
