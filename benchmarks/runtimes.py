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
    rounds: int = 5,
) -> list[dict[str, Any]]:
    """Every (model, backend, batch) cell, with the backend's test-split accuracy on each row.

    The cells of one model are measured in ``rounds`` interleaved rounds (every backend and batch once
    per round, ``duration_s / rounds`` each), and throughput is the median over rounds: on a shared
    virtual machine throughput drifts by tens of percent over minutes, and interleaving keeps that
    drift from landing on one backend. The spread (min / max over rounds) is kept in the row.
    """
    threads = server_threads()
    rows = []
    for model, art in arts.items():
        loaded = {backend: load_runtime(art, backend, threads) for backend in backends}
        accs = {backend: accuracy(rt, x, labels) for backend, rt in loaded.items()}
        inputs = {b: batch_of(x, b) for b in batches}
        names = {backend: runtime_input_name(rt) for backend, rt in loaded.items()}
        per_round: dict[tuple[str, int], list[float]] = {(bk, b): [] for bk in backends for b in batches}
        times: dict[tuple[str, int], list[float]] = {(bk, b): [] for bk in backends for b in batches}
        for backend, rt in loaded.items():  # warm every cell up before any is timed
            for b in batches:
                time_calls(
                    lambda rt=rt, n=names[backend], xb=inputs[b]: rt.run({n: xb}), warmup, 0, min_calls=0
                )
        for _ in range(rounds):
            for backend, rt in loaded.items():
                for b in batches:
                    fn = lambda rt=rt, n=names[backend], xb=inputs[b]: rt.run({n: xb})  # noqa: E731
                    calls, elapsed = time_calls(fn, 0, duration_s / rounds, min_calls=3)
                    per_round[(backend, b)].append(b * len(calls) / elapsed)
                    times[(backend, b)] += calls
        for backend in backends:
            for b in batches:
                tput, t = per_round[(backend, b)], times[(backend, b)]
                cell = {
                    "batch": b,
                    "calls": len(t),
                    "rounds": rounds,
                    "samples_per_s": percentile(tput, 50),
                    "samples_per_s_min": min(tput),
                    "samples_per_s_max": max(tput),
                    "latency_ms_p50": percentile(t, 50) * 1e3,
                    "latency_ms_p99": percentile(t, 99) * 1e3,
                }
                rows.append(
                    {
                        "model": model,
                        "version": art.version,
                        "backend": backend,
                        "threads": threads,
                        "test_accuracy": accs[backend],
                        **cell,
                    }
                )
                log(
                    f"  runtime {model:<12} {backend:<17} batch {b:>2}: "
                    f"{cell['samples_per_s']:9.1f} samples/s (rounds {min(tput):.0f}-{max(tput):.0f})  "
                    f"p50 {cell['latency_ms_p50']:7.2f} ms  acc {accs[backend]:.4f}"
                )
        del loaded
    return rows
