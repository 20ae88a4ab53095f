"""8-bit post-training quantization of ONNX graphs, behind one interface.

``QUANTIZERS`` maps a method name to its class (after diffusers' quantizer mapping); each takes an fp32
ONNX file and writes a quantized one. Calibration data comes from a :class:`CalibrationReader`, its own
object, so any data source (training images, sampler trajectories) can feed any method: a quantizer
names the calibration set it wants (``calibration``) and the task's export spec
(:mod:`export.pipeline`) produces it. The TensorRT builds (:mod:`export.tensorrt`) fit the same
:class:`Quantizer` protocol; this module imports them, never the other way round.

``int8-static``: onnxruntime static quantization in QDQ format — uint8 activations, int8 weights
(the pairing onnxruntime recommends for x86 CPUs; VNNI cores need no reduced range), MinMax ranges
from the calibration set. Only the weight-bearing linear layers (MatMul/Gemm with a constant weight) are
quantized: activation×activation products such as SOFT's kernel matrices and its Newton–Raphson
pseudo-inverse iterations stay fp32, since an 8-bit Newton iteration does not converge. Convolutions
(the patch embedding, SOFT's landmark and depthwise V convolutions) stay fp32 too: with them quantized
the int8 graph ran slower than fp32 on this project's ViTs (BENCHMARKS.md, run `567d2e8`; small and
depthwise int8 convolutions have no fast kernels in onnxruntime's CPU provider).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from export.tensorrt import FP16TensorRT, Int8TensorRT


class CalibrationReader(CalibrationDataReader):
    """Feeds calibration batches ``{input_name: array}`` to a quantizer; re-iterable via ``rewind``.

    Either one input (``CalibrationReader("input", samples)``, float32) or several aligned by row
    (``CalibrationReader({"sample": x, "timestep": t, "label": y})``, dtypes kept).
    """

    def __init__(
        self, input_name: str | dict[str, np.ndarray], samples: np.ndarray | None = None, batch_size: int = 32
    ):
        if isinstance(input_name, dict):
            inputs = {k: np.ascontiguousarray(v) for k, v in input_name.items()}
        else:
            inputs = {input_name: np.ascontiguousarray(samples, dtype=np.float32)}
        sizes = {len(v) for v in inputs.values()}
        if len(sizes) != 1:
            raise ValueError(f"calibration inputs must have the same number of rows, got {sizes}")
        if sizes == {0}:
            raise ValueError("calibration needs at least one sample")
        self.inputs = inputs
        self.batch_size = batch_size
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(self), self.batch_size):
            yield {k: v[i : i + self.batch_size] for k, v in self.inputs.items()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))


class Quantizer(Protocol):
    """Turns an fp32 ONNX graph into an 8-bit (or fp16) one.

    ``source``: the export it is built from (``onnx``, or a QDQ graph for explicit-quantization engines);
    ``calibration``: the calibration set the task's export spec must provide, or None if it needs none.
    """

    name: ClassVar[str]
    output_suffix: ClassVar[str]
    source: ClassVar[str]
    calibration: ClassVar[str | None]

    def quantize(self, src: Path, dst: Path, calibration: CalibrationReader | None) -> dict:
        """Write the quantized graph to ``dst``; returns facts to record in the artifact."""


def weight_bearing_nodes(model: onnx.ModelProto, op_types: tuple[str, ...] = ("MatMul", "Gemm")) -> list[str]:
    """Names of ``op_types`` nodes whose second input is a constant (an initializer or Constant)."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return [
        n.name
        for n in model.graph.node
        if n.op_type in op_types and len(n.input) > 1 and n.input[1] in constants
    ]


class Int8StaticQuantizer:
    """onnxruntime static quantization of the weight-bearing ``op_types`` nodes (QDQ format)."""

    name = "int8-static"
    output_suffix = ".int8.onnx"
    source = "onnx"
    calibration = "default"  # the task's own calibration set (training images for classifiers)
    op_types: ClassVar[tuple[str, ...]] = ("MatMul", "Gemm")
    default_per_channel: ClassVar[bool] = False

    def __init__(self, per_channel: bool | None = None, method: str = "minmax"):
        methods = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }
        if method not in methods:
            raise ValueError(f"unknown calibration method {method!r}; valid: {sorted(methods)}")
        self.per_channel = self.default_per_channel if per_channel is None else per_channel
        self.method = method
        self._method = methods[method]

    def quantize(self, src: Path, dst: Path, calibration: CalibrationReader) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            prepped = Path(tmp) / "prepped.onnx"
            # Symbolic shape inference cannot follow SOFT's Newton iterations; ONNX shape inference suffices.
            quant_pre_process(str(src), str(prepped), skip_symbolic_shape=True)
            nodes = weight_bearing_nodes(onnx.load(str(prepped)), self.op_types)
            if not nodes:
                raise RuntimeError(
                    f"{src}: no {'/'.join(self.op_types)} node with constant weights to quantize"
                )
            calibration.rewind()
            quantize_static(
                str(prepped),
                str(dst),
                calibration,
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=self.per_channel,
                calibrate_method=self._method,
                nodes_to_quantize=nodes,
            )
        return {
            "method": self.name,
            "format": "QDQ",
            "activations": "uint8",
            "weights": "int8",
            "per_channel": self.per_channel,
            "calibration": {"set": self.calibration, "method": self.method, "samples": len(calibration)},
            "quantized_ops": list(self.op_types),
            "quantized_nodes": len(nodes),
        }


class _DiffusionW8A8(Int8StaticQuantizer):
    """PTQ4DM's W8A8 for a diffusion denoiser: 8-bit weights (per output channel) and activations of every
    convolution and linear layer, from a calibration set of (x_t, t, label) rows. The sets differ:
    :class:`PTQ4DMQuantizer` (NDTC), :class:`UniformTimestepQuantizer`, :class:`ForwardNoiseQuantizer`;
    the task's export spec (``export.diffusion``) builds them.
    """

    op_types = ("Conv", "MatMul", "Gemm")
    default_per_channel = True


class PTQ4DMQuantizer(_DiffusionW8A8):
    """Calibrated on NDTC: time steps ~ N(0.4, 0.4) of the sampling trajectory, x_t from the fp32 sampler."""

    name = "int8-ptq4dm"
    output_suffix = ".ptq4dm.onnx"
    calibration = "ndtc"


class UniformTimestepQuantizer(_DiffusionW8A8):
    """Calibrated on uniformly drawn time steps of the same fp32 sampler trajectories."""

    name = "int8-uniform"
    output_suffix = ".uniform.onnx"
    calibration = "uniform"


class ForwardNoiseQuantizer(_DiffusionW8A8):
    """Calibrated on forward-noised training images (x_t = √ᾱ x0 + √(1 − ᾱ) ε, t uniform)."""

    name = "int8-noised"
    output_suffix = ".noised.onnx"
    calibration = "forward-noise"


QUANTIZERS: dict[str, type[Quantizer]] = {
    cls.name: cls
    for cls in (
        Int8StaticQuantizer,
        PTQ4DMQuantizer,
        UniformTimestepQuantizer,
        ForwardNoiseQuantizer,
        FP16TensorRT,
        Int8TensorRT,
    )
}


def get_quantizer(name: str, **kwargs) -> Quantizer:
    try:
        cls = QUANTIZERS[name]
    except KeyError:
        raise ValueError(f"unknown quantization method {name!r}; valid: {sorted(QUANTIZERS)}") from None
    return cls(**kwargs)
