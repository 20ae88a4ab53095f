"""``kiln bench vit``: SOFT vs softmax attention, eager vs onnxruntime fp32 / int8, and the served path.

Writes every raw figure with the machine's description to ``benchmarks/results/vit.json`` (a ``--quick``
run writes ``<output>.vit.json`` beside its markdown instead, so it never replaces the record) and
replaces the ``<!-- bench:vit:start -->`` ... ``<!-- bench:vit:end -->`` section of the markdown file.
Nothing in the text is a fixed figure: every number and every MET / MISSED comes from this run.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import attention, attention_onnx, peers, runtimes, served
from benchmarks.report import fmt, machine_info, markdown_table, run_header, target_lines, write_results

MODELS = ("vit-soft", "vit-softmax")
# The 192-wide ViTs, GEMM-bound at batch 32: the int8 target is measured on them (trained here if missing).
# The whole int8 format grid runs on the first; SOFT's Newton iterations make the second less GEMM-bound.
WIDE_MODELS = ("vit-softmax-wide", "vit-soft-wide")
SERVED_MODEL = "vit-soft"
RESULTS = Path(__file__).resolve().parent / "results" / "vit.json"
# The SOFT target: tokens -> required speed-up of one SOFT layer over fused softmax attention
# (PyTorch's SDPA in eager mode; onnxruntime's own attention kernel on the exported graphs).
ATTENTION_TARGETS = {4096: 4.0, 16384: 15.0}


class BenchmarkError(RuntimeError):
    """The benchmark can not run as configured (e.g. the models are not in the store)."""


@dataclass(frozen=True)
class Settings:
    sides: tuple[int, ...]  # attention grids: side x side tokens
    attn_dim: int
    attn_heads: int
    attn_warmup: int
    attn_reps: int
    attn_budget_s: float  # stop timing a configuration after this long (at least 3 runs)
    runtime_batches: tuple[int, ...]
    runtime_warmup: int
    runtime_duration_s: float
    reference_batches: tuple[int, ...]
    concurrencies: tuple[int, ...]
    served_duration_s: float
    served_warmup_s: float
    # Kiln beside the peer servers (benchmarks.peers): interleaved rounds at one concurrency
    peer_concurrency: int = 32
    peer_rounds: int = 3
    peer_duration_s: float = 5
    peer_warmup_s: float = 1
    # Kiln's worker processes beside the peers, splitting the same intra-op thread budget (run_comparison).
    # On 2 cores, 2 workers x 1 thread served 1.4x the HTTP req/s of 1 worker x 2 threads, at less CPU per
    # request (interleaved rounds, 30 Nov 2026): one event loop is the HTTP bottleneck, not the model.
    peer_kiln_workers: int = 2
    int8_grid_duration_s: float = 2.0  # per grid cell, split into interleaved rounds with the fp32 graph


FULL = Settings(
    sides=(16, 32, 64, 128),
    attn_dim=64,
    attn_heads=2,
    attn_warmup=2,
    attn_reps=7,
    attn_budget_s=15,
    runtime_batches=(1, 32),
    runtime_warmup=3,
    runtime_duration_s=3,
    reference_batches=(1, 8, 32),
    concurrencies=(1, 8, 32),
    served_duration_s=8,
    served_warmup_s=2,
)
QUICK = Settings(
    sides=(16, 32, 64),
    attn_dim=64,
    attn_heads=2,
    attn_warmup=1,
    attn_reps=3,
    attn_budget_s=1,
    runtime_batches=(1, 32),
    runtime_warmup=1,
    runtime_duration_s=0.4,
    reference_batches=(1, 8, 32),
    concurrencies=(1, 8, 32),
    served_duration_s=1,
    served_warmup_s=0.5,
    peer_rounds=1,
    peer_duration_s=1,
    int8_grid_duration_s=0.5,
)


def load_models(
    log=print, models: tuple[str, ...] = MODELS, wide: tuple[str, ...] = WIDE_MODELS
) -> dict[str, Any]:
    """The default ViTs and the wide ones with their onnx and int8-static exports, or a BenchmarkError
    saying how. A wide model missing from the store is trained and exported here with its recipe (first run
    only, a few minutes each), as ``kiln bench diffusion`` trains what it lacks; the default models are
    ``make serve``'s."""
    from export.pipeline import ExportError, export_artifact
    from kiln.artifacts import ArtifactError, get_artifact
    from training.trainer import train

    arts = {}
    for name in (*models, *wide):
        try:
            art = get_artifact(name)
        except ArtifactError as exc:
            if name not in wide:
                raise BenchmarkError(
                    f"{exc}\nrun `make serve` or `kiln train {name} --export` first"
                ) from None
            log(f"{name}: not in the model store; training it with its recipe (first run only, minutes)")
            art = train(name).artifact
        missing = [f for f in ("onnx", "int8-static") if not art.export(f)]
        if missing and name in wide:
            log(f"{art.tag}: exporting {missing}")
            try:
                art = export_artifact(art.tag, missing, log=log)
            except (ArtifactError, ExportError, ValueError) as exc:
                raise BenchmarkError(f"{art.tag}: export {missing} failed: {exc}") from exc
            missing = []
        if missing:
            raise BenchmarkError(
                f"{art.tag} lacks exports {missing}; run `make serve` or "
                f"`kiln train {name} --export` first (or `kiln export {art.tag}`)"
            )
        discarded = {f: art.export(f)["discarded"] for f in ("int8-static",) if "discarded" in art.export(f)}
        if discarded:  # the export's quality gate removed the graph: nothing to measure
            raise BenchmarkError(f"{art.tag}: exports discarded by their quality gate: {discarded}")
        arts[name] = art
    return arts


def run(quick: bool, output: str, command: str) -> dict[str, Any]:
    """Run the suite, write the JSON and the markdown section; returns the results."""
    import onnxruntime as ort

    from kiln.settings import kiln_home
    from training.data import split_inputs

    settings = QUICK if quick else FULL
    arts = load_models()
    machine = machine_info()  # before the run, so the load average is the machine's, not ours
    t0 = time.perf_counter()
    print(f"kiln bench vit{' --quick' if quick else ''}: store {kiln_home()}")
    print("1/3 attention (one subprocess per configuration)")
    attn = attention.run_suite(
        list(settings.sides),
        settings.attn_dim,
        settings.attn_heads,
        settings.attn_warmup,
        settings.attn_reps,
        settings.attn_budget_s,
    )
    # The target's comparisons, at the target sizes this run covers: SOFT vs SDPA interleaved in one
    # process, then the exported layers in onnxruntime (rows of kind "interleaved" / "onnxruntime").
    target_sides = [s for s in settings.sides if s * s in ATTENTION_TARGETS]
    attn_args = (settings.attn_dim, settings.attn_heads, settings.attn_warmup, settings.attn_reps)
    attn += attention.run_interleaved(target_sides, *attn_args, settings.attn_budget_s)
    attn += attention_onnx.run_suite(target_sides, *attn_args, 2 * settings.attn_budget_s)
    print("2/3 runtimes (in process)")
    size = tuple(arts[MODELS[0]].manifest["preprocess"]["size"])
    x, labels = split_inputs("test", size)
    rt = runtimes.run_runtimes(
        arts, x, labels, settings.runtime_batches, settings.runtime_warmup, settings.runtime_duration_s
    )
    print(
        f"   int8 format grid, batch 32, vs fp32: {len(runtimes.INT8_GRID)} formats on {WIDE_MODELS[0]}, "
        f"{len(runtimes.INT8_GRID_SHORT)} on {', '.join((*WIDE_MODELS[1:], *MODELS))}"
    )
    grid = [
        *runtimes.run_int8_grid(
            {WIDE_MODELS[0]: arts[WIDE_MODELS[0]]}, 32, settings.runtime_warmup, settings.int8_grid_duration_s
        ),
        *runtimes.run_int8_grid(
            {m: arts[m] for m in (*WIDE_MODELS[1:], *MODELS)},
            32,
            settings.runtime_warmup,
            settings.int8_grid_duration_s,
            grid=runtimes.INT8_GRID_SHORT,
        ),
    ]
    print(f"3/3 served {SERVED_MODEL} (kiln serve process + load-generator processes)")
    reference_kwargs = dict(
        arts={SERVED_MODEL: arts[SERVED_MODEL]},
        x=x,
        labels=labels,
        batches=settings.reference_batches,
        warmup=settings.runtime_warmup,
        duration_s=settings.runtime_duration_s,
        backends=("onnxruntime",),  # what the server runs by default
    )
    before = runtimes.run_runtimes(**reference_kwargs)
    srv = served.run_served(
        kiln_home(),
        SERVED_MODEL,
        settings.concurrencies,
        settings.served_duration_s,
        settings.served_warmup_s,
        image=x[:1],
    )
    print(f"   {SERVED_MODEL} beside the peer servers ({', '.join(peers.PEERS)}), interleaved rounds")
    art = arts[SERVED_MODEL]
    comparison = served.run_comparison(
        kiln_home(),
        SERVED_MODEL,
        art.file(art.export("onnx")["file"]),
        x[:1],
        concurrency=settings.peer_concurrency,
        rounds=settings.peer_rounds,
        duration_s=settings.peer_duration_s,
        warmup_s=settings.peer_warmup_s,
        threads=runtimes.server_threads(),
        kiln_workers=settings.peer_kiln_workers,
    )
    print("   in-process reference again, after the served cells")
    after = runtimes.run_runtimes(**reference_kwargs)
    # The served target compares against the better of the two reference measurements (the harder bar).
    reference = [
        {
            **max(b, a, key=lambda r: r["samples_per_s"]),
            "samples_per_s_before": b["samples_per_s"],
            "samples_per_s_after": a["samples_per_s"],
        }
        for b, a in zip(before, after, strict=True)
    ]
    results = {
        "suite": "vit",
        "quick": quick,
        "command": command,
        "machine": machine,
        "onnxruntime_providers": ort.get_available_providers(),
        "settings": asdict(settings),
        "models": {n: _model_facts(a) for n, a in arts.items()},
        "attention": attn,
        "runtimes": rt,
        "int8_grid": grid,
        "served_reference": reference,
        "served": srv,
        "served_peers": comparison,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
    }
    results["targets"] = evaluate_targets(results)
    write_results(results, "vit", output, quick, RESULTS, render_markdown)
    return results


def _model_facts(art) -> dict[str, Any]:
    """What the artifact recorded when it was trained and exported (read back, never recomputed here)."""
    m = art.manifest
    metrics, training = m.get("metrics", {}), m.get("training", {})
    onnx, int8 = art.export("onnx") or {}, art.export("int8-static") or {}
    return {
        "tag": art.tag,
        "architecture": m.get("architecture"),
        "parameters": metrics.get("parameters"),
        "epochs": training.get("epochs"),
        "best_epoch": metrics.get("best_epoch"),
        "train_seconds": metrics.get("train_seconds"),
        "val_accuracy": metrics.get("val_accuracy"),
        "test_accuracy": metrics.get("test_accuracy"),
        "onnx_max_abs_diff": onnx.get("max_abs_diff"),
        "onnx_test_accuracy": onnx.get("test_accuracy"),
        "int8_test_accuracy": int8.get("test_accuracy"),
        "code_version": m.get("code_version"),
        "command": f"kiln train {art.name} --export"
        + (f" --seed {training['seed']}" if training.get("seed") else ""),
    }


# --------------------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------------------


def _find(rows: list[dict[str, Any]], **keys: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in keys.items())), None)


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured figures, ``met`` (True / False / None = not measured) and a reason."""
    return [
        _attention_target(results["attention"]),
        _int8_target(results["runtimes"], results.get("int8_grid") or []),
        _served_target(results["served"], results["served_reference"], results.get("served_peers")),
        *(_peer_targets(results["served_peers"]) if "served_peers" in results else []),
    ]


def _attention_target(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's SOFT target from the interleaved PyTorch rows and the onnxruntime rows.

    ``met`` is False as soon as a measured ratio misses, None when a target size was not measured (a
    ``--quick`` run stops at 4096 tokens), else True. The explicit-softmax figures (speed and peak
    memory at 4096 tokens, from the per-kind rows) are reported beside it, not judged.
    """
    sizes = " and ".join(f">= {x:g}x at {n} tokens" for n, x in ATTENTION_TARGETS.items())
    target = (
        f"one SOFT layer faster than fused softmax attention, {sizes}: in PyTorch vs SDPA (interleaved) "
        "and in onnxruntime on the exported graphs vs onnxruntime's own attention kernel"
    )
    parts, misses, missing = [], [], []
    for tokens, need in ATTENTION_TARGETS.items():
        eager = _find(rows, kind="interleaved", tokens=tokens)
        ort = _find(rows, kind="onnxruntime", tokens=tokens)
        if eager:
            lat = eager["latency_ms"]
            parts.append(
                f"{tokens} tokens PyTorch: SOFT {lat['soft']:.2f} ms vs SDPA {lat['softmax-sdpa']:.2f} ms "
                f"= {eager['speedup']:.2f}x"
            )
            if eager["speedup"] < need:
                misses.append(f"PyTorch at {tokens} tokens {eager['speedup']:.2f}x < {need:g}x")
        else:
            missing.append(f"PyTorch at {tokens}")
        if ort and "speedup_vs_fused" in ort:
            best = ort["fastest_fused_softmax"]
            soft_ms, best_ms = ort["kinds"]["soft"]["latency_ms"], ort["kinds"][best]["latency_ms"]
            parts.append(
                f"{tokens} tokens onnxruntime: SOFT {soft_ms:.2f} ms vs {best} {best_ms:.2f} ms "
                f"= {ort['speedup_vs_fused']:.2f}x"
            )
            if ort["speedup_vs_fused"] < need:
                misses.append(f"onnxruntime at {tokens} tokens {ort['speedup_vs_fused']:.2f}x < {need:g}x")
        else:
            missing.append(f"onnxruntime at {tokens}")
    explicit = _explicit_comparison(rows, min(ATTENTION_TARGETS))
    measured = "; ".join(parts) if parts else "not measured in this run"
    if missing and parts:
        measured += f" (not measured in this run: {', '.join(missing)} tokens)"
    if explicit:
        measured += f"; beside it, {explicit}"
    met = False if misses else (None if missing else True)
    reason = ""
    if misses:
        reason = (
            f"{'; '.join(misses)}: SOFT's costs that do not shrink with the sequence (20 Newton steps on "
            "64 x 64 matrices per head, the landmark LayerNorm / GELU, some 60 small kernels) and its "
            "O(N m) passes over memory (the N x m kernel matrix is written, clamped, exponentiated and "
            "read twice) weigh against a fused attention whose N^2 d FLOPs run in cache-blocked GEMMs; "
            "the crossover moves with the core count and the memory bandwidth. With two threads on a "
            "machine that other work shares, each of SOFT's ~15 multi-threaded ops also spins at its "
            "OpenMP barrier for a descheduled thread while SDPA is one parallel loop: on this 2-core VM at "
            "load ~6, 4096 tokens, SOFT took 796 ms with the default wait policy and 17 ms with "
            "OMP_WAIT_POLICY=PASSIVE (SDPA 143 and 89 ms); onnxruntime's spinning pool likewise (16384 "
            "tokens, two threads: SOFT 82 ms spinning, 49 ms with `--no-spinning`; MultiHeadAttention "
            "1075 / 1090 ms) -- see the load average beside each ratio"
        )
    return {"target": target, "met": met, "measured": measured, "reason": reason}


def _explicit_comparison(rows: list[dict[str, Any]], tokens: int) -> str:
    """SOFT vs the explicit N x N softmax (and peak memory vs SDPA) at ``tokens``, from the per-kind rows."""
    soft = _find(rows, kind="soft", tokens=tokens)
    ref = _find(rows, kind="softmax-explicit", tokens=tokens)
    if not soft or not ref or "skipped" in ref or "skipped" in soft:
        return ""
    speed = ref["latency_ms"] / soft["latency_ms"]
    mem = ref["peak_mib"] / soft["peak_mib"] if soft["peak_mib"] > 0 else float("inf")
    text = (
        f"at {tokens} tokens vs the explicit softmax(QK^T)V (separate processes): speed-up {speed:.2f}x, "
        f"peak-memory reduction {mem:.1f}x"
    )
    sdpa = _find(rows, kind="softmax-sdpa", tokens=tokens)
    if sdpa and "skipped" not in sdpa and soft["peak_mib"] > 0:
        text += f" (SDPA's peak is {sdpa['peak_mib'] / soft['peak_mib']:.2f}x SOFT's)"
    return text


def _int8_target(rows: list[dict[str, Any]], grid: list[dict[str, Any]] = ()) -> dict[str, Any]:
    target = (
        "onnxruntime int8 >= 1.5x the fp32 throughput with <= 1 point test-accuracy loss at batch 32, on "
        f"a GEMM-bound ViT ({' or '.join(WIDE_MODELS)}, 192 wide); the 64-wide models are reported beside it"
    )
    batch = max(r["batch"] for r in rows)
    figures = {}
    for model in (*WIDE_MODELS, *MODELS):
        fp32 = _find(rows, model=model, backend="onnxruntime", batch=batch)
        int8 = _find(rows, model=model, backend="onnxruntime-int8", batch=batch)
        if fp32 and int8:
            speed = int8["samples_per_s"] / fp32["samples_per_s"]
            figures[model] = (speed, (fp32["test_accuracy"] - int8["test_accuracy"]) * 100)
    wide = {m: f for m, f in figures.items() if m in WIDE_MODELS}
    if not wide:
        return {"target": target, "met": None, "measured": "not measured in this run", "reason": ""}
    passing = [m for m, (speed, loss) in wide.items() if speed >= 1.5 and loss <= 1.0]
    measured = "; ".join(
        f"{m}: {speed:.2f}x fp32 throughput, accuracy loss {loss:.1f} points"
        for m, (speed, loss) in figures.items()
    )
    measured += f" (batch {batch})"
    shipped = [r for r in grid if r.get("shipped") and r["model"] in wide]
    if shipped:  # the same graph timed interleaved with fp32 round by round: less exposed to drift
        measured += "; format grid, shipped format interleaved with fp32: " + ", ".join(
            f"{r['model']} {r['speedup']:.2f}x (rounds {r['speedup_min']:.2f}-{r['speedup_max']:.2f})"
            for r in shipped
        )
    reason = ""
    if not passing:
        why = []
        slow = [m for m, (speed, _) in wide.items() if speed < 1.5]
        lossy = [m for m, (_, loss) in wide.items() if loss > 1.0]
        if slow:
            why.append(
                f"{', '.join(slow)}: the fp32 operators between the int8 GEMMs (LayerNorm, GELU, residual "
                "adds, attention reshapes) and the quantize / dequantize steps around them still cost about "
                "as much as the int8 GEMMs save; see the format grid for what each knob changes"
            )
        if lossy:
            why.append(f"{', '.join(lossy)}: the shipped format loses more than 1 point on the test split")
        reason = "; ".join(why)
    return {
        "target": target,
        "met": bool(passing),
        "measured": measured,
        "reason": reason,
    }


def _served_target(
    rows: list[dict[str, Any]], reference: list[dict[str, Any]], comparison: dict[str, Any] | None = None
) -> dict[str, Any]:
    target = (
        "gRPC at concurrency 32 (batching on) >= 60% of in-process onnxruntime fp32 throughput at batch 32 "
        "(req/s of 1-image requests vs samples/s)"
    )
    ref = _find(reference, batch=max(r["batch"] for r in reference)) if reference else None
    # The interleaved rounds' median when there are some (steadier than one cell), else the Kiln-alone cell.
    summary = _find(comparison["summary"], server="kiln-grpc") if comparison else None
    if summary:
        cmax, rate, errors = comparison["concurrency"], summary["req_per_s"], summary["errors"]
        source = f"median of {comparison['rounds']} interleaved rounds"
        client = summary["client_cpu_share"]
    else:
        cmax = max(r["concurrency"] for r in rows)
        cell = _find(rows, batching="on", protocol="grpc", concurrency=cmax)
        if not cell:
            return {"target": target, "met": None, "measured": "not measured in this run", "reason": ""}
        rate, errors, source, client = (
            cell["req_per_s"],
            cell["errors"],
            "one cell",
            cell.get("client_cpu_share"),
        )
    if not ref:
        return {"target": target, "met": None, "measured": "not measured in this run", "reason": ""}
    ratio = rate / ref["samples_per_s"]
    met = ratio >= 0.6 and errors == 0
    measured = (
        f"{rate:.1f} req/s vs {ref['samples_per_s']:.1f} samples/s in process = {ratio:.0%}"
        f" (concurrency {cmax}, {source}, {errors} errors"
        + (f", gRPC client {client:.0%} of a core" if client is not None else "")
        + (
            f", server CPU {summary['server_cpu_ms_per_request']:.2f} ms/request"
            if summary and summary.get("server_cpu_ms_per_request")
            else ""
        )
        + ")"
    )
    reason = ""
    if not met:
        reason = (
            "server, load generator and model share the machine's cores: each request's Python work (gRPC "
            "event loop, decoding, batching, metrics) and the Python gRPC client's take CPU the model "
            "would otherwise use, and the in-process figure has all of it; on a shared machine the server "
            "also gets less of the cores than the in-process loop did (compare its CPU per request with "
            "the in-process CPU per sample: threads / samples per second)"
        )
    return {"target": target, "met": met, "measured": measured, "reason": reason}


def _peer_targets(comparison: dict[str, Any] | None) -> list[dict[str, Any]]:
    """HTTP JSON >= 1.3x and binary tensors >= 2x the best peer, medians of the interleaved rounds."""
    targets = []
    for server, factor, what in (
        ("kiln-json", 1.3, "HTTP JSON"),
        ("kiln-binary", 2.0, "HTTP binary tensors"),
    ):
        target = (
            f"{what} at concurrency 32 >= {factor:g}x the best peer server (FastAPI, LitServe, Ray Serve) "
            "on the same graph and body"
        )
        if not comparison:
            targets.append(
                {"target": target, "met": None, "measured": "not measured in this run", "reason": ""}
            )
            continue
        peer_rows = [r for r in comparison["summary"] if not r["server"].startswith("kiln-")]
        kiln = _find(comparison["summary"], server=server)
        if not peer_rows or not kiln:
            why = "; ".join(f"{k}: {v}" for k, v in comparison["skipped"].items()) or "no peer ran"
            targets.append(
                {"target": target, "met": None, "measured": f"no peer measured ({why})", "reason": ""}
            )
            continue
        best = max(peer_rows, key=lambda r: r["req_per_s"])
        ratio = kiln["req_per_s"] / best["req_per_s"]
        met = ratio >= factor and kiln["errors"] == 0
        skipped = "".join(f"; {k} skipped: {v}" for k, v in comparison["skipped"].items())
        cpu = ""
        if kiln.get("server_cpu_ms_per_request") and best.get("server_cpu_ms_per_request"):
            cpu = (
                f"; server CPU {kiln['server_cpu_ms_per_request']:.2f} vs "
                f"{best['server_cpu_ms_per_request']:.2f} ms/request"
            )
        measured = (
            f"Kiln {kiln['req_per_s']:.1f} req/s vs {best['server']} {best['req_per_s']:.1f} = {ratio:.2f}x "
            f"(median of {comparison['rounds']} interleaved rounds, {kiln['errors']} errors{cpu}{skipped})"
        )
        reason = ""
        if not met:
            reason = (
                "every server runs the same onnxruntime session (threads, options) on the same cores, so "
                "no server can beat the model's own in-process throughput, and the best peer is already a "
                "large share of it. Kiln's HTTP requests all pass one event loop (one worker process: "
                "uvicorn, BentoML's OpenTelemetry, access-log and metrics middleware, drain and admission "
                "control, OIP validation), while the peers spread the request work (FastAPI: batch-1 "
                "session runs from a thread pool; LitServe: an API-server process beside the inference "
                "process); compare the server CPU per request above, not only req/s"
            )
        targets.append({"target": target, "met": met, "measured": measured, "reason": reason})
    return targets


# --------------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------------


def render_markdown(results: dict[str, Any], json_path: Path) -> str:
    """The BENCHMARKS.md section (without its markers) for one run's results."""
    threads = next((r["torch_threads"] for r in results["attention"] if "torch_threads" in r), "?")
    s = results["settings"]
    lines = ["## ViT: SOFT vs softmax, runtimes, serving", ""]
    lines += run_header(
        results,
        json_path,
        "- models: " + ", ".join(f"{n} `{v['tag']}`" for n, v in results["models"].items()),
    )
    lines += [
        "",
        "### Targets",
        "",
    ]
    lines += target_lines(results["targets"])
    lines += ["", "### Trained models (digits, 32 x 32)", ""]
    lines += [
        "Read from each artifact's `kiln.json`: trained by the command shown on this machine (AdamW, "
        "warm-up + cosine, seed 0, best-on-validation epoch kept), test split read once after training.",
        "",
    ]
    rows = []
    for n, v in results["models"].items():
        acc = {
            k: (f"{v[k]:.4f}" if isinstance(v.get(k), float) else "-")
            for k in ("val_accuracy", "test_accuracy", "onnx_test_accuracy", "int8_test_accuracy")
        }
        diff = v.get("onnx_max_abs_diff")
        rows.append(
            [
                n,
                f"`{v.get('command', '-')}`",
                v.get("parameters", "-"),
                v.get("epochs", "-"),
                v.get("train_seconds", "-"),
                acc["val_accuracy"],
                acc["test_accuracy"],
                acc["onnx_test_accuracy"],
                acc["int8_test_accuracy"],
                f"{diff:.1e}" if isinstance(diff, float) else "-",
            ]
        )
    lines += [
        markdown_table(
            [
                "model",
                "command",
                "params",
                "epochs",
                "train s",
                "val acc",
                "test acc",
                "ONNX fp32 test acc",
                "int8 test acc",
                "ONNX max abs diff",
            ],
            rows,
        ),
        "",
        "Target (issue): >= 95% test accuracy for both, training in a few minutes on 2 CPU cores.",
    ]
    lines += ["", "### 1. SOFT vs softmax attention", ""]
    lines += [
        f"One attention layer, dim {s['attn_dim']}, {s['attn_heads']} heads, batch 1, forward only under "
        f"`torch.inference_mode`, {threads} torch threads; {s['attn_warmup']} warm-up runs, then the median "
        f"of up to {s['attn_reps']} timed runs (at least 3; fewer past {s['attn_budget_s']:g} s). "
        "SOFT: landmark ratio = side // 8, i.e. an 8 x 8 = 64 landmark grid at every size (the trained "
        "models use ratio 2 on their 8 x 8 token grid), 20 Newton iterations. *softmax (explicit)* "
        "materialises softmax(QK^T / sqrt(d)) V with its N x N scores — the standard quadratic attention "
        "of the SOFT paper's comparisons; *softmax (SDPA)* is `SoftmaxAttention` as the models run it "
        "(`F.scaled_dot_product_attention`, a fused kernel that need not hold N x N) and **the baseline "
        "for the target**, whose ratios come from the interleaved runs below, not from this table (its "
        "cells run in separate processes, minutes apart, under the memory runs' allocator setting).",
        "",
        "Peak memory: each configuration runs in a fresh process (with `MALLOC_MMAP_THRESHOLD_=65536` so "
        "freed blocks go back to the OS); the kernel's peak-RSS mark (VmHWM) is reset through "
        "`/proc/self/clear_refs` after warm-up, and the peak is VmHWM after one forward minus RSS before it: "
        "the pass's working set "
        "beyond weights and input.",
        "",
    ]
    rows = []
    for r in results["attention"]:
        if r["kind"] not in attention.KINDS:  # the target's comparisons, rendered below
            continue
        label = {"soft": "SOFT", "softmax-explicit": "softmax (explicit)", "softmax-sdpa": "softmax (SDPA)"}[
            r["kind"]
        ]
        if "skipped" in r:
            rows.append([r["tokens"], r["grid"], label, "-", "skipped", "skipped", r["skipped"]])
            continue
        setting = f"ratio {r['landmark_ratio']}, {r['landmarks']} landmarks" if r["kind"] == "soft" else "-"
        rows.append(
            [r["tokens"], r["grid"], label, setting, fmt(r["latency_ms"], 2), fmt(r["peak_mib"], 1), ""]
        )
    lines += [
        markdown_table(
            ["tokens", "grid", "attention", "landmarks", "latency ms (median)", "peak MiB", "note"], rows
        ),
        "",
    ]
    lines += _attention_comparison_lines(results["attention"])
    lines += ["### 2. PyTorch eager vs onnxruntime fp32 vs int8", ""]
    thr = results["runtimes"][0]["threads"] if results["runtimes"] else "?"
    lines += [
        f"The server's runtimes (`serving.runtime.load_runtime`, {thr} intra-op threads as the server uses), "
        f"in process, on a fixed batch of test-split images: {s['runtime_warmup']} warm-up calls, "
        f"then {s['runtime_duration_s']:g} s of calls per cell split into interleaved rounds (every "
        "runtime and batch once per round); samples/s is the median over rounds, with the lowest and "
        "highest round beside it — this machine is a shared VM whose throughput drifts by tens of "
        "percent between minutes. Latency = per-call p50 / p99. "
        "Accuracy: the whole test split (270 images) through that runtime.",
        "",
    ]
    rows = [
        [
            r["model"],
            r["backend"],
            r["batch"],
            fmt(r["samples_per_s"]),
            _spread(r),
            fmt(r["latency_ms_p50"], 2),
            fmt(r["latency_ms_p99"], 2),
            f"{r['test_accuracy']:.4f}",
        ]
        for r in results["runtimes"]
    ]
    lines += [
        markdown_table(
            ["model", "runtime", "batch", "samples/s", "rounds min-max", "p50 ms", "p99 ms", "test accuracy"],
            rows,
        ),
        "",
    ]
    lines += _int8_grid_markdown(results.get("int8_grid") or [], s)
    lines += ["### 3. Served path", ""]
    lines += [
        f"`kiln serve --no-train --models {SERVED_MODEL}` (onnxruntime fp32, one worker process) on "
        "127.0.0.1, batching on (`--batch-max-size 32 --batch-window-ms 2`, the defaults) and off "
        "(`--batch-max-size 1`). Load generators, each its own process: HTTP with `wrk -t1 -c<concurrency>` "
        "and `benchmarks/wrk/oip.lua` (compiled C; the Lua script only sends a body prepared once), gRPC "
        "with `python -m benchmarks.load` (grpc.aio, `raw_input_contents`, one HTTP/2 connection per 8 "
        "requests in flight; no compiled gRPC load generator "
        "such as ghz is packaged here). Each keeps *concurrency* one-image requests in flight for "
        f"{s['served_duration_s']:g} s after a {s['served_warmup_s']:g} s warm-up. *client CPU* is the load "
        "generator's own user + system time over its wall time (`os.wait4`), in cores: what it took from "
        "the cores that server and model share.",
        "",
    ]
    rows = [
        [
            r["batching"],
            r["protocol"],
            r["concurrency"],
            fmt(r["req_per_s"]),
            fmt(r["latency_ms_p50"], 2),
            fmt(r["latency_ms_p99"], 2),
            r["requests"],
            r["errors"],
            _client_cpu(r),
            fmt(r.get("server_cpu_ms_per_request"), 2),
        ]
        for r in results["served"]
    ]
    lines += [
        markdown_table(
            [
                "batching",
                "protocol",
                "concurrency",
                "req/s",
                "p50 ms",
                "p99 ms",
                "requests",
                "errors",
                "client CPU",
                "server CPU ms/request",
            ],
            rows,
        ),
        "",
    ]
    lines += _peer_section(results.get("served_peers"))
    lines += [
        "In-process reference (same model and graph, onnxruntime fp32, same thread count), measured before "
        "and after the served cells; the target uses the higher of the two:",
        "",
    ]
    rows = [
        [
            r["batch"],
            fmt(r["samples_per_s"]),
            fmt(r.get("samples_per_s_before")),
            fmt(r.get("samples_per_s_after")),
            fmt(r["latency_ms_p50"], 2),
            fmt(r["latency_ms_p99"], 2),
        ]
        for r in results["served_reference"]
    ]
    lines += [markdown_table(["batch", "samples/s used", "before", "after", "p50 ms", "p99 ms"], rows)]
    return "\n".join(lines)


def _client_cpu(row: dict[str, Any]) -> str:
    share = row.get("client_cpu_share")
    return "-" if share is None else f"{share:.2f}"


_PEER_NOTES = {
    "kiln-json": "Kiln, OIP JSON; each BentoML worker (uvicorn) has the gRPC server on its event loop",
    "kiln-binary": "Kiln, binary tensor extension (JSON header + raw FP32, output asked back in binary)",
    "kiln-grpc": "Kiln, gRPC ModelInfer with raw_input_contents (client: benchmarks.load, grpc.aio)",
    "fastapi": "FastAPI + uvicorn, 1 worker; pydantic body; sync endpoint (thread pool); no batching",
    "litserve": "LitServe 0.2.19: 1 API-server process + 1 inference worker process, LitAPI batching",
    "ray": "Ray Serve: 1 replica with @serve.batch behind Ray's HTTP proxy (own local cluster)",
}


def _peer_section(comparison: dict[str, Any] | None) -> list[str]:
    if not comparison:
        return []
    c = comparison
    lines = [
        f"Kiln beside peer servers (`benchmarks/peers/`) on the same ONNX graph and the same OIP JSON body "
        f"(one {SERVED_MODEL} test image), concurrency {c['concurrency']}: {c['rounds']} interleaved rounds "
        "(Kiln JSON, Kiln binary, Kiln gRPC, then each peer; repeat), "
        f"{c['duration_s']:g} s per cell after a {c['warmup_s']:g} s warm-up; median req/s over the rounds "
        "with the lowest and highest round. Same thread budget: every server's onnxruntime session has "
        f"{c['threads']} intra-op threads, 1 inter-op thread, all graph optimisations and no spinning (as "
        f"Kiln's runtime) — Kiln as `kiln serve --workers {c.get('kiln_workers', 1)}` with "
        f"KILN_THREADS={c.get('kiln_threads_per_worker', c['threads'])}, the same threads in total over its "
        "worker processes (each its own event loop, batcher and session); batching servers use batches of "
        f"at most {c['batch_max_size']} within "
        f"{c['batch_window_ms']:g} ms. All servers stay up during the rounds. *server CPU*: user + system "
        "time of the server's whole process tree (`/proc`; Ray's cluster processes included) per completed "
        "request, and in cores; on a shared machine it depends less than req/s on how much CPU each server "
        "happened to get.",
        "",
    ]
    rows = [
        [
            r["server"],
            fmt(r["req_per_s"]),
            f"{fmt(r['req_per_s_min'])}-{fmt(r['req_per_s_max'])}",
            fmt(r["latency_ms_p50"], 2),
            r["errors"],
            _client_cpu(r),
            fmt(r.get("server_cpu_ms_per_request"), 2),
            fmt(r.get("server_cpu_cores"), 2),
            _PEER_NOTES.get(r["server"], ""),
        ]
        for r in c["summary"]
    ]
    rows += [[name, "skipped", "-", "-", "-", "-", "-", "-", why] for name, why in c["skipped"].items()]
    lines += [
        markdown_table(
            [
                "server",
                "req/s (median)",
                "rounds min-max",
                "p50 ms",
                "errors",
                "client CPU",
                "server CPU ms/request",
                "server CPU cores",
                "how",
            ],
            rows,
        ),
        "",
        "Every server's answer to the body was checked against Kiln's before the rounds (max |logit "
        "difference|: " + ", ".join(f"{k} {v:.1e}" for k, v in c["agreement"].items()) + ").",
        "",
    ]
    return lines


def _int8_grid_markdown(rows: list[dict[str, Any]], s: dict[str, Any]) -> list[str]:
    """The int8 format grid: every cell against the fp32 graph of the same model, shipped format marked."""
    if not rows:
        return []
    lines = [
        "#### int8 formats measured (onnxruntime.quantization `quantize_static` / `quantize_dynamic`)",
        "",
        f"Each cell is built from the model's fp32 graph (`quant_pre_process`, then onnxruntime's quantizer, "
        f"calibrated on 256 training-split images) and timed at batch {rows[0]['batch']} with the server's "
        f"session options ({rows[0]['threads']} intra-op threads, ORT_ENABLE_ALL), interleaved with the fp32 "
        f"graph in {rows[0]['rounds']} rounds ({s.get('int8_grid_duration_s', '?')} s per cell in all); "
        "*x fp32* is the median over rounds of the cell's throughput over the fp32 graph's in the same "
        "round. "
        "Accuracy: validation split (what the export's quality gate reads) and test split (reported only). "
        "**bold** = the format `kiln export` ships (`int8-static`).",
        "",
    ]
    table = []
    for r in rows:
        mark = "**" if r.get("shipped") else ""
        table.append(
            [
                r["model"],
                f"{mark}{r['cell']}{mark}",
                f"{r['speedup']:.2f}x",
                f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}",
                fmt(r["samples_per_s"]),
                f"{r['val_accuracy']:.4f} ({(r['val_accuracy'] - r['fp32_val_accuracy']) * 100:+.1f})"
                if isinstance(r.get("fp32_val_accuracy"), float)
                else f"{r['val_accuracy']:.4f}",
                f"{r['test_accuracy']:.4f} ({(r['test_accuracy'] - r['fp32_test_accuracy']) * 100:+.1f})"
                if isinstance(r.get("fp32_test_accuracy"), float)
                else f"{r['test_accuracy']:.4f}",
                r["quantized_nodes"],
            ]
        )
    lines += [
        markdown_table(
            [
                "model",
                "format",
                "x fp32",
                "rounds min-max",
                "samples/s",
                "val acc (points vs fp32)",
                "test acc (points vs fp32)",
                "int8 nodes",
            ],
            table,
        ),
        "",
    ]
    return lines


def _attention_comparison_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The target's comparisons: SOFT vs SDPA interleaved in PyTorch; the exported layers in onnxruntime."""
    eager = [r for r in rows if r["kind"] == "interleaved"]
    ort = [r for r in rows if r["kind"] == "onnxruntime"]
    lines = []
    if eager:
        lines += [
            "**SOFT vs fused SDPA, interleaved** (`python -m benchmarks.attention --compare --side S`): both "
            "layers in one process with the default allocator (the mmap threshold of the memory runs "
            "above turns every large block into fresh page faults on each call, which no server runs "
            "with), timed in alternation, SOFT then SDPA, each round; the speed-up is the ratio of the "
            "medians.",
            "",
            markdown_table(
                ["tokens", "grid", "SOFT ms", "SDPA ms", "speed-up", "rounds", "torch threads", "load avg"],
                [
                    [
                        r["tokens"],
                        r["grid"],
                        fmt(r["latency_ms"]["soft"], 2),
                        fmt(r["latency_ms"]["softmax-sdpa"], 2),
                        f"{r['speedup']:.2f}x",
                        r["rounds"],
                        r["torch_threads"],
                        r.get("load_average_1m", "-"),
                    ]
                    for r in eager
                ],
            ),
            "",
        ]
    if ort:
        labels = {
            "soft": "SOFT, exported by `export_onnx` (opset 18)",
            "softmax-mha": "softmax, com.microsoft.MultiHeadAttention",
            "softmax-attention23": "softmax, exported at opset 23 (ONNX Attention op)",
            "softmax-unfused": "softmax, exported at opset 18 (MatMul-Softmax-MatMul)",
        }
        table = []
        for r in ort:
            for kind, cell in r["kinds"].items():
                if "skipped" in cell:
                    table.append([r["tokens"], labels[kind], "skipped", "-", "-", "-", cell["skipped"]])
                    continue
                soft_ms = r["kinds"]["soft"]["latency_ms"]
                table.append(
                    [
                        r["tokens"],
                        labels[kind],
                        fmt(cell["latency_ms"], 2),
                        f"{cell['latency_ms'] / soft_ms:.2f}x",
                        cell["fused_attention_nodes"],
                        f"{cell['max_abs_diff']:.1e}",
                        "fastest fused"
                        if kind == r.get("fastest_fused_softmax")
                        else (
                            f"load avg {r['load_average_1m']}"
                            if kind == "soft" and "load_average_1m" in r
                            else ""
                        ),
                    ]
                )
        threads = ort[0]["threads"]
        lines += [
            "**In onnxruntime** (`python -m benchmarks.attention_onnx --side S`): the same layers exported "
            f"and run with the server's session settings ({threads} intra-op thread{'s' * (threads != 1)}, "
            "one inter-op thread, "
            "`ORT_ENABLE_ALL`), interleaved rounds. onnxruntime's optimizer does not fuse the opset-18 "
            "softmax export (`MatMul -> Softmax -> MatMul`) into an attention kernel (*fused nodes* counts "
            "`Attention` / `MultiHeadAttention` in the optimised graph), so the target compares SOFT with "
            "the faster of onnxruntime's own attention kernels: the `com.microsoft.MultiHeadAttention` "
            "contrib op and the opset-23 `Attention` op. *max abs diff*: the graph vs its PyTorch layer.",
            "",
            markdown_table(
                [
                    "tokens",
                    "graph",
                    "latency ms (median)",
                    "time vs SOFT",
                    "fused nodes",
                    "max abs diff",
                    "note",
                ],
                table,
            ),
            "",
        ]
    return lines


def _spread(row: dict[str, Any]) -> str:
    if "samples_per_s_min" not in row:
        return "-"
    return f"{fmt(row['samples_per_s_min'])}-{fmt(row['samples_per_s_max'])}"
