"""Triton's ``config.pbtxt``: parsed, checked against what Kiln serves, completed from the ONNX graph.

The text is parsed with protobuf's ``text_format`` against Triton's ``inference.ModelConfig`` message
(``tritonclient.grpc.model_config_pb2``, generated from Triton's ``model_config.proto``), so anything
Triton would reject as malformed is rejected here with protobuf's line and column. What Kiln serves of it
(Triton's docs, "Model Configuration"):

- ``name`` (must match the directory), ``platform: "onnxruntime_onnx"`` / ``backend: "onnxruntime"``,
  ``default_model_filename`` (default ``model.onnx``);
- ``max_batch_size`` (0: the tensors have no batch dimension);
- ``input`` / ``output``: ``name``, ``data_type``, ``dims`` (-1 = any size), ``reshape``, ``format``
  (informational), an output's ``label_filename`` (the classification extension's labels);
- ``dynamic_batching``: ``max_queue_delay_microseconds``, ``preferred_batch_size``,
  ``default_queue_policy`` (``max_queue_size``, ``default_timeout_microseconds`` with
  ``timeout_action: REJECT``), ``preserve_ordering`` (every request gets its own rows anyway);
- ``instance_group``: the ``count`` of every group (``kind`` CPU/GPU/AUTO: onnxruntime picks the GPU
  providers when it has them);
- ``version_policy``: ``latest { num_versions }`` (default: the newest one), ``all``, ``specific``.

Auto-complete (Triton's ``--strict-model-config=false``, its default): a config without ``input`` or
``output`` gets them from the graph, and a config with neither and ``max_batch_size`` 0 whose graph has
a dynamic first dimension everywhere (and no rank-1 tensor) gets Triton's ``default-max-batch-size`` 4
and dynamic batching.
``optimization``, ``model_warmup``, ``parameters``, ``metric_tags``, ``response_cache`` and
``cc_model_filenames`` only tune Triton itself: they are ignored and the log says so. Everything else
(ensembles, sequence batching, ragged or shape tensors, priorities, repository agents, decoupled
models, other platforms and backends) is refused with :class:`TritonConfigError` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as mc

from serving.repository import TensorSpec

CONFIG_FILE = "config.pbtxt"
DEFAULT_MODEL_FILENAME = "model.onnx"
DEFAULT_MAX_BATCH_SIZE = 4  # Triton's --backend-config=default-max-batch-size for auto-completed models
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"

# Triton's TYPE_* → Open Inference Protocol datatype; TYPE_BF16 has no numpy dtype, so no entry.
_DATATYPES = {
    "TYPE_BOOL": "BOOL",
    "TYPE_UINT8": "UINT8",
    "TYPE_UINT16": "UINT16",
    "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64",
    "TYPE_INT8": "INT8",
    "TYPE_INT16": "INT16",
    "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64",
    "TYPE_FP16": "FP16",
    "TYPE_FP32": "FP32",
    "TYPE_FP64": "FP64",
    "TYPE_STRING": "BYTES",
}
# ONNX TensorProto element types → Open Inference Protocol datatypes.
_ONNX_DATATYPES = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "BYTES",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
    12: "UINT32",
    13: "UINT64",
}

_SERVED = {
    "name",
    "platform",
    "backend",
    "version_policy",
    "max_batch_size",
    "input",
    "output",
    "dynamic_batching",
    "instance_group",
    "default_model_filename",
}
_IGNORED = {
    "optimization",
    "model_warmup",
    "parameters",
    "metric_tags",
    "response_cache",
    "cc_model_filenames",
}
_INPUT_FIELDS = {"name", "data_type", "format", "dims", "reshape"}
_OUTPUT_FIELDS = {"name", "data_type", "dims", "reshape", "label_filename"}
_BATCHING_FIELDS = {
    "preferred_batch_size",
    "max_queue_delay_microseconds",
    "preserve_ordering",
    "default_queue_policy",
}
_QUEUE_FIELDS = {"max_queue_size", "default_timeout_microseconds", "timeout_action", "allow_timeout_override"}
_INSTANCE_FIELDS = {"name", "kind", "count", "gpus"}


class TritonConfigError(ValueError):
    """A ``config.pbtxt`` that is malformed, that Kiln does not serve, or that its graph contradicts."""


@dataclass(frozen=True)
class GraphTensor:
    """One input or output of an ONNX graph: datatype and shape (-1 for a dynamic dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Graph:
    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]


def parse_config(text: str, directory: str) -> tuple[mc.ModelConfig, list[str]]:
    """Parse and check a ``config.pbtxt`` for the model in ``directory`` (its name).

    Returns:
        The config (``name`` filled in from the directory when absent) and notes for the log on
        what was ignored.

    Raises:
        TritonConfigError: malformed text, or a field Kiln does not serve (the message names it).
    """
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise TritonConfigError(f"{CONFIG_FILE} is malformed: {exc}") from None
    if config.name and config.name != directory:
        raise TritonConfigError(
            f"name: {config.name!r} does not match its directory {directory!r} (Triton requires them equal)"
        )
    config.name = directory
    notes = []
    for field, _ in config.ListFields():
        if field.name in _IGNORED:
            notes.append(f"{field.name} is ignored: it tunes Triton itself, Kiln serves without it")
        elif field.name not in _SERVED:
            raise TritonConfigError(f"{field.name} is not supported by Kiln; remove it to serve this model")
    _check_platform(config)
    if config.max_batch_size < 0:
        raise TritonConfigError(
            f"max_batch_size: {config.max_batch_size} must be >= 0 (0 = no batch dimension)"
        )
    for kind, tensors, allowed in (
        ("input", config.input, _INPUT_FIELDS),
        ("output", config.output, _OUTPUT_FIELDS),
    ):
        names = [t.name for t in tensors]
        for i, tensor in enumerate(tensors):
            where = f"{kind}[{i}]"
            _only(tensor, allowed, where)
            if not tensor.name:
                raise TritonConfigError(f"{where}.name is missing")
            if tensor.name in names[:i]:
                raise TritonConfigError(f"{where}.name: {kind} {tensor.name!r} is listed twice")
            _datatype(tensor.data_type, f"{where}.data_type")
            _check_dims(list(tensor.dims), f"{where}.dims")
            if tensor.HasField("reshape"):
                _check_dims(list(tensor.reshape.shape), f"{where}.reshape.shape", empty_ok=True)
                _check_reshape(list(tensor.dims), list(tensor.reshape.shape), where)
    if config.HasField("dynamic_batching"):
        _check_batching(config)
    for i, group in enumerate(config.instance_group):
        _only(group, _INSTANCE_FIELDS, f"instance_group[{i}]")
        if group.count < 0:
            raise TritonConfigError(f"instance_group[{i}].count: {group.count} must be >= 1")
        if group.kind == mc.ModelInstanceGroup.KIND_MODEL:
            raise TritonConfigError(
                f"instance_group[{i}].kind: KIND_MODEL is not supported; use KIND_CPU, KIND_GPU or KIND_AUTO"
            )
    _check_version_policy(config)
    return config, notes


def _check_platform(config: mc.ModelConfig) -> None:
    if config.backend and config.backend != BACKEND:
        why = " (Kiln executes nothing from the repository)" if config.backend == "python" else ""
        raise TritonConfigError(
            f"backend: {config.backend!r} is not supported{why}; Kiln serves ONNX models: "
            f'backend: "{BACKEND}" or platform: "{PLATFORM}"'
        )
    if config.platform and config.platform != PLATFORM:
        what = "ensembles are" if config.platform == "ensemble" else f"{config.platform!r} is"
        raise TritonConfigError(
            f'platform: {what} not supported; Kiln serves ONNX models: platform: "{PLATFORM}" '
            f'or backend: "{BACKEND}"'
        )


def _only(message: Message, allowed: set[str], where: str) -> None:
    for field, _ in message.ListFields():
        if field.name not in allowed:
            raise TritonConfigError(f"{where}.{field.name} is not supported by Kiln")


def _datatype(data_type: int, where: str) -> str:
    name = mc.DataType.Name(data_type)
    if name not in _DATATYPES:
        raise TritonConfigError(f"{where}: {name} is not supported; valid: {', '.join(_DATATYPES)}")
    return _DATATYPES[name]


def _check_dims(dims: list[int], where: str, empty_ok: bool = False) -> None:
    if not dims and not empty_ok:
        raise TritonConfigError(f"{where} is missing (use [1] with reshape: {{ shape: [] }} for a scalar)")
    bad = [d for d in dims if d < -1 or d == 0]
    if bad:
        raise TritonConfigError(f"{where}: {dims} has {bad}; a dimension is a positive size or -1 (any)")


def _check_reshape(dims: list[int], shape: list[int], where: str) -> None:
    if shape.count(-1) > 1:
        raise TritonConfigError(f"{where}.reshape.shape: {shape} has more than one -1")
    if (-1 in dims) != (-1 in shape):
        raise TritonConfigError(
            f"{where}.reshape.shape: {shape} and dims {dims} must both or neither have -1"
        )
    if -1 not in dims and _count(dims) != _count(shape):
        raise TritonConfigError(
            f"{where}.reshape.shape: {shape} holds {_count(shape)} elements, dims {dims} {_count(dims)}"
        )


def _count(dims: list[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _check_batching(config: mc.ModelConfig) -> None:
    batching = config.dynamic_batching
    _only(batching, _BATCHING_FIELDS, "dynamic_batching")
    if config.max_batch_size == 0:
        raise TritonConfigError(
            "dynamic_batching needs max_batch_size >= 1 (a model without a batch dimension)"
        )
    for size in batching.preferred_batch_size:
        if not 1 <= size <= config.max_batch_size:
            raise TritonConfigError(
                f"dynamic_batching.preferred_batch_size: {size} must be in 1..max_batch_size "
                f"({config.max_batch_size})"
            )
    if batching.HasField("default_queue_policy"):
        policy = batching.default_queue_policy
        _only(policy, _QUEUE_FIELDS, "dynamic_batching.default_queue_policy")
        if policy.timeout_action != mc.ModelQueuePolicy.REJECT:
            raise TritonConfigError(
                "dynamic_batching.default_queue_policy.timeout_action: DELAY is not supported; Kiln refuses "
                "a request that waited past the timeout (REJECT)"
            )


def _check_version_policy(config: mc.ModelConfig) -> None:
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "latest" and policy.latest.num_versions < 1:
        raise TritonConfigError(
            f"version_policy.latest.num_versions: {policy.latest.num_versions} must be >= 1"
        )
    if kind == "specific":
        if not policy.specific.versions:
            raise TritonConfigError("version_policy.specific.versions is empty")
        bad = [v for v in policy.specific.versions if v < 1]
        if bad:
            raise TritonConfigError(f"version_policy.specific.versions: {bad} are not versions (>= 1)")


def select_versions(config: mc.ModelConfig, available: list[int]) -> list[int]:
    """The versions the config's ``version_policy`` serves out of ``available``, oldest first."""
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice")
    present = sorted(available)
    if kind == "all":
        return present
    if kind == "specific":
        return [v for v in present if v in set(policy.specific.versions)]
    n = policy.latest.num_versions if kind == "latest" else 1
    return present[-n:]


def read_graph(path: Path) -> Graph:
    """The inputs and outputs of an ONNX graph (not its weights), without running anything."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises protobuf's and its own errors alike
        raise TritonConfigError(f"{path.name} is not a readable ONNX model: {exc}") from None
    initializers = {t.name for t in model.graph.initializer}  # listed as inputs by old exporters

    def tensors(values) -> tuple[GraphTensor, ...]:
        out = []
        for value in values:
            if not value.type.HasField("tensor_type"):
                raise TritonConfigError(
                    f"{path.name}: {value.name!r} is not a tensor; Kiln serves tensors only"
                )
            elem = value.type.tensor_type.elem_type
            if elem not in _ONNX_DATATYPES:
                raise TritonConfigError(
                    f"{path.name}: {value.name!r} has ONNX element type {elem}, not servable"
                )
            dims = value.type.tensor_type.shape.dim
            shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in dims)
            out.append(GraphTensor(value.name, _ONNX_DATATYPES[elem], shape))
        return tuple(out)

    return Graph(
        tensors(v for v in model.graph.input if v.name not in initializers), tensors(model.graph.output)
    )


def complete_config(
    config: mc.ModelConfig, graph: Graph, model_file: str
) -> tuple[mc.ModelConfig, list[str]]:
    """Fill in what the config leaves out from the graph (Triton's auto-complete) and check that the two
    agree: names, datatypes, ranks and fixed dimensions.

    Returns:
        A completed copy of ``config``, and notes for the log on what was filled in.

    Raises:
        TritonConfigError: the config and the graph disagree (the message names the tensor).
    """
    done = mc.ModelConfig()
    done.CopyFrom(config)
    notes = []
    if not done.platform and not done.backend:
        done.backend = BACKEND
    if not done.HasField("version_policy"):  # what Triton's answer shows for the default
        done.version_policy.latest.num_versions = 1
    if not done.input and not done.output and done.max_batch_size == 0 and _batchable(graph):
        done.max_batch_size = DEFAULT_MAX_BATCH_SIZE
        if not done.HasField("dynamic_batching"):
            done.dynamic_batching.SetInParent()
        notes.append(
            f"max_batch_size auto-completed to {DEFAULT_MAX_BATCH_SIZE} with dynamic batching: every tensor "
            "of the graph has a dynamic first dimension (list the inputs to serve it without one)"
        )
    batched = done.max_batch_size > 0
    for kind, configured, found in (
        ("input", done.input, graph.inputs),
        ("output", done.output, graph.outputs),
    ):
        if not configured:
            for tensor in found:
                entry = configured.add(name=tensor.name, data_type=_config_type(tensor.datatype))
                dims = tensor.shape[1:] if batched else tensor.shape
                if not dims:
                    raise TritonConfigError(
                        f"{kind} {tensor.name!r} of {model_file} is a scalar per sample; list it in "
                        f"{CONFIG_FILE} with dims: [1] and reshape: {{ shape: [] }}"
                    )
                entry.dims.extend(dims)
            notes.append(f"{kind} auto-completed from {model_file}: {[t.name for t in found]}")
    by_name = {t.name: t for t in graph.inputs}
    missing = sorted(set(by_name) - {t.name for t in done.input})
    if missing:
        raise TritonConfigError(f"{model_file} has inputs {missing} that {CONFIG_FILE} does not list")
    for kind, configured, found in (
        ("input", done.input, graph.inputs),
        ("output", done.output, graph.outputs),
    ):
        names = {t.name: t for t in found}
        for i, tensor in enumerate(configured):
            graph_tensor = names.get(tensor.name)
            if graph_tensor is None:
                raise TritonConfigError(
                    f"{kind}[{i}] {tensor.name!r} is not an {kind} of {model_file}; "
                    f"its {kind}s: {sorted(names)}"
                )
            _agree(tensor, graph_tensor, f"{kind}[{i}] {tensor.name!r}", batched, model_file)
    return done, notes


def _batchable(graph: Graph) -> bool:
    tensors = graph.inputs + graph.outputs
    # rank >= 2: a rank-1 tensor batched would leave a per-sample scalar, which a config can't say in dims
    return bool(tensors) and all(len(t.shape) >= 2 and t.shape[0] == -1 for t in tensors)


def _agree(tensor: Message, found: GraphTensor, where: str, batched: bool, model_file: str) -> None:
    datatype = _DATATYPES[mc.DataType.Name(tensor.data_type)]
    if datatype != found.datatype:
        raise TritonConfigError(
            f"{where}: data_type {_type_name(datatype)} but {model_file} has {_type_name(found.datatype)}"
        )
    seen = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
    expected = ([-1] if batched else []) + seen
    if len(expected) != len(found.shape):
        raise TritonConfigError(
            f"{where}: {CONFIG_FILE} gives the graph shape {expected} (batch dimension "
            f"{'first' if batched else 'none: max_batch_size 0'}) but {model_file} has {list(found.shape)}"
        )
    if batched and found.shape[0] != -1:
        raise TritonConfigError(
            f"{where}: max_batch_size > 0 needs a dynamic first dimension but {model_file} fixes it at "
            f"{found.shape[0]} (set max_batch_size: 0 and list the batch dimension in dims)"
        )
    for axis, (want, have) in enumerate(zip(expected, found.shape, strict=True)):
        if want != -1 and have != -1 and want != have:
            raise TritonConfigError(
                f"{where}: dimension {axis} is {want} in {CONFIG_FILE} but {have} in {model_file} "
                f"(config {expected}, graph {list(found.shape)})"
            )


def _type_name(datatype: str) -> str:
    return mc.DataType.Name(_config_type(datatype))


def _config_type(datatype: str) -> int:
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def tensor_specs(config: mc.ModelConfig, kind: str) -> list[TensorSpec]:
    """The served (client-facing) specs of ``kind`` ("input"/"output"): the config's dims, with the
    batch dimension (-1) first when ``max_batch_size`` > 0."""
    batch = (-1,) if config.max_batch_size > 0 else ()
    tensors = config.input if kind == "input" else config.output
    return [
        TensorSpec(t.name, _DATATYPES[mc.DataType.Name(t.data_type)], batch + tuple(t.dims)) for t in tensors
    ]


def model_settings(config: mc.ModelConfig) -> dict[str, Any]:
    """The config's scheduling as :class:`serving.config.ModelSettings` overrides.

    Without ``dynamic_batching`` every request runs alone (Triton's default scheduler). With it, a batch
    closes at ``max_batch_size`` rows or, when ``preferred_batch_size`` is given, at the largest preferred
    size (the batch Triton's dynamic batcher forms under load); ``max_queue_delay_microseconds`` is the
    batching window; ``default_queue_policy`` bounds the queue (``max_queue_size``; 0 = Kiln's global
    bound) and the queue time (``default_timeout_microseconds``). ``instance_group`` counts add up.
    """
    settings: dict[str, Any] = {"backend": BACKEND, "batch_max_size": 1}
    if config.HasField("dynamic_batching"):
        batching = config.dynamic_batching
        preferred = list(batching.preferred_batch_size)
        settings["batch_max_size"] = max(preferred) if preferred else config.max_batch_size
        settings["batch_window_ms"] = batching.max_queue_delay_microseconds / 1000.0
        policy = batching.default_queue_policy
        if policy.max_queue_size > 0:
            settings["max_queue_size"] = policy.max_queue_size
        if policy.default_timeout_microseconds > 0:
            settings["max_queue_delay_ms"] = policy.default_timeout_microseconds / 1000.0
    if config.instance_group:
        settings["instances"] = sum(max(1, g.count) for g in config.instance_group)
    return settings


def labels_file(config: mc.ModelConfig) -> str:
    """The ``label_filename`` of the first output that has one ('' when none has)."""
    return next((t.label_filename for t in config.output if t.label_filename), "")


def config_json(config: mc.ModelConfig) -> dict[str, Any]:
    """The config as Triton's HTTP model-configuration answer writes it: field names as in the proto,
    enums by name, 64-bit integers as numbers (protobuf's JSON mapping would quote them)."""
    return _message_json(config)


def _message_json(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _value_json(value_field, v) for k, v in value.items()}
        elif _repeated(field):
            out[field.name] = [_value_json(field, v) for v in value]
        else:
            out[field.name] = _value_json(field, value)
    return out


def _repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 5.29; ``label`` is gone in 7
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED


def _value_json(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _message_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    return value
