"""PyTorch eager vs onnxruntime fp32 vs onnxruntime int8 on a stored artifact, in this process.

The runtimes are the server's own (:func:`serving.runtime.load_runtime`) with the server's default thread
count, so these figures are what one served batch costs without any transport. A cell calls
``runtime.run`` on one fixed batch of test-split images for a fixed wall-clock duration after a warm-up:
latency is the median (and p99) of the per-call times, throughput is ``batch x calls / elapsed``.
Accuracy is the argmax over the whole test split, run in batches of 32.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from benchmarks.report import percentile
from kiln.artifacts import Artifact
from serving.runtime import load_runtime

BACKENDS = ("pytorch", "onnxruntime", "onnxruntime-int8")


def server_threads() -> int:
    """Intra-op threads per runtime, the server's default (``KILN_THREADS``; see serving/config.py)."""
    return int(os.environ.get("KILN_THREADS") or min(4, os.cpu_count() or 1))


def time_calls(fn, warmup: int, duration_s: float, min_calls: int = 5) -> tuple[list[float], float]:
    """Per-call seconds of ``fn()`` for ``duration_s`` (at least ``min_calls``) and the elapsed wall time."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - t_start < duration_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times, time.perf_counter() - t_start


def throughput_cell(runtime, x: np.ndarray, warmup: int, duration_s: float) -> dict[str, Any]:
    """Throughput (samples/s) and latency (ms) of ``runtime`` on the batch ``x``."""
    name = runtime_input_name(runtime)
    times, elapsed = time_calls(lambda: runtime.run({name: x}), warmup, duration_s)
    return {
        "batch": len(x),
        "calls": len(times),
        "samples_per_s": len(x) * len(times) / elapsed,
        "latency_ms_p50": percentile(times, 50) * 1e3,
        "latency_ms_p99": percentile(times, 99) * 1e3,
    }


def runtime_input_name(runtime) -> str:
    names = getattr(runtime, "input_names", None)
    if names:
        return names[0]
    return runtime.session.get_inputs()[0].name


def accuracy(runtime, x: np.ndarray, labels: np.ndarray, batch: int = 32) -> float:
    name = runtime_input_name(runtime)
    out_name = runtime.output_names[0]
    preds = [runtime.run({name: x[i : i + batch]})[out_name].argmax(-1) for i in range(0, len(x), batch)]
    return float((np.concatenate(preds) == labels).mean())


def batch_of(x: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` images of ``x``, repeated if ``x`` has fewer."""
    reps = -(-n // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:n])


def run_runtimes(
    arts: dict[str, Artifact],
    x: np.ndarray,
    labels: np.ndarray,
    batches: tuple[int, ...],
    warmup: int,
    duration_s: float,
    backends: tuple[str, ...] = BACKENDS,
    log=print,
) -> list[dict[str, Any]]:
    """Every (model, backend, batch) cell, with the backend's test-split accuracy on each row."""
    threads = server_threads()
    rows = []
    for model, art in arts.items():
        for backend in backends:
            runtime = load_runtime(art, backend, threads)
            acc = accuracy(runtime, x, labels)
            for b in batches:
                cell = throughput_cell(runtime, batch_of(x, b), warmup, duration_s)
                rows.append(
                    {
                        "model": model,
                        "version": art.version,
                        "backend": backend,
                        "threads": threads,
                        "test_accuracy": acc,
                        **cell,
                    }
                )
                log(
                    f"  runtime {model:<12} {backend:<17} batch {b:>2}: "
                    f"{cell['samples_per_s']:9.1f} samples/s  "
                    f"p50 {cell['latency_ms_p50']:7.2f} ms  acc {acc:.4f}"
                )
            del runtime
    return rows
