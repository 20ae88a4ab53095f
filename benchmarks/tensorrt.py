"""TensorRT engines vs onnxruntime's CUDA execution provider vs its CPU provider, on a CUDA GPU machine.

Run by ``.ci/gpu-check`` (``make gpu-check``) after the GPU extras are installed; it is not a ``kiln bench``
suite because no CPU-only machine can run it. For ``vit-soft`` and ``vit-softmax`` (trained with their
recipes and exported if missing from the store, as ``kiln serve`` does) it builds the ``fp16-trt`` and
``int8-trt`` engines through the export pipeline (:mod:`export.tensorrt`; each passes the classifier's
quality gate or is discarded with the reason) and times, at each batch size, the fp32 ONNX graph on the
CPU and CUDA providers, the int8 QDQ graph on the CPU provider, and both engines
(:class:`export.tensorrt.EngineSession`). Figures and the machine go to one JSON file.

Usage: ``python -m benchmarks.tensorrt --output FILE [--quick]``. Without a CUDA GPU, TensorRT and
onnxruntime's CUDA provider it exits with an error naming what is missing: a GPU benchmark that silently
measured a CPU would be worse than none.

Not yet run on a GPU by the project (no GPU machine was available when it was written); the first run
on one is its verification.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import machine_info, percentile
from benchmarks.runtimes import accuracy, batch_of, time_calls

MODELS = ("vit-soft", "vit-softmax")
ENGINES = {"tensorrt-fp16": "fp16-trt", "tensorrt-int8": "int8-trt"}


class _Graph:
    """An onnxruntime session or a TensorRT engine behind :mod:`benchmarks.runtimes`' ``run`` call."""

    def __init__(self, session, providers: list[str]):
        self.session = session
        self.providers = providers
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs), strict=True))


def _ort(path: Path, providers: list[str]) -> _Graph:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=providers)
    if sess.get_providers()[0] != providers[0]:  # onnxruntime falls back to the CPU without raising
        raise RuntimeError(f"{path}: onnxruntime did not take {providers[0]} (got {sess.get_providers()})")
    return _Graph(sess, sess.get_providers())


def ensure_models(log=print) -> dict[str, Any]:
    """The two default ViTs with onnx, int8-static and both TensorRT engines (built if missing)."""
    from export.pipeline import export_artifact
    from kiln.artifacts import ArtifactError, get_artifact
    from training.trainer import train

    arts = {}
    for name in MODELS:
        try:
            art = get_artifact(name)
        except ArtifactError:
            log(f"{name}: not in the model store; training it")
            art = train(name).artifact
        wanted = ("onnx", "int8-static", *ENGINES.values())
        missing = [f for f in wanted if not art.export(f) or "file" not in art.export(f)]
        if missing:
            log(f"{art.tag}: exporting {missing}")
            art = export_artifact(art.tag, missing, log=log)
        arts[name] = art
    return arts


def run(batches: tuple[int, ...], duration_s: float, log=print) -> dict[str, Any]:
    from kiln.accelerators import tensorrt_status
    from training.data import split_inputs

    ok, reason = tensorrt_status()
    if not ok:
        raise SystemExit(f"benchmarks.tensorrt needs a CUDA GPU and TensorRT: {reason}")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit(
            "onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu in place of onnxruntime "
            f"(available: {ort.get_available_providers()})"
        )
    from export.tensorrt import EngineSession

    arts = ensure_models(log)
    x, labels = split_inputs("test", (32, 32))
    rows = []
    for model, art in arts.items():
        graphs: dict[str, _Graph | None] = {
            "onnxruntime-cpu fp32": _ort(art.file(art.export("onnx")["file"]), ["CPUExecutionProvider"]),
            "onnxruntime-cuda fp32": _ort(
                art.file(art.export("onnx")["file"]), ["CUDAExecutionProvider", "CPUExecutionProvider"]
            ),
            "onnxruntime-cpu int8": _ort(
                art.file(art.export("int8-static")["file"]), ["CPUExecutionProvider"]
            )
            if "file" in art.export("int8-static")
            else None,
        }
        for label, fmt in ENGINES.items():
            entry = art.export(fmt) or {}
            graphs[label] = (
                _Graph(EngineSession(art.file(entry["file"])), ["TensorRT"]) if "file" in entry else None
            )
        for label, graph in graphs.items():
            if graph is None:
                entry = art.export(ENGINES.get(label, "int8-static")) or {}
                rows.append(
                    {"model": model, "runtime": label, "skipped": entry.get("discarded", "not built")}
                )
                log(f"  {model:<12} {label:<22} skipped: {rows[-1]['skipped']}")
                continue
            acc = accuracy(graph, x, labels)
            for b in batches:
                xb = batch_of(x, b)
                calls, elapsed = time_calls(lambda g=graph, xb=xb: g.run({"input": xb}), 5, duration_s)
                row = {
                    "model": model,
                    "runtime": label,
                    "providers": graph.providers,
                    "batch": b,
                    "samples_per_s": b * len(calls) / elapsed,
                    "latency_ms_p50": percentile(calls, 50) * 1e3,
                    "latency_ms_p99": percentile(calls, 99) * 1e3,
                    "test_accuracy": acc,
                }
                rows.append(row)
                log(
                    f"  {model:<12} {label:<22} batch {b:>3}: {row['samples_per_s']:10.1f} samples/s  "
                    f"p50 {row['latency_ms_p50']:7.3f} ms  acc {acc:.4f}"
                )
    return {"suite": "tensorrt", "machine": machine_info(), "gpu": _gpu_name(), "rows": rows}


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tensorrt", description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="JSON file for the figures")
    parser.add_argument("--quick", action="store_true", help="shorter timings (smoke run)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    results = run(batches=(1, 32, 256), duration_s=0.5 if args.quick else 3.0)
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    results["command"] = "python -m benchmarks.tensorrt " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
