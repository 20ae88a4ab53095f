"""A loaded artifact: its runtimes (one per backend), an adaptive batcher each, and its tensor specs.

Implements :class:`serving.repository.ServedModel` for the protocol front-ends, plus ``classify`` for
the task endpoint (preprocessing and probabilities at the edge).
"""

from __future__ import annotations

import logging

import numpy as np

from kiln.artifacts import Artifact
from kiln.imaging import to_model_input
from serving import metrics
from serving.batching import AdaptiveBatcher
from serving.config import ServeConfig
from serving.repository import InferenceError, TensorSpec
from serving.runtime import PLATFORMS, available_backends, load_runtime

log = logging.getLogger("kiln.serving")

MAX_REQUEST_BATCH = 64  # largest batch one request may carry (the OIP config's max_batch_size)


class LoadedModel:
    def __init__(self, art: Artifact, config: ServeConfig):
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
        self.image_size = tuple(art.manifest["preprocess"]["size"])

        status = available_backends(art)
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
            runtime = load_runtime(art, backend, config.threads)
            self.runtimes[backend] = runtime
            self.batchers[backend] = AdaptiveBatcher(
                runtime.run,
                max_batch_size=config.batch_max_size,
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

    async def classify(self, images: np.ndarray, backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(N, H, W)`` images in [0, 1] → (predicted label indices, probabilities)."""
        x = to_model_input(images, self.image_size)
        logits = (await self.infer({self.inputs[0].name: x}, backend))[self.outputs[0].name]
        z = logits - logits.max(axis=-1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
        return probs.argmax(-1), probs

    def close(self) -> None:
        for b in self.batchers.values():
            b.close()
