"""TensorRT engine builds (fp16 and int8) from an exported ONNX graph.

Needs a CUDA GPU and the ``tensorrt`` package (``pip install -e .[gpu]``). :func:`tensorrt_status`
says whether both are present and, if not, why — callers print that as a clear skip message.

int8 uses explicit quantization: the engine is built from the QDQ graph that ``int8-static`` wrote,
so TensorRT reuses the same calibrated scales rather than running its own (deprecated) calibrator.
fp16 builds set the FP16 builder flag where the TensorRT version still has weakly-typed precision
flags; on versions that only build strongly-typed networks, the graph is converted to fp16 first
(inputs and outputs stay fp32).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from kiln.accelerators import tensorrt_status

# The optimisation profile covers batch 1..MAX_BATCH, tuned for OPT_BATCH. 256 rows: a step-level batch of
# the diffusion denoiser (serving.tasks.generation.STEP_BATCH_ROWS) must fit one execution.
MAX_BATCH = 256
OPT_BATCH = 32


def build_engine(onnx_path: Path, plan_path: Path, precision: str) -> dict:
    """Build and serialise a TensorRT engine with a dynamic-batch optimisation profile."""
    if precision not in ("fp16", "int8"):
        raise ValueError(f"unknown TensorRT precision {precision!r}; valid: ['fp16', 'int8']")
    ok, reason = tensorrt_status()
    if not ok:
        raise RuntimeError(f"cannot build a TensorRT engine: {reason}")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    weakly_typed = hasattr(trt.BuilderFlag, "FP16")
    graph = Path(onnx_path).read_bytes()
    if precision == "fp16" and not weakly_typed:
        import onnx
        from onnxconverter_common import float16

        graph = float16.convert_float_to_float16(
            onnx.load(str(onnx_path)), keep_io_types=True
        ).SerializeToString()
    flags = 0 if weakly_typed else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(graph):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    if weakly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (1, *rest), (OPT_BATCH, *rest), (MAX_BATCH, *rest))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build a {precision} engine from {onnx_path} (see log above)")
    Path(plan_path).write_bytes(bytes(serialized))
    return {
        "precision": precision,
        "tensorrt": trt.__version__,
        "max_batch": MAX_BATCH,
        "opt_batch": OPT_BATCH,
    }


class _TensorRTBuild:
    """A TensorRT engine build behind :class:`export.quantize.Quantizer`'s interface."""

    name: ClassVar[str]
    output_suffix: ClassVar[str]
    precision: ClassVar[str]
    source: ClassVar[str]  # which exported ONNX graph the engine is built from
    calibration: ClassVar[str | None] = None  # int8 scales come from the QDQ graph, fp16 needs none

    def quantize(self, src: Path, dst: Path, calibration=None) -> dict:
        return {"method": self.name, "source": self.source, **build_engine(src, dst, self.precision)}


class FP16TensorRT(_TensorRTBuild):
    name = "fp16-trt"
    output_suffix = ".fp16.plan"
    precision = "fp16"
    source = "onnx"


class Int8TensorRT(_TensorRTBuild):
    name = "int8-trt"
    output_suffix = ".int8.plan"
    precision = "int8"
    source = "int8"  # explicit quantization: built from the task's int8 QDQ graph (ExportSpec.int8_format)


class _Tensor:
    def __init__(self, name: str):
        self.name = name


class EngineSession:
    """Runs a serialized TensorRT engine with onnxruntime's ``InferenceSession`` calls (``get_inputs``,
    ``get_outputs``, ``run``), so a task's quality metric measures an engine the way it measures a graph.
    Device buffers are torch CUDA tensors; batches larger than the engine's profile run in chunks."""

    def __init__(self, plan_path: Path | str):
        ok, reason = tensorrt_status()
        if not ok:
            raise RuntimeError(f"cannot run a TensorRT engine: {reason}")
        import tensorrt as trt
        import torch

        self._torch = torch
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
            Path(plan_path).read_bytes()
        )
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize the engine {plan_path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.max_batch = self.engine.get_tensor_profile_shape(self.input_names[0], 0)[2][0]
        self.stream = torch.cuda.Stream()

    def get_inputs(self) -> list[_Tensor]:
        return [_Tensor(n) for n in self.input_names]

    def get_outputs(self) -> list[_Tensor]:
        return [_Tensor(n) for n in self.output_names]

    def run(self, output_names, feeds: dict) -> list:
        import numpy as np

        n = len(next(iter(feeds.values())))
        chunks = [
            self._run_chunk({k: v[i : i + self.max_batch] for k, v in feeds.items()})
            for i in range(0, n, self.max_batch)
        ]
        return [np.concatenate([c[k] for c in chunks]) for k in (output_names or self.output_names)]

    def _run_chunk(self, feeds: dict) -> dict:
        import numpy as np

        torch = self._torch
        with torch.cuda.stream(self.stream):
            keep = {}
            for name in self.input_names:
                t = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda(non_blocking=True)
                keep[name] = t  # alive until the stream has run
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
            outs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                outs[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
                self.context.set_tensor_address(name, outs[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return {k: v.cpu().numpy() for k, v in outs.items()}
