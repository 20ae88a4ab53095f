"""The request lifecycle at the server's edge: SIGTERM drain, requests in flight, clients that go away.

**How BentoML 1.4 stops.** ``kiln serve`` execs ``bentoml serve``, a circus arbiter process that owns the
listening socket and runs the service's worker processes (uvicorn, one per ``--workers``). On SIGTERM
the arbiter stops its watcher: every worker gets SIGTERM, and the arbiter waits for them to exit
(BentoML sets circus's ``graceful_timeout`` to 86400 s, so it never SIGKILLs a draining worker), then
closes the sockets and exits. Left alone, a worker's uvicorn would at once close its copy of the listening
socket — the arbiter's copy still accepts connections into the backlog that nobody answers, so probes
and new requests hang instead of being refused — wait for HTTP requests in flight, and only then run
the lifespan shutdown, where gRPC calls got five seconds and nothing told readiness.

**Kiln's drain**, in each worker (:func:`install_sigterm_drain`, called from the service's start-up):

1. SIGTERM → draining at once: readiness (``/v2/health/ready``, gRPC ``ServerReady``) says not ready,
   every new request is refused (HTTP 503 with ``Connection: close``, gRPC UNAVAILABLE; health and
   ``/metrics`` still answer), ``kiln_server_draining`` is 1.
2. Every request accepted before the signal — HTTP requests, gRPC calls, requests queued in batchers,
   sampling loops half-way — runs to completion: the worker waits until none is in flight (at most
   ``drain_timeout_s``, ``KILN_DRAIN_TIMEOUT_S``).
3. Then uvicorn's own shutdown runs with nothing left to wait for, the service's shutdown hook stops
   gRPC and closes the models, the worker exits, and after it the arbiter.

On Kubernetes the pod's ``preStop`` sleep keeps traffic coming while endpoints are being removed, and
``terminationGracePeriodSeconds`` must cover preStop + the drain (the longest queued work:
``max_queue_delay_ms`` plus the longest request) — see ``k8s/base/deployment.yaml``.

**Overload is shed at the edge.** :class:`EdgeGate` is the outermost layer of each worker's ASGI app —
outside BentoML's own middlewares (error handler, Prometheus traffic metrics, OpenTelemetry spans, access
log, timeout), which :func:`outermost` puts inside it. It refuses a request while draining (503) or once
``max_in_flight`` requests are in progress in the worker (429 with ``Retry-After`` and a JSON body, no
access-log line, no span) from the request line and headers alone: the body is never read, so a rejection
costs a few tens of microseconds of the event loop instead of the whole middleware stack. Under 2000
connections to one model (py-spy of the worker) that stack, run for every request including the ones
refused behind it, was about three quarters of the loop's time; requests waited in the sockets' receive
queues for the loop to reach them, so admitted ones saw seconds of latency that no queue bound inside the
app could shed. Every answer that passes the gate carries ``Server-Timing: edge;dur=<ms>`` (the time from
the gate to the response's headers), so a client can tell the server's time from the time its request
waited before the server read it.

**Clients that go away.** :class:`RequestLifecycleMiddleware` watches each HTTP connection once the
request body is read; when the client disconnects before the response is complete it cancels the
request's task, so a request still queued leaves its batcher uncomputed
(``kiln_inference_dropped_total{reason="cancelled"}``). grpc.aio cancels a call's task itself when its
client cancels or its deadline passes; :class:`DrainInterceptor` also turns the call's deadline into the
request's timeout (:func:`serving.batching.request_timeout`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from serving import metrics
from serving.batching import request_timeout

log = logging.getLogger("kiln.serving")

# Paths that answer while draining: liveness, readiness (which says 503 itself) and metrics.
_EXEMPT_PATHS = ("/v2/health/live", "/v2/health/ready", "/metrics", "/livez", "/readyz", "/healthz")
# gRPC methods that answer while draining (ServerReady reports not ready itself).
_EXEMPT_METHODS = ("ServerLive", "ServerReady", "ModelReady", "Check", "Watch")


class Drain:
    """Whether the server is draining, and how many requests are in flight (HTTP and gRPC).

    ``max_in_flight`` (0 = none) bounds the requests in progress in this worker at the edge, before a
    body is read: past it a request gets 429 / RESOURCE_EXHAUSTED at once. The models' queues bound the
    work waiting for a runtime; this bounds the work waiting for the front-end itself (parsing and
    decoding on the event loop), which is where requests pile up when the CPU is the bottleneck.
    """

    def __init__(self, max_in_flight: int = 0) -> None:
        self.draining = False
        self.in_flight = 0
        self.max_in_flight = max_in_flight
        self.started: float | None = None
        # The one series a refusal increments, resolved once: the refusal path stays a few attribute reads.
        self._refused = metrics.REJECTED.labels(
            model=metrics.UNKNOWN_MODEL, version="", backend="", reason="server_in_flight"
        )

    def full(self) -> bool:
        if self.max_in_flight and self.in_flight >= self.max_in_flight:
            self._refused.inc()
            return True
        return False

    def overloaded(self) -> str:
        return (
            f"server is overloaded: {self.in_flight} requests in progress (max_in_flight "
            f"{self.max_in_flight}); retry later"
        )

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            self.started = time.monotonic()
            metrics.DRAINING.set(1)

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def wait_idle(self, timeout_s: float, poll_s: float = 0.02) -> bool:
        """Wait until no request is in flight; False if ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True

    def refusal(self) -> str:
        return "server is shutting down (draining after SIGTERM); send the request to another replica"


def _took(t0: float) -> tuple[bytes, bytes]:
    """``Server-Timing: edge;dur=<ms since t0>`` (W3C Server Timing), as an ASGI header."""
    return b"server-timing", f"edge;dur={(time.perf_counter() - t0) * 1e3:.3f}".encode()


def _json_answer(status: int, message: str, *extra: tuple[bytes, bytes]) -> tuple[dict, dict]:
    """The two ASGI messages of a small JSON error answer, built once."""
    body = json.dumps({"error": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    return (
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body},
    )


class EdgeGate:
    """The outermost ASGI layer of an HTTP worker: refuses a request while draining (503,
    ``Connection: close``) or past the worker's in-flight bound (429, ``Retry-After: 1``) before its body
    is read and before any other middleware runs, counts the requests it lets through as in flight, and
    stamps their answers with ``Server-Timing: edge;dur=<ms>``.

    Health and ``/metrics`` always pass (readiness reports draining itself). Install it with
    :func:`outermost` so that BentoML's middlewares are inside it.
    """

    def __init__(self, app, drain: Drain):
        self.app = app
        self.drain = drain

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        drain = self.drain
        if scope["path"] not in _EXEMPT_PATHS:
            if drain.draining:
                start, body = _json_answer(503, drain.refusal(), (b"connection", b"close"), _took(t0))
                await send(start)
                return await send(body)
            if drain.full():
                start, body = _json_answer(429, drain.overloaded(), (b"retry-after", b"1"), _took(t0))
                await send(start)
                return await send(body)

        async def timed_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), _took(t0)]}
            await send(message)

        drain.in_flight += 1
        try:
            await self.app(scope, receive, timed_send)
        finally:
            drain.in_flight -= 1


def outermost(service: Any, layer: type, **options: Any) -> None:
    """Make ``layer(app, **options)`` wrap the whole ASGI app BentoML builds for ``service``.

    ``Service.add_asgi_middleware`` places a middleware inside BentoML's own (error handler, traffic
    metrics, tracing, access log, timeout); the app a worker serves is what ``service.to_asgi()`` returns,
    so this service's ``to_asgi`` returns it wrapped. (A server that runs the app with uvicorn directly
    would pass ``layer(app)`` to uvicorn instead.)
    """
    base = type(service)

    class _Wrapped(base):
        __slots__ = ()  # BentoML's Service is a slotted attrs class; the instance keeps its layout

        def to_asgi(self, *args: Any, **kwargs: Any):
            return layer(base.to_asgi(self, *args, **kwargs), **options)

    _Wrapped.__name__ = _Wrapped.__qualname__ = base.__name__
    service.__class__ = _Wrapped


class RequestLifecycleMiddleware:
    """ASGI middleware for the whole service (inside BentoML's timeout middleware, so that cancelling the
    request's task reaches its batcher): cancels a request's task when its client disconnects before the
    response completes."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        await self._cancellable(scope, receive, send)

    async def _cancellable(self, scope, receive, send) -> None:
        body_read = asyncio.Event()
        gone = asyncio.Event()
        complete = False

        async def app_receive() -> dict[str, Any]:
            if body_read.is_set():  # the watcher owns receive() now; it tells us about a disconnect
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        started = False

        async def app_send(message: dict[str, Any]) -> None:
            nonlocal complete, started
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        app_task = asyncio.ensure_future(self.app(scope, app_receive, app_send))

        async def watch() -> None:
            await body_read.wait()
            while not app_task.done():
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    if not complete and not app_task.done():
                        app_task.cancel()  # the client is gone: stop its work (queued rows are dropped)
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({app_task})
        except asyncio.CancelledError:
            app_task.cancel()
            raise
        finally:
            watcher.cancel()
        if app_task.cancelled():
            if not gone.is_set():
                raise asyncio.CancelledError
            if not started:
                # Nobody reads it, but it ends the request for the layers around us (BentoML's timeout
                # middleware would otherwise hold it for its whole timeout) and the access log says why:
                # 499, nginx's "client closed request".
                await send({"type": "http.response.start", "status": 499, "headers": []})
                await send({"type": "http.response.body", "body": b""})
            return
        app_task.result()  # re-raise what the app raised


class DrainInterceptor(grpc.aio.ServerInterceptor):
    """gRPC: UNAVAILABLE for new calls while draining, in-flight counting, and the call's deadline as
    the request's timeout."""

    def __init__(self, drain: Drain):
        self.drain = drain

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        drain = self.drain
        exempt = method in _EXEMPT_METHODS

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context: grpc.aio.ServicerContext):
                if drain.draining and not exempt:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, drain.refusal())
                if not exempt and drain.full():
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, drain.overloaded())
                with drain.track(), request_timeout(context.time_remaining()):
                    return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            async def streaming(request_iterator, context: grpc.aio.ServicerContext):
                if drain.draining and not exempt:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, drain.refusal())
                with drain.track(), request_timeout(context.time_remaining()):
                    result = inner_stream(request_iterator, context)
                    if inspect.isasyncgen(result):
                        async for response in result:
                            yield response
                    else:
                        await result  # a handler that writes with context.write()

            return grpc.stream_stream_rpc_method_handler(
                streaming,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def install_sigterm_drain(drain: Drain, on_draining: Callable[[], None], timeout_s: float) -> None:
    """Make SIGTERM drain this worker (see the module docstring), then hand over to the handler that was
    installed before (uvicorn's, which shuts the server down).

    Call from the running event loop after uvicorn installed its handlers (a service start-up hook).

    Args:
        drain: the state the middleware and interceptor read.
        on_draining: called once, at the signal (flips readiness).
        timeout_s: longest wait for the requests in flight before shutting down anyway.
    """
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        if drain.draining:
            return  # a second SIGTERM (e.g. the arbiter forwarding one the process group already got)
        loop.call_soon_threadsafe(begin)

    def begin() -> None:
        if drain.draining:
            return
        drain.begin()
        on_draining()
        log.info("SIGTERM: draining (%d requests in flight; not ready, refusing new ones)", drain.in_flight)
        task = loop.create_task(finish())
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def finish() -> None:
        idle = await drain.wait_idle(timeout_s)
        seconds = time.monotonic() - (drain.started or time.monotonic())
        if idle:
            log.info("drained in %.2fs; shutting down", seconds)
        else:
            log.warning(
                "drain timeout (%.0fs) with %d requests in flight; shutting down", timeout_s, drain.in_flight
            )
        if callable(previous):
            previous(signal.SIGTERM, None)
        else:  # no handler before ours: the default action, termination
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)


_background: set[asyncio.Task] = set()  # keeps the drain task referenced until it is done
