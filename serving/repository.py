"""The contract between the protocol front-ends (HTTP, gRPC) and the loaded models.

Front-ends decode and validate requests at the edge, then call :meth:`ServedModel.infer` with numpy
arrays; they never see runtimes, batching or artifacts. :class:`ModelRepository` is what they look
models up in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class InferenceError(Exception):
    """A request the server refuses, with the HTTP status that names the class of problem.

    400 bad request (shape, datatype, values, malformed body), 404 unknown model/version,
    413 payload too large, 503 model not ready. Front-ends map these to gRPC codes
    (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNAVAILABLE).
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor: OIP datatype name (``FP32``, ``INT64``...) and shape (-1 = any)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass
class ModelEntry:
    """One row of the repository index."""

    name: str
    version: str
    state: str  # "READY" | "UNAVAILABLE" | "LOADING"
    reason: str = ""


class ServedModel(Protocol):
    name: str
    version: str
    platform: str  # e.g. "onnxruntime_onnx", "pytorch_torchscript", "tensorrt_plan"
    backends: list[
        str
    ]  # loaded runtimes, default first: "onnxruntime", "onnxruntime-int8", "pytorch", "tensorrt"
    max_batch_size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def ready(self) -> bool: ...

    async def infer(self, inputs: dict[str, np.ndarray], backend: str | None = None) -> dict[str, np.ndarray]:
        """Run one request (its own batch dimension first); returns every output by name.

        Inputs are already validated against ``inputs`` (names, datatypes, shapes, finiteness).
        ``backend`` picks one of ``backends`` (default: the first); an unknown one raises
        :class:`InferenceError` 400 naming the loaded ones.
        """
        ...


@dataclass
class ModelRepository:
    """Loaded models by name, each with one or more versions; the newest loaded version is default."""

    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> version -> ServedModel
    default_versions: dict[str, str] = field(default_factory=dict)

    def add(self, model: ServedModel, default: bool = True) -> None:
        self.models.setdefault(model.name, {})[model.version] = model
        if default or model.name not in self.default_versions:
            self.default_versions[model.name] = model.version

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """Look a model up; raises :class:`InferenceError` 404 naming what exists."""
        versions = self.models.get(name)
        if not versions:
            raise InferenceError(404, f"unknown model {name!r}; loaded models: {sorted(self.models)}")
        if version in (None, ""):
            version = self.default_versions[name]
        model = versions.get(version)
        if model is None:
            raise InferenceError(
                404, f"model {name!r} has no version {version!r}; loaded versions: {sorted(versions)}"
            )
        return model

    def index(self) -> list[ModelEntry]:
        rows = [
            ModelEntry(m.name, m.version, "READY" if m.ready() else "UNAVAILABLE")
            for versions in self.models.values()
            for m in versions.values()
        ]
        return sorted(rows, key=lambda e: (e.name, e.version))

    def ready(self) -> bool:
        return bool(self.models) and all(m.ready() for v in self.models.values() for m in v.values())
