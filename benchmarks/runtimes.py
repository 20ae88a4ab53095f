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


# --------------------------------------------------------------------------------------------------
# the int8 format grid
# --------------------------------------------------------------------------------------------------

# (label, quantizer, settings): each cell changes one knob of main's int8-static format (the first row),
# or combines the knobs that paid; the calibration methods change accuracy only. ``kiln bench vit`` builds
# every cell from each model's fp32 graph with onnxruntime.quantization's own tools (export.quantize).
_MAIN = {"ops": "linear", "per_channel": False, "quantize_linear_outputs": True}  # main's int8-static
INT8_GRID: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("QDQ linear per-tensor U8S8 (main)", "int8-static", _MAIN),
    ("+ per-channel", "int8-static", {**_MAIN, "per_channel": True}),
    ("QOperator", "int8-static", {**_MAIN, "quant_format": "qoperator"}),
    ("S8S8 (int8 activations)", "int8-static", {**_MAIN, "activations": "int8"}),
    ("reduce_range (7-bit weights)", "int8-static", {**_MAIN, "reduce_range": True}),
    ("head kept fp32", "int8-static", {**_MAIN, "quantize_head": False}),
    ("+ Conv", "int8-static", {**_MAIN, "ops": "linear+conv"}),
    ("fp32 GEMM outputs (fp32-out)", "int8-static", {**_MAIN, "quantize_linear_outputs": False}),
    (
        "per-channel fp32-out",
        "int8-static",
        {"per_channel": True, "quantize_linear_outputs": False},
    ),
    (
        "per-channel fp32-out, S8S8",
        "int8-static",
        {"per_channel": True, "quantize_linear_outputs": False, "activations": "int8"},
    ),
    (
        "per-channel fp32-out, QOperator",
        "int8-static",
        {"per_channel": True, "quantize_linear_outputs": False, "quant_format": "qoperator"},
    ),
    (
        "per-channel fp32-out, head fp32",
        "int8-static",
        {"per_channel": True, "quantize_linear_outputs": False, "quantize_head": False},
    ),
    (
        "per-channel fp32-out, entropy",
        "int8-static",
        {"per_channel": True, "quantize_linear_outputs": False, "method": "entropy"},
    ),
    (
        "per-channel fp32-out, percentile",
        "int8-static",
        {"per_channel": True, "quantize_linear_outputs": False, "method": "percentile"},
    ),
    ("all ops", "int8-static", {**_MAIN, "ops": "all"}),
    ("all ops + per-channel", "int8-static", {**_MAIN, "ops": "all", "per_channel": True}),
    ("all ops, S8S8", "int8-static", {**_MAIN, "ops": "all", "activations": "int8"}),
    ("dynamic (MatMul/Gemm)", "int8-dynamic", {}),
    ("dynamic per-channel", "int8-dynamic", {"per_channel": True}),
)

# The cells measured on the 64-wide default models too (the whole grid runs on the wide model only, to
# keep `kiln bench vit` within minutes): main's format, each of the shipped format's two changes alone and
# together, every op quantized, and dynamic quantization.
INT8_GRID_SHORT = tuple(
    g
    for g in INT8_GRID
    if g[0]
    in (
        "QDQ linear per-tensor U8S8 (main)",
        "+ per-channel",
        "fp32 GEMM outputs (fp32-out)",
        "per-channel fp32-out",
        "all ops",
        "dynamic (MatMul/Gemm)",
    )
)


def onnx_session(path, threads: int):
    """An onnxruntime session with the options of the server's ``onnxruntime`` runtimes
    (:class:`serving.runtime.OnnxRuntime`: ``threads`` intra-op threads, one inter-op, ORT_ENABLE_ALL), on
    the CPU provider: a grid cell is a file that no artifact serves, so it is opened directly."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_int8_grid(
    arts: dict[str, Artifact],
    batch: int,
    warmup: int,
    duration_s: float,
    grid: tuple[tuple[str, str, dict[str, Any]], ...] = INT8_GRID,
    log=print,
    rounds: int = 5,
) -> list[dict[str, Any]]:
    """Every grid cell on every model: accuracy (validation and test split) and throughput at ``batch``.

    The fp32 graph and all cells of one model are timed in ``rounds`` interleaved rounds (each for
    ``duration_s / rounds`` per round); a cell's speed-up is the median over rounds of its throughput over
    the fp32 graph's in the same round, so drift of the shared machine cancels. The row whose settings match
    the artifact's ``int8-static`` export is marked ``shipped``.
    """
    import tempfile
    from pathlib import Path

    from export.pipeline import spec_for
    from export.quantize import get_quantizer

    threads = server_threads()
    rows = []
    for model, art in arts.items():
        spec = spec_for(art)
        fp32_path = art.file(art.export("onnx")["file"])
        shipped = art.export("int8-static") or {}
        x_test = spec._split(art, "test")[0]
        xb = batch_of(x_test, batch)
        with tempfile.TemporaryDirectory() as tmp:
            cells: dict[str, dict[str, Any]] = {}
            settings_of: dict[str, dict[str, Any]] = {}
            for i, (label, method, settings) in enumerate(grid):
                quantizer = get_quantizer(method, **settings)
                settings_of[label] = quantizer.settings()
                dst = Path(tmp) / f"cell{i}.onnx"
                calib = spec.calibration(art, quantizer.calibration) if quantizer.calibration else None
                t0 = time.perf_counter()
                facts = quantizer.quantize(fp32_path, dst, calib)
                cells[label] = {
                    "method": method,
                    **quantizer.settings(),
                    "quantize_seconds": round(time.perf_counter() - t0, 2),
                    "quantized_nodes": facts["quantized_nodes"],
                    **spec.quality(art, dst),
                    "path": dst,
                }
                cell = cells[label]
                log(
                    f"  int8 grid {model:<16} {label:<36} quantized in {cell['quantize_seconds']:5.1f} s, "
                    f"val acc {cell['val_accuracy']:.4f}"
                )
            sessions = {"fp32": onnx_session(fp32_path, threads)}
            sessions |= {label: onnx_session(c["path"], threads) for label, c in cells.items()}
            feed = {sessions["fp32"].get_inputs()[0].name: xb}
            for sess in sessions.values():
                time_calls(lambda s=sess, f=feed: s.run(None, f), warmup, 0, min_calls=0)
            tput: dict[str, list[float]] = {k: [] for k in sessions}
            for _ in range(rounds):
                for k, sess in sessions.items():
                    calls, elapsed = time_calls(
                        lambda s=sess, f=feed: s.run(None, f), 0, duration_s / rounds, min_calls=2
                    )
                    tput[k].append(batch * len(calls) / elapsed)
            del sessions
        fp32 = art.export("onnx")
        for label, c in cells.items():
            c.pop("path")
            ratios = [a / b for a, b in zip(tput[label], tput["fp32"], strict=True)]
            row = {
                "model": model,
                "version": art.version,
                "cell": label,
                **c,
                "batch": batch,
                "threads": threads,
                "rounds": rounds,
                "samples_per_s": percentile(tput[label], 50),
                "fp32_samples_per_s": percentile(tput["fp32"], 50),
                "speedup": percentile(ratios, 50),
                "speedup_min": min(ratios),
                "speedup_max": max(ratios),
                "fp32_val_accuracy": fp32.get("val_accuracy"),
                "fp32_test_accuracy": fp32.get("test_accuracy"),
                "shipped": shipped.get("settings") == settings_of[label],
            }
            rows.append(row)
            log(
                f"  int8 grid {model:<16} {label:<36} {row['speedup']:5.2f}x fp32 "
                f"(rounds {row['speedup_min']:.2f}-{row['speedup_max']:.2f}), "
                f"val {row['val_accuracy']:.4f} / test {row['test_accuracy']:.4f}"
                + ("  <- shipped" if row["shipped"] else "")
            )
    return rows
