"""Export spec of the price-forecasting task: (features, σ) → quantiles of the next H log-returns.

The graph is exported with the FAVOR+ projection frozen (a buffer; no redraw outside training, see
``model_zoo.performer``) and the BiLSTM as ONNX LSTM nodes.

- Parity: 64 validation-period windows of the artifact's own series must give the same quantiles in
  onnxruntime as in PyTorch.
- Calibration (``int8-static``): 256 training-period windows. Only the linear layers are quantized;
  the LSTMs and the FAVOR+ feature maps stay fp32.
- Quality of every graph: validation-period pinball loss, median MAE (log-return) and 80% interval
  coverage. The final test period is never read here: it belongs to ``kiln bench forecast``.
- The int8 gate (``quality_gates``, applied by :mod:`export.pipeline` like every family's): an
  ``int8-static`` graph whose validation pinball loss is more than :data:`INT8_TOLERANCE` above fp32's
  is discarded with the reason and never served.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from export.gates import QualityGate
from export.quantize import CalibrationReader
from kiln.artifacts import Artifact
from training.forecasting import Series, interval_metrics, load_series

PARITY_SAMPLES = 64
CALIBRATION_SAMPLES = 256
INT8_TOLERANCE = 0.01  # relative increase of validation pinball loss an int8 graph may cost


@lru_cache(maxsize=4)
def _series(source: str, gaps: str, max_gap: int, val_fraction: float, test_fraction: float) -> Series:
    return load_series(
        source, gaps=gaps, max_gap=max_gap, val_fraction=val_fraction, test_fraction=test_fraction
    )


def artifact_series(art: Artifact) -> Series:
    """The artifact's training series with the splits it was trained with."""
    d, t = art.manifest["data"], art.manifest["training"]
    return _series(d["source"], d["gaps"], d["max_gap"], t["val_fraction"], t["test_fraction"])


def onnx_quantiles(graph: Path | str, x: np.ndarray, scale: np.ndarray, batch: int = 512) -> np.ndarray:
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [
            session.run(None, {"features": x[i : i + batch], "scale": scale[i : i + batch]})[0]
            for i in range(0, len(x), batch)
        ]
    )


class ForecastExport:
    task = "price-forecasting"
    formats = ("onnx", "int8-static")
    default_formats = ("onnx", "int8-static")
    int8_format = "int8-static"
    quality_gates = (QualityGate("val_pinball", INT8_TOLERANCE, higher_is_better=False, relative=True),)

    @staticmethod
    def _split(art: Artifact, split: str):
        return artifact_series(art).split(split, art.manifest["context"], art.manifest["horizon"])

    def example_inputs(self, art: Artifact) -> dict[str, np.ndarray]:
        s = self._split(art, "val")
        return {"features": s.x[:2], "scale": s.scale[:2]}

    def parity_inputs(self, art: Artifact) -> tuple[dict[str, np.ndarray], str]:
        s = self._split(art, "val")
        idx = np.linspace(0, len(s.x) - 1, PARITY_SAMPLES).astype(int)
        return {"features": s.x[idx], "scale": s.scale[idx]}, f"{len(idx)} validation-period windows"

    def calibration(self, art: Artifact, name: str) -> CalibrationReader:
        if name != "default":
            raise ValueError(f"{self.task} has one calibration set ('default'), not {name!r}")
        s = self._split(art, "train")
        idx = np.linspace(0, len(s.x) - 1, CALIBRATION_SAMPLES).astype(int)
        return CalibrationReader({"features": s.x[idx], "scale": s.scale[idx]})

    def quality(self, art: Artifact, graph: Path) -> dict[str, Any]:
        s = self._split(art, "val")
        q = onnx_quantiles(graph, s.x, s.scale)
        return {f"val_{k}": v for k, v in interval_metrics(q, s.y, tuple(art.manifest["quantiles"])).items()}
