"""Per-model Prometheus metrics, exported on BentoML's ``/metrics`` next to its defaults.

Plain ``prometheus_client`` metrics: BentoML runs its workers in prometheus_client's multiprocess mode
and its ``/metrics`` endpoint aggregates every metric the workers write.

Named after Triton's (``nv_inference_count`` vs ``nv_inference_exec_count``) so ops teams can read
batching efficiency as ``kiln_inference_count_total / kiln_inference_exec_count_total``.
Every series is labelled by model, version and backend; request counters also by protocol.
"""

from __future__ import annotations

import prometheus_client

_LABELS = ["model", "version", "backend"]
# Latency buckets from 0.5 ms to 10 s: CPU inference of small models sits in the low milliseconds.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UNKNOWN_MODEL = "_unknown_"  # label for requests naming no loaded model (keeps label cardinality bounded)

REQUESTS = prometheus_client.Counter(
    name="kiln_inference_requests_total",
    documentation="Inference requests by outcome (status=success|failure) and protocol (http|grpc)",
    labelnames=[*_LABELS, "protocol", "status"],
)
REQUEST_SECONDS = prometheus_client.Histogram(
    name="kiln_inference_request_seconds",
    documentation="End-to-end request handling time inside the server, decode to encode",
    labelnames=[*_LABELS, "protocol"],
    buckets=_BUCKETS,
)
INFERENCE_COUNT = prometheus_client.Counter(
    name="kiln_inference_count_total",
    documentation="Samples inferred (each row of each request's batch dimension)",
    labelnames=_LABELS,
)
EXEC_COUNT = prometheus_client.Counter(
    name="kiln_inference_exec_count_total",
    documentation="Model executions; inference_count / exec_count is the mean batch the runtime saw",
    labelnames=_LABELS,
)
BATCH_SIZE = prometheus_client.Histogram(
    name="kiln_inference_batch_size",
    documentation="Rows in each batch the runtime executed (adaptive batching; step-level for diffusion)",
    labelnames=_LABELS,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
QUEUE_SECONDS = prometheus_client.Histogram(
    name="kiln_inference_queue_seconds",
    documentation="Time a request waited in the adaptive batcher before its batch ran",
    labelnames=_LABELS,
    buckets=_BUCKETS,
)
COMPUTE_SECONDS = prometheus_client.Histogram(
    name="kiln_inference_compute_seconds",
    documentation="Runtime execution time of one batch",
    labelnames=_LABELS,
    buckets=_BUCKETS,
)
MODEL_LOAD_SECONDS = prometheus_client.Gauge(
    name="kiln_model_load_seconds",
    documentation="Time taken to load the model's runtime at start-up",
    labelnames=_LABELS,
    multiprocess_mode="livemax",  # BentoML workers run in prometheus_client's multiprocess mode
)
MODEL_READY = prometheus_client.Gauge(
    name="kiln_model_ready",
    documentation="1 when the model/version/backend is loaded and serving, else 0",
    labelnames=_LABELS,
    multiprocess_mode="livemax",
)


# Admission control (serving/batching.py, serving/admission.py).
REJECTED = prometheus_client.Counter(
    name="kiln_inference_rejected_total",
    documentation="Requests refused because the model's queue was full (HTTP 429 / gRPC RESOURCE_EXHAUSTED), "
    "by reason: queue_full (max_queue_size), queue_delay (max_queue_delay_ms) or work (a sampling request "
    "that would not finish within its deadline at the measured denoiser rate)",
    labelnames=[*_LABELS, "reason"],
)
DROPPED = prometheus_client.Counter(
    name="kiln_inference_dropped_total",
    documentation="Requests that left the queue without being computed, by reason: cancelled (the client "
    "went away) or timeout (their deadline passed)",
    labelnames=[*_LABELS, "reason"],
)
TIMEOUTS = prometheus_client.Counter(
    name="kiln_inference_timeouts_total",
    documentation="Requests answered HTTP 504 / gRPC DEADLINE_EXCEEDED because their own timeout passed",
    labelnames=_LABELS,
)
BATCH_SPLITS = prometheus_client.Counter(
    name="kiln_inference_batch_splits_total",
    documentation="Failed batches re-run in halves so that only the request that fails gets the error",
    labelnames=_LABELS,
)
QUEUE_SIZE = prometheus_client.Gauge(
    name="kiln_inference_queue_size",
    documentation="Requests waiting in the model's batcher queue",
    labelnames=_LABELS,
    multiprocess_mode="livesum",
)
DRAINING = prometheus_client.Gauge(
    name="kiln_server_draining",
    documentation="1 while the server drains after SIGTERM (not ready, refusing new requests), else 0",
    multiprocess_mode="livemax",
)


GENERATED_IMAGES = prometheus_client.Counter(
    name="kiln_generated_images_total",
    documentation="Images returned by /generate (after hallucination filtering), by sampler",
    labelnames=[*_LABELS, "sampler"],
)
DENOISER_STEPS = prometheus_client.Counter(
    name="kiln_denoiser_steps_total",
    documentation="Sampler steps run by /generate, /invert and /reconstruct (one per request per step)",
    labelnames=[*_LABELS, "sampler"],
)
HALLUCINATION_REJECTIONS = prometheus_client.Counter(
    name="kiln_hallucination_rejections_total",
    documentation="Oversampled images dropped by /generate's hallucination filter",
    labelnames=_LABELS,
)

FORECASTS = prometheus_client.Counter(
    name="kiln_forecasts_total",
    documentation="Forecasts served by /forecast",
    labelnames=_LABELS,
)
FORECAST_INPUT_BARS = prometheus_client.Histogram(
    name="kiln_forecast_input_bars",
    documentation="Bars per /forecast request (after the gap policy)",
    labelnames=_LABELS,
    buckets=(64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384),
)
FORECAST_SECONDS = prometheus_client.Histogram(
    name="kiln_forecast_seconds",
    documentation="Model time of one /forecast (queue + runtime), per model",
    labelnames=_LABELS,
    buckets=_BUCKETS,
)


# Retrieval galleries (serving.gallery), labelled by gallery
GALLERY_SEARCHES = prometheus_client.Counter(
    name="kiln_gallery_searches_total",
    documentation="Gallery searches answered, by the embedding space searched",
    labelnames=["gallery", "space"],
)
GALLERY_UPSERTS = prometheus_client.Counter(
    name="kiln_gallery_upserts_total",
    documentation="Gallery items upserted (acknowledged once flushed)",
    labelnames=["gallery"],
)
GALLERY_REEMBEDDED = prometheus_client.Counter(
    name="kiln_gallery_reembedded_items_total",
    documentation="Gallery items re-embedded by backfills, by model (a compatible upgrade adds none)",
    labelnames=["gallery", "model"],
)
GALLERY_BACKFILL_ITEMS = prometheus_client.Gauge(
    name="kiln_gallery_backfill_items",
    documentation="Backfill progress: items done and total (kind=done|total) of the gallery's last backfill",
    labelnames=["gallery", "kind"],
    multiprocess_mode="livemax",
)


def record_request(
    model: str, version: str, backend: str, protocol: str, ok: bool, seconds: float | None = None
) -> None:
    """Count one request's outcome; front-ends call this once per request, success or failure."""
    REQUESTS.labels(
        model=model,
        version=version,
        backend=backend,
        protocol=protocol,
        status="success" if ok else "failure",
    ).inc()
    if seconds is not None:
        REQUEST_SECONDS.labels(model=model, version=version, backend=backend, protocol=protocol).observe(
            seconds
        )


# The agent family (serving/agent): calls to the configured OpenAI-compatible LLM, its token usage, and
# Kiln tool calls made by the agent or over MCP. Labelled by the LLM's model name, not Kiln's models.
LLM_CALLS = prometheus_client.Counter(
    name="kiln_llm_calls_total",
    documentation="Chat-completion calls to the configured LLM, by outcome (status=success|failure)",
    labelnames=["llm_model", "status"],
)
LLM_TOKENS = prometheus_client.Counter(
    name="kiln_llm_tokens_total",
    documentation="Tokens the LLM reported in its usage (kind=prompt|completion)",
    labelnames=["llm_model", "kind"],
)
LLM_CALL_SECONDS = prometheus_client.Histogram(
    name="kiln_llm_call_seconds",
    documentation="Wall time of one chat-completion call to the LLM, retries included",
    labelnames=["llm_model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)
AGENT_SOLVES = prometheus_client.Counter(
    name="kiln_agent_solves_total",
    documentation="POST /agent/solve requests by strategy and outcome",
    labelnames=["strategy", "status"],
)
TOOL_CALLS = prometheus_client.Counter(
    name="kiln_tool_calls_total",
    documentation="Kiln tools called by the agent (caller=agent) or over MCP (caller=mcp), by outcome",
    labelnames=["tool", "caller", "status"],
)
