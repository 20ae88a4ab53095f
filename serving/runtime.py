"""Runtimes that execute one exported format of an artifact on a batch of numpy inputs.

``onnxruntime`` (fp32 graph) and ``onnxruntime-int8`` (QDQ graph) use the CUDA and TensorRT execution
providers when onnxruntime-gpu and a GPU are present, else the CPU provider; ``pytorch`` rebuilds the
model from its config and safetensors weights; ``tensorrt-fp16`` / ``tensorrt-int8`` run serialized
engines (CUDA GPU + ``tensorrt`` package). :func:`available_backends` says which an artifact supports here.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import numpy as np

from kiln.accelerators import tensorrt_status
from kiln.artifacts import Artifact, load_torch_model

log = logging.getLogger("kiln.serving")

_ONNX_BACKENDS = ("onnxruntime", "onnxruntime-int8")
_TRT_BACKENDS = ("tensorrt-fp16", "tensorrt-int8")
# Artifacts exported before exports recorded the backend they serve (Kiln 0.1 classifiers).
_LEGACY_EXPORTS = {
    "onnxruntime": "onnx",
    "onnxruntime-int8": "int8-static",
    "tensorrt-fp16": "fp16-trt",
    "tensorrt-int8": "int8-trt",
}
PLATFORMS = {
    "onnxruntime": "onnxruntime_onnx",
    "onnxruntime-int8": "onnxruntime_onnx",
    "pytorch": "pytorch_libtorch",
    "tensorrt-fp16": "tensorrt_plan",
    "tensorrt-int8": "tensorrt_plan",
}


class Runtime(Protocol):
    backend: str
    load_seconds: float

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OnnxRuntime:
    def __init__(self, art: Artifact, backend: str, threads: int):
        import onnxruntime as ort

        t0 = time.perf_counter()
        self.backend = backend
        path = art.file(export_for(art, backend)[1]["file"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Intra-op threads sleep between parallel sections instead of spinning: in a server they share
        # the cores with the event loop that parses the next requests, and a spinning thread takes its
        # CPU. On the 2-core machine of BENCHMARKS.md, vit-soft at batch 32: 1300-1450 samples/s without
        # spinning against ~700 with it (ORT's default), batch 1: 550-690 against 350-500.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        preferred = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        providers = [p for p in preferred if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.providers = self.session.get_providers()
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.load_seconds = time.perf_counter() - t0

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs), strict=True))


class TorchRuntime:
    backend = "pytorch"

    def __init__(self, art: Artifact, threads: int):
        import torch

        t0 = time.perf_counter()
        torch.set_num_threads(threads)
        self._torch = torch
        self.model = load_torch_model(art)
        self.input_names = [t["name"] for t in art.manifest["inputs"]]
        self.output_names = [t["name"] for t in art.manifest["outputs"]]
        self.load_seconds = time.perf_counter() - t0

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._torch.inference_mode():
            out = self.model(*(self._torch.from_numpy(inputs[n]) for n in self.input_names))
        outs = out if isinstance(out, tuple) else (out,)
        return {n: o.numpy() for n, o in zip(self.output_names, outs, strict=True)}


class TensorRTRuntime:
    """Runs a serialized TensorRT engine (:class:`export.tensorrt.EngineSession`: torch CUDA buffers,
    batches beyond the engine's profile in chunks)."""

    def __init__(self, art: Artifact, backend: str):
        from export.tensorrt import EngineSession

        t0 = time.perf_counter()
        self.backend = backend
        self.session = EngineSession(art.file(export_for(art, backend)[1]["file"]))
        self.output_names = self.session.output_names
        self.load_seconds = time.perf_counter() - t0

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs), strict=True))


class OnnxTextRuntime:
    """An imported text model (``kiln import``): ``text`` (BYTES) → the artifact's tokenizer
    (:class:`kiln.texts.TextTokenizer`) → its ONNX graph → the outputs, renamed as the manifest's ``text``
    block says (e.g. ``sentence_embedding`` → ``embedding``)."""

    def __init__(self, art: Artifact, backend: str, threads: int):
        from kiln.texts import TextTokenizer

        spec = art.manifest["text"]
        self.onnx = OnnxRuntime(art, backend, threads)
        self.backend = backend
        self.tokenizer = TextTokenizer(
            art.file(spec["tokenizer"]), spec["max_length"], spec["inputs"], spec.get("pad_id", 0)
        )
        self.rename = dict(spec["outputs"])
        self.load_seconds = self.onnx.load_seconds

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from kiln.texts import texts_of

        graph = list(self.rename)
        outs = self.onnx.session.run(graph, self.tokenizer(texts_of(inputs["text"])))
        return {self.rename[n]: o for n, o in zip(graph, outs, strict=True)}


def export_for(art: Artifact, backend: str) -> tuple[str, dict | None]:
    """(format, manifest entry) of the export that serves ``backend``; the entry is None if not exported,
    or if the export was discarded by its quality gate (:func:`discarded` says why).

    The export pipeline records on each entry which backend it serves (the classifier's int8 graph is
    ``int8-static``, the diffusion model's ``int8-ptq4dm``).
    """
    fmt, entry = _recorded(art, backend)
    return fmt, None if entry is None or discarded(entry) else entry


def discarded(entry: dict | None) -> str:
    """Why an export entry must not be served ('' if it may): its graph failed its quality gate at export."""
    if not entry:
        return ""
    if "discarded" in entry:
        return str(entry["discarded"])
    gate = entry.get("gate")
    if isinstance(gate, dict) and gate.get("passed") is not True:
        return f"failed its quality gate: {gate.get('reason') or 'no verdict recorded'}"
    return ""


def _recorded(art: Artifact, backend: str) -> tuple[str, dict | None]:
    for fmt, entry in art.manifest.get("exports", {}).items():
        if entry.get("backend") == backend:
            return fmt, entry
    fmt = _LEGACY_EXPORTS[backend]
    entry = art.export(fmt)
    return fmt, entry if entry is not None and "backend" not in entry else None


def _unavailable(art: Artifact, backend: str) -> str:
    """'' if ``backend``'s export exists and passed its gate, else why it cannot be served."""
    fmt, entry = _recorded(art, backend)
    if entry is None:
        return f"not exported (kiln export {art.name} --format {fmt})"
    why = discarded(entry)
    return f"the {fmt} export {why}" if why else ""


def available_backends(art: Artifact) -> dict[str, str]:
    """backend → '' if loadable here, else the reason it is not (not exported, discarded by its quality
    gate at export, or no TensorRT/GPU here)."""
    out = {backend: _unavailable(art, backend) for backend in _ONNX_BACKENDS}
    # imported models (``kiln import``) have no model-zoo architecture to rebuild in PyTorch
    out["pytorch"] = "" if "architecture" in art.manifest else "no PyTorch model (imported: ONNX only)"
    trt_ok, reason = tensorrt_status()
    for backend in _TRT_BACKENDS:
        out[backend] = _unavailable(art, backend) or ("" if trt_ok else reason)
    return out


def load_runtime(art: Artifact, backend: str, threads: int) -> Runtime:
    if backend in _ONNX_BACKENDS:
        return OnnxRuntime(art, backend, threads)
    if backend == "pytorch":
        return TorchRuntime(art, threads)
    if backend in _TRT_BACKENDS:
        return TensorRTRuntime(art, backend)
    raise ValueError(f"unknown backend {backend!r}; valid: {list(PLATFORMS)}")
