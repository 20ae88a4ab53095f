"""A loaded artifact: its runtimes (one per backend), an adaptive batcher each, and its tensor specs.

:class:`LoadedModel` implements :class:`serving.repository.ServedModel` for the protocol front-ends and
is the same for every task. A task's served model (``serving.tasks.*``) derives from it and adds the
task's own methods (``classify``, ``generate``...), with decoding and encoding at the edge; it may also
change how requests are scheduled onto the runtime (``batch_max_size``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import ClassVar

import numpy as np

from kiln.artifacts import Artifact
from serving import metrics
from serving.batching import AdaptiveBatcher
from serving.config import ServeConfig
from serving.repository import InferenceError, TensorSpec
from serving.runtime import PLATFORMS, available_backends, load_runtime

log = logging.getLogger("kiln.serving")

MAX_REQUEST_BATCH = 64  # largest batch one request may carry (the OIP config's max_batch_size)


class LoadedModel:
    task: ClassVar[str] = ""  # the artifact manifest's "task" this class serves

    def __init__(self, art: Artifact, config: ServeConfig, *, batch_max_size: int | None = None):
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
        status = available_backends(art)
        if status.get(settings.backend, "unknown backend"):
            raise RuntimeError(
                f"{art.tag} cannot run on backend {settings.backend!r}: {status.get(settings.backend)}. "
                f"Loadable here: {[b for b, why in status.items() if not why]}"
            )
        order = [settings.backend] + [b for b, why in status.items() if not why and b != settings.backend]
        self.batchers: dict[str, AdaptiveBatcher] = {}
        self.runtimes = {}
        self.in_flight = 0
        try:
            for backend in order:
                labels = {"model": self.name, "version": self.version, "backend": backend}
                # One runtime per instance: ``instances`` batches compute at once (Triton's instance_group).
                instances = [load_runtime(art, backend, config.threads) for _ in range(settings.instances)]
                runtime = self.runtimes[backend] = instances[0]
                self.batchers[backend] = AdaptiveBatcher(
                    [r.run for r in instances],
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
        for backend in self.batchers:
            metrics.MODEL_READY.labels(model=self.name, version=self.version, backend=backend).set(1)
        self.backends = list(self.batchers)
        self.platform = PLATFORMS[self.backends[0]]
        self.loaded_at = time.time()

    def ready(self) -> bool:
        return bool(self.batchers)

    def resolve_backend(self, backend: str | None) -> str:
        if backend in (None, ""):
            return self.backends[0]
        if backend not in self.backends:
            raise InferenceError(
                400, f"model {self.name!r} has no backend {backend!r}; loaded: {self.backends}"
            )
        return backend

    async def infer(self, inputs: dict[str, np.ndarray], backend: str | None = None) -> dict[str, np.ndarray]:
        batcher = self.batchers.get(self.resolve_backend(backend))
        if batcher is None:
            raise InferenceError(503, f"model {self.name!r} version {self.version!r} was unloaded")
        self.in_flight += 1  # an unload waits for this to reach 0 before closing the batchers
        try:
            return await batcher.submit(inputs)
        finally:
            self.in_flight -= 1

    def close(self) -> None:
        batchers, self.batchers = self.batchers, {}
        for backend, b in batchers.items():
            b.close()
            metrics.MODEL_READY.labels(model=self.name, version=self.version, backend=backend).set(0)
