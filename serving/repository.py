"""The contract between the protocol front-ends (HTTP, gRPC) and the loaded models.

Front-ends decode and validate requests at the edge, then call :meth:`ServedModel.infer` with numpy
arrays; they never see runtimes, batching or artifacts. :class:`ModelRepository` is what they look
models up in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

log = logging.getLogger("kiln.serving")

# Longest a reload or unload waits for the requests inside the old copy: the gateway's request timeout
# (BentoML's traffic timeout in serving/service.py), which no request outlives.
DRAIN_SECONDS = 60.0


class InferenceError(Exception):
    """A request the server refuses, with the HTTP status that names the class of problem.

    400 bad request (shape, datatype, values, malformed body), 401/403 model control without / with a
    wrong admin token, 404 unknown model/version, 413 payload too large, 429 over capacity, 500 a
    failure inside the server, 503 model not ready or UNAVAILABLE. Front-ends map these to gRPC codes
    (INVALID_ARGUMENT, UNAUTHENTICATED/PERMISSION_DENIED, NOT_FOUND, RESOURCE_EXHAUSTED, INTERNAL,
    UNAVAILABLE). ``headers`` go on the HTTP response (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


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
    labels: list[str]  # class names of a classifier's outputs ([] when it has none)
    stats: Any  # serving.model.ModelStats: Triton-style statistics
    loaded_at: float  # time.time() when it finished loading
    in_flight: int  # requests inside the model right now: infer() calls and sampling loops in progress
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def ready(self) -> bool: ...

    def close(self) -> None:
        """Stop the model's batchers and runtimes (after an unload, or at shutdown)."""
        ...

    async def infer(self, inputs: dict[str, np.ndarray], backend: str | None = None) -> dict[str, np.ndarray]:
        """Run one request (its own batch dimension first); returns every output by name.

        Inputs are already validated against ``inputs`` (names, datatypes, shapes, finiteness).
        ``backend`` picks one of ``backends`` (default: the first); an unknown one raises
        :class:`InferenceError` 400 naming the loaded ones.
        """
        ...


@dataclass
class StreamResponse:
    """One response of a decoupled (streaming) request, Triton's term for a model that answers a request
    with any number of responses (a sampler's steps, then its images).

    A served model that streams has ``async def open_stream(parameters, backend) -> AsyncIterator[
    StreamResponse]`` besides :meth:`ServedModel.infer`: awaiting it validates the request's
    ``parameters`` and starts it (raising :class:`InferenceError` before any response), the iterator
    yields the responses, the last with ``final`` set, and raises what fails later. Closing the iterator
    early cancels the request. The front-ends (gRPC ``ModelStreamInfer``, HTTP ``generate_stream``)
    encode the outputs and parameters.
    """

    outputs: dict[str, np.ndarray]  # by name; object arrays of bytes are BYTES
    parameters: dict[str, bool | int | float | str]
    final: bool


@dataclass(eq=False)  # a live registry: compared and hashed by identity (per-repository state keys on it)
class ModelRepository:
    """Models by name, each with one or more loaded versions, plus the ones that are not loaded and why.

    The newest loaded version of a name is its default. A model that failed to load (missing file,
    corrupt graph, a backend that would not start) is recorded with :meth:`fail`: it is UNAVAILABLE with
    its reason in :meth:`index`, requests for it get 503 naming the reason, and every other model keeps
    serving. :meth:`unload` (model control) leaves an UNAVAILABLE row with the reason "unloaded".

    Readiness is strict, as Triton's default ``--strict-readiness=true``: the server is ready when at
    least one model is loaded, every loaded model is ready and no model the server was configured to
    serve failed to load. A model an operator unloaded on purpose does not make the server unready, nor
    does a model-control load that failed (a typo must not take a serving replica out of rotation);
    that failure is in the index with its reason. Per-model
    readiness (``/v2/models/{m}/ready``, gRPC ModelReady, the ``kiln_model_ready`` gauge) says which.
    """

    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> version -> ServedModel
    default_versions: dict[str, str] = field(default_factory=dict)
    failed: dict[str, ModelEntry] = field(default_factory=dict)  # name -> why its load failed
    _blocking: set[str] = field(default_factory=set, repr=False)  # failed configured models
    unloaded: dict[tuple[str, str], ModelEntry] = field(default_factory=dict)
    # Set by the service: loads a model-store tag (NAME or NAME:VERSION) as a served model (blocking).
    loader: Callable[[str], Any] | None = None
    _control: asyncio.Lock | None = field(default=None, repr=False)
    draining: bool = False  # set at SIGTERM (serving.admission): not ready while accepted requests finish

    def add(self, model: ServedModel, default: bool = True) -> None:
        versions = dict(self.models.get(model.name, {}))
        versions[model.version] = model
        self.models[model.name] = versions  # one assignment: readers never see a half-updated dict
        if default or model.name not in self.default_versions:
            self.default_versions[model.name] = model.version
        self.failed.pop(model.name, None)
        self._blocking.discard(model.name)
        self.unloaded.pop((model.name, model.version), None)

    def fail(self, name: str, version: str, reason: str, *, configured: bool = True) -> None:
        """Record that ``name`` (``version``, "" when not known) could not be loaded, and why."""
        self.failed[name] = ModelEntry(name, version, "UNAVAILABLE", reason)
        if configured:  # a model the server was started with: not ready until it loads or is unloaded
            self._blocking.add(name)

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """Look a model up; raises :class:`InferenceError` 404 naming what exists, 503 if UNAVAILABLE."""
        versions = self.models.get(name)
        if not versions:
            entry = self.failed.get(name) or next(
                (e for (n, _), e in self.unloaded.items() if n == name), None
            )
            if entry is not None:
                raise InferenceError(503, f"model {name!r} is UNAVAILABLE: {entry.reason}")
            raise InferenceError(404, f"unknown model {name!r}; loaded models: {sorted(self.models)}")
        if version in (None, ""):
            version = self.default_versions[name]
        model = versions.get(version)
        if model is None:
            entry = self.unloaded.get((name, version))
            if entry is not None:
                raise InferenceError(
                    503, f"model {name!r} version {version!r} is UNAVAILABLE: {entry.reason}"
                )
            raise InferenceError(
                404, f"model {name!r} has no version {version!r}; loaded versions: {sorted(versions)}"
            )
        return model

    def index(self) -> list[ModelEntry]:
        """Every model version the server knows: loaded (READY or not) and UNAVAILABLE, with reasons."""
        rows = [
            ModelEntry(
                m.name, m.version, "READY" if m.ready() else "UNAVAILABLE", "" if m.ready() else "not ready"
            )
            for versions in self.models.values()
            for m in versions.values()
        ]
        rows += list(self.failed.values())
        rows += [e for (n, v), e in self.unloaded.items() if v not in self.models.get(n, {})]
        return sorted(rows, key=lambda e: (e.name, e.version))

    def ready(self) -> bool:
        """Strict readiness (see the class docstring)."""
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        """None when ready, else what keeps the server from being ready."""
        if self.draining:
            return "the server is shutting down (draining after SIGTERM)"
        blocking = [e for e in self.failed.values() if e.name in self._blocking]
        if blocking:
            return "; ".join(f"model {e.name!r} is UNAVAILABLE: {e.reason}" for e in blocking)
        if not self.models:
            return "no model is loaded"
        waiting = sorted(
            f"{m.name}:{m.version}" for v in self.models.values() for m in v.values() if not m.ready()
        )
        return f"models not ready: {waiting}" if waiting else None

    async def load(self, name: str, version: str = "") -> ServedModel:
        """Load ``name`` (``version``, default: the store's latest) and make it the default version.

        Model control (Triton's explicit mode): the new version is loaded beside the loaded ones, and
        requests switch to it in one assignment once it is ready, so none fails during the switch.
        Loading a version that is already loaded by its version parameter makes it the default again;
        loading one by name that turns out to be loaded already reloads it (Triton's reload: the fresh
        copy takes the requests, the old one drains and closes). A load that fails records the model as
        UNAVAILABLE only if no version of it is serving.

        Raises:
            InferenceError: 400 with the reason when the model cannot be loaded.
        """
        if self.loader is None:
            raise InferenceError(400, "this server has no model loader; model control is not available")
        async with self._lock():
            loaded = self.models.get(name, {})
            if version and version in loaded:
                self.default_versions[name] = version
                return loaded[version]
            tag = f"{name}:{version}" if version else name
            try:
                model = await asyncio.to_thread(self.loader, tag)
            except Exception as exc:  # noqa: BLE001 - any load failure is reported, the server keeps serving
                reason = f"{type(exc).__name__}: {exc}"
                log.error("loading %s failed: %s", tag, reason)
                if not loaded:
                    self.fail(name, version, reason, configured=name in self._blocking)
                raise InferenceError(400, f"failed to load {tag}: {reason}") from None
            if model.name != name:
                model.close()
                raise InferenceError(400, f"{tag} loaded as {model.name!r}, not {name!r}")
            self.add(model)
            log.info("loaded %s:%s; it is now the default version of %s", name, model.version, name)
        old = loaded.get(model.version)
        if old is not None:  # a reload: the old copy no longer gets requests
            await self._drain_and_close(old)
            mark_ready = getattr(model, "mark_ready", None)  # the old copy's close() zeroed the same labels
            if mark_ready is not None:
                mark_ready()
        return model

    async def unload(
        self, name: str, version: str = "", *, drain_seconds: float = DRAIN_SECONDS
    ) -> list[str]:
        """Unload every version of ``name`` (or one ``version``); returns the versions unloaded.

        New requests stop reaching the model at once; requests already inside it finish (up to
        ``drain_seconds``) before its runtimes are closed.

        Raises:
            InferenceError: 404 when nothing by that name (version) is loaded.
        """
        async with self._lock():
            versions = dict(self.models.get(name, {}))
            if not versions:
                self._blocking.discard(name)
                if self.failed.pop(name, None) is not None:
                    self.unloaded[(name, "")] = ModelEntry(name, "", "UNAVAILABLE", "unloaded")
                    return []
                raise InferenceError(404, f"unknown model {name!r}; loaded models: {sorted(self.models)}")
            if version and version not in versions:
                raise InferenceError(
                    404, f"model {name!r} has no version {version!r}; loaded versions: {sorted(versions)}"
                )
            gone = [version] if version else sorted(versions)
            remaining = {v: m for v, m in versions.items() if v not in gone}
            if remaining:
                self.models[name] = remaining
                if self.default_versions.get(name) in gone:
                    self.default_versions[name] = max(remaining, key=lambda v: remaining[v].loaded_at)
            else:
                self.models.pop(name)
                self.default_versions.pop(name, None)
            for v in gone:
                self.unloaded[(name, v)] = ModelEntry(name, v, "UNAVAILABLE", "unloaded")
        for v in gone:
            await self._drain_and_close(versions[v], drain_seconds)
            log.info("unloaded %s:%s", name, v)
        return gone

    @staticmethod
    async def _drain_and_close(model: ServedModel, drain_seconds: float = DRAIN_SECONDS) -> None:
        """Wait (up to ``drain_seconds``) for the requests inside ``model`` to finish (sampling loops in
        progress included: they count in ``in_flight`` from admission to their last step), then close it."""
        deadline = time.monotonic() + drain_seconds
        while model.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        model.close()

    def _lock(self) -> asyncio.Lock:
        if self._control is None:
            self._control = asyncio.Lock()
        return self._control
