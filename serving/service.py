"""The Kiln BentoML service, a composition: every task's routes (``serving.tasks``, one FastAPI app),
the Open Inference Protocol over HTTP (mounted at /v2) and gRPC (a grpc.aio server started in the
service's lifecycle), every task's tools over MCP (/mcp), and Prometheus metrics on /metrics.

Configured by ``KILN_*`` environment variables (:class:`serving.config.ServeConfig`), which
``kiln serve`` sets from its flags. Run directly with ``bentoml serve serving.service:Kiln``.
"""

from __future__ import annotations

import asyncio
import logging

import bentoml

import serving  # noqa: F401  (configures the model store before bentoml is imported)
from kiln.artifacts import get_artifact
from serving import metrics
from serving.admin import ReadTokenMiddleware, admin_token, read_token_interceptor
from serving.admission import (
    Drain,
    DrainInterceptor,
    EdgeGate,
    RequestLifecycleMiddleware,
    install_sigterm_drain,
    outermost,
)
from serving.agent.mcp import create_mcp_app
from serving.config import ServeConfig
from serving.limits import BodyLimitMiddleware
from serving.model import LoadedModel
from serving.oip.grpc_server import start_grpc_server
from serving.oip.http import InferFastPath, MountRootMiddleware, create_oip_app
from serving.repository import ModelRepository
from serving.routes import CatchAllMiddleware, OpenAPIVersionMiddleware, create_task_app
from serving.tasks import load_model, routers, tools
from serving.triton.repository import TritonRepository

log = logging.getLogger("kiln.serving")

CONFIG = ServeConfig.from_env()
for _name in ("kiln", "serving"):  # Kiln's loggers: kiln.* and the protocol front-ends (serving.oip.*)
    logging.getLogger(_name).setLevel(CONFIG.log_level)
REPOSITORY = ModelRepository()
# SIGTERM: not ready at once, new requests refused, accepted ones finish; the edge in-flight bound
# (serving.admission).
DRAIN = Drain(CONFIG.edge_bound())
TRITON = TritonRepository(CONFIG.model_repository, CONFIG) if CONFIG.model_repository else None


def _load(tag: str) -> LoadedModel:
    if TRITON is not None and TRITON.has(tag.partition(":")[0]):  # a Triton repository model
        return TRITON.load(tag)
    return load_model(get_artifact(tag), CONFIG)


def _load_models() -> None:
    """Load every configured model; one that fails is UNAVAILABLE with its reason, the others serve."""
    REPOSITORY.loader = _load
    for tag in CONFIG.models:
        name, _, version = tag.partition(":")
        try:
            art = get_artifact(tag)  # its errors name what the store has
            name, version = art.name, art.version
            REPOSITORY.add(load_model(art, CONFIG))
        except Exception as exc:  # noqa: BLE001 - isolation: any load failure is this model's alone
            reason = f"{type(exc).__name__}: {exc}"
            log.error("model %s is UNAVAILABLE: %s", tag, reason)
            REPOSITORY.fail(name, version, reason)
            backend = CONFIG.settings_for(name).backend  # the one it would have served on first
            metrics.MODEL_READY.labels(model=name, version=version, backend=backend).set(0)
    if TRITON is not None:
        TRITON.load_all(REPOSITORY)


OIP_APP = create_oip_app(
    REPOSITORY,
    max_request_bytes=CONFIG.max_request_bytes,
    admin_token=admin_token(),
    model_examples=[tag.partition(":")[0] for tag in CONFIG.models] + (TRITON.names() if TRITON else []),
)


@bentoml.service(name="kiln", workers=CONFIG.workers, traffic={"timeout": 60})
@bentoml.asgi_app(create_mcp_app(tools(REPOSITORY), host=CONFIG.host), path="/mcp")  # Kiln's tools over MCP
@bentoml.asgi_app(OIP_APP, path="/v2")
@bentoml.asgi_app(create_task_app(routers(REPOSITORY)), path="/")
class Kiln:
    def __init__(self) -> None:
        if REPOSITORY.loader is None:
            _load_models()
        self.grpc_server = None
        self.poller = None

    @bentoml.on_startup
    async def start_grpc(self) -> None:
        install_sigterm_drain(DRAIN, lambda: setattr(REPOSITORY, "draining", True), CONFIG.drain_timeout_s)
        if TRITON is not None and CONFIG.repository_poll_s:  # Triton's --model-control-mode=poll
            poll = TRITON.poll(REPOSITORY, CONFIG.repository_poll_s)
            self.poller = asyncio.get_running_loop().create_task(poll)
        if CONFIG.grpc_port:
            self.grpc_server = await start_grpc_server(
                REPOSITORY,
                host=CONFIG.host,
                port=CONFIG.grpc_port,
                max_message_bytes=CONFIG.max_request_bytes,
                share_port=CONFIG.workers > 1,  # each worker process serves gRPC on the same port
                admin_token=admin_token(),
                interceptors=[DrainInterceptor(DRAIN), read_token_interceptor(CONFIG.tokens)],
            )

    @bentoml.on_shutdown
    async def stop_grpc(self) -> None:
        if self.poller is not None:
            self.poller.cancel()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=5)
        for versions in list(REPOSITORY.models.values()):
            for model in versions.values():
                model.close()


Kiln.add_asgi_middleware(CatchAllMiddleware)  # outermost of Kiln's: a 500 with a request id, never re-raised
Kiln.add_asgi_middleware(BodyLimitMiddleware, max_bytes=CONFIG.max_request_bytes)
Kiln.add_asgi_middleware(ReadTokenMiddleware, tokens=CONFIG.tokens)  # KILN_READ_TOKEN: reads need a token
Kiln.add_asgi_middleware(RequestLifecycleMiddleware)
Kiln.add_asgi_middleware(InferFastPath, oip=OIP_APP, prefix="/v2")  # POST /v2/.../infer past the routers
Kiln.add_asgi_middleware(MountRootMiddleware, prefix="/v2")  # GET /v2 answers, not 307 → /v2/
Kiln.add_asgi_middleware(MountRootMiddleware, prefix="/mcp")  # MCP clients POST to /mcp itself
Kiln.add_asgi_middleware(OpenAPIVersionMiddleware)  # /docs.json says which OpenAPI its schemas are
outermost(Kiln, EdgeGate, drain=DRAIN)  # drain refusal and the in-flight bound before BentoML's middlewares
