"""Datatype mapping and the shared request codec, without any transport."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest

from serving.oip import codec, datatypes
from serving.repository import InferenceError


@pytest.mark.parametrize("name", datatypes.DATATYPES)
def test_datatype_names_round_trip(name):
    assert datatypes.from_numpy(datatypes.to_numpy(name)) == name


def test_datatype_details():
    assert datatypes.element_size("FP16") == 2 and datatypes.element_size("UINT64") == 8
    assert datatypes.element_size("BOOL") == 1 and datatypes.element_size("BYTES") is None
    assert datatypes.from_numpy(np.dtype(">f4")) == "FP32"  # byte order is a serialisation detail
    assert datatypes.from_numpy(np.dtype("U5")) == "BYTES"
    with pytest.raises(ValueError, match="valid datatypes: BOOL, UINT8"):
        datatypes.to_numpy("FLOAT32")
    with pytest.raises(ValueError, match="complex128"):
        datatypes.from_numpy(np.complex128)


@pytest.mark.parametrize(
    ("array", "datatype"),
    [
        (np.array([[1.5, -2.0]], np.float32), "FP32"),
        (np.array([1, -1], np.int16), "INT16"),
        (np.array([True, False, True]), "BOOL"),
        (np.array([2**64 - 1], np.uint64), "UINT64"),
        (np.array([b"ab", b"", "ü".encode()], dtype=object), "BYTES"),
    ],
)
def test_binary_round_trip(array, datatype):
    raw = codec.to_bytes(array, datatype)
    decoded = codec._from_binary("t", datatype, array.shape, bytearray(raw))
    np.testing.assert_array_equal(decoded, array)
    assert decoded.flags.writeable or datatype == "BYTES"


def test_bytes_framing_is_little_endian_length_prefixed():
    assert codec.to_bytes(np.array([b"ab", "c"], dtype=object), "BYTES") == b"\x02\0\0\0ab\x01\0\0\0c"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (struct.pack("<I", 10) + b"ab", "runs past the data"),
        (b"\x01\x00", "ends inside an element's 4-byte length"),
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 0), "has 2 BYTES elements but shape [1] needs 1"),
    ],
)
def test_bad_bytes_framing(raw, message):
    with pytest.raises(InferenceError, match=re.escape(message)) as info:
        codec._from_binary("t", "BYTES", (1,), raw)
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("values", "datatype", "message"),
    [
        ([300], "INT8", "out of range for INT8"),
        ([-1], "UINT32", "out of range for UINT32"),
        ([2**64], "UINT64", "out of range for UINT64"),
        ([1.5], "INT32", "INT32 data must be integers"),
        ([1], "BOOL", "BOOL data must be booleans"),
        ([1], "BYTES", "BYTES data must be strings"),
        ({"a": 1}, "FP32", "data must be a list"),
    ],
)
def test_bad_values(values, datatype, message):
    with pytest.raises(InferenceError, match=message):
        codec._from_values("t", datatype, (1,), values)


def test_requested_output_parameters():
    assert codec.requested_output("y", None) == codec.RequestedOutput("y", None)
    assert codec.requested_output("y", {"binary_data": True, "other": 1}).binary is True
    assert codec.binary_data_output({"binary_data_output": True}) is True
    with pytest.raises(InferenceError, match="'binary_data_output' must be a boolean"):
        codec.binary_data_output({"binary_data_output": 1})
    with pytest.raises(InferenceError, match="non-empty string"):
        codec.requested_output(None, {})
