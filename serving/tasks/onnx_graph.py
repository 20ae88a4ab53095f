"""Generic ONNX models: an ``.onnx`` file imported with ``kiln import FILE --name NAME``.

Served exactly as a Triton repository model without a ``config.pbtxt``: the tensors, batching and
dynamic batching are auto-completed from the graph (:func:`serving.triton.config.complete_config`) and the
model runs as a :class:`~serving.triton.model.TritonModel` over OIP HTTP/gRPC. It has no task route.
"""

from __future__ import annotations

from dataclasses import replace

from fastapi import APIRouter

from kiln.artifacts import Artifact
from serving.config import ServeConfig
from serving.repository import ModelRepository
from serving.triton import config as tc
from serving.triton.model import TritonModel


class OnnxModel(TritonModel):
    task = "onnx"

    def __init__(self, art: Artifact, config: ServeConfig):
        file = art.export("onnx")["file"]
        model_config, notes = tc.parse_config("", art.name)
        model_config, completed = tc.complete_config(model_config, tc.read_graph(art.file(file)), file)
        art.manifest.setdefault("inputs", [_spec(s) for s in tc.tensor_specs(model_config, "input")])
        art.manifest.setdefault("outputs", [_spec(s) for s in tc.tensor_specs(model_config, "output")])
        settings = {**tc.model_settings(model_config), **config.model_settings.get(art.name, {})}
        config = replace(config, model_settings={**config.model_settings, art.name: settings})
        super().__init__(art, config, model_config)
        self.notes = notes + completed


def _spec(spec) -> dict:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def router(repo: ModelRepository) -> APIRouter:
    return APIRouter(tags=["onnx"])  # served over OIP only
