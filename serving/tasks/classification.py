"""The image-classification task: ``POST /classify`` over a loaded classifier.

Decodes the image at the edge (:func:`serving.images.decode_image`), resizes it to the model's input the
same way training did, runs the logits through the model's batcher and returns softmax probabilities.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, Field

from kiln.imaging import to_model_input
from serving.images import decode_image
from serving.model import LoadedModel
from serving.repository import ModelRepository
from serving.routes import observed, task_model


class Classifier(LoadedModel):
    task = "image-classification"

    def __init__(self, art, config):
        super().__init__(art, config)
        self.image_size = tuple(art.manifest["preprocess"]["size"])

    async def classify(self, images: np.ndarray, backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(N, H, W)`` images in [0, 1] → (predicted label indices, probabilities)."""
        x = to_model_input(images, self.image_size)
        logits = (await self.infer({self.inputs[0].name: x}, backend))[self.outputs[0].name]
        z = logits - logits.max(axis=-1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
        return probs.argmax(-1), probs


class ClassifyRequest(BaseModel):
    image: list[Any] | str = Field(
        description="Nested list H×W of values in [0, 1] (ink = 1), or a base64-encoded PNG/JPEG "
        "(white ink on black, as the training digits)."
    )
    model: str = Field("vit-soft", description="A loaded classifier (GET /v2/repository/index lists them).")
    version: str = Field("", description="A loaded version; default the newest.")
    backend: str = Field(
        "", description="Runtime: onnxruntime, onnxruntime-int8, pytorch, ...; default the model's."
    )


class ClassifyResponse(BaseModel):
    label: str
    probabilities: dict[str, float]
    model: str
    version: str
    backend: str


def router(repo: ModelRepository) -> APIRouter:
    api = APIRouter(tags=["classification"])

    @api.post("/classify", response_model=ClassifyResponse)
    async def classify(req: ClassifyRequest) -> ClassifyResponse:
        """Classify one grayscale digit image."""
        with observed() as labels:
            served = task_model(repo, Classifier, req.model, req.version)
            chosen = served.resolve_backend(req.backend or None)
            labels.update(model=served.name, version=served.version, backend=chosen)
            pred, probs = await served.classify(decode_image(req.image)[None], chosen)
        names = served.labels or [str(i) for i in range(probs.shape[1])]
        return ClassifyResponse(
            label=names[int(pred[0])],
            probabilities={names[i]: float(v) for i, v in enumerate(probs[0])},
            model=served.name,
            version=served.version,
            backend=chosen,
        )

    return api
