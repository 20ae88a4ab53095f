"""What every task's HTTP routes share: the FastAPI app they are mounted in, one error shape, model
look-up by task, and request metrics.

Task routes are typed (pydantic request and response models), so each has an OpenAPI schema, merged by
BentoML into ``/docs.json``. Errors are ``{"error": "<message>"}`` — the same shape as the Open Inference
Protocol routes — with 400 for a body that fails validation (naming the field), 404 for an unknown
model or version, and whatever status an :class:`~serving.repository.InferenceError` carries.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from typing import TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln import __version__
from serving.metrics import UNKNOWN_MODEL, record_request
from serving.repository import InferenceError, ModelRepository

log = logging.getLogger("kiln.serving")

M = TypeVar("M")


def create_task_app(routers: list[APIRouter]) -> FastAPI:
    """One FastAPI app holding every task's routes, with Kiln's error shape."""
    app = FastAPI(title="Kiln tasks", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    for router in routers:
        app.include_router(router)

    @app.exception_handler(InferenceError)
    async def _inference_error(request: Request, exc: InferenceError) -> JSONResponse:
        retry_after = getattr(exc, "retry_after", None)  # 429 from admission control
        headers = {"Retry-After": retry_after} if retry_after else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

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

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error serving %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal server error: {type(exc).__name__}: {exc}"}, status_code=500)

    return app


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
