"""Server configuration from ``KILN_*`` environment variables (what ``kiln serve`` flags set).

Bad values raise :class:`ConfigError` at start-up with a message saying how to fix them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
BACKENDS = ("onnxruntime", "onnxruntime-int8", "pytorch", "tensorrt-fp16", "tensorrt-int8")
GENERATION_BATCHING = ("step", "request")
DEFAULT_MODELS = (
    "vit-soft,vit-softmax,diffusion-digits,forecaster-goog-daily,forecaster-eurusd-hourly,"
    "embed-old,embed-new-oca,xbt-old,xbt-new-text"
)


class ConfigError(ValueError):
    pass


def _number(name: str, default, minimum, cast=int):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        kind = "an integer" if cast is int else "a number"
        raise ConfigError(f"{name}={raw!r} is not {kind}") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


@dataclass(frozen=True)
class ServeConfig:
    models: tuple[str, ...]  # model-store names (latest version) or name:version tags
    backend: str  # default runtime; others that the artifact has are loaded too and picked per request
    http_port: int
    grpc_port: int  # 0 disables the gRPC server
    host: str
    batch_max_size: int  # 1 turns adaptive batching off
    batch_window_ms: float
    max_request_bytes: int
    workers: int
    threads: int  # onnxruntime / torch intra-op threads per runtime
    log_level: str  # for Kiln's own loggers ("kiln.*")
    # Diffusion sampling: "step" = concurrent requests share denoiser batches step by step;
    # "request" = one request's sampling loop at a time (the baseline the benchmark compares against).
    generation_batching: str = "step"

    @classmethod
    def from_env(cls) -> ServeConfig:
        models = tuple(
            m.strip() for m in os.environ.get("KILN_MODELS", DEFAULT_MODELS).split(",") if m.strip()
        )
        if not models:
            raise ConfigError("KILN_MODELS is empty; name at least one model, e.g. KILN_MODELS=vit-soft")
        backend = os.environ.get("KILN_BACKEND", "onnxruntime")
        if backend not in BACKENDS:
            raise ConfigError(f"KILN_BACKEND={backend!r} is not a backend; valid: {list(BACKENDS)}")
        generation_batching = os.environ.get("KILN_GENERATION_BATCHING", "step")
        if generation_batching not in GENERATION_BATCHING:
            raise ConfigError(
                f"KILN_GENERATION_BATCHING={generation_batching!r} is not a mode; "
                f"valid: {list(GENERATION_BATCHING)}"
            )
        log_level = os.environ.get("KILN_LOG_LEVEL", "INFO").upper()
        if log_level not in _LOG_LEVELS:
            raise ConfigError(f"KILN_LOG_LEVEL={log_level!r} is not a log level; valid: {list(_LOG_LEVELS)}")
        return cls(
            models=models,
            backend=backend,
            http_port=_number("KILN_HTTP_PORT", 3000, 1),
            grpc_port=_number("KILN_GRPC_PORT", 8001, 0),
            host=os.environ.get("KILN_HOST", "0.0.0.0"),
            batch_max_size=_number("KILN_BATCH_MAX_SIZE", 32, 1),
            batch_window_ms=_number("KILN_BATCH_WINDOW_MS", 2.0, 0.0, float),
            max_request_bytes=_number("KILN_MAX_REQUEST_BYTES", 8 * 1024 * 1024, 1024),
            workers=_number("KILN_WORKERS", 1, 1),
            threads=_number("KILN_THREADS", min(4, os.cpu_count() or 1), 1),
            log_level=log_level,
            generation_batching=generation_batching,
        )
