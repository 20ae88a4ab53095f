"""Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` on ``grpc.aio``, plus the
standard ``grpc.health.v1.Health`` service.

Implements the six RPCs of KServe's ``grpc_predict_v2.proto`` (ServerLive, ServerReady, ModelReady,
ServerMetadata, ModelMetadata, ModelInfer) and Triton's extensions that Kiln has (ModelStreamInfer,
ModelConfig, ModelStatistics, RepositoryIndex, RepositoryModelLoad/Unload); Triton's clients
(``tritonclient.grpc``) call the same methods with wire-compatible messages. Inputs come as
``raw_input_contents`` or typed ``contents``; outputs always go back as ``raw_output_contents``.
Request ``parameters``: ``backend`` (string) picks the runtime, ``timeout`` (µs) bounds the request, as
over HTTP. Model control needs metadata ``authorization: Bearer <KILN_ADMIN_TOKEN>``.

Health: service "" is the server's strict readiness, ``inference.GRPCInferenceService`` is SERVING
while the server is live, and each model name is SERVING while its default version is ready (Triton's
per-model readiness); unknown names are NOT_FOUND. The statuses are refreshed twice a second and after
every model-control call, so ``Watch`` streams changes.

:class:`~serving.repository.InferenceError` statuses map to gRPC codes (400 INVALID_ARGUMENT,
401 UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 NOT_FOUND, 413/429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE,
504 DEADLINE_EXCEEDED, anything else INTERNAL); a request over ``max_message_bytes`` is refused by gRPC
itself (RESOURCE_EXHAUSTED); a request that is not a valid protobuf message gets INVALID_ARGUMENT;
anything unexpected is logged and returned as INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from kiln import __version__ as _KILN_VERSION
from serving.batching import request_timeout, timeout_parameter
from serving.metrics import UNKNOWN_MODEL, record_request
from serving.oip import codec, control, datatypes
from serving.oip.http import EXTENSIONS
from serving.oip.proto import grpc_predict_v2_pb2 as pb
from serving.oip.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.repository import InferenceError, ModelRepository, ServedModel, StreamResponse, TensorSpec

logger = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
_STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,  # admission control: the model's queue is full
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,  # the request's timeout passed
}
_HEALTH_REFRESH_SECONDS = 0.5
# Typed-contents field holding each datatype (grpc_predict_v2.proto, InferTensorContents).
# FP16 has none: it can only be sent as raw_input_contents.
_CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The ``GRPCInferenceService`` RPCs over a :class:`~serving.repository.ModelRepository`.

    Args:
        repo: The loaded models.
        server_name: ``name`` in the server metadata.
        server_version: ``version`` in the server metadata.
    """

    def __init__(
        self,
        repo: ModelRepository,
        *,
        server_name: str = "kiln",
        server_version: str = _KILN_VERSION,
        admin_token: str = "",
        health: ModelHealth | None = None,
    ):
        self.repo = repo
        self.server_name = server_name
        self.server_version = server_version
        self.admin_token = admin_token
        self.health = health

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        """The server answers, so it is live."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        """Ready when every loaded model is ready."""
        return pb.ServerReadyResponse(ready=self.repo.ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """Whether one model (version) is ready; NOT_FOUND for an unknown one."""
        model = await _lookup(self.repo, request.name, request.version, context)
        return pb.ModelReadyResponse(ready=model.ready())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        """Server name, version and extensions (the same as over HTTP)."""
        return pb.ServerMetadataResponse(
            name=self.server_name, version=self.server_version, extensions=EXTENSIONS
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        """A model's versions, platform, inputs and outputs; NOT_FOUND for an unknown one."""
        model = await _lookup(self.repo, request.name, request.version, context)
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=sorted(self.repo.models[model.name]),
            platform=model.platform,
            inputs=[_tensor_metadata(spec) for spec in model.inputs],
            outputs=[_tensor_metadata(spec) for spec in model.outputs],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        """Validate, run and encode one inference request; records its metrics with protocol "grpc"."""
        try:
            return await self._infer(request)
        except InferenceError as exc:
            failure = (_status_code(exc), exc.message)
        except Exception as exc:
            logger.exception("unhandled error serving ModelInfer for %r", request.model_name)
            failure = (grpc.StatusCode.INTERNAL, f"internal server error: {type(exc).__name__}: {exc}")
        await context.abort(*failure)  # outside the except blocks: abort() raises to end the RPC

    async def ModelStreamInfer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's streaming inference, requests one after another in the order sent.

        A request to a model that streams (decoupled, in Triton's terms: the diffusion model's generation,
        sent with no input tensors and its settings as request parameters) gets one response per sampler
        step and a final one with the images, each with the parameter ``triton_final_response``; any
        other request gets one response, like Triton's non-decoupled models. A failed request gets its
        ``error_message`` and the stream goes on. A client that cancels the stream cancels the request
        in progress (its rows leave the denoiser batches)."""
        async for raw in requests:
            try:
                request = pb.ModelInferRequest.FromString(raw)
            except DecodeError as exc:
                yield pb.ModelStreamInferResponse(
                    error_message=f"malformed inference.ModelInferRequest: {exc}"
                )
                continue
            try:
                async for response in self._stream_one(request):
                    yield pb.ModelStreamInferResponse(infer_response=response)
            except InferenceError as exc:
                yield pb.ModelStreamInferResponse(error_message=f"{_status_code(exc).name}: {exc.message}")
            except Exception as exc:
                logger.exception("unhandled error serving ModelStreamInfer for %r", request.model_name)
                yield pb.ModelStreamInferResponse(
                    error_message=f"INTERNAL: internal server error: {type(exc).__name__}: {exc}"
                )

    async def _stream_one(self, request: pb.ModelInferRequest) -> AsyncIterator[pb.ModelInferResponse]:
        """The responses to one request of a stream (see :meth:`ModelStreamInfer`)."""
        model = self.repo.get(request.model_name, request.model_version)
        open_stream = getattr(model, "open_stream", None)  # serving.repository.StreamResponse's slot
        if open_stream is None or request.inputs:
            yield await self._infer(request)
            return
        start = time.perf_counter()
        labels = (model.name, model.version, "")
        ok = False
        try:
            parameters = {
                k: v for k, v in _parameters(request.parameters).items() if not k.startswith("triton_")
            }  # triton_enable_empty_final_response: every response says whether it is the final one
            backend = parameters.pop("backend", None)
            if backend is not None and not isinstance(backend, str):
                raise InferenceError(400, f"parameter 'backend' must be a string, got {backend!r}")
            backend = backend or None
            labels = (model.name, model.version, codec.backend_label(model, backend))
            timeout = timeout_parameter(parameters)
            parameters.pop("timeout", None)
            codec.require_ready(model)
            with request_timeout(timeout):  # the generation's task starts inside: it keeps the deadline
                responses = await open_stream(parameters, backend)
            async for response in responses:
                yield _stream_response(model, request.id, response)
            ok = True
        finally:
            record_request(*labels, "grpc", ok, time.perf_counter() - start)

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        start = time.perf_counter()
        labels = (UNKNOWN_MODEL, "", "")
        ok = False
        try:
            model = self.repo.get(request.model_name, request.model_version)
            parameters = _parameters(request.parameters)
            backend = parameters.get("backend")
            if backend is not None and not isinstance(backend, str):
                raise InferenceError(400, f"parameter 'backend' must be a string, got {backend!r}")
            backend = backend or None
            labels = (model.name, model.version, codec.backend_label(model, backend))
            codec.require_ready(model)
            arrays = codec.decode_inputs(model, _request_tensors(request))
            requested = [codec.requested_output(o.name, _parameters(o.parameters)) for o in request.outputs]
            selected = codec.select_outputs(model, requested)
            with request_timeout(timeout_parameter(parameters)):  # the call's deadline applies as well
                results = await model.infer(arrays, backend=backend)
            response = _infer_response(model, request.id, codec.encode_outputs(model, results, selected))
            ok = True
            return response
        finally:
            record_request(*labels, "grpc", ok, time.perf_counter() - start)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        """Triton's model configuration (the subset Kiln fills in); NOT_FOUND for an unknown model."""
        model = await _lookup(self.repo, request.name, request.version, context)
        batched = model.max_batch_size > 0  # dims leave out the batch dimension of batched models
        config = pb.ModelConfig(
            name=model.name,
            platform=model.platform,
            backend=model.backends[0],
            max_batch_size=model.max_batch_size,
            input=[
                pb.ModelInput(name=t.name, data_type=_config_type(t.datatype), dims=_dims(t, batched))
                for t in model.inputs
            ],
            output=[
                pb.ModelOutput(name=t.name, data_type=_config_type(t.datatype), dims=_dims(t, batched))
                for t in model.outputs
            ],
        )
        triton = getattr(model, "triton_config_proto", None)
        if triton:  # a Triton repository model (serving.triton): its whole config.pbtxt, as Triton answers.
            # Kiln's ModelConfig is a wire-compatible subset of Triton's: the fields it lacks
            # (dynamic_batching, instance_group, reshape, label_filename...) travel as unknown fields.
            config = pb.ModelConfig.FromString(triton)
            config.backend = model.backends[0]
        config.parameters["backends"].string_value = ",".join(model.backends)
        config.parameters["version"].string_value = model.version
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        """Triton's statistics extension: every model, one model's versions, or one version."""
        try:
            entries = control.statistics(self.repo, request.name, request.version)
        except InferenceError as exc:
            await context.abort(_status_code(exc), exc.message)
        return json_format.ParseDict({"model_stats": entries}, pb.ModelStatisticsResponse())

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        """Every model version, its state and the reason it is UNAVAILABLE."""
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version, state=e.state, reason=e.reason
                )
                for e in self.repo.index()
                if e.state == "READY" or not request.ready
            ]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        """Load a model (version) and make it the default; needs the admin token."""
        await self._control(control.load, request, context)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        """Unload a model (version); needs the admin token."""
        await self._control(control.unload, request, context)
        return pb.RepositoryModelUnloadResponse()

    async def _control(self, action, request, context: grpc.aio.ServicerContext) -> None:
        try:
            control.authorize(self.admin_token, dict(context.invocation_metadata()).get("authorization"))
            await action(self.repo, request.model_name, _parameters(request.parameters))
        except InferenceError as exc:
            failure = (_status_code(exc), exc.message)
        else:
            if self.health is not None:
                await self.health.refresh()
            return
        await context.abort(*failure)


class ModelHealth:
    """``grpc.health.v1.Health`` (grpcio-health-checking's servicer) kept in step with the repository."""

    def __init__(self, repo: ModelRepository):
        self.repo = repo
        self.servicer = health_aio.HealthServicer()
        self._task: asyncio.Task | None = None

    async def refresh(self) -> None:
        """Set every service's status from the repository now."""
        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        await self.servicer.set("", serving if self.repo.ready() else not_serving)
        await self.servicer.set(SERVICE_NAME, serving)
        for entry in self.repo.index():
            try:
                ready = self.repo.get(entry.name).ready()
            except InferenceError:
                ready = False
            await self.servicer.set(entry.name, serving if ready else not_serving)

    async def start(self, server: grpc.aio.Server) -> None:
        """Set the statuses, then refresh them until ``server`` stops."""
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._run(server))

    async def _run(self, server: grpc.aio.Server) -> None:
        while await server.wait_for_termination(timeout=_HEALTH_REFRESH_SECONDS):  # True: timed out
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - health must keep reporting; the error is logged
                logger.exception("refreshing gRPC health statuses failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.servicer.enter_graceful_shutdown()


async def start_grpc_server(
    repo: ModelRepository,
    *,
    host: str = "0.0.0.0",
    port: int,
    max_message_bytes: int,
    server_name: str = "kiln",
    server_version: str = _KILN_VERSION,
    share_port: bool = False,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    admin_token: str = "",
) -> grpc.aio.Server:
    """Start the gRPC Open Inference Protocol server on ``host:port``.

    Args:
        repo: The loaded models.
        host: Interface to listen on.
        port: TCP port to listen on.
        max_message_bytes: Largest request message accepted; gRPC refuses bigger ones with
            RESOURCE_EXHAUSTED before they reach the servicer.
        server_name: ``name`` in the server metadata.
        server_version: ``version`` in the server metadata.
        share_port: let several processes bind the same port (SO_REUSEPORT), as the server's worker
            processes do when there is more than one; off, a busy port fails at start-up.
        interceptors: server interceptors (the SIGTERM drain's, serving.admission.DrainInterceptor).
        admin_token: Bearer token model control requires ("" turns it off).

    Returns:
        The started server; stop it with ``await server.stop(grace)``.

    Raises:
        ValueError: ``max_message_bytes`` is not positive.
        RuntimeError: the address could not be bound.
    """
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
    # so_reuseport off unless asked: a second server on a busy port must fail, not silently share it.
    options = [("grpc.max_receive_message_length", max_message_bytes), ("grpc.so_reuseport", int(share_port))]
    server = grpc.aio.server(options=options, interceptors=list(interceptors))
    health = ModelHealth(repo)
    servicer = InferenceServicer(
        repo, server_name=server_name, server_version=server_version, admin_token=admin_token, health=health
    )
    server.add_generic_rpc_handlers([_service_handler(servicer)])
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    address = f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        await server.stop(None)
        raise RuntimeError(f"could not bind the gRPC server to {address}; is the port in use?")
    await server.start()
    await health.start(server)
    logger.info("Open Inference Protocol gRPC server listening on %s", address)
    return server


def _service_handler(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """The service's method handlers, each parsing its own request so that malformed bytes get
    INVALID_ARGUMENT (gRPC's own deserialisation failure would surface as INTERNAL)."""
    methods = {
        "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
        "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
        "ModelConfig": (pb.ModelConfigRequest, pb.ModelConfigResponse),
        "ModelStatistics": (pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
        "RepositoryIndex": (pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
        "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse),
        "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            _parsing(getattr(servicer, name), request_type),
            request_deserializer=None,  # raw bytes: parsed by _parsing
            response_serializer=response_type.SerializeToString,
        )
        for name, (request_type, response_type) in methods.items()
    }
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer,
        request_deserializer=None,  # raw bytes: a malformed one gets its error_message, the stream goes on
        response_serializer=pb.ModelStreamInferResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def _parsing(
    method: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]], request_type: type[Message]
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message]]:
    async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        try:
            request = request_type.FromString(raw)
        except DecodeError as exc:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"malformed {request_type.DESCRIPTOR.full_name} message: {exc}",
            )
        return await method(request, context)

    return handler


async def _lookup(
    repo: ModelRepository, name: str, version: str, context: grpc.aio.ServicerContext
) -> ServedModel:
    try:
        return repo.get(name, version)
    except InferenceError as exc:
        await context.abort(_status_code(exc), exc.message)
        raise  # not reached: abort() raises


def _status_code(exc: InferenceError) -> grpc.StatusCode:
    return _STATUS_CODES.get(exc.status, grpc.StatusCode.INTERNAL)


def _config_type(datatype: str) -> int:
    return pb.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    return list(spec.shape[1:] if batched else spec.shape)


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=list(spec.shape)
    )


def _parameters(parameters: Any) -> dict[str, Any]:
    """An ``InferParameter`` map as plain Python values (unset parameters are left out)."""
    values = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            values[key] = getattr(parameter, choice)
    return values


def _request_tensors(request: pb.ModelInferRequest) -> list[codec.RequestTensor]:
    """Pair each input with its raw contents or typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InferenceError(
            400, f"raw_input_contents has {len(raw)} entries but the request has {len(request.inputs)} inputs"
        )
    tensors = []
    for index, tensor in enumerate(request.inputs):
        if raw:
            if tensor.HasField("contents"):
                raise InferenceError(
                    400, f"input {tensor.name!r} has typed contents but the request uses raw_input_contents"
                )
            data: Any = raw[index]
        else:
            field = _CONTENTS_FIELDS.get(tensor.datatype)
            if field is None and tensor.datatype == "FP16":
                raise InferenceError(
                    400,
                    f"input {tensor.name!r}: FP16 has no typed contents field; send it in raw_input_contents",
                )
            # An unknown datatype leaves no data here; decode_inputs reports the datatype first.
            data = list(getattr(tensor.contents, field)) if field else None
        tensors.append(codec.RequestTensor(tensor.name, tensor.datatype, tuple(tensor.shape), data))
    return tensors


def _stream_response(model: ServedModel, request_id: str, response: StreamResponse) -> pb.ModelInferResponse:
    tensors = [
        codec.ResponseTensor(name, datatypes.from_numpy(array.dtype), tuple(array.shape), array, True)
        for name, array in response.outputs.items()
    ]
    message = _infer_response(model, request_id, tensors)
    for key, value in {**response.parameters, "triton_final_response": response.final}.items():
        parameter = message.parameters[key]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int):
            parameter.int64_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        else:
            parameter.string_param = str(value)
    return message


def _infer_response(
    model: ServedModel, request_id: str, tensors: list[codec.ResponseTensor]
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request_id)
    for tensor in tensors:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
        response.raw_output_contents.append(codec.to_bytes(tensor.array, tensor.datatype))
    return response
