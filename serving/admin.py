"""Bearer tokens and their scopes: who may read, write and administer the server.

Three scopes, each accepting its own token and every broader one:

* **admin** — every route that changes what the server serves or deletes whole things: model control
  (``/v2/repository/models/{m}/load|unload`` and the gRPC RPCs), gallery upgrade / backfill / rollback /
  drop, trajectory synthesis. Token: ``KILN_ADMIN_TOKEN`` when set; otherwise a random token made once and
  kept in ``$KILN_HOME/admin-token`` (mode 600, shared by every worker of the server), so a first
  ``make serve`` has working admin routes. The variable overrides the file. ``kiln token`` prints the
  active one.
* **write** — gallery create, item upsert and item delete. Token: ``KILN_WRITE_TOKEN`` or the admin token.
* **read** — everything else (inference, search, metadata). Open, unless ``KILN_READ_TOKEN`` is set: then
  every request but the health probes, ``/metrics`` and the API document needs the read, write or admin
  token (:class:`ReadTokenMiddleware` over HTTP, :class:`ReadTokenInterceptor` over gRPC).

HTTP ``Authorization: Bearer <token>``, gRPC metadata ``authorization: Bearer <token>``. No bearer, or an
empty one: 401 (with ``WWW-Authenticate``); a wrong one: 403; both name where the token comes from.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from kiln.settings import kiln_home
from serving.config import Tokens
from serving.repository import InferenceError

log = logging.getLogger("kiln.serving")

ADMIN_TOKEN_ENV = "KILN_ADMIN_TOKEN"
WRITE_TOKEN_ENV = "KILN_WRITE_TOKEN"
READ_TOKEN_ENV = "KILN_READ_TOKEN"
SCOPES = ("read", "write", "admin")
ADMIN_TOKEN_FILE = "admin-token"  # under KILN_HOME

# Open with KILN_READ_TOKEN set: probes, Prometheus and the API description (no data in any of them).
OPEN_PATHS = (
    "/v2/health/live", "/v2/health/ready", "/metrics", "/livez", "/readyz", "/healthz", "/docs.json"
)  # fmt: skip
OPEN_GRPC_METHODS = ("ServerLive", "ServerReady", "Check", "Watch")


def admin_token(tokens: Tokens | None = None) -> str:
    """The token: ``KILN_ADMIN_TOKEN`` (``tokens.admin``), else the one in ``$KILN_HOME/admin-token`` (made
    if missing); "" when neither is set and the file cannot be made (a read-only home: admin routes off)."""
    import secrets

    token = (tokens or Tokens.from_env()).admin
    if token:
        return token
    path = kiln_home() / ADMIN_TOKEN_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # O_EXCL: one worker makes it, the others read it
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24))
            log.info("admin token (for %s unset) written to %s", ADMIN_TOKEN_ENV, path)
        return path.read_text().strip()
    except OSError as exc:  # e.g. a read-only state directory in a container: admin routes stay off
        log.warning("admin routes off: %s unset and %s cannot be made (%s)", ADMIN_TOKEN_ENV, path, exc)
        return ""


def scope_token(scope: str) -> str:
    """The token that a client of ``scope`` sends (what ``kiln token --scope`` prints): write falls back to
    the admin token when ``KILN_WRITE_TOKEN`` is unset, read to write's."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid: {list(SCOPES)}")
    tokens = Tokens.from_env()
    if scope == "read" and tokens.read:
        return tokens.read
    if scope in ("read", "write") and tokens.write:
        return tokens.write
    return admin_token()


def _admin_source(tokens: Tokens) -> str:
    if tokens.admin:
        return (
            f"the admin token is {ADMIN_TOKEN_ENV} (set on this server; it overrides "
            f"$KILN_HOME/{ADMIN_TOKEN_FILE})"
        )
    return (
        f"the admin token is the one in $KILN_HOME/{ADMIN_TOKEN_FILE} ({ADMIN_TOKEN_ENV} is unset; "
        "when set it overrides the file)"
    )


def _accepted(scope: str, tokens: Tokens) -> tuple[list[str], str]:
    """(the tokens ``scope`` accepts, a sentence naming them and where they come from)."""
    admin = [admin_token(tokens)]
    where = _admin_source(tokens) + "; `kiln token` prints it"
    if scope == "admin":
        return admin, where
    if scope == "write":
        own = [tokens.write] if tokens.write else []
        return own + admin, f"send {WRITE_TOKEN_ENV} or the admin token: {where}"
    own = [t for t in (tokens.read, tokens.write) if t]
    return own + admin, f"send {READ_TOKEN_ENV}, {WRITE_TOKEN_ENV} or the admin token: {where}"


def require(scope: str, authorization: str | None, tokens: Tokens | None = None) -> None:
    """Check an ``Authorization`` value (HTTP header or gRPC metadata) for ``scope``: returns when it
    carries one of the scope's tokens (or the scope is open: read without ``KILN_READ_TOKEN``); else
    :class:`InferenceError` 401 (no bearer token, or an empty one; with ``WWW-Authenticate``) or 403 (a
    wrong one, or no token to compare with)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid: {list(SCOPES)}")
    tokens = tokens or Tokens.from_env()
    if scope == "read" and not tokens.read:
        return
    accepted, where = _accepted(scope, tokens)
    accepted = [t for t in accepted if t]
    if not accepted:
        raise InferenceError(
            403,
            f"{scope} routes are off on this server: no {ADMIN_TOKEN_ENV} and $KILN_HOME/{ADMIN_TOKEN_FILE} "
            f"cannot be made; start it with {ADMIN_TOKEN_ENV} set"
            + (f" (or {WRITE_TOKEN_ENV} for writes)" if scope == "write" else ""),
        )
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if not scheme or (scheme.lower() == "bearer" and not token):
        raise InferenceError(
            401,
            f"{scope} route: send 'Authorization: Bearer <token>' with a non-empty token ({where})",
            headers={"WWW-Authenticate": f'Bearer realm="kiln-{scope}"'},
        )
    matches = any(hmac.compare_digest(token.encode(), t.encode()) for t in accepted)
    if scheme.lower() != "bearer" or not matches:
        raise InferenceError(403, f"wrong {scope} token ({where})")


def check_bearer(expected: str, authorization: str | None) -> None:
    """Check an ``Authorization`` value against the admin token ``expected`` ("" = admin routes off: 403);
    see :func:`require`. HTTP headers and gRPC metadata alike."""
    if not expected:
        raise InferenceError(403, f"admin routes are off on this server: start it with {ADMIN_TOKEN_ENV} set")
    tokens = Tokens.from_env()
    scheme, _, token = (authorization or "").strip().partition(" ")
    if not scheme or (scheme.lower() == "bearer" and not token.strip()):
        raise InferenceError(
            401,
            f"admin route: send 'Authorization: Bearer <token>' with a non-empty token "
            f"({_admin_source(tokens)}; `kiln token` prints it)",
            headers={"WWW-Authenticate": 'Bearer realm="kiln-admin"'},
        )
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise InferenceError(403, f"wrong admin token ({_admin_source(tokens)}; `kiln token` prints it)")


def require_admin(authorization: str | None) -> None:
    """:func:`require` for the admin scope."""
    require("admin", authorization)


def require_write(authorization: str | None) -> None:
    """:func:`require` for the write scope."""
    require("write", authorization)


class ReadTokenMiddleware:
    """ASGI: with ``KILN_READ_TOKEN`` set, every HTTP request but :data:`OPEN_PATHS` needs a bearer token
    of any scope, checked before the body is read; a no-op otherwise."""

    def __init__(self, app, tokens: Tokens):
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.tokens.read or scope.get("path", "") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        authorization = next(
            (v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"authorization"), None
        )
        try:
            require("read", authorization, self.tokens)
        except InferenceError as exc:
            body = json.dumps({"error": exc.message}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
            await send({"type": "http.response.start", "status": exc.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def _grpc_status(status: int):
    import grpc

    return grpc.StatusCode.UNAUTHENTICATED if status == 401 else grpc.StatusCode.PERMISSION_DENIED


def read_token_interceptor(tokens: Tokens):
    """gRPC: with ``KILN_READ_TOKEN`` set, every RPC but the probes (:data:`OPEN_GRPC_METHODS`) needs a
    bearer token of any scope in its metadata (UNAUTHENTICATED / PERMISSION_DENIED otherwise)."""
    import grpc

    class ReadTokenInterceptor(grpc.aio.ServerInterceptor):
        async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
        ) -> grpc.RpcMethodHandler:
            handler = await continuation(details)
            if handler is None or not tokens.read or details.method.rsplit("/", 1)[-1] in OPEN_GRPC_METHODS:
                return handler
            metadata = dict(details.invocation_metadata or ())
            try:
                require("read", metadata.get("authorization"), tokens)
                return handler
            except InferenceError as exc:
                refusal = exc

            async def refuse(request_or_iterator, context: grpc.aio.ServicerContext):
                await context.abort(_grpc_status(refusal.status), refusal.message)

            if handler.unary_unary is not None:
                return grpc.unary_unary_rpc_method_handler(
                    refuse, handler.request_deserializer, handler.response_serializer
                )
            if handler.unary_stream is not None:
                return grpc.unary_stream_rpc_method_handler(
                    refuse, handler.request_deserializer, handler.response_serializer
                )
            if handler.stream_unary is not None:
                return grpc.stream_unary_rpc_method_handler(
                    refuse, handler.request_deserializer, handler.response_serializer
                )
            return grpc.stream_stream_rpc_method_handler(
                refuse, handler.request_deserializer, handler.response_serializer
            )

    return ReadTokenInterceptor()
