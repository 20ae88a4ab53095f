"""``kiln export``: artifact → ONNX (parity-checked) → int8 QDQ graph → TensorRT engines, one store tag.

Each format's file goes into the artifact's directory and its facts (parity, accuracy, settings) into
``kiln.json`` under ``exports``. A parity failure removes the bad file and raises: a graph that does not
match PyTorch is never served.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import onnxruntime as ort
import torch
from tqdm.auto import tqdm

from export.onnx import export_onnx, max_abs_diff
from export.quantize import CalibrationReader, get_quantizer
from kiln.accelerators import tensorrt_status
from kiln.artifacts import Artifact, get_artifact, load_torch_model
from training.data import split_inputs

FORMATS = ("onnx", "int8-static", "fp16-trt", "int8-trt")
PARITY_ATOL = 1e-4  # fp32 ONNX vs eager PyTorch, max |Δlogit|
CALIBRATION_SAMPLES = 256  # drawn from the training split
PARITY_SAMPLES = 64  # held-out (validation split) inputs


class ExportError(Exception):
    """An export step produced something Kiln will not serve."""


def onnx_accuracy(path, inputs: np.ndarray, labels: np.ndarray, batch_size: int = 128) -> float:
    """Top-1 accuracy of an ONNX classifier under onnxruntime (CPU)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    preds = np.concatenate(
        [
            sess.run(None, {name: inputs[i : i + batch_size]})[0].argmax(-1)
            for i in range(0, len(inputs), batch_size)
        ]
    )
    return float((preds == labels).mean())


def export_artifact(
    tag: str,
    formats: Sequence[str] = FORMATS,
    *,
    atol: float = PARITY_ATOL,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> Artifact:
    """Export an artifact to the requested formats; returns the updated artifact."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; valid: {list(FORMATS)}")
    art = get_artifact(tag)
    size = tuple(art.manifest["preprocess"]["size"])
    input_name = art.manifest["inputs"][0]["name"]
    output_name = art.manifest["outputs"][0]["name"]
    test_x, test_y = split_inputs("test", size)
    steps = [f for f in FORMATS if f in formats]
    bar = tqdm(steps, desc=f"export {art.tag}", unit="format", disable=not progress)
    for fmt in bar:
        bar.set_postfix(format=fmt)
        t0 = time.perf_counter()
        if fmt == "onnx":
            model = load_torch_model(art)
            val_x, _ = split_inputs("val", size)
            path = art.file("model.onnx")
            staged = path.with_name(path.name + ".staged")  # a failed re-export never clobbers a good graph
            export_onnx(
                model, torch.from_numpy(val_x[:2]), staged, input_name=input_name, output_name=output_name
            )
            diff = max_abs_diff(model, staged, val_x[:PARITY_SAMPLES])
            if not diff <= atol:  # also catches NaN
                staged.unlink(missing_ok=True)
                raise ExportError(
                    f"{art.tag}: ONNX output differs from PyTorch by {diff:.3g} > tolerance {atol:g} "
                    f"on {PARITY_SAMPLES} held-out inputs; the new graph was discarded"
                )
            os.replace(staged, path)
            entry = {
                "file": path.name,
                "max_abs_diff": diff,
                "atol": atol,
                "parity_inputs": f"{PARITY_SAMPLES} validation-split images",
                "test_accuracy": onnx_accuracy(path, test_x, test_y),
            }
        elif fmt == "int8-static":
            src = _require(art, "onnx", fmt)
            train_x, _ = split_inputs("train", size)
            calib = CalibrationReader(input_name, train_x[:CALIBRATION_SAMPLES])
            dst = art.file("model.int8.onnx")
            staged = dst.with_name(dst.name + ".staged")
            facts = get_quantizer(fmt).quantize(src, staged, calib)
            os.replace(staged, dst)
            entry = {
                "file": dst.name,
                **facts,
                "test_accuracy": onnx_accuracy(dst, test_x, test_y),
                "fp32_test_accuracy": art.export("onnx")["test_accuracy"],
            }
        else:  # TensorRT engines
            ok, reason = tensorrt_status()
            if not ok:
                log(f"skipping {fmt}: {reason}")
                continue
            quantizer = get_quantizer(fmt)
            src = _require(art, quantizer.source, fmt)
            dst = art.file("model" + quantizer.output_suffix)
            staged = dst.with_name(dst.name + ".staged")
            facts = quantizer.quantize(src, staged)
            os.replace(staged, dst)
            entry = {"file": dst.name, **facts}
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        art.update(exports={fmt: entry})
        log(f"{art.tag}: {fmt} → {entry['file']}" + _summary(entry))
    return art


def _require(art: Artifact, fmt: str, needed_by: str):
    entry = art.export(fmt)
    if entry is None or not art.file(entry["file"]).is_file():
        raise ExportError(
            f"{art.tag}: {needed_by} needs the {fmt!r} export first (kiln export --format {fmt})"
        )
    return art.file(entry["file"])


def _summary(entry: dict) -> str:
    parts = []
    if "max_abs_diff" in entry:
        parts.append(f"max|Δ|={entry['max_abs_diff']:.2e}")
    if "test_accuracy" in entry:
        parts.append(f"test acc={entry['test_accuracy']:.4f}")
    return f" ({', '.join(parts)})" if parts else ""
