"""Server configuration from ``KILN_*`` environment variables (what ``kiln serve`` flags set).

Bad values raise :class:`ConfigError` at start-up with a message saying how to fix them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

BACKENDS = ("onnxruntime", "onnxruntime-int8", "pytorch", "tensorrt-fp16", "tensorrt-int8")


class ConfigError(ValueError):
    pass


def _int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def _float(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
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

    @classmethod
    def from_env(cls) -> ServeConfig:
        models = tuple(
            m.strip() for m in os.environ.get("KILN_MODELS", "vit-soft,vit-softmax").split(",") if m.strip()
        )
        if not models:
            raise ConfigError("KILN_MODELS is empty; name at least one model, e.g. KILN_MODELS=vit-soft")
        backend = os.environ.get("KILN_BACKEND", "onnxruntime")
        if backend not in BACKENDS:
            raise ConfigError(f"KILN_BACKEND={backend!r} is not a backend; valid: {list(BACKENDS)}")
        return cls(
            models=models,
            backend=backend,
            http_port=_int("KILN_HTTP_PORT", 3000, 1),
            grpc_port=_int("KILN_GRPC_PORT", 8001, 0),
            host=os.environ.get("KILN_HOST", "0.0.0.0"),
            batch_max_size=_int("KILN_BATCH_MAX_SIZE", 32, 1),
            batch_window_ms=_float("KILN_BATCH_WINDOW_MS", 2.0, 0.0),
            max_request_bytes=_int("KILN_MAX_REQUEST_BYTES", 8 * 1024 * 1024, 1024),
            workers=_int("KILN_WORKERS", 1, 1),
            threads=_int("KILN_THREADS", min(4, os.cpu_count() or 1), 1),
        )

    def to_env(self) -> dict[str, str]:
        return {
            "KILN_MODELS": ",".join(self.models),
            "KILN_BACKEND": self.backend,
            "KILN_HTTP_PORT": str(self.http_port),
            "KILN_GRPC_PORT": str(self.grpc_port),
            "KILN_HOST": self.host,
            "KILN_BATCH_MAX_SIZE": str(self.batch_max_size),
            "KILN_BATCH_WINDOW_MS": str(self.batch_window_ms),
            "KILN_MAX_REQUEST_BYTES": str(self.max_request_bytes),
            "KILN_WORKERS": str(self.workers),
            "KILN_THREADS": str(self.threads),
        }
