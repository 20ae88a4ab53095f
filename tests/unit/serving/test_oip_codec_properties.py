"""Property tests of the Open Inference Protocol codecs (hypothesis): every datatype round-trips through
JSON ``data`` and through the binary layout exactly, and JSON outputs are strict JSON (non-finite → null)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from serving.oip import codec, datatypes
from serving.repository import TensorSpec

NUMERIC = [d for d in datatypes.DATATYPES if d != datatypes.BYTES]
SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5)


class _OneInput:
    """Test double of :class:`serving.repository.ServedModel` with one input of any shape."""

    name, version, max_batch_size = "t", "1", 0

    def __init__(self, datatype: str, rank: int):
        self.inputs = [TensorSpec("x", datatype, (-1,) * rank)]


def _arrays(datatype: str):
    dtype = datatypes.to_numpy(datatype)
    elements = None
    if dtype.kind == "f":  # inputs must be finite (NaN/Inf are a 400); every finite value of the width
        elements = st.floats(allow_nan=False, allow_infinity=False, width=dtype.itemsize * 8)
    return hnp.arrays(dtype, SHAPES, elements=elements)


def _decode(datatype: str, array: np.ndarray, data) -> np.ndarray:
    model = _OneInput(datatype, array.ndim)
    return codec.decode_inputs(model, [codec.RequestTensor("x", datatype, list(array.shape), data)])["x"]


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("datatype", NUMERIC)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_numeric_round_trips_json_and_binary(datatype, data):
    array = data.draw(_arrays(datatype))
    as_json = _strict(json.dumps(codec.to_json(array, datatype), allow_nan=False))
    np.testing.assert_array_equal(_decode(datatype, array, as_json), array)
    binary = codec.to_bytes(array, datatype)
    assert len(binary) == array.size * datatypes.element_size(datatype)
    decoded = _decode(datatype, array, bytearray(binary))
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


@settings(max_examples=40, deadline=None)
@given(shape=SHAPES, data=st.data())
def test_bytes_round_trip_json_as_utf8_and_binary_as_any_bytes(shape, data):
    n = int(np.prod(shape))
    texts = data.draw(st.lists(st.text(max_size=8), min_size=n, max_size=n))
    raw = data.draw(st.lists(st.binary(max_size=8), min_size=n, max_size=n))
    utf8 = np.empty(n, dtype=object)
    utf8[:] = [t.encode() for t in texts]
    utf8 = utf8.reshape(shape)
    as_json = _strict(json.dumps(codec.to_json(utf8, "BYTES")))
    assert as_json == texts
    assert list(_decode("BYTES", utf8, as_json).reshape(-1)) == list(utf8.reshape(-1))
    anything = np.empty(n, dtype=object)
    anything[:] = raw
    anything = anything.reshape(shape)
    back = _decode("BYTES", anything, bytearray(codec.to_bytes(anything, "BYTES")))
    assert back.shape == anything.shape and list(back.reshape(-1)) == raw


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_json_outputs_are_strict_json_with_null_for_non_finite(datatype, data):
    dtype = datatypes.to_numpy(datatype)
    array = data.draw(hnp.arrays(dtype, SHAPES, elements=st.floats(width=dtype.itemsize * 8)))
    values = _strict(json.dumps(codec.to_json(array, datatype), allow_nan=False))
    flat = array.reshape(-1)
    assert len(values) == flat.size
    for value, expected in zip(values, flat, strict=True):
        assert value is None if not np.isfinite(expected) else value == float(expected)
