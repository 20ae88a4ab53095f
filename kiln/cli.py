"""The ``kiln`` command line: train, export, serve, manage models, benchmark."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from serving.config import DEFAULT_MODELS, SETTING_BY_FLAG, SETTINGS

app = typer.Typer(
    help="Kiln: train research models on bundled data, export them to ONNX / int8 / TensorRT, and serve "
    "them over HTTP and gRPC (Open Inference Protocol) with Prometheus metrics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
models_app = typer.Typer(help="List, inspect and delete artifacts in the model store.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _option(flags: str, **kwargs):
    """A ``kiln serve`` option from its entry in serving.config.SETTINGS (variable, help, shown default)."""
    setting = SETTING_BY_FLAG[flags.split("/")[0]]
    show = {"show_default": setting.shown} if setting.shown is not None else {}
    return typer.Option(flags, envvar=setting.env, help=setting.help, **show, **kwargs)


def _default(flag: str):
    return SETTING_BY_FLAG[flag].default


_ENV_ONLY_EPILOG = "Settings read from the environment only:\n\n" + "\n\n".join(
    f"{s.env} (default: {s.default_text}) — {s.help}" for s in SETTINGS if s.flag is None
)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def _missing(exc: Exception, tag: str) -> str:
    """An artifact error's message, with how to train the model when the store lacks it."""
    from kiln.artifacts import ArtifactNotFound
    from kiln.prepare import recipe_hint

    return f"{exc}; {recipe_hint(tag)}" if isinstance(exc, ArtifactNotFound) else str(exc)


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
            help="Image recipes (vit-*, diffusion-*, embed-old, embed-new-independent): train on this "
            "ImageFolder directory (DIR/<class>/<image>.png|jpg; needs --name). Forecasters: train on this "
            "CSV/Parquet of OHLCV bars (timestamp, open, high, low, close, volume; exchange and tool layouts "
            "are recognised) or a bundled series (GOOG, EURUSD, BTCUSD)."
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="Store the result as NAME, not the recipe's name (required with image --data)."),
    ] = None,
    channels: Annotated[
        int | None,
        typer.Option(help="Image recipes with --data: 1 (grayscale) or 3 (RGB); default: from the images."),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(min=4, help="Image recipes with --data: resize every image to this square side."),
    ] = None,
    gaps: Annotated[
        str | None,
        typer.Option(help="Forecasters: gap policy for missing bars: keep (default), fill or error."),
    ] = None,
) -> None:
    """Train a model on bundled data, or an image recipe on your ImageFolder (--data DIR --name NAME),
    and save it to the model store (best-on-validation weights)."""
    import dataclasses

    from training.recipes import RECIPES
    from training.trainer import train as run_training

    if model not in RECIPES:
        _fail(f"unknown model {model!r}; trainable: {', '.join(sorted(RECIPES))}")
    recipe = RECIPES[model]
    if name is not None and (name in RECIPES or not name.replace("-", "").replace("_", "").isalnum()):
        _fail(
            f"--name {name!r} must be a new model name (letters, digits, - and _), "
            "not a recipe's: a model trained on your data never replaces a default one"
        )
    if hasattr(recipe, "dataset"):  # an image recipe: --data is an ImageFolder directory
        if data is not None and name is None:
            _fail(f"--data needs --name: the model trained on {data} is stored under a name of your own")
        if gaps is not None:
            _fail(f"--gaps applies to forecasters, not {model!r}")
        changes = {"dataset": data} if data is not None else {}
        if channels is not None or image_size is not None:
            if data is None:
                _fail("--channels/--image-size apply with --data (the bundled digits are fixed)")
            if channels is not None:
                changes["channels"] = channels
            if image_size is not None:
                changes["image_size"] = (image_size, image_size)
    else:
        if channels is not None or image_size is not None:
            _fail(f"--channels/--image-size apply to image recipes, not {model!r}")
        changes = {k: v for k, v in (("data", data), ("gaps", gaps)) if v is not None}
        if changes and not all(hasattr(recipe, k) for k in changes):
            _fail(f"--data/--gaps apply to forecasters and image recipes; {model!r} trains on bundled data")
    recipe = dataclasses.replace(recipe, **changes)
    try:
        result = run_training(name or model, epochs=epochs, seed=seed, recipe=recipe)
    except ValueError as exc:  # BarsError and ImageFolderError included: the message names the bad bar/file
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
        _fail(_missing(exc, tag))


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


@app.command("import")
def import_cmd(
    path: Annotated[
        str,
        typer.Argument(
            help="A local save_pretrained directory (transformers or sentence-transformers) or an .onnx "
            "file. Never a hub id: Kiln does not download models."
        ),
    ],
    name: Annotated[str, typer.Option(help="Store (and serve) the model as NAME.")],
    task: Annotated[
        str | None,
        typer.Option(
            help="embedding, text-classification or image-classification; default: detected (modules.json "
            "→ embedding; *ForSequenceClassification → text-classification; *ForImageClassification → "
            "image-classification; a base *Model → embedding, mean pooled; .onnx → a generic ONNX model)."
        ),
    ] = None,
    eval_data: Annotated[
        str | None,
        typer.Option(
            help="Classifiers: JSONL of {text (or image: a path relative to the file), label: a name or "
            "an index}; the graph's and the original's accuracy on it are recorded."
        ),
    ] = None,
) -> None:
    """Import a Hugging Face / sentence-transformers model or an ONNX file into the model store.

    The model is exported to ONNX with its tokenizer / pre-processing kept beside it and parity-checked
    against the original (embeddings: cosine >= 0.999 on every text; classifiers: logits within 1e-3); a
    graph that drifts is discarded and nothing is stored. Serve it with `KILN_MODELS=NAME kiln serve`.
    """
    from export.huggingface import ImportError_, import_model
    from kiln.artifacts import ArtifactError

    try:
        art = import_model(path, name, task, eval_data, log=typer.echo)
    except (ImportError_, ArtifactError) as exc:
        _fail(str(exc))
    typer.echo(f"stored {art.tag}; serve it with: KILN_MODELS={art.name} kiln serve")


@app.command(epilog=_ENV_ONLY_EPILOG)
def serve(
    models: Annotated[str | None, _option("--models")] = _default("--models"),
    backend: Annotated[str, _option("--backend")] = _default("--backend"),
    host: Annotated[str, _option("--host")] = _default("--host"),
    http_port: Annotated[int, _option("--http-port")] = _default("--http-port"),
    grpc_port: Annotated[int, _option("--grpc-port")] = _default("--grpc-port"),
    batch_max_size: Annotated[int, _option("--batch-max-size", min=1)] = _default("--batch-max-size"),
    batch_window_ms: Annotated[float, _option("--batch-window-ms", min=0)] = _default("--batch-window-ms"),
    max_request_bytes: Annotated[int, _option("--max-request-bytes", min=1024)] = _default(
        "--max-request-bytes"
    ),
    max_queue_size: Annotated[int, _option("--max-queue-size", min=1)] = _default("--max-queue-size"),
    max_queue_delay_ms: Annotated[float, _option("--max-queue-delay-ms", min=0)] = _default(
        "--max-queue-delay-ms"
    ),
    max_in_flight: Annotated[str | None, _option("--max-in-flight")] = _default("--max-in-flight"),
    drain_timeout_s: Annotated[float, _option("--drain-timeout-s", min=0)] = _default("--drain-timeout-s"),
    max_text_chars: Annotated[int, _option("--max-text-chars", min=1)] = _default("--max-text-chars"),
    max_image_pixels: Annotated[int, _option("--max-image-pixels", min=1)] = _default("--max-image-pixels"),
    generation_deadline_s: Annotated[float, _option("--generation-deadline-s", min=0.001)] = _default(
        "--generation-deadline-s"
    ),
    agent_max_tokens: Annotated[int, _option("--agent-max-tokens", min=1)] = _default("--agent-max-tokens"),
    agent_max_nli_calls: Annotated[int, _option("--agent-max-nli-calls", min=1)] = _default(
        "--agent-max-nli-calls"
    ),
    model_config: Annotated[str | None, _option("--model-config")] = _default("--model-config"),
    model_repository: Annotated[str | None, _option("--model-repository")] = _default("--model-repository"),
    repository_poll_s: Annotated[float, _option("--repository-poll-s", min=0)] = _default(
        "--repository-poll-s"
    ),
    workers: Annotated[int, _option("--workers", min=1)] = _default("--workers"),
    threads: Annotated[int | None, _option("--threads", min=1)] = _default("--threads"),
    generation_batching: Annotated[str, _option("--generation-batching")] = _default("--generation-batching"),
    log_level: Annotated[str, _option("--log-level")] = _default("--log-level"),
    train_missing: Annotated[bool, _option("--train/--no-train")] = _default("--train"),
    train_epochs: Annotated[int | None, _option("--train-epochs", min=1)] = _default("--train-epochs"),
    prepare_jobs: Annotated[int | None, _option("--prepare-jobs", min=1)] = _default("--prepare-jobs"),
) -> None:
    """Serve models over HTTP (BentoML) and gRPC, training and exporting missing ones first.

    Every setting can also come from its KILN_* environment variable (as the Kubernetes ConfigMap sets
    them); a flag on the command line wins.
    """
    from serving.config import ConfigError, ServeConfig

    if models is None:
        models = "" if model_repository else DEFAULT_MODELS
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
        "KILN_MAX_IN_FLIGHT": max_in_flight or "auto",
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
    if model_repository:
        env["KILN_MODEL_REPOSITORY"] = os.path.abspath(model_repository)
    env["KILN_REPOSITORY_POLL_S"] = str(repository_poll_s)
    if threads is not None:
        env["KILN_THREADS"] = str(threads)
    os.environ.update(env)
    try:
        config = ServeConfig.from_env()
    except ConfigError as exc:
        _fail(str(exc))
    _prepare(config.models, train_missing, train_epochs, prepare_jobs)
    everywhere = " — every interface; --host 127.0.0.1 keeps it to this machine" if host == "0.0.0.0" else ""
    typer.echo(f"bound to {host}{everywhere}")
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
        typer.echo(
            "no models yet: `kiln prepare` trains and exports the default ones (`make serve` does too)"
        )
        return
    rows = [("TAG", "ARCHITECTURE", "QUALITY", "EXPORTS")]
    for a in arts:
        exports = ",".join(
            fmt + ("(discarded)" if "discarded" in entry else "")
            for fmt, entry in a.manifest.get("exports", {}).items()
        )
        rows.append((a.tag, a.manifest.get("architecture", "?"), _quality(a.manifest), exports or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3])


def _quality(manifest: dict) -> str:
    """The artifact's own quality metric, by task: what its trainer and export measured."""
    metrics, onnx = manifest.get("metrics", {}), manifest.get("exports", {}).get("onnx", {})
    task = manifest.get("task")
    if "test_accuracy" in metrics:  # classifiers
        return f"test accuracy {metrics['test_accuracy']:.3f}"
    if task == "image-generation" and "fid_digits" in onnx:
        return (
            f"FID-digits {onnx['fid_digits']:.2f}, cond. accuracy {onnx.get('conditional_accuracy', 0):.2f}"
        )
    if task == "price-forecasting" and "val_mae_log_return" in metrics:
        mae = f"val MAE {metrics['val_mae_log_return']:.4f}"
        walk = metrics.get("val_mae_random_walk")
        return mae + (f" (random walk {walk:.4f})" if walk is not None else "")
    recall = sorted(k for k in metrics if k.startswith("test_") and k.endswith(("_top1", "_r1")))
    if task == "embedding" and recall:
        # the model's own space first (self / new-new), else the cross-model one it was trained for
        key = next((k for k in recall if "self" in k or "new_new" in k), None)
        key = key or next((k for k in recall if "projection_r1" in k and "no_" not in k), recall[0])
        name, spaces = ("top-1", key[5:-5]) if key.endswith("_top1") else ("recall@1", key[5:-3])
        return f"test {name} {metrics[key]:.1f}% ({spaces.replace('_', ' ')})"
    return "-"


@models_app.command("show")
def models_show(tag: Annotated[str, typer.Argument(help="NAME (latest) or NAME:VERSION.")]) -> None:
    """Print an artifact's manifest: config, metrics, exports, code version."""
    from kiln.artifacts import ArtifactError, get_artifact

    try:
        art = get_artifact(tag)
    except ArtifactError as exc:
        _fail(_missing(exc, tag))
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
def token(
    scope: Annotated[
        str, typer.Option("--scope", help="Whose token: admin (default), write, or read.")
    ] = "admin",
) -> None:
    """Print the server's bearer token for scripts: -H "Authorization: Bearer $(kiln token)".

    admin: KILN_ADMIN_TOKEN when set (it overrides the file), else the token in $KILN_HOME/admin-token
    (made if missing, exactly as the server makes it; KILN_HOME as the server resolves it, from any
    directory). write: KILN_WRITE_TOKEN when set, else the admin token. read: KILN_READ_TOKEN when set,
    else the write token.
    """
    from serving.admin import SCOPES, scope_token

    if scope not in SCOPES:
        _fail(f"unknown scope {scope!r}; valid: {', '.join(SCOPES)}")
    value = scope_token(scope)
    if not value:
        _fail(
            "no token: KILN_ADMIN_TOKEN is unset and $KILN_HOME/admin-token cannot be made "
            "(a read-only KILN_HOME?); set KILN_ADMIN_TOKEN"
        )
    typer.echo(value)


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
