"""8-bit post-training quantization of ONNX graphs, behind one interface.

``QUANTIZERS`` maps a method name to its class (after diffusers' quantizer mapping); each takes an fp32
ONNX file and writes a quantized one. Calibration data comes from a :class:`CalibrationReader`, its own
object, so any data source (training images, sampler trajectories) can feed any method: a quantizer
names the calibration set it wants (``calibration``) and the task's export spec
(:mod:`export.pipeline`) produces it. The TensorRT builds (:mod:`export.tensorrt`) fit the same
:class:`Quantizer` protocol; this module imports them, never the other way round.

``int8-static``: onnxruntime static quantization (``quant_pre_process``, then ``quantize_static``) in QDQ
format: uint8 activations with MinMax ranges from the calibration set, int8 weights with one scale per
output channel, on the weight-bearing linear layers (MatMul/Gemm with a constant weight) only, and with
their outputs left fp32 (``OpTypesToExcludeOutputQuantization``), so onnxruntime runs each as one
MatMulIntegerToFloat instead of QLinearMatMul + DequantizeLinear + an fp32 bias Add. Why this format
(``kiln bench vit`` measures the whole grid, BENCHMARKS.md):

- fp32 GEMM outputs: the one knob that pays. On vit-softmax-wide at batch 32 with the server's two
  threads on a quiet machine, main's format ran 1.24x fp32, this one 1.58x (vit-soft-wide: about 1.2x to
  1.5x); the dequantize + fp32 bias pass that quantized outputs need was the cost.
- per-channel weights: the same speed within noise (1.58x vs 1.59x), never less accurate.
- U8S8, not S8S8: the x86 kernels (VNNI/AMX here) take u8 x s8; int8 activations were no faster in this
  format (1.60x) and far slower with every op quantized (0.65x). reduce_range (7-bit weights) is for
  cores without VNNI and bought nothing here.
- QDQ, not QOperator: QOperator writes QLinearMatMul with 8-bit outputs, so it can not leave GEMM outputs
  fp32 (1.25x), and QDQ is what TensorRT's explicit quantization (``int8-trt``) is built from.
- linear layers only: quantizing every op (Add, Mul, Softmax, the activation x activation products) ran
  as fast on vit-softmax-wide with two threads (1.58x; 2.3x on one) but lost 0.4 more points there, was
  slower on SOFT (its Newton iterations become chains of small QLinear ops) and cost vit-soft 10 points of
  accuracy; convolutions (the patch embedding, SOFT's landmark and depthwise V convolutions) are small or
  depthwise and ran slower quantized. The head kept fp32 changed nothing measurable.
- dynamic quantization (``int8-dynamic``, no calibration) was a little faster on the wide models (1.67x),
  but its graphs (DynamicQuantizeLinear, MatMulInteger) can not feed TensorRT's explicit quantization.
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
    quantize_dynamic,
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


_OP_SETS: dict[str, tuple[str, ...] | None] = {
    "linear": ("MatMul", "Gemm"),  # weight-bearing linear layers only
    "linear+conv": ("Conv", "MatMul", "Gemm"),
    "all": None,  # every op type onnxruntime's quantizer supports (Add, Mul, Softmax, ...), every node
}
_FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
_ACTIVATIONS = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


def _choice(kind: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {sorted(valid)}")


def quantized_node_count(model: onnx.ModelProto) -> int:
    """Compute nodes that run on 8-bit inputs: in QDQ form, those fed by a DequantizeLinear; in QOperator
    form, the QLinear* / *Integer* operators."""
    qdq = {"QuantizeLinear", "DequantizeLinear"}
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(
        n.op_type not in qdq
        and (
            any(i in dequantized for i in n.input)
            or n.op_type.startswith("QLinear")
            or "Integer" in n.op_type
            or n.op_type == "DynamicQuantizeMatMul"
        )
        for n in model.graph.node
    )


class Int8StaticQuantizer:
    """onnxruntime static quantization (``quantize_static``) with int8 weights and calibrated activations.

    Every knob of the format is a constructor argument, so ``kiln bench vit`` can measure the grid with
    the same code the export runs; the class defaults are what ``kiln export`` writes.

    Args:
        quant_format: ``"qdq"`` (QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into integer
            kernels) or ``"qoperator"`` (QLinearMatMul, QLinearConv, ... written into the graph).
        per_channel: one weight scale per output channel instead of per tensor.
        ops: ``"linear"`` (MatMul/Gemm with a constant weight), ``"linear+conv"`` (also convolutions) or
            ``"all"`` (onnxruntime's default op set on every node, activation x activation MatMuls included).
        activations: ``"uint8"`` (U8S8, the x86 pairing) or ``"int8"`` (S8S8).
        reduce_range: 7-bit weights (for x86 cores without VNNI, whose u8 x s8 products can saturate).
        method: calibration method, ``"minmax"``, ``"entropy"`` or ``"percentile"``.
        quantize_head: also quantize the classifier head (the graph's last weight-bearing node).
        quantize_linear_outputs: also quantize what MatMul/Gemm write. With it, onnxruntime fuses
            DQ -> MatMul -> Q into QLinearMatMul and the bias Add that follows runs on a dequantized copy;
            without (``OpTypesToExcludeOutputQuantization``), DQ -> MatMul -> Add fuses into
            MatMulIntegerToFloat with its bias, which writes fp32 directly.
    """

    name = "int8-static"
    output_suffix = ".int8.onnx"
    source = "onnx"
    calibration = "default"  # the task's own calibration set (training images for classifiers)
    # The format `kiln export` ships (measured in BENCHMARKS.md's int8 grid, see the module docstring).
    default_ops: ClassVar[str] = "linear"
    default_per_channel: ClassVar[bool] = True
    default_quantize_linear_outputs: ClassVar[bool] = False

    def __init__(
        self,
        per_channel: bool | None = None,
        method: str = "minmax",
        *,
        quant_format: str = "qdq",
        ops: str | None = None,
        activations: str = "uint8",
        reduce_range: bool = False,
        quantize_head: bool = True,
        quantize_linear_outputs: bool | None = None,
    ):
        ops = self.default_ops if ops is None else ops
        _choice("calibration method", method, _METHODS)
        _choice("quantization format", quant_format, _FORMATS)
        _choice("op set", ops, _OP_SETS)
        _choice("activation type", activations, _ACTIVATIONS)
        self.per_channel = self.default_per_channel if per_channel is None else per_channel
        self.method = method
        self.quant_format = quant_format
        self.ops = ops
        self.activations = activations
        self.reduce_range = reduce_range
        self.quantize_head = quantize_head
        self.quantize_linear_outputs = (
            self.default_quantize_linear_outputs
            if quantize_linear_outputs is None
            else quantize_linear_outputs
        )

    def settings(self) -> dict:
        """The knobs as recorded in the artifact (and as the benchmark's grid names them)."""
        return {
            "format": self.quant_format,
            "per_channel": self.per_channel,
            "ops": self.ops,
            "activations": self.activations,
            "reduce_range": self.reduce_range,
            "calibration_method": self.method,
            "quantize_head": self.quantize_head,
            "quantize_linear_outputs": self.quantize_linear_outputs,
        }

    def quantize(self, src: Path, dst: Path, calibration: CalibrationReader) -> dict:
        op_types = _OP_SETS[self.ops]
        with tempfile.TemporaryDirectory() as tmp:
            prepped = Path(tmp) / "prepped.onnx"
            # onnxruntime's pre-processing: basic graph optimisation and shape inference. Symbolic shape
            # inference cannot follow SOFT's Newton iterations; ONNX shape inference suffices.
            quant_pre_process(str(src), str(prepped), skip_symbolic_shape=True)
            model = onnx.load(str(prepped))
            linear = weight_bearing_nodes(model, ("MatMul", "Gemm"))
            if not linear:
                raise RuntimeError(f"{src}: no MatMul/Gemm node with constant weights to quantize")
            nodes = None if op_types is None else weight_bearing_nodes(model, op_types)
            exclude = [] if self.quantize_head else [linear[-1]]
            if nodes is not None:
                nodes = [n for n in nodes if n not in exclude]
            calibration.rewind()
            quantize_static(
                str(prepped),
                str(dst),
                calibration,
                quant_format=_FORMATS[self.quant_format],
                op_types_to_quantize=op_types,
                activation_type=_ACTIVATIONS[self.activations],
                weight_type=QuantType.QInt8,
                per_channel=self.per_channel,
                reduce_range=self.reduce_range,
                calibrate_method=_METHODS[self.method],
                nodes_to_quantize=nodes,
                nodes_to_exclude=exclude or None,
                extra_options={}
                if self.quantize_linear_outputs
                else {"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]},
            )
        return {
            "method": self.name,
            "format": {"qdq": "QDQ", "qoperator": "QOperator"}[self.quant_format],
            "activations": self.activations,
            "weights": "int8",
            "per_channel": self.per_channel,
            "reduce_range": self.reduce_range,
            "calibration": {"set": self.calibration, "method": self.method, "samples": len(calibration)},
            "quantized_ops": list(op_types) if op_types is not None else [self.ops],
            "quantize_head": self.quantize_head,
            "quantized_nodes": quantized_node_count(onnx.load(str(dst))),
            "settings": self.settings(),
        }


class Int8DynamicQuantizer:
    """onnxruntime dynamic quantization (``quantize_dynamic``) of the weight-bearing MatMul/Gemm nodes: int8
    weights, activations quantized per batch at run time (no calibration set). The baseline that static
    quantization is measured against in ``kiln bench vit``."""

    name = "int8-dynamic"
    output_suffix = ".dynamic.onnx"
    source = "onnx"
    calibration = None

    def __init__(self, per_channel: bool = False):
        self.per_channel = per_channel

    def settings(self) -> dict:
        return {"format": "dynamic", "per_channel": self.per_channel, "ops": "linear", "activations": "uint8"}

    def quantize(self, src: Path, dst: Path, calibration: CalibrationReader | None = None) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            prepped = Path(tmp) / "prepped.onnx"
            quant_pre_process(str(src), str(prepped), skip_symbolic_shape=True)
            nodes = weight_bearing_nodes(onnx.load(str(prepped)))
            if not nodes:
                raise RuntimeError(f"{src}: no MatMul/Gemm node with constant weights to quantize")
            quantize_dynamic(
                str(prepped),
                str(dst),
                weight_type=QuantType.QInt8,
                per_channel=self.per_channel,
                nodes_to_quantize=nodes,
            )
        return {
            "method": self.name,
            "format": "dynamic",
            "activations": "uint8 (per batch)",
            "weights": "int8",
            "per_channel": self.per_channel,
            "quantized_ops": ["MatMul", "Gemm"],
            "quantized_nodes": quantized_node_count(onnx.load(str(dst))),
            "settings": self.settings(),
        }


class _DiffusionW8A8(Int8StaticQuantizer):
    """PTQ4DM's W8A8 for a diffusion denoiser: 8-bit weights (per output channel) and activations of every
    convolution and linear layer, from a calibration set of (x_t, t, label) rows. The sets differ:
    :class:`PTQ4DMQuantizer` (NDTC), :class:`UniformTimestepQuantizer`, :class:`ForwardNoiseQuantizer`;
    the task's export spec (``export.diffusion``) builds them.
    """

    default_ops = "linear+conv"
    default_per_channel = True
    default_quantize_linear_outputs = True  # W8A8 end to end, as PTQ4DM


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
        Int8DynamicQuantizer,
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
