"""What every task's HTTP routes share: the FastAPI app they are mounted in, one error shape, model
look-up by task, and request metrics.

Task routes are typed (pydantic request and response models), so each has an OpenAPI schema, merged by
BentoML into ``/docs.json``. Errors are ``{"error": "<message>"}`` — the same shape as the Open Inference
Protocol routes — with 400 for a body that fails validation (naming the field), 404 for an unknown
model or version, and whatever status an :class:`~serving.repository.InferenceError` carries (with its
headers: ``WWW-Authenticate``, ``Retry-After``). Anything unexpected is a 500 carrying a request id (also in
the log line and the ``X-Request-Id`` header), answered by :class:`CatchAllMiddleware` inside the app, so the
exception never reaches the server: Starlette's own catch-all re-raises after answering, and uvicorn then
drops the keep-alive connection. Non-finite floats in a response body are ``null`` (:class:`JSONBody`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Iterator
from typing import TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from kiln import __version__
from serving.metrics import UNKNOWN_MODEL, record_request
from serving.repository import InferenceError, ModelRepository

log = logging.getLogger("kiln.serving")

M = TypeVar("M")


def create_task_app(routers: list[APIRouter]) -> FastAPI:
    """One FastAPI app holding every task's routes, with Kiln's error shape."""
    app = FastAPI(
        title="Kiln tasks",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        default_response_class=JSONBody,
    )
    for router in routers:
        app.include_router(router)
    app.add_middleware(CatchAllMiddleware)

    @app.exception_handler(InferenceError)
    async def _inference_error(request: Request, exc: InferenceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse({"error": "invalid request: " + "; ".join(problems)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (unknown route, wrong method, a body it cannot parse) in Kiln's shape.
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    return app


REQUEST_ID_HEADER = "X-Request-Id"
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def json_safe(value):
    """``value`` with every non-finite float (NaN, ±Infinity) replaced by ``None``: JSON has no literal for
    them, and a bare ``NaN`` makes the whole body unparseable for strict clients."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class JSONBody(JSONResponse):
    """Starlette's JSONResponse (strict: ``allow_nan=False``), with non-finite floats as ``null`` rather
    than a 500 for the whole response."""

    def render(self, content) -> bytes:
        try:
            return super().render(content)
        except ValueError:  # "Out of range float values are not JSON compliant"
            return super().render(json_safe(content))


def error_response(exc: InferenceError) -> JSONResponse:
    """Kiln's error for an :class:`InferenceError`: its status and message, and its headers
    (``WWW-Authenticate`` for 401, ``Retry-After`` for 429) — every front-end maps errors with this."""
    headers = dict(exc.headers)
    retry_after = getattr(exc, "retry_after", None)  # 429 from admission control
    if retry_after:
        headers["Retry-After"] = str(retry_after)
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers or None)


def internal_error_response(method: str, path: str, exc: BaseException, request_id: str = "") -> JSONResponse:
    """The 500 for an unexpected exception: logged with a request id (the client's ``X-Request-Id`` when
    it sent a plain one, else a new one) that the body and the ``X-Request-Id`` header carry."""
    if isinstance(exc, ClientDisconnect):  # the client left mid-body: nobody to answer, nothing broke
        log.debug("client disconnected before its request body was read: %s %s", method, path)
        gone = "client disconnected before its request body was read"
        return JSONResponse({"error": gone}, status_code=499)
    request_id = request_id if _CLIENT_REQUEST_ID.match(request_id or "") else uuid.uuid4().hex
    log.error("unhandled error serving %s %s (request id %s)", method, path, request_id, exc_info=exc)
    return JSONResponse(
        {"error": f"internal server error: {type(exc).__name__}: {exc}", "request_id": request_id},
        status_code=500,
        headers={REQUEST_ID_HEADER: request_id},
    )


class CatchAllMiddleware:
    """ASGI: an exception escaping the app becomes a logged 500 with a request id and goes no further.

    Inside the app's middleware stack, below Starlette's ``ServerErrorMiddleware`` (which re-raises after
    answering, making uvicorn drop a keep-alive connection). When the response had already started, the
    exception is logged and the response ends where it stopped.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:  # noqa: BLE001 - the catch-all: answer, log, never re-raise
            method, path = scope.get("method", ""), scope.get("path", "")
            if started:
                log.error("unhandled error after the response started: %s %s", method, path, exc_info=exc)
                return
            client_id = next(
                (v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"x-request-id"), ""
            )
            await internal_error_response(method, path, exc, client_id)(scope, receive, send)


def task_model(repo: ModelRepository, cls: type[M], name: str, version: str | None) -> M:
    """The loaded model ``name`` (version), which must be served by ``cls``; else 404 / 400 naming why."""
    model = repo.get(name, version or None)
    if not isinstance(model, cls):
        fitting = sorted(
            n for n, versions in repo.models.items() if any(isinstance(m, cls) for m in versions.values())
        )
        raise InferenceError(
            400,
            f"model {name!r} is not a {cls.task} model (it serves {getattr(model, 'task', '?')}); "  # type: ignore[attr-defined]
            f"{cls.task} models loaded: {fitting}",  # type: ignore[attr-defined]
        )
    return model


@contextlib.contextmanager
def observed(protocol: str = "http") -> Iterator[dict[str, str]]:
    """Times one request and records its outcome; the caller fills in model, version and backend."""
    labels = {"model": UNKNOWN_MODEL, "version": "", "backend": ""}
    start, ok = time.perf_counter(), False
    try:
        yield labels
        ok = True
    finally:
        record_request(**labels, protocol=protocol, ok=ok, seconds=time.perf_counter() - start)


class OpenAPIVersionMiddleware:
    """ASGI middleware that labels BentoML's ``/docs.json`` as the OpenAPI version its schemas are.

    BentoML merges the mounted FastAPI apps' documents and labels the result OpenAPI 3.0.2, but FastAPI
    (pydantic 2) writes JSON Schema 2020-12, i.e. OpenAPI 3.1 (``exclusiveMinimum: 0`` is a number
    there, a boolean in 3.0), so a 3.0 validator rejects the document. This rewrites the label.
    """

    def __init__(self, app, path: str = "/docs.json", version: str = "3.1.0"):
        self.app = app
        self.path = path
        self.version = version

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        start: dict = {}
        body = bytearray()

        async def buffered_send(message):
            if message["type"] == "http.response.start":
                start.update(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            payload = bytes(body)
            if start.get("status") == 200:
                document = json.loads(payload)
                document["openapi"] = self.version
                payload = json.dumps(document).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(payload)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": payload})

        await self.app(scope, receive, buffered_send)
