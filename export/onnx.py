"""ONNX export of model-zoo models and an onnxruntime-vs-PyTorch parity check.

Export runs under :func:`model_zoo.soft.exportable`, the zoo's one export switch (after timm's
``set_layer_config(exportable=True)``): layers with data-dependent control flow (SOFT's Newton step-size
search) switch to an equivalent form made of fixed tensor ops. A model may take several named inputs
(a denoiser takes sample, timestep and label); the batch dimension of each is exported dynamic.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model_zoo.soft import exportable

__all__ = ["export_onnx", "max_abs_diff"]


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor | Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    opset: int = 18,
    input_name: str = "input",
    output_name: str = "logits",
    output_names: list[str] | None = None,
) -> Path:
    """Export ``model`` to an ONNX file with a dynamic batch dimension on every input.

    Uses torch's default (dynamo, ``torch.export``-based) exporter. Weights are embedded in the file
    (no external-data side file), so the graph is a single self-contained artifact; that limits models
    to protobuf's 2 GiB, far above anything in the zoo.

    Args:
        model: the module to export; exported in eval mode, its train/eval mode is restored afterwards.
        example_input: one example input tensor, or ``{name: tensor}`` in the order of ``forward``'s
            positional arguments; only their non-batch dimensions are fixed in the graph.
        path: destination ``.onnx`` file; parent directories are created.
        opset: ONNX opset version.
        input_name: name of the graph input when ``example_input`` is a single tensor.
        output_name: name of the graph output (single-output models).
        output_names: names of several graph outputs; overrides ``output_name``.

    Returns:
        The path written.

    Raises:
        TypeError: ``example_input`` is not a tensor.
        ValueError: ``example_input`` has no batch dimension.
        RuntimeError: the exporter failed (chained to the exporter's error).
    """
    inputs = {input_name: example_input} if isinstance(example_input, torch.Tensor) else example_input
    if not isinstance(inputs, Mapping) or not all(isinstance(t, torch.Tensor) for t in inputs.values()):
        raise TypeError(
            f"example_input must be a torch.Tensor or a mapping of them, got {type(example_input).__name__}"
        )
    if any(t.dim() < 1 for t in inputs.values()):
        raise ValueError("every example input needs a leading batch dimension")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with exportable(), torch.no_grad():
            torch.onnx.export(
                model,
                tuple(inputs.values()),
                str(path),
                input_names=list(inputs),
                output_names=output_names or [output_name],
                opset_version=opset,
                dynamo=True,
                external_data=False,
                # DYNAMIC (not a named Dim) so an example batch of 1 is not specialised to a constant.
                dynamic_shapes=tuple({0: torch.export.Dim.DYNAMIC} for _ in inputs),
            )
    except Exception as err:
        raise RuntimeError(f"ONNX export of {type(model).__name__} to {path} failed: {err}") from err
    finally:
        model.train(was_training)
    return path


def max_abs_diff(
    model: nn.Module, onnx_path: str | Path, inputs: np.ndarray | Mapping[str, np.ndarray]
) -> float:
    """Largest absolute difference between onnxruntime (CPU) and the PyTorch model in eager mode.

    Args:
        model: the PyTorch module the graph was exported from; run in eval mode, default (non-exportable)
            form, under ``torch.no_grad``.
        onnx_path: the exported graph.
        inputs: a batch for a single-input graph (fed as float32), or ``{graph input name: array}``
            in the order of ``forward``'s positional arguments (dtypes kept).

    Returns:
        ``max |onnx - torch|`` over all output elements (of every output).

    Raises:
        FileNotFoundError: no file at ``onnx_path``.
        TypeError: ``inputs`` is not a numpy array or a mapping of them.
        ValueError: a single array for a graph with several inputs, or output shapes differ.
    """
    import onnxruntime as ort  # deferred: only export/serving code paths need the runtime

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX graph at {onnx_path}")
    single = isinstance(inputs, np.ndarray)
    if not single and not (
        isinstance(inputs, Mapping) and all(isinstance(a, np.ndarray) for a in inputs.values())
    ):
        raise TypeError(f"inputs must be a numpy array or a mapping of them, got {type(inputs).__name__}")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    graph_inputs = session.get_inputs()
    if single:
        if len(graph_inputs) != 1:
            raise ValueError(f"expected a graph with one input, got {[i.name for i in graph_inputs]}")
        inputs = {graph_inputs[0].name: np.ascontiguousarray(inputs, dtype=np.float32)}
    inputs = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
    ort_outs = session.run(None, inputs)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            torch_outs = model(*(torch.from_numpy(a) for a in inputs.values()))
    finally:
        model.train(was_training)
    torch_outs = torch_outs if isinstance(torch_outs, tuple) else (torch_outs,)
    worst = 0.0
    for ort_out, torch_out in zip(ort_outs, torch_outs, strict=True):
        torch_out = torch_out.numpy()
        if ort_out.shape != torch_out.shape:
            raise ValueError(f"output shapes differ: onnxruntime {ort_out.shape} vs torch {torch_out.shape}")
        worst = max(worst, float(np.abs(ort_out.astype(np.float64) - torch_out.astype(np.float64)).max()))
    return worst
