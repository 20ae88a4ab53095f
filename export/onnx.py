"""ONNX export of model-zoo models and an onnxruntime-vs-PyTorch parity check.

Export runs under :func:`model_zoo.soft.exportable`, the zoo's one export switch (after timm's
``set_layer_config(exportable=True)``): layers with data-dependent control flow (SOFT's Newton step-size
search) switch to an equivalent form made of fixed tensor ops. The batch dimension is exported dynamic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from model_zoo.soft import exportable

__all__ = ["export_onnx", "max_abs_diff"]


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    *,
    opset: int = 18,
    input_name: str = "input",
    output_name: str = "logits",
) -> Path:
    """Export ``model`` to an ONNX file with a dynamic batch dimension.

    Uses torch's default (dynamo, ``torch.export``-based) exporter. Weights are embedded in the file
    (no external-data side file), so the graph is a single self-contained artifact; that limits models
    to protobuf's 2 GiB, far above anything in the zoo.

    Args:
        model: the module to export; exported in eval mode, its train/eval mode is restored afterwards.
        example_input: one example input tensor; only its non-batch dimensions are fixed in the graph.
        path: destination ``.onnx`` file; parent directories are created.
        opset: ONNX opset version.
        input_name: name of the graph input.
        output_name: name of the graph output.

    Returns:
        The path written.

    Raises:
        TypeError: ``example_input`` is not a tensor.
        ValueError: ``example_input`` has no batch dimension.
        RuntimeError: the exporter failed (chained to the exporter's error).
    """
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    if example_input.dim() < 1:
        raise ValueError("example_input needs a leading batch dimension")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with exportable(), torch.no_grad():
            torch.onnx.export(
                model,
                (example_input,),
                str(path),
                input_names=[input_name],
                output_names=[output_name],
                opset_version=opset,
                dynamo=True,
                external_data=False,
                # DYNAMIC (not a named Dim) so an example batch of 1 is not specialised to a constant.
                dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
            )
    except Exception as err:
        raise RuntimeError(f"ONNX export of {type(model).__name__} to {path} failed: {err}") from err
    finally:
        model.train(was_training)
    return path


def max_abs_diff(model: nn.Module, onnx_path: str | Path, inputs: np.ndarray) -> float:
    """Largest absolute difference between onnxruntime (CPU) and the PyTorch model in eager mode.

    Args:
        model: the PyTorch module the graph was exported from; run in eval mode, default (non-exportable)
            form, under ``torch.no_grad``.
        onnx_path: the exported graph.
        inputs: a batch of inputs, fed to both as float32.

    Returns:
        ``max |onnx - torch|`` over all output elements.

    Raises:
        FileNotFoundError: no file at ``onnx_path``.
        TypeError: ``inputs`` is not a numpy array.
        ValueError: the graph does not have exactly one input, or output shapes differ.
    """
    import onnxruntime as ort  # deferred: only export/serving code paths need the runtime

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX graph at {onnx_path}")
    if not isinstance(inputs, np.ndarray):
        raise TypeError(f"inputs must be a numpy array, got {type(inputs).__name__}")
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    graph_inputs = session.get_inputs()
    if len(graph_inputs) != 1:
        raise ValueError(f"expected a graph with one input, got {[i.name for i in graph_inputs]}")
    ort_out = session.run(None, {graph_inputs[0].name: inputs})[0]

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            torch_out = model(torch.from_numpy(inputs)).numpy()
    finally:
        model.train(was_training)
    if ort_out.shape != torch_out.shape:
        raise ValueError(f"output shapes differ: onnxruntime {ort_out.shape} vs torch {torch_out.shape}")
    return float(np.abs(ort_out.astype(np.float64) - torch_out.astype(np.float64)).max())
