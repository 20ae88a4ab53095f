"""Open Inference Protocol over HTTP/REST: a FastAPI app that BentoML mounts at ``/v2``.

Routes follow KServe's v2 REST protocol (``docs/predict-api/v2/required_api.md``) plus Triton's
extensions: binary tensor data (``extension_binary_data.md``), classification
(``extension_classification.md``), model configuration (``.../config``, a subset), statistics
(``extension_statistics.md``) and model repository (index, load, unload). Paths are relative to the
mount point::

    GET  /                                          server metadata (also ``GET /v2``, see below)
    GET  /health/live, /health/ready                200, or 503 naming what is not ready (strict readiness)
    GET  /models/{name}[/versions/{version}]        model metadata
    GET  /models/{name}[/versions/{version}]/ready  200, or 503 when not ready / UNAVAILABLE
    GET  /models/{name}[/versions/{version}]/config max_batch_size, input, output, backends (Triton-style)
    GET  /models[/{name}[/versions/{version}]]/stats  Triton's statistics extension
    POST /models/{name}[/versions/{version}]/infer  ``parameters``: backend, timeout, binary_data_output
    POST /models/{name}[/versions/{version}]/generate         Triton's generate extension: JSON answer
    POST /models/{name}[/versions/{version}]/generate_stream  the same as server-sent events
    POST /repository/index                          every model version, its state and the reason
    POST /repository/models/{name}/load             model control (``Bearer $KILN_ADMIN_TOKEN``)
    POST /repository/models/{name}/unload           model control

Request ``parameters`` reach the model the same way over HTTP and gRPC: ``backend`` (string) picks the
runtime. The ``?backend=`` query parameter of earlier releases still works and is deprecated.

Generate (Triton's ``extension_generate.md``), for a model that streams (:class:`~serving.repository.
StreamResponse`; the diffusion model): the body's fields are the generation's settings (``/generate``'s
fields without model, version and backend, plus ``preview_every`` when streaming) and ``parameters``
holds ``backend`` and ``timeout``. Each response is one JSON object: ``model_name``, ``model_version``,
the response's parameters and its outputs by name (BYTES outputs, the PNGs, as base64 strings).
``generate`` answers the final one; ``generate_stream`` sends every one as an SSE ``data:`` line (steps,
then the final one), and an error after the stream started as ``data: {"error": ...}``. Errors before
it started are the usual JSON errors.

Request bodies are parsed here, not by FastAPI (the binary extension appends raw bytes to the JSON), so
every error names the tensor or field; the pydantic models of :mod:`serving.oip.schemas` describe the
bodies in the OpenAPI document BentoML serves at ``/docs.json``. Errors are ``{"error": "<message>"}``
with 400 (bad request), 401/403 (model control without / with a wrong token), 404 (unknown
model/version/route), 413 (body over ``max_request_bytes``), 503 (not ready) or 500 (a bug; logged).

Starlette's ``Mount("/v2", app)`` only matches ``/v2/...``; a bare ``GET /v2`` gets a 307 redirect to
``/v2/`` from the parent router. :class:`MountRootMiddleware`, added to the parent app (BentoML:
``Service.add_asgi_middleware(MountRootMiddleware, prefix="/v2")``), serves it directly instead.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from kiln import __version__ as _KILN_VERSION
from serving import sse
from serving.batching import request_timeout, timeout_parameter
from serving.metrics import UNKNOWN_MODEL, record_request
from serving.oip import codec, control, schemas
from serving.repository import InferenceError, ModelRepository, ServedModel, StreamResponse, TensorSpec
from serving.routes import REQUEST_ID_HEADER, error_response, internal_error_response, json_safe

logger = logging.getLogger(__name__)

EXTENSIONS = [
    "binary_tensor_data",
    "classification",
    "generate",  # Triton's generate extension, for a model that streams (diffusion: generate_stream)
    "model_configuration",
    "model_repository",  # unload_dependents is accepted and moot: no Kiln model depends on another
    "statistics",
]
_HEADER_LENGTH = "inference-header-content-length"  # binary tensor extension: bytes of JSON before the data
_TRITON_CONFIG_TYPES = {"BYTES": "TYPE_STRING"}  # model_config.proto names; the others are TYPE_<name>

Handler = Callable[[Request], Awaitable[Response]]


def create_oip_app(
    repo: ModelRepository,
    *,
    max_request_bytes: int,
    server_name: str = "kiln",
    server_version: str = _KILN_VERSION,
    admin_token: str = "",
    model_examples: list[str] | None = None,
) -> FastAPI:
    """Build the Open Inference Protocol HTTP app over ``repo``.

    Args:
        repo: The loaded models.
        max_request_bytes: Largest request body accepted; bigger ones get 413, whether announced by
            ``Content-Length`` or found while streaming a chunked body.
        server_name: ``name`` in the server metadata.
        server_version: ``version`` in the server metadata.
        admin_token: Bearer token that model control (load/unload) requires; "" turns it off.
        model_examples: Model names the OpenAPI document gives as examples of ``{name}``.

    Returns:
        A FastAPI app whose routes are relative to its mount point (``/v2``).

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
                "backend": model.backends[0],
                "backends": list(model.backends),
                "max_batch_size": model.max_batch_size,
                "input": [_config_tensor(spec, batched) for spec in model.inputs],
                "output": [_config_tensor(spec, batched) for spec in model.outputs],
                # A Triton repository model (serving.triton): its whole config.pbtxt, as Triton answers.
                **(getattr(model, "triton_config", None) or {}),
            }
        )

    async def model_stats(request: Request) -> Response:
        name = request.path_params.get("name", "")
        return JSONResponse(
            {"model_stats": control.statistics(repo, name, request.path_params.get("version", ""))}
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

    async def _control_parameters(request: Request) -> dict[str, Any]:
        control.authorize(admin_token, request.headers.get("authorization"))
        body = await _read_body(request, max_request_bytes)
        return _parameters(_parse_json(body).get("parameters"), "request") if body.strip() else {}

    async def load(request: Request) -> Response:
        parameters = await _control_parameters(request)
        return JSONResponse(await control.load(repo, request.path_params["name"], parameters))

    async def unload(request: Request) -> Response:
        parameters = await _control_parameters(request)
        return JSONResponse(await control.unload(repo, request.path_params["name"], parameters))

    async def infer(request: Request) -> Response:
        start = time.perf_counter()
        labels = (UNKNOWN_MODEL, "", "")
        ok = False
        try:
            model = _model(repo, request)
            body = await _read_body(request, max_request_bytes)
            header, binary = _split_body(body, request.headers.get(_HEADER_LENGTH))
            parameters = _parameters(header.get("parameters"), "request")
            backend = _backend(parameters, request.query_params.get("backend"))
            labels = (model.name, model.version, codec.backend_label(model, backend))
            codec.require_ready(model)
            inputs, requested, binary_default = _parse_infer_request(header, binary)
            arrays = codec.decode_inputs(model, inputs)
            selected = codec.select_outputs(model, requested, binary_default=binary_default)
            timeout = timeout_parameter(parameters)
            with request_timeout(None if timeout is None else timeout - (time.perf_counter() - start)):
                results = await model.infer(arrays, backend=backend)
            response = _infer_response(
                model, header.get("id"), codec.encode_outputs(model, results, selected)
            )
            ok = True
            return response
        finally:
            record_request(*labels, "http", ok, time.perf_counter() - start)

    async def open_generation(
        request: Request, streamed: bool
    ) -> tuple[ServedModel, str | None, AsyncIterator[StreamResponse]]:
        """Validate a generate request and start it (raises before anything is sent)."""
        model = _model(repo, request)
        open_stream = getattr(model, "open_stream", None)
        if open_stream is None:
            streaming = sorted(
                n
                for n, versions in repo.models.items()
                if any(hasattr(m, "open_stream") for m in versions.values())
            )
            raise InferenceError(
                400, f"model {model.name!r} does not generate (use /infer); models that do: {streaming}"
            )
        body = await _read_body(request, max_request_bytes)
        fields = _parse_json(body) if body.strip() else {}
        parameters = _parameters(fields.pop("parameters", None), "request")
        unknown = sorted(set(parameters) - {"backend", "timeout"})
        if unknown:
            raise InferenceError(
                400,
                f"unknown request parameters {unknown}: 'parameters' takes backend and timeout; "
                "the generation's settings are the body's fields",
            )
        if not streamed and "preview_every" in fields:
            raise InferenceError(400, "preview_every: previews are only sent by generate_stream")
        backend = _backend(parameters, None)
        timeout = timeout_parameter(parameters)
        codec.require_ready(model)
        with request_timeout(timeout):  # the generation's task starts inside: it keeps the deadline
            responses = await open_stream(fields, backend)
        return model, backend, responses

    async def generate(request: Request) -> Response:
        start = time.perf_counter()
        labels = (UNKNOWN_MODEL, "", "")
        ok = False
        try:
            model, backend, responses = await open_generation(request, streamed=False)
            labels = (model.name, model.version, codec.backend_label(model, backend))
            final = None
            async for response in responses:
                if response.final:
                    final = response
            if final is None:
                raise InferenceError(500, f"model {model.name!r} ended its responses without a final one")
            ok = True
            return JSONResponse(_generate_json(model, final))
        finally:
            record_request(*labels, "http", ok, time.perf_counter() - start)

    async def generate_stream(request: Request) -> Response:
        start = time.perf_counter()
        try:
            model, backend, responses = await open_generation(request, streamed=True)
        except BaseException:
            record_request(UNKNOWN_MODEL, "", "", "http", False, time.perf_counter() - start)
            raise
        labels = (model.name, model.version, codec.backend_label(model, backend))

        async def events() -> AsyncIterator[bytes]:
            ok = False
            try:
                async for response in responses:
                    yield sse.encode_event(json.dumps(_generate_json(model, response), separators=(",", ":")))
                ok = True
            except InferenceError as exc:
                yield sse.encode_event(json.dumps({"error": exc.message}))
            except Exception as exc:  # noqa: BLE001 - the stream has started: the error goes in it
                logger.exception("unhandled error streaming %s", request.url.path)
                yield sse.encode_event(
                    json.dumps({"error": f"internal server error: {type(exc).__name__}: {exc}"})
                )
            finally:
                record_request(*labels, "http", ok, time.perf_counter() - start)

        return StreamingResponse(events(), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)

    app = FastAPI(
        title="Kiln Open Inference Protocol",
        version=server_version,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # BentoML serves the merged document at /docs.json
    )
    app.add_exception_handler(HTTPException, _http_exception)
    app.state.infer = _guarded(infer)  # InferFastPath's way to the same handler, past the routers

    def route(path: str, handler: Handler, method: str, ok: type[BaseModel] | None, **doc: Any) -> None:
        responses: dict[int | str, Any] = {
            code: {"model": schemas.Error, "description": why} for code, why in doc.pop("errors", {}).items()
        }
        responses[200] = {"model": ok, "description": "OK"} if ok else {"description": "OK (empty body)"}
        if doc.pop("streamed", False):  # server-sent events, each one's data the JSON of ``ok``
            responses[200]["content"] = {sse.MEDIA_TYPE: {"schema": {"type": "string"}}}
        app.add_api_route(
            path,
            _guarded(handler),
            methods=[method],
            responses=responses,
            openapi_extra=_operation_extra(
                path, doc.pop("body", None), doc.pop("admin", False), model_examples or []
            ),
            response_class=JSONResponse,
            include_in_schema=True,
            operation_id=doc.pop("operation_id"),
            summary=doc.pop("summary"),
            tags=["Open Inference Protocol"],
        )

    not_found = {404: "Unknown model or version."}
    unavailable = {503: "The model is not ready or UNAVAILABLE (the error says why)."}
    route(
        "/",
        server_metadata,
        "GET",
        schemas.ServerMetadata,
        operation_id="server_metadata",
        summary="Server name, version and protocol extensions",
    )
    route("/health/live", live, "GET", None, operation_id="server_live", summary="The server answers")
    route(
        "/health/ready",
        ready,
        "GET",
        None,
        operation_id="server_ready",
        summary="Every configured model is ready (strict readiness)",
        errors={503: "Not ready, and why."},
    )
    route(
        "/repository/index",
        repository_index,
        "POST",
        None,
        operation_id="repository_index",
        summary="Every model version, its state and why it is UNAVAILABLE",
        body=schemas.RepositoryIndexRequest,
        errors={400: "Malformed body."},
    )
    admin_errors = {
        400: "Malformed body or a model that failed to load (the error says why).",
        401: "No admin token.",
        403: "Wrong admin token (KILN_ADMIN_TOKEN, else the one in $KILN_HOME/admin-token).",
        404: "Unknown model or version.",
    }
    for verb, handler, ok in (
        ("load", load, schemas.LoadResponse),
        ("unload", unload, schemas.UnloadResponse),
    ):
        route(
            f"/repository/models/{{name}}/{verb}",
            handler,
            "POST",
            ok,
            operation_id=f"repository_model_{verb}",
            summary=f"Model control: {verb} a model (version)",
            body=schemas.ModelControlRequest,
            admin=True,
            errors=admin_errors,
        )
    route(
        "/models/stats",
        model_stats,
        "GET",
        schemas.ModelStatisticsResponse,
        operation_id="statistics",
        summary="Statistics of every loaded model",
    )
    for path, suffix in (("/models/{name}", ""), ("/models/{name}/versions/{version}", "_version")):
        route(
            path,
            model_metadata,
            "GET",
            schemas.ModelMetadata,
            operation_id=f"model_metadata{suffix}",
            summary="A model's versions, platform, inputs and outputs",
            errors={**not_found, **unavailable},
        )
        route(
            f"{path}/ready",
            model_ready,
            "GET",
            None,
            operation_id=f"model_ready{suffix}",
            summary="Whether the model is ready",
            errors={**not_found, **unavailable},
        )
        route(
            f"{path}/config",
            model_config,
            "GET",
            schemas.ModelConfig,
            operation_id=f"model_config{suffix}",
            summary="The model's configuration (Triton-style subset)",
            errors={**not_found, **unavailable},
        )
        route(
            f"{path}/stats",
            model_stats,
            "GET",
            schemas.ModelStatisticsResponse,
            operation_id=f"model_statistics{suffix}",
            summary="The model's statistics (Triton's extension)",
            errors=not_found,
        )
        route(
            f"{path}/infer",
            infer,
            "POST",
            schemas.InferenceResponse,
            operation_id=f"model_infer{suffix}",
            summary="Run inference (JSON, or JSON + binary tensor data)",
            body=schemas.InferenceRequest,
            errors={
                400: "Malformed request; the error names the tensor or field.",
                413: "Body over the server's limit.",
                429: "The model's queue is full.",
                **not_found,
                **unavailable,
            },
        )
        for verb, handler, what in (
            ("generate", generate, "the final response as JSON"),
            ("generate_stream", generate_stream, "every response as a server-sent event (text/event-stream)"),
        ):
            route(
                f"{path}/{verb}",
                handler,
                "POST",
                schemas.GenerateResponse,
                operation_id=f"model_{verb}{suffix}",
                summary=f"Triton's generate extension (a model that streams, e.g. diffusion): {what}",
                body=schemas.GenerateRequest,
                streamed=verb == "generate_stream",
                errors={
                    400: "Malformed request or a model that does not generate; the error names the field.",
                    413: "Body over the server's limit.",
                    429: "The model is over capacity.",
                    **not_found,
                    **unavailable,
                },
            )
    return app


def _generate_json(model: ServedModel, response: StreamResponse) -> dict[str, Any]:
    """A generate response: the model, the response's parameters, then its outputs by name (BYTES
    elements base64-encoded: they are PNGs, which are not UTF-8)."""
    body: dict[str, Any] = {"model_name": model.name, "model_version": model.version, **response.parameters}
    for name, array in response.outputs.items():
        if array.dtype == object:
            body[name] = [base64.b64encode(bytes(v)).decode() for v in array.ravel()]
        else:
            body[name] = array.tolist()
    return body


def _operation_extra(
    path: str, body: type[BaseModel] | None, admin: bool, model_examples: list[str]
) -> dict[str, Any]:
    """OpenAPI for what FastAPI cannot see: path parameters, request bodies (parsed by the handlers),
    the admin token."""
    extra: dict[str, Any] = {"parameters": []}
    for p in ("name", "version"):
        if "{" + p + "}" in path:
            parameter = {
                "name": p,
                "in": "path",
                "required": True,
                "schema": {"type": "string", "minLength": 1},
            }
            if p == "name" and model_examples:
                parameter["examples"] = {m: {"value": m} for m in model_examples}
            extra["parameters"].append(parameter)
    if path.endswith("/infer"):
        extra["parameters"].append(
            {
                "name": "backend",
                "in": "query",
                "required": False,
                "deprecated": True,
                "schema": {"type": "string"},
                "description": "Deprecated: use the request parameter 'backend'.",
            }
        )
    if body is not None:
        content: dict[str, Any] = {"application/json": {"schema": schemas.inline_schema(body)}}
        if body is schemas.InferenceRequest:
            content["application/octet-stream"] = {
                "schema": {"type": "string", "format": "binary"},
                "description": "Binary tensor data extension: Inference-Header-Content-Length bytes of JSON, "
                "then the tensors' bytes.",
            }
        extra["requestBody"] = {"required": body is schemas.InferenceRequest, "content": content}
    if admin:
        extra["parameters"].append(
            {
                "name": "Authorization",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "'Bearer <token>': the server's KILN_ADMIN_TOKEN.",
            }
        )
    return extra


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


class InferFastPath:
    """ASGI middleware for the app that mounts the OIP app: ``POST <prefix>/models/{name}[/versions/
    {version}]/infer`` goes straight to the OIP app's ``infer`` handler.

    The handler, its errors and its answers are the ones the mounted route has; what is skipped is the
    routing on the way there (the parent's and the OIP app's routers, FastAPI's dependency solving and
    exception middleware, BentoML's request context), which cost more CPU per request than the
    handler itself (py-spy of ``kiln serve`` under ``wrk`` at 32 connections, vit-soft: about 40% of
    the event loop's time against 25% in the handler). Middleware added before this one (body limit,
    drain, in-flight bound) still wraps it; any other method or path passes through unchanged.
    """

    def __init__(self, app: ASGIApp, oip: FastAPI, prefix: str = "/v2"):
        self.app = app
        self.handler: Handler = oip.state.infer
        # Starlette's {param} matches [^/]+ of the decoded path, as here.
        self.pattern = re.compile(
            rf"{re.escape(prefix.rstrip('/'))}/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer an infer request here; pass everything else on."""
        if scope["type"] == "http" and scope["method"] == "POST":
            match = self.pattern.fullmatch(scope["path"])
            if match:
                params = {k: v for k, v in match.groupdict().items() if v is not None}
                scope = {**scope, "path_params": params}
                response = await self.handler(Request(scope, receive))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _guarded(handler: Handler) -> Handler:
    """Turn :class:`InferenceError` into its JSON error and anything unexpected into a logged 500."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        except InferenceError as exc:
            return error_response(exc)
        except Exception as exc:  # noqa: BLE001 - answered and logged with a request id, never re-raised
            return internal_error_response(
                request.method, request.url.path, exc, request.headers.get(REQUEST_ID_HEADER, "")
            )

    return wrapper


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


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
        value = orjson.loads(data)  # several times faster than json on 1024-float tensors
    except orjson.JSONDecodeError:
        # What orjson refuses and the json module reads (NaN / Infinity literals, integers past 64
        # bits, deeper nesting) or refuses with its own message: parsed again by json, so every body
        # gets the same answer (the codec's 4xx naming the tensor, or json's error) as before.
        value = _parse_json_stdlib(data)
    if not isinstance(value, dict):
        raise InferenceError(400, f"request body must be a JSON object, got {type(value).__name__}")
    return value


def _parse_json_stdlib(data: bytes | bytearray | memoryview) -> Any:
    try:
        return json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InferenceError(400, f"malformed JSON in request body: {exc}") from None
    except RecursionError:
        raise InferenceError(400, "JSON in request body is nested too deeply") from None


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


def _backend(parameters: dict[str, Any], query: str | None) -> str | None:
    """The backend a request asks for: request parameter ``backend``, or the deprecated query parameter."""
    backend = parameters.get("backend")
    if backend is not None and not isinstance(backend, str):
        raise InferenceError(400, f"parameter 'backend' must be a string, got {backend!r}")
    if query and backend and query != backend:
        raise InferenceError(400, f"?backend={query} and parameter 'backend'={backend!r} disagree; send one")
    return backend or query or None


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
        body["id"] = json_safe(request_id)  # echoed as sent; a NaN parsed by the lenient reader is null
    header = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(
        b"".join([header, *chunks]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
