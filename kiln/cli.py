"""The ``kiln`` command line: train, export, serve, manage models, benchmark."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from serving.config import DEFAULT_MODELS

app = typer.Typer(
    help="Kiln: train research models on bundled data, export them to ONNX / int8 / TensorRT, and serve "
    "them over HTTP and gRPC (Open Inference Protocol) with Prometheus metrics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
models_app = typer.Typer(help="List, inspect and delete artifacts in the model store.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


@app.command()
def train(
    model: Annotated[
        str,
        typer.Argument(
            help="Recipe to train: vit-soft, vit-soft-norm, vit-softmax (classifiers), "
            "vit-soft-wide, vit-softmax-wide (192-wide classifiers, for int8), "
            "diffusion-digits (class-conditional diffusion), forecaster-goog-daily, "
            "forecaster-eurusd-hourly (price forecasters), embed-old, embed-new-independent, "
            "embed-new-bct, embed-new-bt2, embed-new-oca (retrieval; a compatible model needs its old "
            "one), xbt-old, xbt-new-text (XBT image–text)."
        ),
    ],
    epochs: Annotated[int | None, typer.Option(min=1, help="Override the recipe's epoch count.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, data order and augmentation.")] = 0,
    export: Annotated[
        bool, typer.Option("--export/--no-export", help="Export ONNX + int8 afterwards.")
    ] = False,
    data: Annotated[
        str | None,
        typer.Option(
            help="Forecasters: train on this CSV/Parquet of OHLCV bars (timestamp, open, high, low, close, "
            "volume; exchange and tool layouts are recognised) or a bundled series (GOOG, EURUSD, BTCUSD)."
        ),
    ] = None,
    gaps: Annotated[
        str | None,
        typer.Option(help="Forecasters: gap policy for missing bars: keep (default), fill or error."),
    ] = None,
) -> None:
    """Train a model on bundled data and save it to the model store (best-on-validation weights)."""
    import dataclasses

    from training.recipes import RECIPES
    from training.trainer import train as run_training

    if model not in RECIPES:
        _fail(f"unknown model {model!r}; trainable: {', '.join(sorted(RECIPES))}")
    recipe = RECIPES[model]
    changes = {k: v for k, v in (("data", data), ("gaps", gaps)) if v is not None}
    if changes:
        if not all(hasattr(recipe, k) for k in changes):
            _fail(f"--data/--gaps apply to forecasters; {model!r} trains on its bundled data")
        recipe = dataclasses.replace(recipe, **changes)
    try:
        result = run_training(model, epochs=epochs, seed=seed, recipe=recipe)
    except ValueError as exc:  # kiln.market.bars.BarsError included: the message names the bad bar
        _fail(str(exc))
    typer.echo(result.summary())
    if export:
        _export(result.artifact.tag, None)


def _export(tag: str, formats: list[str] | None, max_loss: list[str] | None = None) -> None:
    from export.gates import parse_max_loss
    from export.pipeline import ExportError, export_artifact
    from kiln.artifacts import ArtifactError

    try:
        export_artifact(tag, formats, log=typer.echo, max_loss=parse_max_loss(max_loss or []))
    except (ArtifactError, ExportError, ValueError) as exc:
        _fail(str(exc))


@app.command("export")
def export_cmd(
    model: Annotated[str, typer.Argument(help="Artifact to export: NAME (latest) or NAME:VERSION.")],
    formats: Annotated[
        list[str] | None,
        typer.Option(
            "--format",
            "-f",
            help="Format(s) to build; repeatable. Classifiers: onnx, int8-static, fp16-trt, int8-trt. "
            "Diffusion: onnx, int8-ptq4dm, int8-uniform, int8-noised, fp16-trt, int8-trt. "
            "Forecasters: onnx, int8-static (served only if it holds accuracy). "
            "Default: every format of the model's task (TensorRT only on a GPU).",
        ),
    ] = None,
    max_loss: Annotated[
        list[str] | None,
        typer.Option(
            "--max-loss",
            help="Quality gate override, METRIC=VALUE, repeatable: how much of the fp32 graph's quality "
            "an int8 graph or TensorRT engine may lose before it is discarded (never served). "
            "Classifiers: val_accuracy (default 0.01). Diffusion: fid_digits (relative, default 0.2), "
            "conditional_accuracy (default 0.05).",
        ),
    ] = None,
) -> None:
    """Export an artifact: ONNX (parity-checked), 8-bit PTQ graphs (QDQ), TensorRT fp16/int8 engines.

    Every format is stored under the artifact's model-store tag; its parity and quality (test accuracy,
    FID-digits...) go into kiln.json. A derived graph that fails its quality gate is deleted and its
    entry records why.
    """
    _export(model, formats, max_loss)


@app.command()
def serve(
    models: Annotated[
        str, typer.Option(envvar="KILN_MODELS", help="Comma-separated model names or NAME:VERSION tags.")
    ] = DEFAULT_MODELS,
    backend: Annotated[
        str,
        typer.Option(
            envvar="KILN_BACKEND",
            help="Default runtime: onnxruntime, onnxruntime-int8, pytorch, tensorrt-fp16, tensorrt-int8.",
        ),
    ] = "onnxruntime",
    host: Annotated[
        str, typer.Option(envvar="KILN_HOST", help="Address to bind HTTP and gRPC to.")
    ] = "0.0.0.0",
    http_port: Annotated[
        int, typer.Option(envvar="KILN_HTTP_PORT", help="HTTP port (task endpoints, /v2, /metrics).")
    ] = 3000,
    grpc_port: Annotated[
        int, typer.Option(envvar="KILN_GRPC_PORT", help="gRPC Open Inference Protocol port; 0 disables it.")
    ] = 8001,
    batch_max_size: Annotated[
        int,
        typer.Option(
            envvar="KILN_BATCH_MAX_SIZE", min=1, help="Adaptive batching: max samples per batch; 1 = off."
        ),
    ] = 32,
    batch_window_ms: Annotated[
        float,
        typer.Option(
            envvar="KILN_BATCH_WINDOW_MS", min=0, help="Adaptive batching: max wait for a batch to fill."
        ),
    ] = 2.0,
    max_request_bytes: Annotated[
        int,
        typer.Option(
            envvar="KILN_MAX_REQUEST_BYTES",
            min=1024,
            help="Larger request bodies get HTTP 413 / RESOURCE_EXHAUSTED.",
        ),
    ] = 8 * 1024 * 1024,
    max_queue_size: Annotated[
        int,
        typer.Option(
            envvar="KILN_MAX_QUEUE_SIZE",
            min=1,
            help="Admission control: most requests waiting per model and backend; more get HTTP 429 with "
            "Retry-After / gRPC RESOURCE_EXHAUSTED at once (Triton's max_queue_size).",
        ),
    ] = 256,
    max_queue_delay_ms: Annotated[
        float,
        typer.Option(
            envvar="KILN_MAX_QUEUE_DELAY_MS",
            min=0,
            help="Admission control: longest a request may wait in a model's queue (estimated when it "
            "arrives, enforced when its batch forms); past it, 429 / RESOURCE_EXHAUSTED. 0 = no bound.",
        ),
    ] = 1000.0,
    max_in_flight: Annotated[
        int,
        typer.Option(
            envvar="KILN_MAX_IN_FLIGHT",
            min=0,
            help="Admission control at the edge: most requests in progress per worker (HTTP + gRPC); more "
            "get 429 / RESOURCE_EXHAUSTED before their body is read. 0 = no bound.",
        ),
    ] = 512,
    drain_timeout_s: Annotated[
        float,
        typer.Option(
            envvar="KILN_DRAIN_TIMEOUT_S",
            min=0,
            help="SIGTERM: longest wait for accepted requests to finish (the server is not ready and "
            "refuses new requests meanwhile) before it exits anyway.",
        ),
    ] = 30.0,
    max_text_chars: Annotated[
        int,
        typer.Option(
            envvar="KILN_MAX_TEXT_CHARS",
            min=1,
            help="Work budget: longest text per input of a text model (/embed, /v1/embeddings, OIP BYTES), "
            "in characters, checked before tokenising; longer gets HTTP 400.",
        ),
    ] = 2000,
    max_image_pixels: Annotated[
        int,
        typer.Option(
            envvar="KILN_MAX_IMAGE_PIXELS",
            min=1,
            help="Work budget: pixels of all images in one request, read from the PNG/JPEG headers before "
            "any is decoded; more gets HTTP 400.",
        ),
    ] = 16 * 1024 * 1024,
    generation_deadline_s: Annotated[
        float,
        typer.Option(
            envvar="KILN_GENERATION_DEADLINE_S",
            min=0.001,
            help="Sampling requests (/generate, /invert, /reconstruct): admitted beside the ones in progress "
            "only if all would finish within half of this at the measured sampling rate (else HTTP 429 with "
            "Retry-After at arrival), and answered 504 at it. Keep it below the gateway's 60 s timeout.",
        ),
    ] = 50.0,
    agent_max_tokens: Annotated[
        int,
        typer.Option(
            envvar="KILN_AGENT_MAX_TOKENS", min=1, help="The agent: most completion tokens per LLM call."
        ),
    ] = 1024,
    agent_max_nli_calls: Annotated[
        int,
        typer.Option(
            envvar="KILN_AGENT_MAX_NLI_CALLS",
            min=1,
            help="The agent: most NLI judgments (IEP's candidate checks) per question; more candidates "
            "than that are cut to the most plausible ones.",
        ),
    ] = 16,
    model_config: Annotated[
        str | None,
        typer.Option(
            envvar="KILN_MODEL_CONFIG",
            help="YAML or JSON file of per-model settings (backend, batch_max_size, batch_window_ms, "
            "max_queue_size, max_queue_delay_ms, instances, max_text_chars, max_image_pixels, "
            "generation_deadline_s) by model name; the flags above are the "
            "defaults. KILN_MODEL_SETTINGS takes the same mapping as inline JSON.",
        ),
    ] = None,
    workers: Annotated[int, typer.Option(envvar="KILN_WORKERS", min=1, help="Server worker processes.")] = 1,
    generation_batching: Annotated[
        str,
        typer.Option(
            envvar="KILN_GENERATION_BATCHING",
            help="Diffusion sampling: 'step' (concurrent /generate requests share denoiser batches step by "
            "step) or 'request' (one request's sampling loop at a time).",
        ),
    ] = "step",
    log_level: Annotated[
        str, typer.Option(envvar="KILN_LOG_LEVEL", help="Kiln's log level: DEBUG, INFO, WARNING, ERROR.")
    ] = "INFO",
    train_missing: Annotated[
        bool, typer.Option("--train/--no-train", help="Train and export default models the store lacks.")
    ] = True,
    train_epochs: Annotated[
        int | None, typer.Option(min=1, help="Epochs for models trained here (default: the recipe's).")
    ] = None,
    prepare_jobs: Annotated[
        int | None,
        typer.Option(
            envvar="KILN_PREPARE_JOBS",
            min=1,
            help="Missing models trained/exported at once, each in its own process (default: one per core).",
        ),
    ] = None,
) -> None:
    """Serve models over HTTP (BentoML) and gRPC, training and exporting missing ones first.

    Every setting can also come from its KILN_* environment variable (as the Kubernetes ConfigMap sets
    them); a flag on the command line wins.
    """
    from serving.config import ConfigError, ServeConfig

    env = {
        "KILN_MODELS": models,
        "KILN_BACKEND": backend,
        "KILN_HOST": host,
        "KILN_HTTP_PORT": str(http_port),
        "KILN_GRPC_PORT": str(grpc_port),
        "KILN_BATCH_MAX_SIZE": str(batch_max_size),
        "KILN_BATCH_WINDOW_MS": str(batch_window_ms),
        "KILN_MAX_REQUEST_BYTES": str(max_request_bytes),
        "KILN_MAX_QUEUE_SIZE": str(max_queue_size),
        "KILN_MAX_QUEUE_DELAY_MS": str(max_queue_delay_ms),
        "KILN_DRAIN_TIMEOUT_S": str(drain_timeout_s),
        "KILN_MAX_IN_FLIGHT": str(max_in_flight),
        "KILN_MAX_TEXT_CHARS": str(max_text_chars),
        "KILN_MAX_IMAGE_PIXELS": str(max_image_pixels),
        "KILN_GENERATION_DEADLINE_S": str(generation_deadline_s),
        "KILN_AGENT_MAX_TOKENS": str(agent_max_tokens),
        "KILN_AGENT_MAX_NLI_CALLS": str(agent_max_nli_calls),
        "KILN_WORKERS": str(workers),
        "KILN_GENERATION_BATCHING": generation_batching,
        "KILN_LOG_LEVEL": log_level,
    }
    if model_config:
        env["KILN_MODEL_CONFIG"] = os.path.abspath(model_config)
    os.environ.update(env)
    try:
        config = ServeConfig.from_env()
    except ConfigError as exc:
        _fail(str(exc))
    _prepare(config.models, train_missing, train_epochs, prepare_jobs)
    typer.echo(f"HTTP  http://localhost:{http_port}  (task routes: /docs.json; /v2/...; GET /metrics)")
    if grpc_port:
        typer.echo(f"gRPC  localhost:{grpc_port}  (inference.GRPCInferenceService)")
    cmd = [
        sys.executable,
        "-m",
        "serving.launch",  # bentoml's CLI, with this server's own metrics directory
        "serve",
        "serving.service:Kiln",
        "--host",
        host,
        "--port",
        str(http_port),
        # After the SIGTERM drain (serving.admission) nothing accepted is in flight; uvicorn's own wait
        # for connections is then bounded so a stale one cannot hold the exit.
        "--timeout-graceful-shutdown",
        "5",
    ]
    os.execv(sys.executable, cmd)


def _prepare(tags, train_missing: bool, epochs: int | None, jobs: int | None, export: bool = True) -> None:
    from export.pipeline import ExportError
    from kiln.artifacts import ArtifactError
    from kiln.prepare import PrepareError, prepare

    try:
        prepare(tags, train_missing=train_missing, epochs=epochs, jobs=jobs, export=export, log=typer.echo)
    except (PrepareError, ArtifactError, ExportError, ValueError) as exc:
        _fail(str(exc))


@app.command("prepare")
def prepare_cmd(
    models: Annotated[
        list[str] | None,
        typer.Argument(help="Models to make servable (default: the ones `kiln serve` serves by default)."),
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs for models trained here.")] = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            envvar="KILN_PREPARE_JOBS",
            min=1,
            help="Models prepared at once, each in its own process (default: one per core).",
        ),
    ] = None,
    export: Annotated[
        bool,
        typer.Option(
            "--export/--no-export",
            help="Build the default exports too (--no-export: train what the store lacks, export nothing).",
        ),
    ] = True,
) -> None:
    """Train the models the store lacks and build their default exports (what `kiln serve` does first).

    Models a recipe requires are prepared first: an old embedding model before the compatible new one
    trains; FID-digits' classifier (vit-soft) before diffusion exports, while diffusion trains beside it.
    Useful as an image-build or init step, so a server starts at once.
    """
    from training.recipes import DEFAULT_MODELS

    _prepare(tuple(models or DEFAULT_MODELS), True, epochs, jobs, export)


@models_app.command("list")
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List Kiln artifacts, newest first."""
    from kiln.artifacts import list_artifacts

    arts = list_artifacts()
    if as_json:
        typer.echo(json.dumps([{"tag": a.tag, **a.manifest} for a in arts], indent=2))
        return
    if not arts:
        typer.echo("no models yet: `kiln train vit-soft` or `make serve` creates them")
        return
    typer.echo(f"{'TAG':<34} {'ARCHITECTURE':<20} {'TEST ACC':>8}  EXPORTS")
    for a in arts:
        acc = a.manifest.get("metrics", {}).get("test_accuracy")
        acc_s = f"{acc:.4f}" if acc is not None else "-"
        exports = ",".join(
            fmt + ("(discarded)" if "discarded" in entry else "")
            for fmt, entry in a.manifest.get("exports", {}).items()
        )
        exports = exports or "-"
        typer.echo(f"{a.tag:<34} {a.manifest.get('architecture', '?'):<20} {acc_s:>8}  {exports}")


@models_app.command("show")
def models_show(tag: Annotated[str, typer.Argument(help="NAME (latest) or NAME:VERSION.")]) -> None:
    """Print an artifact's manifest: config, metrics, exports, code version."""
    from kiln.artifacts import ArtifactError, get_artifact

    try:
        art = get_artifact(tag)
    except ArtifactError as exc:
        _fail(str(exc))
    typer.echo(json.dumps({"tag": art.tag, "path": str(art.path), **art.manifest}, indent=2))


@models_app.command("delete")
def models_delete(
    tag: Annotated[str, typer.Argument(help="NAME:VERSION to delete (NAME alone deletes the latest).")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete an artifact and all its exported formats from the model store."""
    from kiln.artifacts import ArtifactError, delete_artifact, get_artifact

    try:
        art = get_artifact(tag)
    except ArtifactError as exc:
        _fail(str(exc))
    if not yes and not typer.confirm(f"delete {art.tag} and all its exports?"):
        raise typer.Exit(code=1)
    delete_artifact(art.tag)
    typer.echo(f"deleted {art.tag}")


@app.command()
def bench(
    suite: Annotated[
        str,
        typer.Argument(
            help="Benchmark suite: vit (attention, runtimes + int8 format grid, serving; trains "
            "the 192-wide ViTs if missing), diffusion (samplers, PTQ4DM int8, "
            "hallucination filter; trains and exports diffusion-digits and vit-soft if missing), agent "
            "(CoT / IEP / IEP+CoT accuracy and LLM calls on --data; needs an LLM), forecast "
            "(walk-forward backtest of the forecasters and baselines on GOOG daily and EURUSD hourly), "
            "retrieval (BCT/BT²/OCA compatibility tables, XBT recall, gallery upgrade cost and search "
            "latency) or serving (capacity, then overload at 4x capacity: admitted latency, 429s, 5xx)."
        ),
    ] = "vit",
    quick: Annotated[
        bool, typer.Option(help="Fewer repetitions and sizes (a smoke run; not for the record).")
    ] = False,
    output: Annotated[str, typer.Option(help="Markdown file to update.")] = "BENCHMARKS.md",
    data: Annotated[
        str | None,
        typer.Option(
            help="agent suite: JSONL of multiple-choice questions ({question, options, answer index, "
            "context?}); default benchmarks/data/agent_mc.jsonl. The agent suite needs KILN_LLM_BASE_URL "
            "and KILN_LLM_MODEL."
        ),
    ] = None,
) -> None:
    """Run a benchmark suite and write its JSON and table into BENCHMARKS.md with the exact command."""
    suites = ("vit", "diffusion", "agent", "forecast", "retrieval", "serving")
    if suite not in suites:
        _fail(f"unknown benchmark suite {suite!r}; valid: {', '.join(suites)}")
    import importlib

    module = importlib.import_module(f"benchmarks.{suite}")
    try:
        options = {"data": data} if suite == "agent" else {}
        module.run(quick=quick, output=output, command=" ".join(["kiln", *sys.argv[1:]]), **options)
    except module.BenchmarkError as exc:
        _fail(str(exc))


if __name__ == "__main__":
    app()
