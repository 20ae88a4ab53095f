"""The Kiln BentoML service: task endpoints, the Open Inference Protocol over HTTP (mounted at /v2)
and gRPC (a grpc.aio server started in the service's lifecycle), and Prometheus metrics on /metrics.

Configured by ``KILN_*`` environment variables (:class:`serving.config.ServeConfig`), which
``kiln serve`` sets from its flags. Run directly with ``bentoml serve serving.service:Kiln``.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import time
from http import HTTPStatus
from typing import Any

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, InvalidArgument, NotFound

import serving  # noqa: F401  (configures the model store before bentoml is imported)
from kiln.artifacts import get_artifact
from serving import metrics
from serving.config import ServeConfig
from serving.limits import BodyLimitMiddleware
from serving.model import LoadedModel
from serving.oip.grpc_server import start_grpc_server
from serving.oip.http import MountRootMiddleware, create_oip_app
from serving.repository import InferenceError, ModelRepository

log = logging.getLogger("kiln.serving")

CONFIG = ServeConfig.from_env()
for _name in ("kiln", "serving"):  # Kiln's loggers: kiln.* and the protocol front-ends (serving.oip.*)
    logging.getLogger(_name).setLevel(CONFIG.log_level)
REPOSITORY = ModelRepository()
MAX_IMAGE_SIDE = 1024

_STATUS_ERRORS = {400: InvalidArgument, 404: NotFound}


def _http_error(err: InferenceError) -> BentoMLException:
    cls = _STATUS_ERRORS.get(err.status)
    return cls(err.message) if cls else BentoMLException(err.message, error_code=HTTPStatus(err.status))


def decode_image(image: Any) -> np.ndarray:
    """A nested list (H×W, values in [0, 1], ink = 1) or a base64 PNG/JPEG → (H, W) float32 in [0, 1]."""
    if isinstance(image, str):
        from PIL import Image, UnidentifiedImageError

        try:
            raw = base64.b64decode(image, validate=True)
            with Image.open(io.BytesIO(raw)) as im:
                if max(im.size) > MAX_IMAGE_SIDE:
                    raise InferenceError(
                        400, f"image is {im.size[0]}×{im.size[1]}; the limit is {MAX_IMAGE_SIDE} a side"
                    )
                arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        except (binascii.Error, ValueError) as exc:
            raise InferenceError(400, f"`image` is a string but not valid base64: {exc}") from None
        except UnidentifiedImageError:
            raise InferenceError(400, "`image` is base64 but not a PNG/JPEG image PIL can read") from None
        return arr
    try:
        arr = np.asarray(image, dtype=np.float32)
    except (ValueError, TypeError):
        raise InferenceError(400, "`image` must be a rectangular nested list of numbers (H×W)") from None
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise InferenceError(400, f"`image` must be 2-D (H×W) grayscale; got shape {list(arr.shape)}")
    if max(arr.shape) > MAX_IMAGE_SIDE:
        raise InferenceError(
            400, f"image is {arr.shape[1]}×{arr.shape[0]}; the limit is {MAX_IMAGE_SIDE} a side"
        )
    if not np.isfinite(arr).all():
        raise InferenceError(400, "`image` contains NaN or Inf")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise InferenceError(400, f"`image` values must lie in [0, 1]; got [{arr.min():g}, {arr.max():g}]")
    return arr


def _load_models() -> None:
    for tag in CONFIG.models:
        art = get_artifact(tag)  # raises with a message naming what the store has
        REPOSITORY.add(LoadedModel(art, CONFIG))


@bentoml.service(name="kiln", workers=CONFIG.workers, traffic={"timeout": 60})
@bentoml.asgi_app(create_oip_app(REPOSITORY, max_request_bytes=CONFIG.max_request_bytes), path="/v2")
class Kiln:
    def __init__(self) -> None:
        if not REPOSITORY.models:
            _load_models()
        self.grpc_server = None

    @bentoml.on_startup
    async def start_grpc(self) -> None:
        if CONFIG.grpc_port:
            self.grpc_server = await start_grpc_server(
                REPOSITORY,
                host=CONFIG.host,
                port=CONFIG.grpc_port,
                max_message_bytes=CONFIG.max_request_bytes,
                share_port=CONFIG.workers > 1,  # each worker process serves gRPC on the same port
            )
            log.info("gRPC Open Inference Protocol on %s:%d", CONFIG.host, CONFIG.grpc_port)

    @bentoml.on_shutdown
    async def stop_grpc(self) -> None:
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=5)
        for versions in REPOSITORY.models.values():
            for model in versions.values():
                model.close()

    @bentoml.api(route="/classify")
    async def classify(
        self, image: list | str, model: str = "vit-soft", version: str = "", backend: str = ""
    ) -> dict:
        """Classify one grayscale digit image.

        Args:
            image: nested list H×W of values in [0, 1] (ink = 1), or a base64-encoded PNG/JPEG
                (white ink on black, as the training digits).
            model: a loaded model name (GET /v2/repository/index lists them).
            version: a loaded version; default the newest.
            backend: runtime to use (onnxruntime, onnxruntime-int8, pytorch, ...); default the model's.
        """
        t0 = time.perf_counter()
        labels = {"model": metrics.UNKNOWN_MODEL, "version": "", "backend": ""}
        try:
            served = REPOSITORY.get(model, version or None)
            chosen = served.resolve_backend(backend or None)
            labels = {"model": served.name, "version": served.version, "backend": chosen}
            img = decode_image(image)
            pred, probs = await served.classify(img[None], chosen)
        except InferenceError as err:
            metrics.record_request(**labels, protocol="http", ok=False, seconds=time.perf_counter() - t0)
            raise _http_error(err) from None
        metrics.record_request(**labels, protocol="http", ok=True, seconds=time.perf_counter() - t0)
        p = probs[0]
        return {
            "label": served.labels[int(pred[0])] if served.labels else int(pred[0]),
            "probabilities": {
                (served.labels[i] if served.labels else str(i)): float(v) for i, v in enumerate(p)
            },
            "model": served.name,
            "version": served.version,
            "backend": chosen,
        }


Kiln.add_asgi_middleware(BodyLimitMiddleware, max_bytes=CONFIG.max_request_bytes)
Kiln.add_asgi_middleware(MountRootMiddleware, prefix="/v2")  # GET /v2 answers, not 307 → /v2/
