"""Export spec of the embedding task (retrieval): image towers, and the XBT text model's projection.

What the ONNX graph is depends on the artifact's ``embedding.modality``:

* ``image`` / ``image+text`` — ``images`` (N, 1, 16, 16) in [0, 1] → ``embedding`` (N, dim), L2-normalised
  (for the dual encoder, its image tower; its word-level text tower runs in PyTorch).
* ``text`` (XBT new text model) — everything after MiniLM: ``native`` (N, 384) MiniLM sentence embeddings
  → ``embedding`` (N, 384) and ``embedding_<old space>`` (the XBT projection). MiniLM itself (tokenizer +
  transformer) runs in PyTorch; the served text model's inputs are strings (manifest ``inputs``), the
  graph's are in ``graph_inputs``.

Parity inputs: 64 validation-split images (or MiniLM embeddings of 64 validation captions).
Calibration: 256 training-split images (or training captions).

Quality gate: every graph's retrieval top-1 is measured on the *validation* query/gallery split (image
models: the graph's own embeddings, and new-query vs old-gallery for compatible models; text models:
text→image recall@1 of held-out-phrasing captions against the old image gallery). The gate passes when
it is not below the PyTorch model's validation figure minus :data:`QUALITY_TOLERANCE` points. An fp32
graph that fails raises; an int8 graph that loses more than that against the fp32 graph is discarded by
the pipeline's gate (``quality_gates``, :mod:`export.gates`) and never served. Test-split figures are
recorded beside it, never used to decide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from export.gates import QualityGate
from export.quantize import CalibrationReader
from kiln.artifacts import Artifact, get_artifact, load_torch_model

PARITY_SAMPLES = 64
CALIBRATION_SAMPLES = 256
QUALITY_TOLERANCE = 1.0  # points of top-1 / recall@1 an exported graph may lose against PyTorch


class QualityGateError(Exception):
    """An fp32 graph retrieves worse than its PyTorch model."""


def onnx_embed(
    graph: Path | str, inputs: np.ndarray, output: str | None = None, batch_size: int = 256
) -> np.ndarray:
    """Run an embedding graph's (only) input → ``output`` (default: the first) under onnxruntime (CPU)."""
    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    outputs = [output] if output else None
    return np.concatenate(
        [sess.run(outputs, {name: inputs[i : i + batch_size]})[0] for i in range(0, len(inputs), batch_size)]
    )


def _old_artifact(art: Artifact) -> Artifact | None:
    compatible = art.manifest["embedding"].get("compatible") or []
    if not compatible:
        return None
    entry = compatible[0]
    return get_artifact(f"{entry['model']}:{entry['version']}")


class EmbeddingExport:
    task = "embedding"
    formats = ("onnx", "int8-static", "fp16-trt", "int8-trt")
    default_formats = ("onnx", "int8-static")
    int8_format = "int8-static"
    quality_gates = (QualityGate("val_top1", QUALITY_TOLERANCE),)  # percent, so the loss is in points

    def __init__(self) -> None:
        self._models: dict[str, torch.nn.Module] = {}  # one PyTorch load (MiniLM: seconds) per export run

    def _model(self, art: Artifact) -> torch.nn.Module:
        if art.tag not in self._models:
            self._models[art.tag] = load_torch_model(art)
        return self._models[art.tag]

    # -- inputs ----------------------------------------------------------------------------------

    @staticmethod
    def _is_text(art: Artifact) -> bool:
        return art.manifest["embedding"]["modality"] == "text"

    @staticmethod
    def _images(art: Artifact, split: str) -> tuple[np.ndarray, np.ndarray]:
        from training.data import recorded_image_data

        return recorded_image_data(art.manifest, tuple(art.manifest["preprocess"]["size"])).inputs[split]

    def _caption_embeddings(self, art: Artifact, split: str, n: int) -> np.ndarray:
        from training.captions import captions

        rng = np.random.default_rng({"train": 0, "val": 1}[split])
        texts = captions(rng.integers(0, 10, size=n), seed={"train": 10, "val": 11}[split])
        return self._model(art).embed_native(texts).numpy()

    def _rows(self, art: Artifact, split: str, n: int) -> np.ndarray:
        if self._is_text(art):
            return self._caption_embeddings(art, split, n)
        return self._images(art, split)[0][:n]

    def _input_name(self, art: Artifact) -> str:
        return art.manifest.get("graph_inputs", art.manifest["inputs"])[0]["name"]

    def example_inputs(self, art: Artifact) -> dict[str, np.ndarray]:
        return {self._input_name(art): self._rows(art, "val", 2)}

    def parity_inputs(self, art: Artifact) -> tuple[dict[str, np.ndarray], str]:
        x = self._rows(art, "val", PARITY_SAMPLES)
        what = "MiniLM embeddings of validation captions" if self._is_text(art) else "validation-split images"
        return {self._input_name(art): x}, f"{len(x)} {what}"

    def calibration(self, art: Artifact, name: str) -> CalibrationReader:
        if name != "default":
            raise ValueError(f"{self.task} has one calibration set ('default'), not {name!r}")
        return CalibrationReader(self._input_name(art), self._rows(art, "train", CALIBRATION_SAMPLES))

    # -- quality ---------------------------------------------------------------------------------

    def quality(self, art: Artifact, graph: Path) -> dict[str, Any]:
        graph = Path(graph)
        modality = art.manifest["embedding"]["modality"]
        quality = {"text": self._text_quality, "image+text": self._dual_quality, "image": self._image_quality}
        out = quality[modality](art, graph)
        reference = out.pop("_reference")
        floor = reference - QUALITY_TOLERANCE
        out["quality_floor"] = round(floor, 2)  # against PyTorch; derived graphs: quality_gates vs fp32
        if out["val_top1"] < floor and graph.name == "model.onnx":  # the fp32 graph
            raise QualityGateError(
                f"{art.tag}: {graph.name} retrieval top-1 {out['val_top1']:.2f} on the validation split is "
                f"below the floor {floor:.2f} (PyTorch {reference:.2f} − {QUALITY_TOLERANCE})"
            )
        return out

    def _image_quality(self, art: Artifact, graph: Path) -> dict[str, Any]:
        from training.data import recorded_image_data
        from training.retrieval import query_gallery, retrieval_metrics, to_space

        size = tuple(art.manifest["preprocess"]["size"])
        source = recorded_image_data(art.manifest, size) if "data" in art.manifest else None
        old_art = _old_artifact(art)
        old = self._model(old_art) if old_art is not None else None
        dims = old_art.manifest["embedding"]["dim"] if old_art is not None else None
        out: dict[str, Any] = {}
        for split in ("val", "test"):
            qg = query_gallery(split, size, source)
            (xq, yq), (xg, yg) = qg["query"], qg["gallery"]
            q, g = onnx_embed(graph, xq), onnx_embed(graph, xg)
            out[f"{split}_top1"] = round(retrieval_metrics(q, yq, g, yg)["top1"], 2)
            if old is not None:
                with torch.no_grad():
                    old_g = old(torch.from_numpy(xg)).numpy()
                new_old = retrieval_metrics(to_space(q, dims), yq, old_g, yg)
                out[f"{split}_new_old_top1"] = round(new_old["top1"], 2)
        metrics = art.manifest["metrics"]
        out["_reference"] = metrics.get("val_new_new_top1", metrics.get("val_self_top1"))
        out["quality_metric"] = "retrieval top-1 (%), validation query/gallery split; test beside it"
        return out

    def _dual_quality(self, art: Artifact, graph: Path) -> dict[str, Any]:
        """The dual encoder's image graph as the gallery of its own (PyTorch) text tower's queries."""
        from training.retrieval import retrieval_metrics
        from training.xbt import eval_queries

        model = self._model(art)
        out: dict[str, Any] = {}
        for split in ("val", "test"):
            xg, yg = self._images(art, split)
            texts, yq = eval_queries(split)
            with torch.no_grad():
                q = model.embed_texts(texts).numpy()
            out[f"{split}_top1"] = round(retrieval_metrics(q, yq, onnx_embed(graph, xg), yg)["top1"], 2)
        out["_reference"] = art.manifest["metrics"]["val_text_to_image_r1"]
        out["quality_metric"] = "text→image recall@1 (%) of the image graph as gallery, validation split"
        return out

    def _text_quality(self, art: Artifact, graph: Path) -> dict[str, Any]:
        from training.retrieval import retrieval_metrics
        from training.xbt import eval_queries

        old_art = _old_artifact(art)
        old = self._model(old_art)
        model = self._model(art)
        out: dict[str, Any] = {}
        for split in ("val", "test"):
            xg, yg = self._images(old_art, split)
            texts, yq = eval_queries(split)
            q = onnx_embed(
                graph,
                model.embed_native(texts).numpy(),
                f"embedding_{old_art.manifest['embedding']['space']}",
            )
            with torch.no_grad():
                g = old(torch.from_numpy(xg)).numpy()
            out[f"{split}_top1"] = round(retrieval_metrics(q, yq, g, yg)["top1"], 2)
        out["_reference"] = art.manifest["metrics"]["val_new_old_projection_r1"]
        out["quality_metric"] = "text→image recall@1 (%) against the old image gallery, validation split"
        return out
