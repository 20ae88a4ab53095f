"""Open Inference Protocol over HTTP/REST: a Starlette app that BentoML mounts at ``/v2``.

Routes follow KServe's v2 REST protocol (``docs/predict-api/v2/required_api.md``) plus Triton's binary
tensor data extension (``docs/protocol/extension_binary_data.md``), its model configuration endpoint
(``.../config``, a subset) and its repository index (``POST /v2/repository/index``). Paths below are
relative to the mount point::

    GET  /                                          server metadata (also ``GET /v2``, see below)
    GET  /health/live, /health/ready                200, or 503 when not ready
    GET  /models/{name}[/versions/{version}]        model metadata
    GET  /models/{name}[/versions/{version}]/ready  200, or 503 when not ready
    GET  /models/{name}[/versions/{version}]/config max_batch_size, input, output (Triton-style)
    POST /models/{name}[/versions/{version}]/infer  ?backend= picks the runtime
    POST /repository/index                          every model, version and state

Errors are ``{"error": "<message>"}`` with 400 (bad request), 404 (unknown model/version/route),
413 (body over ``max_request_bytes``), 503 (not ready) or 500 (a bug; logged with its traceback).

Starlette's ``Mount("/v2", app)`` only matches ``/v2/...``; a bare ``GET /v2`` gets a 307 redirect to
``/v2/`` from the parent router. :class:`MountRootMiddleware`, added to the parent app (BentoML:
``Service.add_asgi_middleware(MountRootMiddleware, prefix="/v2")``), serves it directly instead.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from kiln import __version__ as _KILN_VERSION
from serving.metrics import UNKNOWN_MODEL, record_request
from serving.oip import codec
from serving.repository import InferenceError, ModelRepository, ServedModel, TensorSpec

logger = logging.getLogger(__name__)

EXTENSIONS = ["binary_tensor_data", "model_configuration"]
_HEADER_LENGTH = "inference-header-content-length"  # binary tensor extension: bytes of JSON before the data
_TRITON_CONFIG_TYPES = {"BYTES": "TYPE_STRING"}  # model_config.proto names; the others are TYPE_<name>

Handler = Callable[[Request], Awaitable[Response]]


def create_oip_app(
    repo: ModelRepository,
    *,
    max_request_bytes: int,
    server_name: str = "kiln",
    server_version: str = _KILN_VERSION,
) -> Starlette:
    """Build the Open Inference Protocol HTTP app over ``repo``.

    Args:
        repo: The loaded models.
        max_request_bytes: Largest request body accepted; bigger ones get 413, whether announced by
            ``Content-Length`` or found while streaming a chunked body.
        server_name: ``name`` in the server metadata.
        server_version: ``version`` in the server metadata.

    Returns:
        A Starlette app whose routes are relative to its mount point (``/v2``).

    Raises:
        ValueError: ``max_request_bytes`` is not positive.
    """
    if max_request_bytes <= 0:
        raise ValueError(f"max_request_bytes must be positive, got {max_request_bytes}")

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": server_name, "version": server_version, "extensions": EXTENSIONS})

    async def live(request: Request) -> Response:
        return Response(status_code=200)

    async def ready(request: Request) -> Response:
        reason = repo.not_ready_reason()  # strict readiness: see ModelRepository
        return Response(status_code=200) if reason is None else _error(503, f"not ready: {reason}")

    async def model_metadata(request: Request) -> Response:
        model = _model(repo, request)
        return JSONResponse(
            {
                "name": model.name,
                "versions": sorted(repo.models[model.name]),
                "platform": model.platform,
                "inputs": [_tensor_metadata(spec) for spec in model.inputs],
                "outputs": [_tensor_metadata(spec) for spec in model.outputs],
            }
        )

    async def model_ready(request: Request) -> Response:
        return Response(status_code=200 if _model(repo, request).ready() else 503)

    async def model_config(request: Request) -> Response:
        model = _model(repo, request)
        batched = model.max_batch_size > 0  # Triton's dims leave out the batch dimension of batched models
        return JSONResponse(
            {
                "name": model.name,
                "version": model.version,
                "platform": model.platform,
                "backends": list(model.backends),
                "max_batch_size": model.max_batch_size,
                "input": [_config_tensor(spec, batched) for spec in model.inputs],
                "output": [_config_tensor(spec, batched) for spec in model.outputs],
            }
        )

    async def repository_index(request: Request) -> Response:
        body = await _read_body(request, max_request_bytes)
        only_ready = False
        if body.strip():
            options = _parse_json(bytes(body))
            only_ready = options.get("ready", False)
            if not isinstance(only_ready, bool):
                raise InferenceError(400, f"'ready' must be a boolean, got {only_ready!r}")
        return JSONResponse(
            [
                {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
                for e in repo.index()
                if e.state == "READY" or not only_ready
            ]
        )

    async def infer(request: Request) -> Response:
        start = time.perf_counter()
        labels = (UNKNOWN_MODEL, "", "")
        ok = False
        try:
            model = _model(repo, request)
            backend = request.query_params.get("backend") or None
            labels = (model.name, model.version, codec.backend_label(model, backend))
            codec.require_ready(model)
            body = await _read_body(request, max_request_bytes)
            header, binary = _split_body(body, request.headers.get(_HEADER_LENGTH))
            inputs, requested, binary_default = _parse_infer_request(header, binary)
            arrays = codec.decode_inputs(model, inputs)
            selected = codec.select_outputs(model, requested, binary_default=binary_default)
            results = await model.infer(arrays, backend=backend)
            response = _infer_response(
                model, header.get("id"), codec.encode_outputs(model, results, selected)
            )
            ok = True
            return response
        finally:
            record_request(*labels, "http", ok, time.perf_counter() - start)

    model_paths = ["/models/{name}", "/models/{name}/versions/{version}"]
    routes = [
        Route("/", _guarded(server_metadata), methods=["GET"]),
        Route("/health/live", _guarded(live), methods=["GET"]),
        Route("/health/ready", _guarded(ready), methods=["GET"]),
        Route("/repository/index", _guarded(repository_index), methods=["POST"]),
    ]
    for path in model_paths:
        routes += [
            Route(path, _guarded(model_metadata), methods=["GET"]),
            Route(f"{path}/ready", _guarded(model_ready), methods=["GET"]),
            Route(f"{path}/config", _guarded(model_config), methods=["GET"]),
            Route(f"{path}/infer", _guarded(infer), methods=["POST"]),
        ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})


class MountRootMiddleware:
    """ASGI middleware for the app that mounts the OIP app: serves ``GET <prefix>`` as ``<prefix>/``.

    Without it the parent's router answers the bare prefix with a 307 redirect, which clients that do
    not follow redirects read as a failure.
    """

    def __init__(self, app: ASGIApp, prefix: str = "/v2"):
        self.app = app
        self.prefix = prefix.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Rewrite the path of a request for exactly the prefix, then pass it on."""
        if scope["type"] == "http" and scope["path"] == self.prefix:
            path = self.prefix + "/"
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await self.app(scope, receive, send)


def _guarded(handler: Handler) -> Handler:
    """Turn :class:`InferenceError` into its JSON error and anything unexpected into a logged 500."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        except InferenceError as exc:
            return _error(exc.status, exc.message)
        except Exception as exc:
            logger.exception("unhandled error serving %s %s", request.method, request.url.path)
            return _error(500, f"internal server error: {type(exc).__name__}: {exc}")

    return wrapper


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")


def _model(repo: ModelRepository, request: Request) -> ServedModel:
    return repo.get(request.path_params["name"], request.path_params.get("version"))


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def _config_tensor(spec: TensorSpec, batched: bool) -> dict[str, Any]:
    dims = list(spec.shape[1:] if batched else spec.shape)
    return {
        "name": spec.name,
        "data_type": _TRITON_CONFIG_TYPES.get(spec.datatype, f"TYPE_{spec.datatype}"),
        "dims": dims,
    }


async def _read_body(request: Request, limit: int) -> bytearray:
    """Read the body, refusing (413) one over ``limit`` bytes before reading it or while streaming it."""
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise InferenceError(
            400, f"Content-Encoding {encoding!r} is not supported; send the body uncompressed"
        )
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InferenceError(400, f"invalid Content-Length {declared!r}")
        if int(declared) > limit:
            raise InferenceError(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise InferenceError(413, f"request body is over the limit of {limit} bytes")
    return body


def _split_body(body: bytearray, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """Split a body into its JSON header and the binary tensor data after it."""
    if header_length is None:
        return _parse_json(body), memoryview(b"")
    if not header_length.isdigit() or int(header_length) > len(body):
        raise InferenceError(
            400,
            f"Inference-Header-Content-Length {header_length!r} is not a length within the "
            f"{len(body)}-byte body",
        )
    size = int(header_length)
    view = memoryview(body)
    return _parse_json(view[:size]), view[size:]


def _parse_json(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        value = json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InferenceError(400, f"malformed JSON in request body: {exc}") from None
    if not isinstance(value, dict):
        raise InferenceError(400, f"request body must be a JSON object, got {type(value).__name__}")
    return value


def _parse_infer_request(
    header: dict[str, Any], binary: memoryview
) -> tuple[list[codec.RequestTensor], list[codec.RequestedOutput], bool]:
    """Read the JSON inference request; binary inputs take their slices of ``binary`` in order."""
    parameters = _parameters(header.get("parameters"), "request")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InferenceError(400, "'inputs' must be a non-empty list of input tensors")
    inputs, offset = [], 0
    for item in raw_inputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InferenceError(400, f"each input must be an object with a string 'name', got {item!r:.100}")
        name = item["name"]
        size = _parameters(item.get("parameters"), f"input {name!r}").get("binary_data_size")
        if size is None:
            if "data" not in item:
                raise InferenceError(
                    400, f"input {name!r} has neither 'data' nor a 'binary_data_size' parameter"
                )
            data: Any = item["data"]
        else:
            if "data" in item:
                raise InferenceError(
                    400, f"input {name!r} has both 'data' and a 'binary_data_size' parameter"
                )
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InferenceError(
                    400, f"input {name!r}: 'binary_data_size' must be a non-negative integer"
                )
            if offset + size > len(binary):
                raise InferenceError(
                    400,
                    f"input {name!r}: binary_data_size {size} runs past the {len(binary)} bytes of binary "
                    "data (check Inference-Header-Content-Length)",
                )
            data = binary[offset : offset + size]
            offset += size
        inputs.append(codec.RequestTensor(name, item.get("datatype"), item.get("shape"), data))
    if offset != len(binary):
        raise InferenceError(
            400,
            f"request has {len(binary)} bytes of binary data but its inputs' binary_data_size "
            f"add up to {offset}",
        )
    raw_outputs = header.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise InferenceError(400, "'outputs' must be a list")
    requested = []
    for item in raw_outputs:
        if not isinstance(item, dict):
            raise InferenceError(400, f"each requested output must be an object, got {item!r:.100}")
        name = item.get("name")
        requested.append(
            codec.requested_output(name, _parameters(item.get("parameters"), f"output {name!r}"))
        )
    return inputs, requested, codec.binary_data_output(parameters)


def _parameters(value: Any, owner: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InferenceError(400, f"{owner}: 'parameters' must be an object")
    return value


def _infer_response(model: ServedModel, request_id: Any, tensors: list[codec.ResponseTensor]) -> Response:
    outputs, chunks = [], []
    for tensor in tensors:
        output: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if tensor.binary:
            chunk = codec.to_bytes(tensor.array, tensor.datatype)
            output["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            output["data"] = codec.to_json(tensor.array, tensor.datatype)
        outputs.append(output)
    body: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "outputs": outputs}
    if request_id is not None:
        body["id"] = request_id
    header = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(
        b"".join([header, *chunks]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
