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

:data:`SETTINGS` is the one catalogue of the server's settings — each ``KILN_*`` variable and ``kiln serve``
flag with its default and help: :meth:`ServeConfig.from_env` takes its defaults from it, ``kiln serve``
builds its options and ``--help`` from it, and ``tests/unit/serving/test_settings_catalogue.py`` checks the
README's settings table against it. Adding a setting is one entry here and one row in the README.
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


@dataclass(frozen=True)
class Setting:
    """One server setting: its ``KILN_*`` variable and/or ``kiln serve`` flag, its default and help.

    ``shown`` is how the default reads in ``--help`` and the README when it is not the value itself (a
    default computed at start-up, or none).
    """

    env: str | None
    flag: str | None
    default: Any
    help: str
    shown: str | None = None

    @property
    def default_text(self) -> str:
        if self.shown is not None:
            return self.shown
        if isinstance(self.default, bool):
            return self.flag if self.default else f"--no-{self.flag.removeprefix('--')}"
        if isinstance(self.default, float) and self.default == int(self.default):
            return str(int(self.default))
        return str(self.default)


_CORES = "min(4, cores)"
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "KILN_MODELS",
        "--models",
        None,  # the built-in models; none when a Triton model repository is served
        "Comma-separated model names or NAME:VERSION tags (default: the built-in models; none with "
        "--model-repository).",
        shown=DEFAULT_MODELS,
    ),
    Setting("KILN_BACKEND", "--backend", "onnxruntime", f"Default runtime: {', '.join(BACKENDS)}."),
    Setting(
        "KILN_HOST",
        "--host",
        "0.0.0.0",
        "Address HTTP and gRPC bind to; the default accepts connections from every interface — "
        "--host 127.0.0.1 serves this machine only.",
    ),
    Setting("KILN_HTTP_PORT", "--http-port", 3000, "HTTP port (task endpoints, /v2, /metrics)."),
    Setting("KILN_GRPC_PORT", "--grpc-port", 8001, "gRPC Open Inference Protocol port; 0 disables it."),
    Setting(
        "KILN_BATCH_MAX_SIZE", "--batch-max-size", 32, "Adaptive batching: max samples per batch; 1 = off."
    ),
    Setting(
        "KILN_BATCH_WINDOW_MS", "--batch-window-ms", 2.0, "Adaptive batching: max wait for a batch to fill."
    ),
    Setting(
        "KILN_MAX_REQUEST_BYTES",
        "--max-request-bytes",
        8 * 1024 * 1024,
        "Larger request bodies get HTTP 413 / RESOURCE_EXHAUSTED (default 8 MiB).",
    ),
    Setting(
        "KILN_MAX_QUEUE_SIZE",
        "--max-queue-size",
        256,
        "Admission control: most requests waiting per model and backend; more get HTTP 429 with "
        "Retry-After / gRPC RESOURCE_EXHAUSTED at once (Triton's max_queue_size).",
    ),
    Setting(
        "KILN_MAX_QUEUE_DELAY_MS",
        "--max-queue-delay-ms",
        1000.0,
        "Admission control: longest a request may wait in a model's queue (estimated when it arrives, "
        "enforced when its batch forms); past it, 429 / RESOURCE_EXHAUSTED. 0 = no bound.",
    ),
    Setting(
        "KILN_MAX_IN_FLIGHT",
        "--max-in-flight",
        None,
        "Admission control at the edge: most requests in progress per worker (HTTP + gRPC); more get 429 "
        "with Retry-After / RESOURCE_EXHAUSTED before their body is read or any other middleware runs. "
        "'auto': what the models hold (each one's queue plus its batches in computation, summed, at most "
        "512); 0 = no bound.",
        shown="auto",
    ),
    Setting(
        "KILN_DRAIN_TIMEOUT_S",
        "--drain-timeout-s",
        30.0,
        "SIGTERM: longest wait for accepted requests to finish (the server is not ready and refuses new "
        "requests meanwhile) before it exits anyway.",
    ),
    Setting(
        "KILN_MAX_TEXT_CHARS",
        "--max-text-chars",
        2000,
        "Work budget: longest text per input of a text model (/embed, /v1/embeddings, OIP BYTES), in "
        "characters, checked before tokenising; longer gets HTTP 400.",
    ),
    Setting(
        "KILN_MAX_IMAGE_PIXELS",
        "--max-image-pixels",
        16 * 1024 * 1024,
        "Work budget: pixels of all images in one request, read from the PNG/JPEG headers before any is "
        "decoded; more gets HTTP 400.",
    ),
    Setting(
        "KILN_GENERATION_DEADLINE_S",
        "--generation-deadline-s",
        50.0,
        "Sampling requests (/generate, /invert, /reconstruct): admitted beside the ones in progress only if "
        "all would finish within half of this at the measured sampling rate (else HTTP 429 with Retry-After "
        "at arrival), and answered 504 at it. Keep it below the gateway's 60 s timeout.",
    ),
    Setting(
        "KILN_AGENT_MAX_TOKENS", "--agent-max-tokens", 1024, "The agent: most completion tokens per LLM call."
    ),
    Setting(
        "KILN_AGENT_MAX_NLI_CALLS",
        "--agent-max-nli-calls",
        16,
        "The agent: most NLI judgments (IEP's candidate checks) per question; more candidates than that are "
        "cut to the most plausible ones.",
    ),
    Setting(
        "KILN_MODEL_CONFIG",
        "--model-config",
        None,
        "YAML or JSON file of per-model settings (backend, batch_max_size, batch_window_ms, max_queue_size, "
        "max_queue_delay_ms, instances, max_text_chars, max_image_pixels, generation_deadline_s) by model "
        "name; the flags above are the defaults.",
        shown="none",
    ),
    Setting(
        "KILN_MODEL_SETTINGS",
        None,
        None,
        "The same per-model mapping as inline JSON (wins over the file per key).",
        shown="none",
    ),
    Setting(
        "KILN_MODEL_REPOSITORY",
        "--model-repository",
        None,
        "A Triton model repository (DIR/<name>/config.pbtxt, DIR/<name>/<version>/model.onnx): every model "
        "in it is served beside the --models ones (KILN_MODELS then defaults to none).",
        shown="none",
    ),
    Setting(
        "KILN_REPOSITORY_POLL_S",
        "--repository-poll-s",
        0.0,
        "Rescan the model repository this often (seconds; Triton's --model-control-mode=poll): new model "
        "and version directories are served, removed ones drained and unloaded. 0 = never.",
    ),
    Setting("KILN_WORKERS", "--workers", 1, "Server worker processes."),
    Setting(
        "KILN_THREADS",
        "--threads",
        None,
        "onnxruntime / PyTorch intra-op threads per runtime.",
        shown=_CORES,
    ),
    Setting(
        "KILN_GENERATION_BATCHING",
        "--generation-batching",
        "step",
        "Diffusion sampling: 'step' (concurrent /generate requests share denoiser batches step by step) or "
        "'request' (one request's sampling loop at a time).",
    ),
    Setting("KILN_LOG_LEVEL", "--log-level", "INFO", f"Kiln's log level: {', '.join(_LOG_LEVELS)}."),
    Setting(None, "--train", True, "Train and export the models the store lacks first (--no-train refuses)."),
    Setting(None, "--train-epochs", None, "Epochs for models trained here.", shown="the recipe's"),
    Setting(
        "KILN_PREPARE_JOBS",
        "--prepare-jobs",
        None,
        "Missing models trained/exported at once, each in its own process.",
        shown="one per core",
    ),
    Setting(
        "KILN_HOME",
        None,
        None,
        "State directory: model store, training runs, logs, admin token, Milvus Lite file.",
        shown=".kiln",
    ),
    Setting(
        "KILN_ADMIN_TOKEN",
        None,
        None,
        "Bearer token of the admin routes (and writes and reads); unset: a random one kept in "
        "$KILN_HOME/admin-token (`kiln token` prints the active one).",
        shown="$KILN_HOME/admin-token",
    ),
    Setting(
        "KILN_WRITE_TOKEN",
        None,
        None,
        "Bearer token of gallery writes (create, upsert, delete item); the admin token writes too.",
        shown="the admin token",
    ),
    Setting(
        "KILN_READ_TOKEN",
        None,
        None,
        "When set, every request but health probes, /metrics and /docs.json needs it (or the write or "
        "admin token); unset: reads are open.",
        shown="none (reads open)",
    ),
    Setting(
        "KILN_DEMO_GALLERIES",
        None,
        "digits=embed-old,digits-xbt=xbt-old",
        "Demo galleries created at start-up, NAME=MODEL,...; empty = none.",
    ),
    Setting(
        "KILN_MILVUS_URI",
        None,
        None,
        "Milvus for the galleries: a Milvus Lite file, or http://host:19530 for a standalone/cluster server.",
        shown="$KILN_HOME/milvus/galleries.db",
    ),
    Setting("KILN_MILVUS_TOKEN", None, None, "Token for a Milvus server.", shown="none"),
    Setting(
        "KILN_RAY_ADDRESS",
        None,
        None,
        "Run gallery backfills as Ray Data jobs: `local`, `auto` or ray://host:10001 (the ray extra).",
        shown="none (in-process)",
    ),
    Setting(
        "KILN_RAY_ACTORS", None, None, "Model replicas a Ray backfill embeds with.", shown="one per Ray CPU"
    ),
    Setting(
        "KILN_LLM_BASE_URL",
        None,
        None,
        "OpenAI-compatible chat-completions server of the agent; unset: the agent routes answer 503.",
        shown="none",
    ),
    Setting("KILN_LLM_MODEL", None, None, "The model name that LLM server serves.", shown="none"),
    Setting("KILN_LLM_API_KEY", None, "none", "Bearer key sent to the LLM server."),
    Setting("KILN_LLM_TIMEOUT", None, 60.0, "Seconds per LLM call."),
    Setting(
        "KILN_LLM_MAX_RETRIES",
        None,
        2,
        "Retries of failed LLM calls (connection errors, timeouts, 429, 5xx; exponential backoff).",
    ),
)
SETTING_BY_ENV = {s.env: s for s in SETTINGS if s.env}
SETTING_BY_FLAG = {s.flag: s for s in SETTINGS if s.flag}


def default_of(env: str) -> Any:
    """The catalogued default of the ``KILN_*`` variable ``env``."""
    return SETTING_BY_ENV[env].default


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


# The edge in-flight bound's ceiling when derived from the models (two default model queues' worth).
MAX_IN_FLIGHT_AUTO = 512


def _max_in_flight() -> int | None:
    """KILN_MAX_IN_FLIGHT: unset or ``auto`` → None (derived from the models), else an integer >= 0."""
    if os.environ.get("KILN_MAX_IN_FLIGHT", "").strip().lower() in ("", "auto"):
        return None
    try:
        return _number("KILN_MAX_IN_FLIGHT", None, 0)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (an integer >= 0, or 'auto')") from None


@dataclass(frozen=True)
class Tokens:
    """The bearer tokens of the server's scopes, as set (``serving.admin`` resolves the admin token's file
    fallback and checks them). Empty = not set. Kept out of ``repr`` so a logged config leaks none."""

    admin: str = field(default="", repr=False)  # KILN_ADMIN_TOKEN: admin routes, and writes and reads
    write: str = field(default="", repr=False)  # KILN_WRITE_TOKEN: gallery writes (and reads)
    read: str = field(default="", repr=False)  # KILN_READ_TOKEN: when set, reads need a token too

    @classmethod
    def from_env(cls) -> Tokens:
        return cls(
            admin=os.environ.get("KILN_ADMIN_TOKEN", "").strip(),
            write=os.environ.get("KILN_WRITE_TOKEN", "").strip(),
            read=os.environ.get("KILN_READ_TOKEN", "").strip(),
        )


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
    # 0 = no bound, None = what the served models hold (see edge_bound).
    max_in_flight: int | None = None
    # Every model's work budgets (ModelSettings has the meaning; per-model overrides win).
    max_text_chars: int = 2000
    max_image_pixels: int = 16 * 1024 * 1024
    generation_deadline_s: float = 50.0
    # The agent (/agent/solve): most completion tokens per LLM call, and NLI judgments per question.
    agent_max_tokens: int = 1024
    agent_max_nli_calls: int = 16
    model_settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> overrides
    # A Triton model repository served beside the model-store models (serving.triton); "" = none.
    model_repository: str = ""
    repository_poll_s: float = 0.0  # rescan the repository this often (Triton's poll mode); 0 = never

    def edge_bound(self) -> int:
        """The in-flight bound of each worker's edge: ``max_in_flight`` when set (0 = none), else what the
        served models can hold at once — each one's queue plus the batches it computes
        (``max_queue_size + batch_max_size × instances``), summed, at most :data:`MAX_IN_FLIGHT_AUTO`.

        A request past that would only be refused by its model's queue after its body was read and
        decoded; refused at the edge it costs the event loop next to nothing.
        """
        if self.max_in_flight is not None:
            return self.max_in_flight
        if self.model_repository:  # its models are found at run time (polling adds more): the cap
            return MAX_IN_FLIGHT_AUTO
        held = 0
        for tag in self.models:
            s = self.settings_for(tag.partition(":")[0])
            held += s.max_queue_size + s.batch_max_size * s.instances
        return min(held, MAX_IN_FLIGHT_AUTO)
    tokens: Tokens = field(default_factory=Tokens, repr=False)  # bearer tokens by scope (serving.admin)

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
        model_repository = os.environ.get("KILN_MODEL_REPOSITORY", "")
        if model_repository and not Path(model_repository).is_dir():
            raise ConfigError(f"KILN_MODEL_REPOSITORY={model_repository!r} is not a directory")
        # With a model repository, only its models unless KILN_MODELS names model-store ones too.
        default_models = "" if model_repository else DEFAULT_MODELS
        models = tuple(
            m.strip() for m in os.environ.get("KILN_MODELS", default_models).split(",") if m.strip()
        )
        if not models and not model_repository:
            raise ConfigError(
                "KILN_MODELS is empty; name at least one model, e.g. KILN_MODELS=vit-soft, "
                "or serve a Triton model repository (KILN_MODEL_REPOSITORY)"
            )
        backend = os.environ.get("KILN_BACKEND", default_of("KILN_BACKEND"))
        if backend not in BACKENDS:
            raise ConfigError(f"KILN_BACKEND={backend!r} is not a backend; valid: {list(BACKENDS)}")
        generation_batching = os.environ.get(
            "KILN_GENERATION_BATCHING", default_of("KILN_GENERATION_BATCHING")
        )
        if generation_batching not in GENERATION_BATCHING:
            raise ConfigError(
                f"KILN_GENERATION_BATCHING={generation_batching!r} is not a mode; "
                f"valid: {list(GENERATION_BATCHING)}"
            )
        log_level = os.environ.get("KILN_LOG_LEVEL", default_of("KILN_LOG_LEVEL")).upper()
        if log_level not in _LOG_LEVELS:
            raise ConfigError(f"KILN_LOG_LEVEL={log_level!r} is not a log level; valid: {list(_LOG_LEVELS)}")
        config = cls(
            models=models,
            backend=backend,
            http_port=_number("KILN_HTTP_PORT", default_of("KILN_HTTP_PORT"), 1),
            grpc_port=_number("KILN_GRPC_PORT", default_of("KILN_GRPC_PORT"), 0),
            host=os.environ.get("KILN_HOST", default_of("KILN_HOST")),
            batch_max_size=_number("KILN_BATCH_MAX_SIZE", default_of("KILN_BATCH_MAX_SIZE"), 1),
            batch_window_ms=_number("KILN_BATCH_WINDOW_MS", default_of("KILN_BATCH_WINDOW_MS"), 0.0, float),
            max_request_bytes=_number("KILN_MAX_REQUEST_BYTES", default_of("KILN_MAX_REQUEST_BYTES"), 1024),
            workers=_number("KILN_WORKERS", default_of("KILN_WORKERS"), 1),
            threads=_number("KILN_THREADS", min(4, os.cpu_count() or 1), 1),  # SETTINGS shows it
            log_level=log_level,
            generation_batching=generation_batching,
            max_queue_size=_number("KILN_MAX_QUEUE_SIZE", default_of("KILN_MAX_QUEUE_SIZE"), 1),
            max_queue_delay_ms=_number(
                "KILN_MAX_QUEUE_DELAY_MS", default_of("KILN_MAX_QUEUE_DELAY_MS"), 0.0, float
            ),
            drain_timeout_s=_number("KILN_DRAIN_TIMEOUT_S", default_of("KILN_DRAIN_TIMEOUT_S"), 0.0, float),
            max_in_flight=_max_in_flight(),
            max_text_chars=_number("KILN_MAX_TEXT_CHARS", default_of("KILN_MAX_TEXT_CHARS"), 1),
            max_image_pixels=_number("KILN_MAX_IMAGE_PIXELS", default_of("KILN_MAX_IMAGE_PIXELS"), 1),
            generation_deadline_s=_number(
                "KILN_GENERATION_DEADLINE_S", default_of("KILN_GENERATION_DEADLINE_S"), 0.001, float
            ),
            agent_max_tokens=_number("KILN_AGENT_MAX_TOKENS", default_of("KILN_AGENT_MAX_TOKENS"), 1),
            agent_max_nli_calls=_number(
                "KILN_AGENT_MAX_NLI_CALLS", default_of("KILN_AGENT_MAX_NLI_CALLS"), 1
            ),
            model_settings=load_model_settings(
                os.environ.get("KILN_MODEL_CONFIG"), os.environ.get("KILN_MODEL_SETTINGS")
            ),
            model_repository=str(Path(model_repository).resolve()) if model_repository else "",
            repository_poll_s=_number(
                "KILN_REPOSITORY_POLL_S", default_of("KILN_REPOSITORY_POLL_S"), 0.0, float
            ),
            tokens=Tokens.from_env(),
        )
        if config.repository_poll_s and not model_repository:
            raise ConfigError("KILN_REPOSITORY_POLL_S needs a model repository (KILN_MODEL_REPOSITORY)")
        for model in config.model_settings:  # every override is checked now, not when a model loads
            config.settings_for(model)
        return config
