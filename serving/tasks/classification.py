"""The image-classification task: ``POST /classify`` over a loaded classifier.

Decodes the image at the edge (:func:`serving.images.decode_images`: its pixels checked from the header,
decoded off the event loop), resizes it to the model's input the same way training did, runs the logits
through the model's batcher and returns softmax probabilities.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, Field

from kiln.imaging import to_model_input
from serving.agent.tools import Tool
from serving.images import decode_images
from serving.model import LoadedModel
from serving.repository import ModelRepository
from serving.routes import observed, task_model


class Classifier(LoadedModel):
    task = "image-classification"

    def __init__(self, art, config):
        super().__init__(art, config)
        self.image_size = tuple(art.manifest["preprocess"]["size"])
        self.channels = int(art.manifest["preprocess"].get("channels", 1))  # 3: an RGB model

    async def classify(self, images: np.ndarray, backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(N, H, W)`` (``(N, 3, H, W)`` for an RGB model) images in [0, 1] → (predicted label indices,
        probabilities)."""
        x = to_model_input(images, self.image_size)
        logits = (await self.infer({self.inputs[0].name: x}, backend))[self.outputs[0].name]
        z = logits - logits.max(axis=-1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
        return probs.argmax(-1), probs


class ClassifyRequest(BaseModel):
    image: list[Any] | str = Field(
        description="Nested list H×W of values in [0, 1] (ink = 1), or a base64-encoded PNG/JPEG "
        "(white ink on black, as the training digits); for a model trained on RGB images, 3×H×W or a "
        "colour PNG/JPEG."
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


async def classify_image(repo: ModelRepository, req: ClassifyRequest) -> ClassifyResponse:
    """Classify one grayscale digit image (the route and the ``classify`` tool both run this)."""
    with observed() as labels:
        served = task_model(repo, Classifier, req.model, req.version)
        chosen = served.resolve_backend(req.backend or None)
        labels.update(model=served.name, version=served.version, backend=chosen)
        (image,) = await decode_images(
            [req.image], served.settings.max_image_pixels, "image", rgb=served.channels == 3
        )
        pred, probs = await served.classify(image[None], chosen)
    names = served.labels or [str(i) for i in range(probs.shape[1])]
    return ClassifyResponse(
        label=names[int(pred[0])],
        probabilities={names[i]: float(v) for i, v in enumerate(probs[0])},
        model=served.name,
        version=served.version,
        backend=chosen,
    )


def router(repo: ModelRepository) -> APIRouter:
    api = APIRouter(tags=["classification"])

    @api.post("/classify", response_model=ClassifyResponse)
    async def classify(req: ClassifyRequest) -> ClassifyResponse:
        """Classify one grayscale digit image."""
        return await classify_image(repo, req)

    return api


def tools(repo: ModelRepository) -> list[Tool]:
    """The task's tools slot: ``/classify`` for the agent and MCP clients (same request model)."""

    async def handler(req: ClassifyRequest) -> ClassifyResponse:
        return await classify_image(repo, req)

    return [
        Tool(
            name="classify",
            description="Classify a handwritten digit image (nested list H×W of values in [0, 1], ink = 1, "
            "or a base64 PNG) with one of Kiln's image classifiers; returns the label and probabilities.",
            request_model=ClassifyRequest,
            handler=handler,
        )
    ]
