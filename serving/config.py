"""Server configuration from ``KILN_*`` environment variables (what ``kiln serve`` flags set).

The global batching and queue settings are every model's defaults; ``KILN_MODEL_CONFIG`` (a YAML or
JSON file, ``kiln serve --model-config``) or ``KILN_MODEL_SETTINGS`` (the same mapping as inline JSON)
override them per model, as Triton's per-model ``config.pbtxt`` does::

    vit-soft:
      backend: onnxruntime-int8
      batch_max_size: 16
      batch_window_ms: 1
      max_queue_size: 64
      max_queue_delay_ms: 500
      instances: 2          # batches computed at once, each on its own runtime
    diffusion-digits:
      generation_deadline_s: 30   # sampling requests that would not finish by then: 429 at arrival
    xbt-new-text:
      max_text_chars: 1000  # longest text per input, checked before tokenising

Bad values raise :class:`ConfigError` at start-up with a message saying how to fix them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kiln.settings import DEFAULT_MODELS as _DEFAULT_MODELS

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
BACKENDS = ("onnxruntime", "onnxruntime-int8", "pytorch", "tensorrt-fp16", "tensorrt-int8")
GENERATION_BATCHING = ("step", "request")
DEFAULT_MODELS = ",".join(_DEFAULT_MODELS)  # KILN_MODELS' default, comma-separated


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


_INTEGER_SETTINGS = ("batch_max_size", "max_queue_size", "instances", "max_text_chars", "max_image_pixels")


@dataclass(frozen=True)
class ModelSettings:
    """How one model is served: its default runtime, batching, queue bounds and instance count."""

    backend: str
    batch_max_size: int  # 1 turns adaptive batching off
    batch_window_ms: float
    max_queue_size: int  # requests waiting; more get 429 / RESOURCE_EXHAUSTED (Triton's max_queue_size)
    max_queue_delay_ms: float  # longest a request may wait in the queue; 0 = no time bound
    instances: int = 1  # batches computed concurrently, each on its own runtime (Triton's instance_group)
    # Work budgets, checked before anything is decoded or computed (issue 16):
    max_text_chars: int = 2000  # characters per text input (/embed, /v1/embeddings, OIP BYTES)
    max_image_pixels: int = 16 * 1024 * 1024  # pixels of all images in one request (64 MiB as float32)
    # A sampling request is admitted beside the ones in progress only if all would finish within half of
    # this at the measured sampling rate (serving.batching.ADMISSION_HEADROOM), and is answered 504 at it:
    # below the gateway's 60 s (BentoML's traffic timeout), so a client hears 429 at arrival or 504 from
    # Kiln, never the gateway's timeout.
    generation_deadline_s: float = 50.0
    explicit: frozenset[str] = field(default=frozenset(), compare=False)  # keys set for this model

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend {self.backend!r} is not a backend; valid: {list(BACKENDS)}")
        for name, minimum in (
            ("batch_max_size", 1),
            ("batch_window_ms", 0),
            ("max_queue_size", 1),
            ("max_queue_delay_ms", 0),
            ("instances", 1),
            ("max_text_chars", 1),
            ("max_image_pixels", 1),
            ("generation_deadline_s", 0.001),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            if name in _INTEGER_SETTINGS and value != int(value):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if value < minimum:
                raise ConfigError(f"{name}={value} must be >= {minimum}")
            if name in _INTEGER_SETTINGS:
                object.__setattr__(self, name, int(value))


SETTING_KEYS = tuple(f.name for f in fields(ModelSettings) if f.name != "explicit")


def load_model_settings(path: str | None, inline: str | None) -> dict[str, dict[str, Any]]:
    """Per-model overrides from a YAML/JSON file and/or inline JSON (the inline one wins per key)."""
    import yaml

    merged: dict[str, dict[str, Any]] = {}
    sources = []
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"KILN_MODEL_CONFIG={path!r}: no such file")
        try:
            sources.append((f"model config {path}", yaml.safe_load(p.read_text())))
        except yaml.YAMLError as exc:
            raise ConfigError(f"model config {path} is not valid YAML/JSON: {exc}") from None
    if inline:
        try:
            sources.append(("KILN_MODEL_SETTINGS", json.loads(inline)))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"KILN_MODEL_SETTINGS is not valid JSON: {exc}") from None
    for where, data in sources:
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must map model names to settings, got {type(data).__name__}")
        for model, settings in data.items():
            if not isinstance(model, str) or not isinstance(settings, dict):
                raise ConfigError(
                    f"{where}: {model!r} must map to a mapping of settings ({', '.join(SETTING_KEYS)})"
                )
            unknown = sorted(set(settings) - set(SETTING_KEYS))
            if unknown:
                raise ConfigError(
                    f"{where}: model {model!r} has unknown settings {unknown}; valid: {list(SETTING_KEYS)}"
                )
            merged.setdefault(model, {}).update(settings)
    return merged


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
    max_queue_size: int = 256  # see serving.batching.DEFAULT_MAX_QUEUE_SIZE for why
    max_queue_delay_ms: float = 1000.0
    # SIGTERM: longest the server waits for accepted requests before it exits anyway.
    drain_timeout_s: float = 30.0
    # Requests in progress per worker (HTTP + gRPC) before the edge answers 429 without reading the body;
    # 0 = no bound. 512 = two default model queues' worth.
    max_in_flight: int = 512
    # Every model's work budgets (ModelSettings has the meaning; per-model overrides win).
    max_text_chars: int = 2000
    max_image_pixels: int = 16 * 1024 * 1024
    generation_deadline_s: float = 50.0
    # The agent (/agent/solve): most completion tokens per LLM call, and NLI judgments per question.
    agent_max_tokens: int = 1024
    agent_max_nli_calls: int = 16
    model_settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> overrides

    def settings_for(self, model: str) -> ModelSettings:
        """The settings of ``model`` (a model-store name): the global ones with its overrides."""
        base = ModelSettings(
            backend=self.backend,
            batch_max_size=self.batch_max_size,
            batch_window_ms=self.batch_window_ms,
            max_queue_size=self.max_queue_size,
            max_queue_delay_ms=self.max_queue_delay_ms,
            max_text_chars=self.max_text_chars,
            max_image_pixels=self.max_image_pixels,
            generation_deadline_s=self.generation_deadline_s,
        )
        overrides = self.model_settings.get(model, {})
        try:
            return replace(base, **overrides, explicit=frozenset(overrides))
        except ConfigError as exc:
            raise ConfigError(f"model settings of {model!r}: {exc}") from None

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
        config = cls(
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
            max_queue_size=_number("KILN_MAX_QUEUE_SIZE", 256, 1),
            max_queue_delay_ms=_number("KILN_MAX_QUEUE_DELAY_MS", 1000.0, 0.0, float),
            drain_timeout_s=_number("KILN_DRAIN_TIMEOUT_S", 30.0, 0.0, float),
            max_in_flight=_number("KILN_MAX_IN_FLIGHT", 512, 0),
            max_text_chars=_number("KILN_MAX_TEXT_CHARS", 2000, 1),
            max_image_pixels=_number("KILN_MAX_IMAGE_PIXELS", 16 * 1024 * 1024, 1),
            generation_deadline_s=_number("KILN_GENERATION_DEADLINE_S", 50.0, 0.001, float),
            agent_max_tokens=_number("KILN_AGENT_MAX_TOKENS", 1024, 1),
            agent_max_nli_calls=_number("KILN_AGENT_MAX_NLI_CALLS", 16, 1),
            model_settings=load_model_settings(
                os.environ.get("KILN_MODEL_CONFIG"), os.environ.get("KILN_MODEL_SETTINGS")
            ),
        )
        for model in config.model_settings:  # every override is checked now, not when a model loads
            config.settings_for(model)
        return config
