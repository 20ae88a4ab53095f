"""A loaded artifact: its runtimes (one per backend), an adaptive batcher each, and its tensor specs.

:class:`LoadedModel` implements :class:`serving.repository.ServedModel` for the protocol front-ends and
is the same for every task. A task's served model (``serving.tasks.*``) derives from it and adds the
task's own methods (``classify``, ``generate``...), with decoding and encoding at the edge; it may also
change how requests are scheduled onto the runtime (``batch_max_size``).
"""

from __future__ import annotations

import logging
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

        status = available_backends(art) if backends is None else backends
        if status.get(config.backend, "unknown backend"):
            raise RuntimeError(
                f"{art.tag} cannot run on backend {config.backend!r}: {status.get(config.backend)}. "
                f"Loadable here: {[b for b, why in status.items() if not why]}"
            )
        order = [config.backend] + [b for b, why in status.items() if not why and b != config.backend]
        self.batchers: dict[str, AdaptiveBatcher] = {}
        self.runtimes = {}
        for backend in order:
            labels = {"model": self.name, "version": self.version, "backend": backend}
            runtime = runtime_factory(art, backend, config.threads)
            self.runtimes[backend] = runtime
            self.batchers[backend] = AdaptiveBatcher(
                runtime.run,
                max_batch_size=batch_max_size or config.batch_max_size,
                window_ms=config.batch_window_ms,
                labels=labels,
            )
            metrics.MODEL_LOAD_SECONDS.labels(**labels).set(runtime.load_seconds)
            metrics.MODEL_READY.labels(**labels).set(1)
            log.info("loaded %s on %s in %.2fs", art.tag, backend, runtime.load_seconds)
        self.backends = list(self.batchers)
        self.platform = PLATFORMS[self.backends[0]]

    def ready(self) -> bool:
        return bool(self.batchers)

    def resolve_backend(self, backend: str | None) -> str:
        if backend in (None, ""):
            return self.backends[0]
        if backend not in self.batchers:
            raise InferenceError(
                400, f"model {self.name!r} has no backend {backend!r}; loaded: {self.backends}"
            )
        return backend

    async def infer(self, inputs: dict[str, np.ndarray], backend: str | None = None) -> dict[str, np.ndarray]:
        return await self.batchers[self.resolve_backend(backend)].submit(inputs)

    def close(self) -> None:
        for b in self.batchers.values():
            b.close()
