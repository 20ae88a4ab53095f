"""A loaded artifact: its runtimes (one per backend), an adaptive batcher each, and its tensor specs.

:class:`LoadedModel` implements :class:`serving.repository.ServedModel` for the protocol front-ends and
is the same for every task. A task's served model (``serving.tasks.*``) derives from it and adds the
task's own methods (``classify``, ``generate``...), with decoding and encoding at the edge; it may also
change how requests are scheduled onto the runtime (``batch_max_size``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from kiln.artifacts import Artifact
from serving import metrics
from serving.batching import AdaptiveBatcher
from serving.config import ServeConfig
from serving.repository import InferenceError, TensorSpec
from serving.runtime import PLATFORMS, available_backends, load_runtime

log = logging.getLogger("kiln.serving")

MAX_REQUEST_BATCH = 64  # largest batch one request may carry (the OIP config's max_batch_size)


_COMPUTE_NS = "__kiln_compute_ns__"  # travels with each batch's rows: the batch's compute time


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class ModelStats:
    """Per-model statistics in the shape of Triton's statistics extension (``model_stats`` entries).

    ``success`` / ``fail``: requests and their time inside the model (queue + compute); ``queue``: time
    waiting for a batch (a request's time minus its batch's compute time); ``compute_infer``: the
    runtime's execution, counted once per request that rode in the batch, as Triton does; per batch
    size, the executions and their compute time. Kept in the worker process that serves the model.
    """

    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    inference_count: int = 0  # samples (rows) inferred
    execution_count: int = 0  # runtime executions (batches)
    last_inference_ms: int = 0  # ms since the epoch of the last request's end
    batches: dict[int, _Duration] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def timed(self, run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]):
        """Wrap a runtime's ``run``: count the execution, and attach its compute time to every row."""

        def run_timed(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            start = time.perf_counter_ns()
            outputs = run(inputs)
            ns = time.perf_counter_ns() - start
            rows = len(next(iter(inputs.values())))
            with self._lock:
                self.execution_count += 1
                self.inference_count += rows
                self.batches.setdefault(rows, _Duration()).add(ns)
            return {**outputs, _COMPUTE_NS: np.full(rows, ns, dtype=np.int64)}

        return run_timed

    def request(self, ok: bool, ns: int, compute_ns: int) -> None:
        with self._lock:
            if ok:
                self.success.add(ns)
                self.compute_infer.add(compute_ns)
                self.queue.add(max(0, ns - compute_ns))
            else:
                self.fail.add(ns)
            self.last_inference_ms = int(time.time() * 1000)

    def as_dict(self) -> dict[str, Any]:
        """Triton's ``model_stats`` entry body (without name and version)."""
        zero = {"count": 0, "ns": 0}
        with self._lock:
            return {
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": asdict(self.success),
                    "fail": asdict(self.fail),
                    "queue": asdict(self.queue),
                    "compute_input": dict(zero),
                    "compute_infer": asdict(self.compute_infer),
                    "compute_output": dict(zero),
                    "cache_hit": dict(zero),
                    "cache_miss": dict(zero),
                },
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": dict(zero),
                        "compute_infer": asdict(d),
                        "compute_output": dict(zero),
                    }
                    for size, d in sorted(self.batches.items())
                ],
            }


class LoadedModel:
    task: ClassVar[str] = ""  # the artifact manifest's "task" this class serves

    def __init__(
        self,
        art: Artifact,
        config: ServeConfig,
        *,
        batch_max_size: int | None = None,
        backends: dict[str, str] | None = None,
        runtime_factory=load_runtime,
    ):
        """``backends`` (backend → '' if loadable, else why not) and ``runtime_factory`` let a task run
        artifacts that the exported-graph runtimes cannot (e.g. text encoders with a tokenizer)."""
        self.artifact = art
        self.name = art.name
        self.version = art.version
        self.max_batch_size = MAX_REQUEST_BATCH
        self.inputs = [
            TensorSpec(t["name"], t["datatype"], tuple(t["shape"])) for t in art.manifest["inputs"]
        ]
        self.outputs = [
            TensorSpec(t["name"], t["datatype"], tuple(t["shape"])) for t in art.manifest["outputs"]
        ]
        self.labels = art.manifest.get("labels", [])

        # Per-model settings (serving.config.ModelSettings): the global ones unless the operator set
        # this model's own; a task's batch size (``batch_max_size``) yields to an explicit per-model one.
        self.settings = settings = config.settings_for(art.name)
        if batch_max_size is not None and "batch_max_size" not in settings.explicit:
            settings = replace(settings, batch_max_size=batch_max_size)
        status = available_backends(art) if backends is None else backends
        if status.get(settings.backend, "unknown backend"):
            raise RuntimeError(
                f"{art.tag} cannot run on backend {settings.backend!r}: {status.get(settings.backend)}. "
                f"Loadable here: {[b for b, why in status.items() if not why]}"
            )
        order = [settings.backend] + [b for b, why in status.items() if not why and b != settings.backend]
        self.batchers: dict[str, AdaptiveBatcher] = {}
        self.runtimes = {}
        self.in_flight = 0
        self.stats = ModelStats()
        try:
            for backend in order:
                labels = {"model": self.name, "version": self.version, "backend": backend}
                # One runtime per instance: ``instances`` batches compute at once (Triton's instance_group).
                instances = [runtime_factory(art, backend, config.threads) for _ in range(settings.instances)]
                runtime = self.runtimes[backend] = instances[0]
                self.batchers[backend] = AdaptiveBatcher(
                    [self.stats.timed(r.run) for r in instances],
                    max_batch_size=settings.batch_max_size,
                    window_ms=settings.batch_window_ms,
                    labels=labels,
                    max_queue_size=settings.max_queue_size,
                    max_queue_delay_ms=settings.max_queue_delay_ms,
                )
                metrics.MODEL_LOAD_SECONDS.labels(**labels).set(runtime.load_seconds)
                log.info("loaded %s on %s in %.2fs", art.tag, backend, runtime.load_seconds)
        except Exception as exc:
            # One backend that will not start (a corrupt or missing graph) makes the whole model
            # UNAVAILABLE: the repository records the reason, the other models keep serving.
            self.close()
            raise RuntimeError(f"{art.tag}: backend {backend!r} failed to load: {exc}") from exc
        self.mark_ready()
        self.backends = list(self.batchers)
        self.platform = PLATFORMS[self.backends[0]]
        self.loaded_at = time.time()

    def ready(self) -> bool:
        return bool(self.batchers)

    def mark_ready(self) -> None:
        """``kiln_model_ready`` 1 for every loaded backend; again after a reload, when the replaced copy's
        close() zeroed the same labels."""
        for backend in self.batchers:
            metrics.MODEL_READY.labels(model=self.name, version=self.version, backend=backend).set(1)

    def resolve_backend(self, backend: str | None) -> str:
        if backend in (None, ""):
            return self.backends[0]
        if backend not in self.backends:
            raise InferenceError(
                400, f"model {self.name!r} has no backend {backend!r}; loaded: {self.backends}"
            )
        return backend

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        """Refuse (400, naming the problem) inputs that would make the runtime fail: a request's rows
        share a batch with other requests', so what one request gets wrong must be caught here, before it
        is queued, not as a failed batch. Tasks add their models' value ranges (labels, time steps,
        text); names, datatypes, shapes and finiteness of protocol requests are checked by the codec.
        """
        rows = {name: (a.shape[0] if a.ndim else None) for name, a in inputs.items()}
        if None in rows.values() or len(set(rows.values())) > 1:
            raise InferenceError(
                400,
                f"model {self.name!r}: every input needs the same batch size (first dimension); got "
                + ", ".join(f"{k}: {v if v is not None else 'a scalar'}" for k, v in rows.items()),
            )

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Count a request of several ``infer`` calls (a sampling loop) as in flight for its whole
        length, so a reload, unload or drain waits for it and not only for the step computing now."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def infer(self, inputs: dict[str, np.ndarray], backend: str | None = None) -> dict[str, np.ndarray]:
        batcher = self.batchers.get(self.resolve_backend(backend))
        if batcher is None:
            raise InferenceError(503, f"model {self.name!r} version {self.version!r} was unloaded")
        self.check_inputs(inputs)
        self.in_flight += 1  # an unload waits for this to reach 0 before closing the batchers
        start, ok = time.perf_counter_ns(), False
        try:
            outputs = dict(await batcher.submit(inputs))
            compute_ns = int(outputs.pop(_COMPUTE_NS)[0])
            ok = True
            return outputs
        finally:
            self.in_flight -= 1
            self.stats.request(ok, time.perf_counter_ns() - start, compute_ns if ok else 0)

    def close(self) -> None:
        batchers, self.batchers = self.batchers, {}
        for backend, b in batchers.items():
            b.close()
            metrics.MODEL_READY.labels(model=self.name, version=self.version, backend=backend).set(0)
