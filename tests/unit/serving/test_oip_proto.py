"""The committed gRPC modules are what ``serving/oip/proto/generate.py`` produces from the .proto."""

from __future__ import annotations

from serving.oip.proto import generate


def test_generated_modules_are_up_to_date(tmp_path):
    for path in generate.generate(tmp_path):
        committed = generate.PROTO_DIR / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale; run `python -m serving.oip.proto.generate` and commit the result"
        )


def test_modules_import_package_relative_alongside_tritons():
    import tritonclient.grpc.service_pb2  # noqa: F401  (same message names, other descriptor pool)

    from serving.oip.proto import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc

    assert grpc_predict_v2_pb2.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"
    assert grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub is not None
