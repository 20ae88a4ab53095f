"""What every peer shares: its onnxruntime session (built as Kiln's) and the OIP JSON response body."""

from __future__ import annotations

from typing import Any

import numpy as np


def session(onnx: str, threads: int):
    """An onnxruntime CPU session with the options of :class:`serving.runtime.OnnxRuntime`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as Kiln's: same engine settings
    return ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])


def response(model: str, output_name: str, logits: np.ndarray) -> dict[str, Any]:
    """The OIP response Kiln sends for one output (flattened ``data``)."""
    return {
        "model_name": model,
        "outputs": [
            {
                "name": output_name,
                "datatype": "FP32",
                "shape": list(logits.shape),
                "data": logits.ravel().tolist(),
            }
        ],
    }
