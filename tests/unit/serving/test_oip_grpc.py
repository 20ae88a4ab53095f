"""The Open Inference Protocol gRPC server on a real localhost port, over test-double models.

Driven by an unmodified third-party client (``tritonclient.grpc``) and by the generated stub for the
cases that client can not produce (typed contents, malformed messages).
"""

from __future__ import annotations

import asyncio
import struct
import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2 as triton_config_pb
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.utils import InferenceServerException

from serving.oip import grpc_server
from serving.oip.proto import grpc_predict_v2_pb2 as pb
from serving.oip.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.repository import InferenceError

MAX_MESSAGE = 64 * 1024
X = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]], dtype=np.float32)


@pytest.fixture(scope="module")
def target(module_repo, free_port):
    """``host:port`` of a started server, run on its own event loop in a background thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    port = free_port()
    start = grpc_server.start_grpc_server(
        module_repo, host="127.0.0.1", port=port, max_message_bytes=MAX_MESSAGE
    )
    server = asyncio.run_coroutine_threadsafe(start, loop).result(timeout=10)
    yield f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.close()


@pytest.fixture
def triton(target):
    client = grpcclient.InferenceServerClient(target)
    yield client
    client.close()


@pytest.fixture
def stub(target):
    with grpc.insecure_channel(target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
def recorded(monkeypatch):
    calls = []
    monkeypatch.setattr(grpc_server, "record_request", lambda *args: calls.append(args))
    return calls


def _x_input(x: np.ndarray = X, datatype: str = "FP32") -> grpcclient.InferInput:
    inp = grpcclient.InferInput("x", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def _code(stub_call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub_call(request)
    return info.value.code(), info.value.details()


def test_health_and_metadata_with_tritonclient(triton):
    assert triton.is_server_live()
    assert not triton.is_server_ready()  # the "cold" test double is not ready
    assert triton.is_model_ready("linear") and triton.is_model_ready("linear", "1")
    assert not triton.is_model_ready("cold")
    server = triton.get_server_metadata(as_json=True)
    assert server["name"] == "kiln" and "binary_tensor_data" in server["extensions"]
    meta = triton.get_model_metadata("linear", as_json=True)
    assert (
        meta["name"] == "linear"
        and meta["versions"] == ["1", "2"]
        and meta["platform"] == "numpy_test_double"
    )
    assert meta["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": ["-1", "3"]}
    ]  # int64 as JSON strings
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as info:
        triton.get_model_metadata("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_infer_with_tritonclient(triton, module_repo, linear_reference, recorded):
    result = triton.infer("linear", [_x_input()], request_id="abc")
    np.testing.assert_allclose(result.as_numpy("y"), linear_reference(X), rtol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("argmax"), linear_reference(X).argmax(1))
    response = result.get_response()
    assert response.model_name == "linear" and response.model_version == "2" and response.id == "abc"
    assert recorded[-1][:5] == ("linear", "2", "numpy", "grpc", True)

    outputs = [grpcclient.InferRequestedOutput("argmax")]
    result = triton.infer(
        "linear", [_x_input()], model_version="1", outputs=outputs, parameters={"backend": "double"}
    )
    assert [o.name for o in result.get_response().outputs] == ["argmax"]
    assert module_repo.get("linear", "1").calls[-1] == "double"


def test_bytes_and_fp16_with_tritonclient(triton):
    arrays = {
        "text": np.array([b"a", b"", "ü".encode()], dtype=object),
        "flag": np.array([True, False]),
        "small": np.array([-3, 4], dtype=np.int8),
        "big": np.array([2**64 - 1], dtype=np.uint64),
        "half": np.array([0.5, -2.0], dtype=np.float16),
    }
    datatypes = {"text": "BYTES", "flag": "BOOL", "small": "INT8", "big": "UINT64", "half": "FP16"}
    inputs = []
    for name, array in arrays.items():
        inp = grpcclient.InferInput(name, list(array.shape), datatypes[name])
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    result = triton.infer("echo", inputs)
    for name, array in arrays.items():
        np.testing.assert_array_equal(result.as_numpy(f"{name}_out"), array)


@pytest.mark.parametrize(
    ("model", "x", "datatype", "code", "message"),
    [
        ("linear", np.zeros((2, 2), np.float32), "FP32", "INVALID_ARGUMENT", "dimension 1 is wrong"),
        ("linear", np.zeros((5, 3), np.float32), "FP32", "INVALID_ARGUMENT", "max_batch_size 4"),
        ("linear", np.zeros((2, 3), np.float64), "FP64", "INVALID_ARGUMENT", "expects FP32"),
        ("linear", np.full((1, 3), np.nan, np.float32), "FP32", "INVALID_ARGUMENT", "NaN or infinite"),
        ("nope", X, "FP32", "NOT_FOUND", "unknown model 'nope'"),
        ("cold", X, "FP32", "UNAVAILABLE", "is not ready"),
        ("broken", X, "FP32", "INTERNAL", "RuntimeError: runtime exploded"),
        # 80 KB of tensor data against a 64 KiB max_message_bytes: refused by gRPC before the servicer.
        ("linear", np.zeros((4, 5000), np.float32), "FP32", "RESOURCE_EXHAUSTED", "larger than max"),
    ],
)
def test_bad_requests_with_tritonclient(triton, model, x, datatype, code, message):
    with pytest.raises(InferenceServerException, match=message) as info:
        triton.infer(model, [_x_input(x, datatype)])
    assert info.value.status() == f"StatusCode.{code}"
    assert triton.is_server_live()  # still serving


def test_unknown_backend_and_output(triton, recorded):
    with pytest.raises(InferenceServerException, match="no backend 'gpu'") as info:
        triton.infer("linear", [_x_input()], parameters={"backend": "gpu"})
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert recorded[-1][:5] == ("linear", "2", "_unknown_", "grpc", False)
    with pytest.raises(InferenceServerException, match="unknown output 'logits'"):
        triton.infer("linear", [_x_input()], outputs=[grpcclient.InferRequestedOutput("logits")])


def _request(**tensor_fields) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="linear")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 3], **tensor_fields)
    return request


def test_typed_contents(stub, linear_reference):
    request = _request(contents=pb.InferTensorContents(fp32_contents=X.reshape(-1).tolist()))
    response = stub.ModelInfer(request)
    y = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))
    np.testing.assert_allclose(y, linear_reference(X), rtol=1e-6)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (_request(contents=pb.InferTensorContents(fp32_contents=[1.0, 2.0])), "has 2 data elements"),
        (
            _request(contents=pb.InferTensorContents(fp64_contents=X.reshape(-1).tolist())),
            "has 0 data elements",
        ),
        (
            pb.ModelInferRequest(
                model_name="linear", inputs=[pb.ModelInferRequest.InferInputTensor(name="x")]
            ),
            "unknown datatype ''",
        ),
        (_request(), "has 0 data elements"),
        (
            pb.ModelInferRequest(
                model_name="linear", inputs=[_request().inputs[0]], raw_input_contents=[X.tobytes(), b""]
            ),
            "raw_input_contents has 2 entries but the request has 1 inputs",
        ),
        (
            pb.ModelInferRequest(
                model_name="linear",
                inputs=[_request(contents=pb.InferTensorContents(fp32_contents=[1.0] * 6)).inputs[0]],
                raw_input_contents=[X.tobytes()],
            ),
            "has typed contents but the request uses raw_input_contents",
        ),
        (
            pb.ModelInferRequest(
                model_name="linear", inputs=[_request().inputs[0]], raw_input_contents=[b"\0" * 20]
            ),
            "has 20 bytes of binary data but shape [2, 3] of FP32 needs 24",
        ),
        (pb.ModelInferRequest(model_name="linear"), "missing input(s) ['x']"),
    ],
)
def test_bad_typed_and_raw_contents_are_invalid_argument(stub, request_, message):
    code, details = _code(stub.ModelInfer, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details


def test_fp16_needs_raw_contents_and_backend_must_be_a_string(stub):
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="half", datatype="FP16", shape=[1])
    code, details = _code(stub.ModelInfer, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "FP16 has no typed contents field" in details
    request = _request(contents=pb.InferTensorContents(fp32_contents=[1.0] * 6))
    request.parameters["backend"].int64_param = 3
    code, details = _code(stub.ModelInfer, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'backend' must be a string" in details


@pytest.mark.parametrize(
    "payload", [b"\x0a\x05ab", b"\xff\xff\xff\xff", b"\x0a\x02\xc3\x28"]
)  # truncated, bad tag, bad UTF-8
def test_malformed_protobuf_is_invalid_argument(target, payload):
    with grpc.insecure_channel(target) as channel:
        for method in ("ModelInfer", "ModelMetadata"):
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")  # bytes in, bytes out
            with pytest.raises(grpc.RpcError) as info:
                call(payload)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed inference." in info.value.details()


def test_unknown_model_on_model_ready_is_not_found(stub):
    code, details = _code(stub.ModelReady, pb.ModelReadyRequest(name="linear", version="9"))
    assert code == grpc.StatusCode.NOT_FOUND and "no version '9'" in details


def _echo_request(half_datatype: str = "FP16") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="echo")
    request.outputs.add(name="text_out")
    for name, datatype in (("text", "BYTES"), ("flag", "BOOL"), ("small", "INT8"), ("big", "UINT64")):
        request.inputs.add(name=name, datatype=datatype, shape=[1])
    request.inputs.add(name="half", datatype=half_datatype, shape=[1])
    return request


def test_raw_contents_of_every_kind_and_a_requested_output(stub):
    request = _echo_request()
    text = struct.pack("<I", 2) + b"ab"
    request.raw_input_contents.extend([text, b"\x01", b"\xfb", struct.pack("<Q", 7), b"\x00\x3c"])
    response = stub.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["text_out"] and response.raw_output_contents == [text]
    assert response.outputs[0].datatype == "BYTES" and list(response.outputs[0].shape) == [1]


def test_typed_contents_datatype_mismatch(stub):
    request = _echo_request(half_datatype="FP32")
    request.inputs[-1].contents.fp32_contents.append(1.0)
    code, details = _code(stub.ModelInfer, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'half' has datatype FP32 but model 'echo' expects FP16" in details  # before any data


def test_messages_are_wire_compatible_with_tritons(target):
    """Every field of our messages has the same number, type and label in Triton's ``grpc_service.proto``
    (or ``model_config.proto`` for the model configuration), and every enum value the same number."""
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        triton_message = triton_pb.DESCRIPTOR.message_types_by_name.get(
            message.name
        ) or triton_config_pb.DESCRIPTOR.message_types_by_name.get(message.name)
        assert triton_message is not None, f"{message.name} is in neither of Triton's protos"
        _assert_fields_match(message, triton_message)
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        theirs = triton_config_pb.DESCRIPTOR.enum_types_by_name[enum.name]
        assert {v.name: v.number for v in enum.values} == {v.name: v.number for v in theirs.values}
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name
        assert method.output_type.full_name == other.output_type.full_name


def _assert_fields_match(ours, theirs) -> None:
    for field in ours.fields:
        other = theirs.fields_by_name[field.name]
        assert (field.number, field.type) == (other.number, other.type), field.full_name
        assert field.is_repeated == other.is_repeated, field.full_name
    for nested in ours.nested_types:
        _assert_fields_match(nested, theirs.nested_types_by_name[nested.name])


def test_start_rejects_bad_settings_and_busy_port(module_repo, target):
    async def start(**kwargs):
        return await grpc_server.start_grpc_server(module_repo, host="127.0.0.1", **kwargs)

    with pytest.raises(ValueError, match="max_message_bytes must be positive"):
        asyncio.run(start(port=0, max_message_bytes=0))
    with pytest.raises(RuntimeError):
        asyncio.run(start(port=int(target.rsplit(":", 1)[1]), max_message_bytes=1024))


def test_server_side_failures_are_internal_not_unknown():
    """InferenceError statuses without a gRPC counterpart (500 from a failed batch, anything unmapped)
    are INTERNAL; the client-error ones keep theirs."""
    assert grpc_server._status_code(InferenceError(500, "inference failed")) == grpc.StatusCode.INTERNAL
    assert grpc_server._status_code(InferenceError(418, "?")) == grpc.StatusCode.INTERNAL
    assert grpc_server._status_code(InferenceError(401, "token")) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_server._status_code(InferenceError(403, "token")) == grpc.StatusCode.PERMISSION_DENIED
