"""``kiln export``: artifact → ONNX (parity-checked) → 8-bit graphs → TensorRT engines, one store tag.

What differs per task lives in its :class:`ExportSpec` (``export.classification``,
``export.diffusion``, ...), looked up by the artifact's ``task``: the example inputs the graph is traced
with, the held-out inputs parity is checked on, the calibration sets the quantizers ask for, and the
quality metric every exported graph is measured with. The steps themselves are the same for every task.

Each format's file goes into the artifact's directory and its facts (parity, quality, settings) into
``kiln.json`` under ``exports``. A parity failure removes the bad file and raises: a graph that does not
match PyTorch is never served. A re-export is staged next to the old file and replaces it only once it
passed, so a failed re-export never clobbers a good graph.

Every graph derived from the fp32 one (8-bit QDQ graphs, TensorRT engines) passes its task's quality
gates (``ExportSpec.quality_gates``, :mod:`export.gates`) or is discarded: its quality is measured on the
staged file with the task's own metric and compared with the fp32 graph's; a graph that loses more than
allowed is deleted, the verdict and the reason go into its manifest entry (``gate``, no ``file``) and the
log, and serving reports that reason instead of loading it. Gates are checked, never skipped: a derived
graph whose quality cannot be measured is discarded too.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from export.classification import ClassifierExport
from export.diffusion import DiffusionExport
from export.embedding import EmbeddingExport
from export.forecasting import ForecastExport
from export.gates import QualityGate, evaluate, with_overrides
from export.onnx import export_onnx, max_abs_diff
from export.quantize import QUANTIZERS, CalibrationReader, get_quantizer
from kiln.accelerators import tensorrt_status
from kiln.artifacts import Artifact, get_artifact, load_torch_model

_log = logging.getLogger("kiln.export")

PARITY_ATOL = 1e-4  # fp32 ONNX vs eager PyTorch, max |Δ output|


class ExportError(Exception):
    """An export step produced something Kiln will not serve."""


class ExportSpec(Protocol):
    """What the export pipeline needs to know about one task."""

    task: ClassVar[str]  # the artifact manifest's "task"
    formats: ClassVar[tuple[str, ...]]  # "onnx" first, then QUANTIZERS names, in build order
    default_formats: ClassVar[tuple[str, ...]]  # what `kiln serve` makes sure exists
    int8_format: ClassVar[str]  # the int8 graph served as "onnxruntime-int8" and built into int8 engines

    def example_inputs(self, art: Artifact) -> dict[str, np.ndarray]:
        """A small batch (≥ 2 rows) to trace the graph with, by graph input name, in forward's order."""

    def parity_inputs(self, art: Artifact) -> tuple[dict[str, np.ndarray], str]:
        """Held-out inputs that ONNX must match PyTorch on, and a description for the manifest."""

    def calibration(self, art: Artifact, name: str) -> CalibrationReader:
        """The calibration set a quantizer asks for by name (``Quantizer.calibration``)."""

    # What a derived graph may lose against the fp32 graph, on metrics that ``quality()`` returns.
    quality_gates: ClassVar[tuple[QualityGate, ...]]

    def quality(self, art: Artifact, graph: Path) -> dict[str, Any]:
        """The task's quality metrics of one exported graph (e.g. ``val_accuracy``): an ONNX file, or a
        TensorRT engine (``*.plan``) — open either with :func:`export.sessions.open_session`."""


SPECS: dict[str, type[ExportSpec]] = {
    cls.task: cls for cls in (ClassifierExport, DiffusionExport, ForecastExport, EmbeddingExport)
}


def spec_for(art: Artifact) -> ExportSpec:
    task = art.manifest.get("task", "")
    try:
        return SPECS[task]()
    except KeyError:
        raise ExportError(
            f"{art.tag}: no export spec for task {task!r}; known tasks: {sorted(SPECS)}"
        ) from None


def _tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def export_artifact(
    tag: str,
    formats: Sequence[str] | None = None,
    *,
    atol: float = PARITY_ATOL,
    log: Callable[[str], None] = print,
    progress: bool = True,
    max_loss: Mapping[str, float] | None = None,
) -> Artifact:
    """Export an artifact to the requested formats (default: every format of its task).

    Args:
        max_loss: per gated metric, the loss a derived graph may have against fp32 (overrides the
            task's ``quality_gates``; e.g. ``{"val_accuracy": 0.02}``).

    Raises:
        ValueError: a format that does not exist, or that the artifact's task does not export; a
            ``max_loss`` metric the task does not gate.
        ArtifactError: no such artifact.
        ExportError: a graph failed its parity check, or a format's source export is missing.
    """
    known = ("onnx", *QUANTIZERS)
    if formats is not None:
        unknown = sorted(set(formats) - set(known))
        if unknown:
            raise ValueError(f"unknown export format(s) {unknown}; valid: {list(known)}")
    art = get_artifact(tag)
    spec = spec_for(art)
    if formats is None:
        formats = spec.formats
    foreign = sorted(set(formats) - set(spec.formats))
    if foreign:
        raise ValueError(
            f"{art.tag} is a {spec.task!r} model; it does not export {foreign}. "
            f"Its formats: {list(spec.formats)}"
        )
    steps = [f for f in spec.formats if f in formats]
    gates = _gates(spec, max_loss) if set(steps) - {"onnx"} else ()
    bar = tqdm(steps, desc=f"export {art.tag}", unit="format", disable=not progress)
    for fmt in bar:
        bar.set_postfix(format=fmt)
        t0 = time.perf_counter()
        if fmt == "onnx":
            entry = _export_onnx(art, spec, atol)
        else:
            quantizer = get_quantizer(fmt)
            if quantizer.output_suffix.endswith(".plan"):
                ok, reason = tensorrt_status()
                if not ok:
                    log(f"skipping {fmt}: {reason}")
                    continue
            source = spec.int8_format if quantizer.source == "int8" else quantizer.source
            src = _require(art, source, fmt)
            dst = art.file("model" + quantizer.output_suffix)
            staged = dst.with_name(dst.name + ".staged")
            calib = spec.calibration(art, quantizer.calibration) if quantizer.calibration else None
            facts = quantizer.quantize(src, staged, calib)
            entry = {"file": dst.name, **facts}
            if fmt == spec.int8_format:
                entry["backend"] = "onnxruntime-int8"
            elif "precision" in facts:  # a TensorRT engine
                entry["backend"] = f"tensorrt-{facts['precision']}"
            entry.update(_gate(art, spec, gates, staged))
            if entry["gate"]["passed"]:
                os.replace(staged, dst)
            else:
                staged.unlink(missing_ok=True)
                dst.unlink(missing_ok=True)  # an older graph of this format no longer says what it was
                del entry["file"]
                entry["discarded"] = f"failed its quality gate: {entry['gate']['reason']}"
                log(f"{art.tag}: {fmt} DISCARDED, not served — {entry['gate']['reason']}")
                _log.warning(
                    "%s: %s discarded by its quality gate: %s", art.tag, fmt, entry["gate"]["reason"]
                )
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        art.update(exports={fmt: entry})
        if "file" in entry:
            log(f"{art.tag}: {fmt} → {entry['file']}" + _summary(entry))
    return art


def _gates(spec: ExportSpec, max_loss: Mapping[str, float] | None) -> tuple[QualityGate, ...]:
    gates = getattr(spec, "quality_gates", None)
    if not gates:
        raise ExportError(
            f"the {spec.task!r} export spec declares no quality_gates, so its derived graphs could not be "
            "gated; add `quality_gates = (QualityGate(METRIC, MAX_LOSS), ...)` on metrics its quality() "
            "returns"
        )
    return with_overrides(gates, max_loss)


def _gate(art: Artifact, spec: ExportSpec, gates: tuple[QualityGate, ...], graph: Path) -> dict[str, Any]:
    """Quality of a staged derived graph, its fp32 counterparts (``fp32_<metric>``) and the gates' verdict."""
    fp32 = art.export("onnx") or {}
    try:
        quality = spec.quality(art, graph)
    except Exception as exc:  # any failure to measure is a failed gate, recorded with its cause
        quality = {"quality_note": f"quality not measured: {type(exc).__name__}: {exc}"}
    metrics = {g.metric for g in gates} | set(quality)
    return {
        **quality,
        **{f"fp32_{k}": fp32[k] for k in metrics if k in fp32},
        "gate": evaluate(gates, fp32, quality),
    }


def _export_onnx(art: Artifact, spec: ExportSpec, atol: float) -> dict[str, Any]:
    model = load_torch_model(art)
    path = art.file("model.onnx")
    staged = path.with_name(path.name + ".staged")
    export_onnx(
        model,
        _tensors(spec.example_inputs(art)),
        staged,
        output_names=[t["name"] for t in art.manifest["outputs"]],
    )
    inputs, described = spec.parity_inputs(art)
    diff = max_abs_diff(model, staged, inputs)
    if not diff <= atol:  # also catches NaN
        staged.unlink(missing_ok=True)
        raise ExportError(
            f"{art.tag}: ONNX output differs from PyTorch by {diff:.3g} > tolerance {atol:g} "
            f"on {described}; the new graph was discarded"
        )
    os.replace(staged, path)
    return {
        "file": path.name,
        "backend": "onnxruntime",
        "max_abs_diff": diff,
        "atol": atol,
        "parity_inputs": described,
        **spec.quality(art, path),
    }


def _require(art: Artifact, fmt: str, needed_by: str):
    entry = art.export(fmt)
    if entry is not None and "discarded" in entry:
        raise ExportError(
            f"{art.tag}: {needed_by} is built from the {fmt!r} export, which was {entry['discarded']}"
        )
    if entry is None or not art.file(entry["file"]).is_file():
        raise ExportError(
            f"{art.tag}: {needed_by} needs the {fmt!r} export first (kiln export --format {fmt})"
        )
    return art.file(entry["file"])


def _summary(entry: dict) -> str:
    parts = []
    if "max_abs_diff" in entry:
        parts.append(f"max|Δ|={entry['max_abs_diff']:.2e}")
    for key, value in entry.items():
        if isinstance(value, float) and key not in ("max_abs_diff", "atol", "seconds") and "fp32_" not in key:
            parts.append(f"{key.replace('_', ' ')}={value:.4f}")
    return f" ({', '.join(parts)})" if parts else ""
