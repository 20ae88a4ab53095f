"""Request validation and tensor (de)serialisation shared by the HTTP and gRPC front-ends.

Each front-end turns its wire format into :class:`RequestTensor` objects (name, datatype, shape, and
either a nested list of values or a bytes-like buffer) and :class:`RequestedOutput` objects; everything
else is here, so a request is checked the same way whichever protocol carried it:
:func:`decode_inputs` validates against the model's :class:`~serving.repository.TensorSpec` inputs and
returns numpy arrays, :func:`select_outputs` / :func:`encode_outputs` build the response tensors, and
:func:`to_bytes` / :func:`to_json` serialise them.

Binary layout (Triton's binary tensor data extension, also the gRPC ``raw_*_contents`` layout):
flattened row-major little-endian elements without padding; BOOL is one byte per element; a BYTES
element is a 4-byte little-endian unsigned length followed by that many bytes.
Every validation failure raises :class:`~serving.repository.InferenceError` 400 naming the tensor and
the problem.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.metrics import UNKNOWN_MODEL
from serving.oip import datatypes
from serving.repository import InferenceError, ServedModel, TensorSpec

_BYTES_LENGTH = struct.Struct("<I")  # BYTES element framing: 4-byte little-endian unsigned length


@dataclass(frozen=True)
class RequestTensor:
    """One input tensor as a request states it, before validation.

    Attributes:
        name: Input name.
        datatype: OIP datatype name as sent (validated by :func:`decode_inputs`).
        shape: Shape as sent (validated by :func:`decode_inputs`).
        data: Elements as a (possibly nested) sequence of values — JSON ``data`` or typed gRPC
            contents — or a bytes-like buffer in the binary layout (binary HTTP data, ``raw_input_contents``).
    """

    name: str
    datatype: Any
    shape: Any
    data: Any


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for; ``binary`` is ``None`` where the request did not say."""

    name: str
    binary: bool | None = None
    classification: int = 0  # top-k classes as BYTES "score:index[:label]" (classification extension)


@dataclass(frozen=True)
class ResponseTensor:
    """One output ready to serialise."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray
    binary: bool


def require_ready(model: ServedModel) -> None:
    """Raise :class:`InferenceError` 503 when ``model`` is loaded but not ready to serve."""
    if not model.ready():
        raise InferenceError(503, f"model {model.name!r} version {model.version!r} is not ready")


def backend_label(model: ServedModel, backend: str | None) -> str:
    """The metrics ``backend`` label for a request: the default backend when none is asked for, and one
    shared value (``metrics.UNKNOWN_MODEL``) for names the model does not have, so that client-chosen
    strings can not grow the label set."""
    if backend is None:
        return model.backends[0] if model.backends else ""
    return backend if backend in model.backends else UNKNOWN_MODEL


def decode_inputs(model: ServedModel, tensors: Sequence[RequestTensor]) -> dict[str, np.ndarray]:
    """Validate a request's inputs against ``model.inputs`` and decode them to numpy arrays.

    Checks, in order: duplicate, unknown and missing input names; datatype names and that they match
    the model's; shapes (rank, fixed dimensions, batch size within ``model.max_batch_size`` and the
    same for every input); data length against the shape; value types and ranges; no NaN or Inf.

    Args:
        model: The model the request is for.
        tensors: The request's inputs, in request order.

    Returns:
        Writable arrays of the model's dtypes and the requested shapes, by input name.

    Raises:
        InferenceError: 400 naming the first problem found.
    """
    specs = {spec.name: spec for spec in model.inputs}
    seen: set[str] = set()
    for tensor in tensors:
        if tensor.name in seen:
            raise InferenceError(400, f"input {tensor.name!r} is given more than once")
        seen.add(tensor.name)
        if tensor.name not in specs:
            raise InferenceError(
                400, f"unknown input {tensor.name!r} for model {model.name!r}; its inputs are {sorted(specs)}"
            )
    missing = sorted(set(specs) - seen)
    if missing:
        raise InferenceError(400, f"missing input(s) {missing} for model {model.name!r}")

    shapes: dict[str, tuple[int, ...]] = {}
    for tensor in tensors:  # every tensor's datatype and shape before any data
        _check_datatype(model, specs[tensor.name], tensor.datatype)
        shapes[tensor.name] = _check_shape(model, specs[tensor.name], tensor.shape)
    if model.max_batch_size > 0 and len({shape[0] for shape in shapes.values() if shape}) > 1:
        batch_sizes = {name: shape[0] for name, shape in shapes.items() if shape}
        raise InferenceError(400, f"inputs disagree on the batch size (first dimension): {batch_sizes}")

    arrays: dict[str, np.ndarray] = {}
    for tensor in tensors:
        datatype, shape = specs[tensor.name].datatype, shapes[tensor.name]
        if isinstance(tensor.data, bytes | bytearray | memoryview):
            array = _from_binary(tensor.name, datatype, shape, tensor.data)
        else:
            array = _from_values(tensor.name, datatype, shape, tensor.data)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InferenceError(
                400, f"input {tensor.name!r} contains NaN or infinite values, which are not allowed"
            )
        arrays[tensor.name] = array if array.flags.writeable else array.copy()
    return arrays


def requested_output(name: Any, parameters: Mapping[str, Any] | None) -> RequestedOutput:
    """Build a :class:`RequestedOutput` from a request's output name and parameters.

    ``binary_data`` (bool) asks for the output in binary form; ``classification`` (int k > 0), Triton's
    classification extension, for the top k classes of a (batch, classes) output instead of its values.

    Raises:
        InferenceError: 400 for a non-string name, a non-bool ``binary_data`` or a ``classification``
            that is not a positive integer.
    """
    if not isinstance(name, str) or not name:
        raise InferenceError(400, f"requested output name must be a non-empty string, got {name!r}")
    parameters = parameters or {}
    binary = parameters.get("binary_data")
    if binary is not None and not isinstance(binary, bool):
        raise InferenceError(
            400, f"output {name!r}: parameter 'binary_data' must be a boolean, got {binary!r}"
        )
    k = parameters.get("classification", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise InferenceError(
            400, f"output {name!r}: parameter 'classification' must be a positive integer (top k), got {k!r}"
        )
    return RequestedOutput(name, binary, k)


def binary_data_output(parameters: Mapping[str, Any] | None) -> bool:
    """The request-level ``binary_data_output`` parameter: default binary form for every output.

    Raises:
        InferenceError: 400 when it is given and not a boolean.
    """
    value = (parameters or {}).get("binary_data_output", False)
    if not isinstance(value, bool):
        raise InferenceError(400, f"parameter 'binary_data_output' must be a boolean, got {value!r}")
    return value


def select_outputs(
    model: ServedModel, requested: Sequence[RequestedOutput], *, binary_default: bool = False
) -> list[RequestedOutput]:
    """Resolve which outputs to return and in which form.

    Args:
        model: The model the request is for.
        requested: The request's ``outputs``; empty means every output of the model, in model order.
        binary_default: The form for outputs whose own ``binary_data`` is not given.

    Returns:
        One :class:`RequestedOutput` per output to return, with ``binary`` resolved to a bool.

    Raises:
        InferenceError: 400 naming an unknown or repeated output.
    """
    known = [spec.name for spec in model.outputs]
    if not requested:
        return [RequestedOutput(name, binary_default) for name in known]
    selected: list[RequestedOutput] = []
    for output in requested:
        if output.name not in known:
            raise InferenceError(
                400,
                f"unknown output {output.name!r} requested from model {model.name!r}; its outputs: {known}",
            )
        if any(s.name == output.name for s in selected):
            raise InferenceError(400, f"output {output.name!r} is requested more than once")
        spec = next(s for s in model.outputs if s.name == output.name)
        if output.classification and (len(spec.shape) != 2 or spec.datatype == datatypes.BYTES):
            raise InferenceError(
                400,
                f"output {output.name!r} of model {model.name!r} has shape {list(spec.shape)} "
                f"({spec.datatype}); classification needs a numeric (batch, classes) output",
            )
        selected.append(
            RequestedOutput(
                output.name,
                binary_default if output.binary is None else output.binary,
                output.classification,
            )
        )
    return selected


def encode_outputs(
    model: ServedModel, results: Mapping[str, np.ndarray], selected: Sequence[RequestedOutput]
) -> list[ResponseTensor]:
    """Pair the model's results with the selected outputs; datatypes come from the arrays themselves.

    Raises:
        RuntimeError: the model did not return a selected output or returned an unserialisable dtype
            (a server-side bug, reported as 500 by the front-ends).
    """
    tensors = []
    for output in selected:
        if output.name not in results:
            raise RuntimeError(
                f"model {model.name!r} returned no output {output.name!r} (got {sorted(results)})"
            )
        array = np.asarray(results[output.name])
        if output.classification:
            array = classify(array, output.classification, getattr(model, "labels", []))
        try:
            datatype = datatypes.from_numpy(array.dtype)
        except ValueError as exc:
            raise RuntimeError(f"model {model.name!r} output {output.name!r}: {exc}") from None
        tensors.append(ResponseTensor(output.name, datatype, tuple(array.shape), array, bool(output.binary)))
    return tensors


def classify(scores: np.ndarray, k: int, labels: Sequence[str]) -> np.ndarray:
    """Triton's classification extension: per row, the top ``k`` classes (k capped at the number of
    classes) as ``"score:index"`` or ``"score:index:label"`` strings, highest score first."""
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = np.empty(top.shape, dtype=object)
    for row, indices in enumerate(top):
        for j, index in enumerate(indices):
            text = f"{scores[row, index]:g}:{index}"
            out[row, j] = f"{text}:{labels[index]}" if index < len(labels) else text
    return out


def to_bytes(array: np.ndarray, datatype: str) -> bytes:
    """Serialise ``array`` in the binary layout (little-endian; BYTES length-framed)."""
    if datatype == datatypes.BYTES:
        parts = []
        for element in np.asarray(array, dtype=object).reshape(-1):
            raw = element.encode() if isinstance(element, str) else bytes(element)
            parts += [_BYTES_LENGTH.pack(len(raw)), raw]
        return b"".join(parts)
    dtype = datatypes.to_numpy(datatype).newbyteorder("<")
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def to_json(array: np.ndarray, datatype: str) -> list[Any]:
    """Flattened JSON-ready values of ``array``; BYTES elements are decoded as UTF-8 strings; NaN and
    ±Infinity are ``null`` (JSON has no literal for them; binary outputs keep them).

    Raises:
        InferenceError: 400 when a BYTES element is not UTF-8 (the client can ask for binary instead).
    """
    flat = np.asarray(array).reshape(-1)
    if datatype != datatypes.BYTES:
        values = flat.tolist()
        if flat.dtype.kind in "fc":  # JSON has no NaN / Infinity: non-finite values are null (README)
            for i in np.flatnonzero(~np.isfinite(flat)):
                values[i] = None
        return values
    values = []
    for element in flat:
        if isinstance(element, str):
            values.append(element)
            continue
        try:
            values.append(bytes(element).decode())
        except UnicodeDecodeError:
            raise InferenceError(
                400, "a BYTES output is not valid UTF-8 and can not be returned as JSON; request binary_data"
            ) from None
    return values


def _check_datatype(model: ServedModel, spec: TensorSpec, datatype: Any) -> None:
    try:
        datatypes.to_numpy(datatype)
    except ValueError as exc:
        raise InferenceError(400, f"input {spec.name!r}: {exc}") from None
    if datatype != spec.datatype:
        raise InferenceError(
            400,
            f"input {spec.name!r} has datatype {datatype} but model {model.name!r} expects {spec.datatype}",
        )


def _check_shape(model: ServedModel, spec: TensorSpec, shape: Any) -> tuple[int, ...]:
    if (
        not isinstance(shape, Sequence)
        or isinstance(shape, str)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise InferenceError(
            400, f"input {spec.name!r}: shape must be a list of non-negative integers, got {shape!r}"
        )
    shape = tuple(shape)
    expected = f"model {model.name!r} expects {list(spec.shape)} (-1 = any size)"
    if len(shape) != len(spec.shape):
        raise InferenceError(
            400, f"input {spec.name!r} has shape {list(shape)} of rank {len(shape)} but {expected}"
        )
    for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if want != -1 and got != want:
            raise InferenceError(
                400, f"input {spec.name!r} has shape {list(shape)}, dimension {axis} is wrong: {expected}"
            )
    if model.max_batch_size > 0 and shape:
        if shape[0] > model.max_batch_size:
            raise InferenceError(
                400,
                f"input {spec.name!r} has batch size {shape[0]}, over the max_batch_size "
                f"{model.max_batch_size} of model {model.name!r}",
            )
        if shape[0] < 1:
            raise InferenceError(400, f"input {spec.name!r} has batch size 0; send at least one sample")
    return shape


def _from_binary(
    name: str, datatype: str, shape: tuple[int, ...], buffer: bytes | bytearray | memoryview
) -> np.ndarray:
    count = math.prod(shape)
    buffer = memoryview(buffer).cast("B")
    if datatype == datatypes.BYTES:
        elements, offset = [], 0
        while offset < len(buffer):
            if offset + _BYTES_LENGTH.size > len(buffer):
                raise InferenceError(
                    400, f"input {name!r}: BYTES data ends inside an element's 4-byte length"
                )
            (length,) = _BYTES_LENGTH.unpack_from(buffer, offset)
            offset += _BYTES_LENGTH.size
            if offset + length > len(buffer):
                raise InferenceError(
                    400, f"input {name!r}: BYTES element of {length} bytes runs past the data"
                )
            elements.append(bytes(buffer[offset : offset + length]))
            offset += length
        if len(elements) != count:
            raise InferenceError(
                400,
                f"input {name!r} has {len(elements)} BYTES elements but shape {list(shape)} needs {count}",
            )
        array = np.empty(count, dtype=object)
        array[:] = elements
        return array.reshape(shape)
    dtype = datatypes.to_numpy(datatype)
    expected = count * dtype.itemsize
    if len(buffer) != expected:
        raise InferenceError(
            400,
            f"input {name!r} has {len(buffer)} bytes of binary data but shape {list(shape)} of {datatype} "
            f"needs {expected}",
        )
    if datatype == "BOOL":
        return np.frombuffer(buffer, dtype=np.uint8).astype(bool).reshape(shape)
    return np.frombuffer(buffer, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)


def _from_values(name: str, datatype: str, shape: tuple[int, ...], values: Any) -> np.ndarray:
    count = math.prod(shape)
    dtype = datatypes.to_numpy(datatype)
    if values is None or isinstance(values, str | Mapping):
        raise InferenceError(
            400, f"input {name!r}: data must be a list of values, got {type(values).__name__}"
        )
    if datatype == datatypes.BYTES:
        try:
            flat = np.asarray(values, dtype=object).reshape(-1)
        except ValueError:
            raise InferenceError(400, f"input {name!r}: data is not a rectangular array") from None
        if not all(isinstance(v, str | bytes) for v in flat):
            raise InferenceError(400, f"input {name!r}: BYTES data must be strings")
        _check_count(name, flat.size, shape, count)
        array = np.empty(count, dtype=object)
        array[:] = [v.encode() if isinstance(v, str) else v for v in flat]
        return array.reshape(shape)
    try:
        raw = np.asarray(values)
    except (ValueError, TypeError):
        raise InferenceError(400, f"input {name!r}: data is not a rectangular array of numbers") from None
    _check_count(name, raw.size, shape, count)
    if raw.size == 0:
        return np.empty(shape, dtype=dtype)
    if dtype.kind in "iu" and raw.dtype.kind in "fO" and _all_python_ints(values):
        # Integers beyond int64 (UINT64 over 2**63) make numpy infer float64 or object: convert exactly.
        try:
            return np.asarray(values, dtype=dtype).reshape(shape)
        except OverflowError:
            raise InferenceError(400, f"input {name!r}: values out of range for {datatype}") from None
    allowed = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dtype.kind]
    if raw.dtype.kind not in allowed:
        wanted = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}[dtype.kind]
        raise InferenceError(400, f"input {name!r}: {datatype} data must be {wanted}, got {raw.dtype} values")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise InferenceError(
                400, f"input {name!r}: values out of range for {datatype} [{info.min}, {info.max}]"
            )
    with np.errstate(over="ignore"):  # FP16/FP32 overflow becomes inf, refused by the finiteness check
        return raw.astype(dtype).reshape(shape)


def _check_count(name: str, got: int, shape: tuple[int, ...], count: int) -> None:
    if got != count:
        raise InferenceError(
            400, f"input {name!r} has {got} data elements but shape {list(shape)} needs {count}"
        )


def _all_python_ints(values: Any) -> bool:
    flat = np.asarray(values, dtype=object).reshape(-1)
    return all(isinstance(v, int) and not isinstance(v, bool) for v in flat)
