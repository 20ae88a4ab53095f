"""The text-classification task: models imported with ``kiln import`` (a transformers
``*ForSequenceClassification`` exported to ONNX, its tokenizer kept beside the graph).

Served model :class:`TextClassifier` (task ``text-classification``): over the Open Inference Protocol it
takes ``text`` (BYTES, one string per row) and returns ``logits`` (the classification extension maps them
to the model's ``id2label`` names); the text is tokenized inside the runtime
(:class:`serving.runtime.OnnxTextRuntime`), so requests are batched as rows of strings like any other
model's rows.

Route: ``POST /classify-text`` — one text → label and softmax probabilities (``/classify`` stays the
image route, with its request shape unchanged).
"""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, Field

from kiln.artifacts import Artifact
from serving.agent.tools import Tool
from serving.config import ServeConfig
from serving.model import LoadedModel
from serving.repository import InferenceError, ModelRepository, TensorSpec
from serving.routes import observed, task_model
from serving.runtime import OnnxTextRuntime

MAX_TEXT_CHARS = 20_000  # one text; the tokenizer truncates it to the model's maximum length anyway


def _runtime(art: Artifact, backend: str, threads: int) -> OnnxTextRuntime:
    if backend != "onnxruntime":
        raise ValueError(f"an imported text model runs on onnxruntime only, not {backend!r}")
    return OnnxTextRuntime(art, backend, threads)


class TextClassifier(LoadedModel):
    task = "text-classification"

    def __init__(self, art: Artifact, config: ServeConfig):
        super().__init__(art, config, runtime_factory=_runtime)
        self.inputs = [TensorSpec("text", "BYTES", (-1,))]
        self.outputs = [TensorSpec("logits", "FP32", (-1, len(self.labels)))]

    async def classify(self, texts: list[str], backend: str | None = None) -> np.ndarray:
        """Texts → (N, labels) softmax probabilities."""
        logits = (await self.infer({"text": np.array(texts, dtype=object)}, backend))["logits"]
        z = logits - logits.max(axis=-1, keepdims=True)
        return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


class ClassifyTextRequest(BaseModel):
    text: str = Field(description="The text to classify.")
    model: str = Field(description="An imported text classifier (`kiln import DIR --name NAME`).")
    version: str = Field("", description="A loaded version; default the newest.")


class ClassifyTextResponse(BaseModel):
    label: str
    probabilities: dict[str, float]
    model: str
    version: str


async def classify_text(repo: ModelRepository, req: ClassifyTextRequest) -> ClassifyTextResponse:
    """The route and the ``classify_text`` tool both run this."""
    with observed() as labels:
        served = task_model(repo, TextClassifier, req.model, req.version)
        labels.update(model=served.name, version=served.version, backend=served.backends[0])
        if not req.text.strip():
            raise InferenceError(400, "`text` is empty")
        if len(req.text) > MAX_TEXT_CHARS:
            raise InferenceError(400, f"`text` has {len(req.text)} characters; at most {MAX_TEXT_CHARS}")
        probs = (await served.classify([req.text]))[0]
    return ClassifyTextResponse(
        label=served.labels[int(probs.argmax())],
        probabilities={name: float(p) for name, p in zip(served.labels, probs, strict=True)},
        model=served.name,
        version=served.version,
    )


def router(repo: ModelRepository) -> APIRouter:
    api = APIRouter(tags=["text-classification"])

    @api.post("/classify-text", response_model=ClassifyTextResponse)
    async def classify(req: ClassifyTextRequest) -> ClassifyTextResponse:
        """Classify one text with an imported text classifier."""
        return await classify_text(repo, req)

    return api


def tools(repo: ModelRepository) -> list[Tool]:
    """The task's tools slot: ``/classify-text`` for the agent and MCP clients (same request model)."""

    async def handler(req: ClassifyTextRequest) -> ClassifyTextResponse:
        return await classify_text(repo, req)

    return [
        Tool(
            name="classify_text",
            description="Classify a text with a text classifier imported into Kiln (a Hugging Face "
            "model); returns the label and the probability of each label.",
            request_model=ClassifyTextRequest,
            handler=handler,
        )
    ]
