"""Open Inference Protocol tensor datatype names and the numpy dtypes that hold them.

Names from the protocol's "Tensor Data Types" table (KServe v2 ``required_api.md``). Binary and raw
gRPC contents are little-endian; BYTES elements are ``object`` arrays of ``bytes`` (each element is framed
as a 4-byte little-endian length and the bytes when serialised, see :mod:`serving.oip.codec`).
"""

from __future__ import annotations

import numpy as np

BYTES = "BYTES"

_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    BYTES: np.dtype(np.object_),
}
DATATYPES: tuple[str, ...] = tuple(_DTYPES)
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def to_numpy(datatype: str) -> np.dtype:
    """The numpy dtype (native byte order) that holds ``datatype``.

    Raises:
        ValueError: ``datatype`` is not an OIP datatype name; the message lists the valid ones.
    """
    try:
        return _DTYPES[datatype]
    except (KeyError, TypeError):
        raise ValueError(f"unknown datatype {datatype!r}; valid datatypes: {', '.join(DATATYPES)}") from None


def from_numpy(dtype: np.dtype | type) -> str:
    """The OIP datatype name for a numpy dtype; ``str``/``bytes``/``object`` arrays are BYTES.

    Raises:
        ValueError: no OIP datatype holds ``dtype`` (complex numbers, datetimes...).
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return BYTES
    name = _NAMES.get(dtype.newbyteorder("=")) if dtype.byteorder != "|" else _NAMES.get(dtype)
    if name is None:
        raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")
    return name


def element_size(datatype: str) -> int | None:
    """Bytes per element in binary form; ``None`` for BYTES, whose elements vary in length.

    Raises:
        ValueError: ``datatype`` is not an OIP datatype name.
    """
    return None if datatype == BYTES else to_numpy(datatype).itemsize
