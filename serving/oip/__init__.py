"""Open Inference Protocol (KServe v2 / Triton) front-ends over HTTP and gRPC.

- :mod:`serving.oip.datatypes`: OIP datatype names and their numpy dtypes.
- :mod:`serving.oip.codec`: request validation and tensor (de)serialisation, shared by both protocols.
- :mod:`serving.oip.http`: the Starlette app BentoML mounts at ``/v2`` (JSON + binary tensor extension).
- :mod:`serving.oip.grpc_server`: ``inference.GRPCInferenceService`` on ``grpc.aio``.

The protocol is KServe's "Predict Protocol - Version 2" (``docs/predict-api/v2/required_api.md``) with
Triton's binary tensor data extension (``docs/protocol/extension_binary_data.md``).
"""
