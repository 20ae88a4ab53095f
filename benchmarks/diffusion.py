"""``kiln bench diffusion``: samplers, PTQ4DM 8-bit graphs and the hallucination filter of the digits family.

Measured on the store's ``diffusion-digits`` (trained and exported first if missing, as ``kiln serve``
does) with FID-digits in the features of the store's ``vit-soft`` (:mod:`export.fid_digits`):

1. samplers — DDPM, DDIM, Time-Shift DDIM and BDIA-DDIM at several step counts through the fp32 ONNX
   denoiser: FID-digits against the test split, conditional accuracy, sampling time; every cell draws
   the same labels and the same seeded noise. Time shift and BDIA run with the papers' settings; a small
   grid of their options is also scored by FID against the *validation* split (another seed), and the
   best of it, where it differs, is run on the test split at the few-step count of the target;
2. PTQ4DM W8A8 — the quality of each int8 graph (NDTC, uniform and forward-noise calibration) and the
   fp32 vs int8 denoiser throughput in onnxruntime, with what onnxruntime made of the int8 graph;
3. further subsections from :data:`SECTIONS` (the hallucination toy, step-level batching on a served
   model; one line adds another).

Writes every raw figure with the machine's description to ``benchmarks/results/diffusion.json`` (a
``--quick`` run writes ``<output>.diffusion.json`` beside its markdown instead, so it never replaces the
record) and replaces the ``diffusion`` section of the markdown file. Nothing in the text is a fixed
figure: every number and every MET / MISSED comes from this run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import hallucination_toy, step_batching
from benchmarks.report import (
    fmt,
    machine_info,
    markdown_table,
    percentile,
    run_header,
    target_lines,
    write_results,
)
from benchmarks.runtimes import time_calls

MODEL = "diffusion-digits"
CLASSIFIER = "vit-soft"  # FID-digits' feature extractor (export.diffusion.FID_CLASSIFIER)
SAMPLERS = ("ddpm", "ddim", "time-shift", "bdia")
SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "time-shift": "time-shift DDIM", "bdia": "BDIA-DDIM"}
# Options beyond each sampler's constructor defaults. Time shift keeps its defaults (window 80, cutoff 300:
# the authors' few-step DDIM setting). BDIA's default γ = 1 is Kiln's choice for exact inversion; for
# sampling from noise the paper uses γ ≈ 0.5 at few steps (and γ = 0.5 reads the same in the paper's and
# the official code's conventions, which put γ on different terms).
SAMPLER_OPTIONS: dict[str, dict[str, Any]] = {"bdia": {"gamma": 0.5}}
# Scored by FID against the validation split at TARGET_STEPS_FEW, seed TUNING_SEED; the first entry of
# each list is the setting above. Time shift: the authors' two published settings (DDIM, F-PNDM) and two
# between them; BDIA: the paper's few-step and many-step γ and two towards DDIM (γ = 0).
TUNING_GRID: dict[str, list[dict[str, Any]]] = {
    "time-shift": [
        {"window": 80, "cutoff": 300},
        {"window": 5, "cutoff": 550},
        {"window": 20, "cutoff": 300},
        {"window": 40, "cutoff": 550},
    ],
    "bdia": [{"gamma": 0.5}, {"gamma": 1.0}, {"gamma": 0.35}, {"gamma": 0.2}],
}
TUNING_SEED = 1  # not the test cells' seed: the tuning never sees their noise either
SPREAD_SEEDS = (0, 1, 2)  # DDIM at the few-step count with these seeds: FID's spread from the noise alone
INT8_FORMATS = ("int8-ptq4dm", "int8-uniform", "int8-noised")
GUIDANCE = 2.0
SEED = 0
THREADS = 2  # onnxruntime intra-op threads, for sampling and throughput alike
QUALITY_STEPS = 20  # DDIM steps of the int8 quality cells (as the export records)
TARGET_STEPS_FEW = 10  # time shift and BDIA must beat DDIM here
TARGET_STEPS_ACCURACY, TARGET_ACCURACY = 50, 0.90
TARGET_FID_RATIO = 1.10  # int8 (NDTC) FID within 10% of fp32
TARGET_SPEEDUP, TARGET_BATCH = 1.5, 64
RESULTS = Path(__file__).resolve().parent / "results" / "diffusion.json"


class BenchmarkError(RuntimeError):
    """The benchmark can not run as configured (e.g. a model failed to train or export)."""


@dataclass(frozen=True)
class Settings:
    per_class: int  # generated images per digit class, every cell
    steps: tuple[int, ...]  # sampler step counts
    throughput_batches: tuple[int, ...]
    throughput_warmup: int
    throughput_duration_s: float  # per graph and batch, split over the rounds
    throughput_rounds: int
    profile_runs: int  # onnxruntime profiling: calls per graph at TARGET_BATCH


FULL = Settings(
    per_class=50,
    steps=(10, 20, 50, 100),
    throughput_batches=(1, 16, 64),
    throughput_warmup=3,
    throughput_duration_s=6,
    throughput_rounds=5,
    profile_runs=10,
)
QUICK = Settings(
    per_class=10,
    steps=(10, 20),
    throughput_batches=(1, 16, 64),
    throughput_warmup=1,
    throughput_duration_s=1,
    throughput_rounds=3,
    profile_runs=3,
)


@dataclass(frozen=True)
class Context:
    """What a further section gets: the run's mode and seed, the store and its artifacts."""

    quick: bool
    seed: int
    home: Path
    arts: dict[str, Any]


@dataclass(frozen=True)
class Section:
    """A further subsection: ``run(context) -> results`` (JSON-able), ``render(results) -> markdown``."""

    key: str
    run: Callable[[Context], dict[str, Any]]
    render: Callable[[dict[str, Any]], str]


# The subsections after the samplers and PTQ4DM, in order; one line adds another.
SECTIONS: list[Section] = [
    Section(
        "hallucination_toy", lambda c: hallucination_toy.run(c.quick, seed=c.seed), hallucination_toy.render
    ),
    Section("step_batching", lambda c: step_batching.run(c.home, c.quick), step_batching.render),
]


def ensure_models(log: Callable[[str], None] = print) -> dict[str, Any]:
    """``vit-soft`` and ``diffusion-digits`` with the exports measured here, trained / exported if missing.

    As ``kiln serve`` does: a model missing from the store is trained with its recipe
    (:func:`training.trainer.train`), a missing export is built with :func:`export.pipeline.export_artifact`
    (the classifier first: the diffusion exports measure their quality in its features).
    """
    from export.pipeline import ExportError, export_artifact, spec_for
    from kiln.artifacts import ArtifactError, get_artifact
    from training.trainer import train

    arts = {}
    for name in (CLASSIFIER, MODEL):
        try:
            art = get_artifact(name)
        except ArtifactError:
            log(f"{name}: not in the model store; training it (first run only)")
            art = train(name).artifact
        wanted = ("onnx", *INT8_FORMATS) if name == MODEL else spec_for(art).default_formats
        missing = [
            f
            for f in wanted
            if not art.export(f)
            or ("discarded" not in art.export(f) and not art.file(art.export(f)["file"]).is_file())
        ]
        if missing:
            log(f"{art.tag}: exporting {missing}")
            try:
                art = export_artifact(art.tag, missing, log=log)
            except (ArtifactError, ExportError, ValueError) as exc:
                raise BenchmarkError(f"{art.tag}: export {missing} failed: {exc}") from exc
        discarded = {f: art.export(f)["discarded"] for f in wanted if "discarded" in (art.export(f) or {})}
        if discarded:  # the export's quality gate removed them: nothing to measure
            raise BenchmarkError(f"{art.tag}: exports discarded by their quality gate: {discarded}")
        arts[name] = art
    return arts


def run(quick: bool, output: str, command: str) -> dict[str, Any]:
    """Run the suite, write the JSON and the markdown section; returns the results."""
    import onnxruntime as ort

    from export.fid_digits import FidDigits
    from kiln.settings import kiln_home

    settings = QUICK if quick else FULL
    print(f"kiln bench diffusion{' --quick' if quick else ''}: store {kiln_home()}")
    arts = ensure_models()
    machine = machine_info()  # before the run, so the load average is the machine's, not ours
    t0 = time.perf_counter()
    art = arts[MODEL]
    fid = FidDigits(arts[CLASSIFIER].tag)
    labels = np.repeat(np.arange(len(art.manifest["labels"])), settings.per_class)
    graphs = {"fp32": art.file(art.export("onnx")["file"])}
    graphs |= {f: art.file(art.export(f)["file"]) for f in INT8_FORMATS}

    print(
        f"1/3 samplers ({len(labels)} images per cell, guidance {GUIDANCE:g}, fp32 ONNX, {THREADS} threads)"
    )
    floor = _floors(fid, settings.per_class)
    samplers = run_samplers(art, fid, graphs["fp32"], labels, settings.steps)
    print(f"   options by FID against the validation split ({TARGET_STEPS_FEW} steps, seed {TUNING_SEED})")
    tuning = run_tuning(art, split_fid(arts[CLASSIFIER], "val"), graphs["fp32"], labels)
    samplers += run_tuned(art, fid, graphs["fp32"], labels, tuning)
    print(
        f"   DDIM {TARGET_STEPS_FEW} steps with other seeds (the spread of FID-digits from the noise alone)"
    )
    spread = run_seed_spread(art, fid, graphs["fp32"], labels, samplers)

    print("2/3 PTQ4DM int8: quality, graph, throughput")
    fp32_cell = _find(samplers, sampler="ddim", steps=QUALITY_STEPS)
    quantized = run_quantized(art, fid, graphs, labels, fp32_cell)
    int8_graph = {
        "file_ops": _op_counts(graphs["int8-ptq4dm"]),
        "onnxruntime_ops": _optimized_op_counts(graphs["int8-ptq4dm"]),
        "fp32_onnxruntime_ops": _optimized_op_counts(graphs["fp32"]),
        "profile_batch": TARGET_BATCH,
        "fp32_kernel_share": _kernel_shares(graphs["fp32"], TARGET_BATCH, settings.profile_runs),
        "int8_kernel_share": _kernel_shares(graphs["int8-ptq4dm"], TARGET_BATCH, settings.profile_runs),
    }
    throughput = run_throughput(
        {"fp32": graphs["fp32"], "int8-ptq4dm": graphs["int8-ptq4dm"]},
        settings.throughput_batches,
        settings.throughput_warmup,
        settings.throughput_duration_s,
        settings.throughput_rounds,
    )

    print(f"3/3 further sections: {', '.join(s.key for s in SECTIONS) or 'none'}")
    context = Context(quick=quick, seed=SEED, home=kiln_home(), arts=arts)
    sections = {}
    for section in SECTIONS:
        t_section = time.perf_counter()
        sections[section.key] = section.run(context)
        print(f"   {section.key}: {time.perf_counter() - t_section:.0f}s")

    results = {
        "suite": "diffusion",
        "quick": quick,
        "command": command,
        "machine": machine,
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "onnxruntime_providers": ort.get_available_providers(),
        "settings": asdict(settings),
        "threads": THREADS,
        "guidance": GUIDANCE,
        "seed": SEED,
        "sampler_options": {s: _sampler_options(art, s) for s in SAMPLERS},
        "tuning": tuning,
        "seed_spread": spread,
        "time_shift_check": time_shift_check(art, TARGET_STEPS_FEW, settings.steps),
        "models": {MODEL: _model_facts(art), CLASSIFIER: _classifier_facts(arts[CLASSIFIER])},
        "floor": floor,
        "samplers": samplers,
        "quantized": quantized,
        "int8_graph": int8_graph,
        "throughput": throughput,
        "sections": sections,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    results["targets"] = evaluate_targets(results)
    write_results(results, "diffusion", output, quick, RESULTS, render_markdown)
    return results


# --------------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------------


_SHOWN_OPTIONS = {"ddpm": (), "ddim": ("eta",), "time-shift": ("window", "cutoff", "eta"), "bdia": ("gamma",)}


def _sampler_options(art, name: str) -> dict[str, Any]:
    """The options that shape each sampler here: its constructor defaults overridden by SAMPLER_OPTIONS."""
    from model_zoo.schedulers import NoiseSchedule, create_sampler

    sampler = create_sampler(name, NoiseSchedule(**art.manifest["schedule"]), **SAMPLER_OPTIONS.get(name, {}))
    return {k: getattr(sampler, k) for k in _SHOWN_OPTIONS.get(name, ())}


def _floors(fid, per_class: int) -> dict[str, Any]:
    """Real-vs-real FID: the whole train split vs test, and ``per_class`` train digits per class vs test
    (the generated cells' sample count: FID is biased upwards at small N)."""
    from kiln.imaging import resize_bilinear
    from training.data import digits_splits

    train = digits_splits()["train"]
    idx = np.concatenate([np.flatnonzero(train.labels == k)[:per_class] for k in np.unique(train.labels)])
    matched = resize_bilinear(train.images[idx], (16, 16)) * 2.0 - 1.0  # as a generated image would be
    return {
        "train_vs_test": fid.floor(),
        "train_vs_test_samples": int(len(train.labels)),
        "matched": fid.fid(matched),
        "matched_samples": int(len(idx)),
    }


def _sample(art, denoise, labels: np.ndarray, sampler: str, steps: int, seed: int, options: dict[str, Any]):
    from export.diffusion import sample_digits

    return sample_digits(
        art, denoise, labels=labels, sampler=sampler, steps=steps, guidance=GUIDANCE, seed=seed, **options
    )


def run_samplers(art, fid, graph: Path, labels: np.ndarray, steps: tuple[int, ...], log=print) -> list[dict]:
    """Every (steps, sampler) cell through one fp32 denoiser, the same labels and seed in every cell.

    Step counts outermost, so a drift of the shared machine's speed lands on all samplers of a step count.
    """
    from export.diffusion import onnx_denoiser

    denoise = onnx_denoiser(graph, threads=THREADS)
    rows = []
    for n in steps:
        for name in SAMPLERS:
            options = SAMPLER_OPTIONS.get(name, {})
            images, seconds = _sample(art, denoise, labels, name, n, SEED, options)
            rows.append(_cell(fid, images, labels, seconds, sampler=name, steps=n, variant="paper", log=log))
    return rows


def diverged(images: np.ndarray) -> int:
    """How many generated images hold a NaN or Inf (a sampler that blew up on them)."""
    return int((~np.isfinite(images.reshape(len(images), -1)).all(axis=1)).sum())


def _cell(fid, images, labels, seconds: float, log=print, **keys: Any) -> dict[str, Any]:
    """FID-digits and conditional accuracy of one cell; a cell with diverged samples gets neither (a set
    with failures left out would not compare with the others) and says how many diverged."""
    bad = diverged(images)
    row = {
        **keys,
        "images": len(labels),
        "diverged": bad,
        "fid_digits": None if bad else fid.fid(images),
        "conditional_accuracy": None if bad else fid.conditional_accuracy(images, labels),
        "seconds": seconds,
        "seconds_per_100": seconds * 100 / len(labels),
    }
    log(
        f"  {keys.get('sampler', '')} {keys.get('steps', '')} steps {keys.get('variant', '')}: "
        + (
            f"{bad} of {len(labels)} samples diverged (NaN/Inf)"
            if bad
            else f"FID-digits {row['fid_digits']:.3f}  cond. acc {row['conditional_accuracy']:.3f}"
        )
        + f"  {row['seconds_per_100']:.1f} s/100 images"
    )
    return row


def split_fid(classifier, split: str) -> Callable[[np.ndarray], float]:
    """FID-digits against another split than the test split: ``fid(images in [-1, 1]) -> float``.

    For choosing sampler options on the validation split, so the test split stays unseen. Real and
    generated digits take :class:`export.fid_digits.FidDigits`' path into the same classifier: 8×8 digits
    resized to 16×16, generated ones mapped from [-1, 1] to [0, 1], both to the classifier's input size,
    pre-logit features, Fréchet distance.
    """
    import torch

    from export.fid_digits import GENERATED_SIZE, feature_statistics, frechet_distance
    from kiln.artifacts import load_torch_model
    from kiln.imaging import resize_bilinear, to_model_input
    from training.data import digits_splits

    model = load_torch_model(classifier)
    size = tuple(classifier.manifest["preprocess"]["size"])

    def features(images_01: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(to_model_input(images_01, size))
            return model.forward_head(model.forward_features(x), pre_logits=True).double().numpy()

    reference = feature_statistics(features(resize_bilinear(digits_splits()[split].images, GENERATED_SIZE)))

    def fid(images: np.ndarray) -> float:
        images_01 = np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)
        return frechet_distance(*feature_statistics(features(images_01)), *reference)

    return fid


def run_tuning(art, val_fid, graph: Path, labels: np.ndarray, log=print) -> list[dict[str, Any]]:
    """DDIM and every TUNING_GRID setting at TARGET_STEPS_FEW steps, scored by ``val_fid``; the best of each
    sampler (lowest validation FID) is marked ``chosen``."""
    from export.diffusion import onnx_denoiser

    denoise = onnx_denoiser(graph, threads=THREADS)
    cells = [("ddim", {})] + [(name, opts) for name, grid in TUNING_GRID.items() for opts in grid]
    rows = []
    for name, options in cells:
        images, seconds = _sample(art, denoise, labels, name, TARGET_STEPS_FEW, TUNING_SEED, options)
        bad = diverged(images)
        score = None if bad else val_fid(images)
        rows.append(
            {
                "sampler": name,
                "options": options,
                "images": len(labels),
                "diverged": bad,
                "val_fid": score,
                "seconds": seconds,
            }
        )
        log(f"  {name:<10} {_options(options):<22} validation FID {_fid(score, bad, len(labels))}")
    for name in TUNING_GRID:
        finite = [r for r in rows if r["sampler"] == name and r["val_fid"] is not None]
        if finite:
            min(finite, key=lambda r: r["val_fid"])["chosen"] = True
    return rows


def run_tuned(art, fid, graph: Path, labels: np.ndarray, tuning: list[dict], log=print) -> list[dict]:
    """Test-split cells of the validation-chosen settings that differ from the papers' (few steps only)."""
    from export.diffusion import onnx_denoiser

    denoise = onnx_denoiser(graph, threads=THREADS)
    rows = []
    for r in tuning:
        if not r.get("chosen") or r["options"] == TUNING_GRID[r["sampler"]][0]:  # the papers' setting
            continue
        images, seconds = _sample(art, denoise, labels, r["sampler"], TARGET_STEPS_FEW, SEED, r["options"])
        row = _cell(
            fid,
            images,
            labels,
            seconds,
            sampler=r["sampler"],
            steps=TARGET_STEPS_FEW,
            variant="val-tuned",
            log=log,
        )
        rows.append({**row, "options": r["options"]})
    return rows


def run_seed_spread(art, fid, graph: Path, labels: np.ndarray, samplers: list[dict], log=print) -> dict:
    """FID-digits of DDIM at TARGET_STEPS_FEW steps for SPREAD_SEEDS (the table's seed from its cell)."""
    from export.diffusion import onnx_denoiser

    denoise = onnx_denoiser(graph, threads=THREADS)
    cell = _find(samplers, sampler="ddim", steps=TARGET_STEPS_FEW)
    fids = {SEED: cell["fid_digits"]} if cell else {}
    for seed in SPREAD_SEEDS:
        if seed not in fids:
            images, _ = _sample(art, denoise, labels, "ddim", TARGET_STEPS_FEW, seed, {})
            fids[seed] = None if diverged(images) else fid.fid(images)
            log(f"  ddim {TARGET_STEPS_FEW} steps seed {seed}: FID-digits {_fid(fids[seed])}")
    return {
        "sampler": "ddim",
        "steps": TARGET_STEPS_FEW,
        "fid_digits_by_seed": {str(k): v for k, v in fids.items()},
    }


def time_shift_check(art, steps: int, all_steps: tuple[int, ...] = ()) -> dict[str, Any]:
    """What the time-shift rule (paper settings) picks for x_t exactly on the training marginal, and how
    far up its window reaches at each of ``all_steps``.

    Validation digits forward-noised at each nominal step of a ``steps``-step run: a rule that matched
    noise levels would leave these time steps where they are. The reach: the window around the first
    step that shifts, and ᾱ at its top (x̂0 = (x_t − √(1 − ᾱ) ε) / √ᾱ scales the error of ε by 1 / √ᾱ).
    No network is involved.
    """
    import torch

    from kiln.imaging import resize_bilinear
    from model_zoo.schedulers import NoiseSchedule, create_sampler
    from training.data import digits_splits

    schedule = NoiseSchedule(**art.manifest["schedule"])
    sampler = create_sampler("time-shift", schedule, **SAMPLER_OPTIONS.get("time-shift", {}))
    sampler.set_timesteps(steps)
    size = tuple(art.manifest["image"]["size"])
    x0 = torch.from_numpy(resize_bilinear(digits_splits()["val"].images, size) * 2.0 - 1.0).float()[:, None]
    abar = schedule.alphas_cumprod().float()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for t in sampler.nominal_timesteps.tolist()[1:]:  # never at the first step
        if t <= sampler.cutoff:
            break
        # forward process, DDPM eq. (4): x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε
        x_t = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * torch.randn(x0.shape, generator=gen)
        shifted = sampler.shifted_timesteps(x_t, t)
        rows.append(
            {
                "t": t,
                "one_minus_alpha_bar": float(1 - abar[t]),
                "pixel_variance": float(x_t.flatten(1).var(dim=1).mean()),
                "mean_shift": float((shifted - t).float().mean()),
            }
        )
    reach = []
    abar64 = schedule.alphas_cumprod()
    for n in all_steps:
        sampler.set_timesteps(n)
        first = int(sampler.nominal_timesteps[1])  # never at the first step
        top = min(schedule.num_train_timesteps - 1, first + sampler.window // 2)
        reach.append(
            {"steps": n, "first_shifted_t": first, "window_top": top, "alpha_bar": float(abar64[top])}
        )
    return {
        "window": sampler.window,
        "cutoff": sampler.cutoff,
        "x0_pixel_variance": float(x0.flatten(1).var(dim=1).mean()),
        "rows": rows,
        "reach": reach,
    }


def run_quantized(art, fid, graphs: dict[str, Path], labels: np.ndarray, fp32: dict | None, log=print):
    """fp32 and every int8 graph at DDIM ``QUALITY_STEPS`` steps (fp32 from the samplers' cell if run)."""
    from export.diffusion import onnx_denoiser

    rows = []
    for name, graph in graphs.items():
        entry = art.export("onnx" if name == "fp32" else name)
        if name == "fp32" and fp32 is not None:
            cell = {k: fp32[k] for k in ("fid_digits", "conditional_accuracy", "seconds_per_100")}
        else:
            denoise = onnx_denoiser(graph, threads=THREADS)
            images, seconds = _sample(art, denoise, labels, "ddim", QUALITY_STEPS, SEED, {})
            cell = _cell(
                fid, images, labels, seconds, sampler="ddim", steps=QUALITY_STEPS, variant=name, log=log
            )
        calibration = entry.get("calibration") or {}
        rows.append(
            {
                "graph": name,
                "file": graph.name,
                "calibration": calibration.get("set", "-"),
                "calibration_samples": calibration.get("samples"),
                "per_channel": entry.get("per_channel"),
                "quantized_ops": entry.get("quantized_ops"),
                "quantized_nodes": entry.get("quantized_nodes"),
                "export_fid_digits": entry.get("fid_digits"),  # what kiln.json recorded at export
                "export_conditional_accuracy": entry.get("conditional_accuracy"),
                **{k: cell[k] for k in ("fid_digits", "conditional_accuracy", "seconds_per_100")},
            }
        )
    return rows


def _session(graph: Path, threads: int = THREADS, **options: Any):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    for k, v in options.items():
        setattr(opts, k, v)
    return ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])


def denoiser_inputs(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A fixed denoiser batch: N(0, 1) samples, time steps over [0, 1000), labels incl. the null one."""
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((batch, 1, 16, 16)).astype(np.float32),
        "timestep": rng.integers(0, 1000, batch).astype(np.int64),
        "label": rng.integers(0, 11, batch).astype(np.int64),
    }


def run_throughput(
    graphs: dict[str, Path],
    batches: tuple[int, ...],
    warmup: int,
    duration_s: float,
    rounds: int,
    log=print,
) -> list[dict[str, Any]]:
    """Denoiser samples/s per (graph, batch) in onnxruntime, in interleaved rounds (as ``runtimes.py``).

    Every graph and batch runs once per round for ``duration_s / rounds``; throughput is the median over
    rounds, with the slowest and fastest round kept: a shared machine's speed drifts between minutes, and
    interleaving keeps that drift from landing on one graph.
    """
    sessions = {name: _session(path) for name, path in graphs.items()}
    inputs = {b: denoiser_inputs(b) for b in batches}
    per_round = {(g, b): [] for g in graphs for b in batches}
    times = {(g, b): [] for g in graphs for b in batches}
    for sess in sessions.values():  # warm every cell up before any is timed
        for b in batches:
            time_calls(lambda s=sess, x=inputs[b]: s.run(None, x), warmup, 0, min_calls=0)
    for _ in range(rounds):
        for g, sess in sessions.items():
            for b in batches:
                calls, elapsed = time_calls(
                    lambda s=sess, x=inputs[b]: s.run(None, x), 0, duration_s / rounds, min_calls=3
                )
                per_round[(g, b)].append(b * len(calls) / elapsed)
                times[(g, b)] += calls
    rows = []
    for g in graphs:
        for b in batches:
            tput, t = per_round[(g, b)], times[(g, b)]
            row = {
                "graph": g,
                "batch": b,
                "threads": THREADS,
                "rounds": rounds,
                "calls": len(t),
                "samples_per_s": percentile(tput, 50),
                "samples_per_s_min": min(tput),
                "samples_per_s_max": max(tput),
                "latency_ms_p50": percentile(t, 50) * 1e3,
                "latency_ms_p99": percentile(t, 99) * 1e3,
            }
            rows.append(row)
            log(
                f"  {g:<12} batch {b:>2}: {row['samples_per_s']:8.1f} samples/s "
                f"(rounds {min(tput):.0f}-{max(tput):.0f})  p50 {row['latency_ms_p50']:7.2f} ms"
            )
    return rows


def _op_counts(graph: Path) -> dict[str, int]:
    import onnx

    return dict(Counter(n.op_type for n in onnx.load(str(graph)).graph.node).most_common())


def _optimized_op_counts(graph: Path) -> dict[str, int]:
    """Op types of the graph onnxruntime actually runs, after its CPU graph optimizations (QDQ fusion)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        # severity 3: onnxruntime warns that a layout-optimized graph is machine-specific; it is only counted
        _session(graph, optimized_model_filepath=str(out), log_severity_level=3)
        return dict(Counter(n.op_type for n in onnx.load(str(out)).graph.node).most_common())


def _kernel_shares(graph: Path, batch: int, runs: int) -> dict[str, float]:
    """Share of onnxruntime's kernel time per op type over ``runs`` calls at ``batch`` (its profiler)."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = _session(graph, enable_profiling=True, profile_file_prefix=str(Path(tmp) / "profile"))
        x = denoiser_inputs(batch)
        sess.run(None, x)  # the first call allocates; profiled with the rest, it is one of runs + 1
        for _ in range(runs):
            sess.run(None, x)
        events = json.loads(Path(sess.end_profiling()).read_text())
    totals: Counter[str] = Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            totals[e["args"]["op_name"]] += e["dur"]
    whole = sum(totals.values()) or 1
    return {op: round(us / whole, 4) for op, us in totals.most_common()}


def _model_facts(art) -> dict[str, Any]:
    """What the diffusion artifact recorded when it was trained and exported (read back, not recomputed)."""
    m = art.manifest
    metrics, training = m.get("metrics", {}), m.get("training", {})
    onnx = art.export("onnx") or {}
    return {
        "tag": art.tag,
        "architecture": m.get("architecture"),
        "parameters": metrics.get("parameters"),
        "epochs": training.get("epochs"),
        "best_epoch": metrics.get("best_epoch"),
        "train_seconds": metrics.get("train_seconds"),
        "train_loss": metrics.get("train_loss"),
        "val_loss": metrics.get("val_loss"),
        "schedule": m.get("schedule"),
        "onnx_max_abs_diff": onnx.get("max_abs_diff"),
        "onnx_atol": onnx.get("atol"),
        "onnx_parity_inputs": onnx.get("parity_inputs"),
        "code_version": m.get("code_version"),
        "command": f"kiln train {art.name} --export"
        + (f" --seed {training['seed']}" if training.get("seed") else ""),
    }


def _classifier_facts(art) -> dict[str, Any]:
    metrics = art.manifest.get("metrics", {})
    return {"tag": art.tag, "test_accuracy": metrics.get("test_accuracy"), "role": "FID-digits features"}


# --------------------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------------------


def _find(rows: list[dict[str, Any]], **keys: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in keys.items())), None)


def _not_measured(target: str) -> dict[str, Any]:
    return {"target": target, "met": None, "measured": "not measured in this run", "reason": ""}


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured figures, ``met`` (True / False / None = not measured) and a reason."""
    return [
        few_steps_target(results["samplers"], results.get("tuning", []), results.get("time_shift_check")),
        accuracy_target(results["samplers"]),
        int8_quality_target(results["quantized"]),
        int8_speed_target(results["throughput"], results.get("int8_graph", {})),
    ]


def few_steps_target(
    rows: list[dict[str, Any]], tuning: list[dict[str, Any]], check: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Judged on the setting chosen without the test split: the validation-chosen one where it differs
    from the papers' (a ``val-tuned`` row), else the papers'."""
    n = TARGET_STEPS_FEW
    target = (
        f"time-shift DDIM and BDIA-DDIM beat DDIM on FID-digits at {n} steps (each with the setting chosen "
        "on the validation split from the papers' and a small grid)"
    )
    ddim = _find(rows, sampler="ddim", steps=n)
    if ddim is None or any(_find(rows, sampler=s, steps=n) is None for s in ("time-shift", "bdia")):
        return _not_measured(target)
    base = ddim["fid_digits"]
    parts, losers = [f"DDIM {_fid_of(ddim)}"], []
    for s in ("time-shift", "bdia"):
        paper = _find(rows, sampler=s, steps=n, variant="paper") or _find(rows, sampler=s, steps=n)
        tuned = _find(rows, sampler=s, steps=n, variant="val-tuned")
        text = f"{SAMPLER_NAMES[s]} {_fid_of(paper)} ({_change(paper['fid_digits'], base)})"
        if tuned:
            text += (
                f" with the papers' setting, {_fid_of(tuned)} ({_change(tuned['fid_digits'], base)}) "
                f"with the validation-chosen {_options(tuned.get('options', {}))}"
            )
        parts.append(text)
        judged = (tuned or paper)["fid_digits"]
        if judged is None or base is None or not judged < base:
            losers.append(s)
    val = {(r["sampler"], json.dumps(r["options"], sort_keys=True)): r["val_fid"] for r in tuning}
    val_ddim = val.get(("ddim", "{}"))
    chosen = {r["sampler"]: r for r in tuning if r.get("chosen")}
    reasons = []
    if "time-shift" in losers:
        why = "time shift did not correct an exposure bias here"
        if check and check.get("rows"):
            shifts = ", ".join(f"t {r['t']}: {r['mean_shift']:+.0f}" for r in check["rows"])
            why = (
                "the time-shift rule compares a sample's pixel variance with 1 − ᾱ_t, but on validation "
                "digits forward-noised to the nominal steps (x_t exactly on the training marginal) it moves "
                f"the time step by {shifts} train steps (the window is ±{check['window'] // 2}): the pixel "
                f"variance of x_t is ᾱ·Var(x0) + (1 − ᾱ), and a digit's own pixel variance "
                f"({check['x0_pixel_variance']:.2f} in [−1, 1]) is not small next to 1 − ᾱ, so the rule "
                "takes "
                "on-marginal states for noisier ones and tells the network the wrong noise level"
            )
        if "time-shift" in chosen and val_ddim is not None:
            c = chosen["time-shift"]
            why += (
                f"; the best grid setting on the validation split ({_options(c['options'])}, FID "
                f"{_fid(c['val_fid'])} vs DDIM {_fid(val_ddim)}) shifts less and so stays near DDIM"
            )
        reasons.append(why)
    if "bdia" in losers:
        why = "BDIA's backward estimate of the previous interval did not reduce the error at this step count"
        if "bdia" in chosen and val_ddim is not None:
            c = chosen["bdia"]
            why = (
                f"on the validation split the best γ of the grid ({_options(c['options'])}) scored FID "
                f"{_fid(c['val_fid'])} vs DDIM {_fid(val_ddim)}: γ → 0 is DDIM, and a larger γ adds the "
                f"backward estimate over the previous interval, which at {n} steps does not pay here"
            )
        reasons.append(why)
    return {
        "target": target,
        "met": not losers,
        "measured": f"FID-digits at {n} steps: " + "; ".join(parts),
        "reason": "; ".join(reasons),
    }


def accuracy_target(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n, bar = TARGET_STEPS_ACCURACY, TARGET_ACCURACY
    target = f"conditional accuracy >= {bar:.0%} at {n} DDIM steps (guidance {GUIDANCE:g})"
    cell = _find(rows, sampler="ddim", steps=n)
    if cell is None:
        return _not_measured(target)
    acc = cell["conditional_accuracy"]
    if acc is None:
        return {
            "target": target,
            "met": False,
            "measured": f"{cell['diverged']} of {cell['images']} samples diverged (NaN/Inf)",
            "reason": "the sampler diverged",
        }
    met = acc >= bar
    reason = ""
    if not met:
        reason = (
            "the classifier assigns the other images to another class: at this model size and training "
            "length some generated digits are ambiguous; stronger guidance trades FID for accuracy"
        )
    return {
        "target": target,
        "met": met,
        "measured": f"{acc:.1%} of {cell['images']} images",
        "reason": reason,
    }


def int8_quality_target(rows: list[dict[str, Any]]) -> dict[str, Any]:
    target = (
        f"int8 PTQ4DM (NDTC calibration) FID-digits within {TARGET_FID_RATIO - 1:.0%} of fp32 "
        f"(DDIM {QUALITY_STEPS} steps)"
    )
    fp32, int8 = _find(rows, graph="fp32"), _find(rows, graph="int8-ptq4dm")
    if fp32 is None or int8 is None:
        return _not_measured(target)
    a, b = int8["fid_digits"], fp32["fid_digits"]
    met = a is not None and b is not None and a <= TARGET_FID_RATIO * b
    others = [f"{r['graph']} {_fid_of(r)}" for r in rows if r["graph"] not in ("fp32", "int8-ptq4dm")]
    measured = f"fp32 {_fid_of(fp32)}, int8-ptq4dm {_fid_of(int8)} ({_change(a, b)})"
    if others:
        measured += f"; {', '.join(others)}"
    reason = ""
    if not met:
        reason = (
            "8-bit activations of every convolution and linear layer lose detail that a 16 × 16 digit "
            "needs; the error compounds over the sampling steps"
        )
    return {"target": target, "met": met, "measured": measured, "reason": reason}


def int8_speed_target(rows: list[dict[str, Any]], graph_facts: dict[str, Any]) -> dict[str, Any]:
    target = f"int8 denoiser >= {TARGET_SPEEDUP:g}x the fp32 throughput at batch {TARGET_BATCH} (onnxruntime)"
    fp32 = _find(rows, graph="fp32", batch=TARGET_BATCH)
    int8 = _find(rows, graph="int8-ptq4dm", batch=TARGET_BATCH)
    if fp32 is None or int8 is None:
        return _not_measured(target)
    speed = int8["samples_per_s"] / fp32["samples_per_s"]
    met = speed >= TARGET_SPEEDUP
    measured = (
        f"{int8['samples_per_s']:.1f} vs {fp32['samples_per_s']:.1f} samples/s = {speed:.2f}x "
        f"({THREADS} threads)"
    )
    reason = ""
    if not met:
        conv = graph_facts.get("fp32_kernel_share", {}).get("Conv")
        bound = f"{1 / (1 - conv):.2f}x" if conv and conv < 1 else "?"
        share = graph_facts.get("int8_kernel_share", {})
        qdq = share.get("QuantizeLinear", 0.0) + share.get("DequantizeLinear", 0.0)
        reason = (
            f"convolutions are {_pct(conv)} of the fp32 graph's kernel time at batch {TARGET_BATCH}, so even "
            f"free int8 convolutions would give at most {bound}; in the int8 graph onnxruntime does run "
            f"every convolution as QLinearConv ({_pct(share.get('QLinearConv'))} of its kernel time), but "
            "spends "
            f"{_pct(share.get('Transpose'))} on Transposes into and out of the NHWC layout of its int8 "
            f"convolutions and {_pct(qdq)} on QuantizeLinear / DequantizeLinear around the ops that stay "
            "fp32 (GroupNorm, SiLU, residual and time-embedding adds, upsampling, attention softmax)"
        )
    return {"target": target, "met": met, "measured": measured, "reason": reason}


def _change(value: float | None, base: float | None) -> str:
    return f"{(value - base) / base:+.1%}" if value is not None and base else "-"


def _fid(value: float | None, bad: int = 0, images: int | None = None) -> str:
    if value is not None:
        return f"{value:.3f}"
    return f"diverged ({bad} of {images} samples NaN/Inf)" if bad else "-"


def _fid_of(row: dict[str, Any]) -> str:
    return _fid(row.get("fid_digits"), row.get("diverged", 0), row.get("images"))


def _acc(value: float | None) -> str:
    return f"{value:.1%}" if value is not None else "-"


def _pct(share: float | None) -> str:
    return f"{share:.0%}" if isinstance(share, float) else "?"


# --------------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------------


def render_markdown(results: dict[str, Any], json_path: Path) -> str:
    """The BENCHMARKS.md section (without its markers) for one run's results."""
    s = results["settings"]
    model = results["models"][MODEL]
    classifier = results["models"][CLASSIFIER]
    lines = ["## Diffusion: samplers, PTQ4DM int8, hallucination filter, step-level batching", ""]
    lines += run_header(
        results,
        json_path,
        "- FID and accuracy do not depend on the load; times do",
        f"- models: {MODEL} `{model['tag']}`; FID-digits features and conditional accuracy: {CLASSIFIER} "
        f"`{classifier['tag']}` (test accuracy {_num(classifier.get('test_accuracy'), 4)})",
    )
    lines += [
        "",
        "### Targets",
        "",
    ]
    lines += target_lines(results["targets"])

    lines += ["", "### Trained model (digits, 16 x 16)", ""]
    lines += [
        "Read from the artifact's `kiln.json`: trained by the command shown on this machine (AdamW, "
        "warm-up + cosine, EMA weights, seed 0, best epoch by the ε-MSE on a fixed noising of the "
        "validation split).",
        "",
        markdown_table(
            [
                "model",
                "command",
                "params",
                "epochs (best)",
                "train s",
                "val loss (ε MSE)",
                "ONNX max abs diff",
            ],
            [
                [
                    MODEL,
                    f"`{model.get('command', '-')}`",
                    model.get("parameters", "-"),
                    f"{model.get('epochs', '-')} ({model.get('best_epoch', '-')})",
                    model.get("train_seconds", "-"),
                    _num(model.get("val_loss"), 4),
                    f"{_sci(model.get('onnx_max_abs_diff'))} (atol {model.get('onnx_atol', '-')})",
                ]
            ],
        ),
        "",
        f"ONNX parity inputs: {model.get('onnx_parity_inputs', '-')}.",
    ]

    lines += ["", "### Samplers", ""]
    floor = results["floor"]
    opts = results.get("sampler_options", {})
    lines += [
        f"Each cell generates {s['per_class']} images per class ({s['per_class'] * 10} in all) through the "
        f"fp32 ONNX denoiser in onnxruntime ({results['threads']} intra-op threads), classifier-free "
        f"guidance {results['guidance']:g} (two denoiser rows per image and step), the same labels and seed "
        f"{results['seed']} in every cell (the same initial noise; DDPM's per-step noise from the same "
        "generator), so cells compare pairwise. FID-digits: Fréchet distance to the test split (270 digits) "
        f"in the pre-logit features of `{classifier['tag']}`; conditional accuracy: the share of images "
        "that classifier assigns to the class they were generated for. Seconds per 100 images: the whole "
        "sampling loop, wall clock, step counts outermost so a drift of the machine lands on all samplers "
        "of a step count alike.",
        "",
        "Papers' settings: "
        + "; ".join(f"{SAMPLER_NAMES[k]}: {_options(v)}" for k, v in opts.items() if v)
        + " (DDPM: ancestral, σ_t² = β̃_t). Time shift runs with its defaults, the authors' few-step DDIM "
        "setting; BDIA with the paper's few-step γ = 0.5 (Kiln's default γ = 1 is for exact inversion). "
        "*val-tuned* rows: the setting that scored best on the validation split (below), where it differs "
        "from the papers'; they run after that search, later than the other cells of their step count, so "
        "their seconds need not compare with those cells'.",
        "",
        f"Real-vs-real floor (what a perfect generator would score): {floor['matched']:.3f} for "
        f"{floor['matched_samples']} train-split digits ({s['per_class']} per class, the cells' sample "
        f"count) vs the test split; {floor['train_vs_test']:.3f} for the whole train split "
        f"({floor['train_vs_test_samples']} digits).",
        "",
    ]
    rows = []
    for r in sorted(results["samplers"], key=lambda r: r["steps"]):
        ddim = _find(results["samplers"], sampler="ddim", steps=r["steps"])
        vs = _change(r["fid_digits"], ddim["fid_digits"]) if ddim and r["sampler"] != "ddim" else ""
        setting = _options(r["options"] if "options" in r else opts.get(r["sampler"], {}))
        if r.get("variant") == "val-tuned":
            setting = f"val-tuned: {setting}"
        rows.append(
            [
                r["steps"],
                SAMPLER_NAMES.get(r["sampler"], r["sampler"]),
                setting,
                _fid_of(r),
                vs,
                _acc(r["conditional_accuracy"]),
                fmt(r["seconds_per_100"], 1),
            ]
        )
    lines += [
        markdown_table(
            [
                "steps",
                "sampler",
                "setting",
                "FID-digits",
                "vs DDIM",
                "conditional accuracy",
                "s / 100 images",
            ],
            rows,
        ),
        "",
    ]
    spread = results.get("seed_spread")
    if spread and spread.get("fid_digits_by_seed"):
        by_seed = spread["fid_digits_by_seed"]
        lines += [
            f"How much FID-digits moves with the noise alone: DDIM, {spread['steps']} steps, seeds "
            f"{' / '.join(by_seed)}: {' / '.join(_fid(v) for v in by_seed.values())}. The cells above "
            "share one seed, so their differences are paired and less noisy than this spread; still, a "
            "difference of a few percent is within noise.",
            "",
        ]
    tuning = results.get("tuning", [])
    if tuning:
        lines += [
            f"Choosing settings without the test split: at {TARGET_STEPS_FEW} steps, seed {TUNING_SEED} (not "
            f"the cells' seed), the same labels, each setting's FID against the validation split "
            "(270 digits, the same feature path); the lowest of each sampler is chosen. The test split never "
            "enters this choice.",
            "",
            markdown_table(
                ["sampler", "setting", "validation FID", "chosen"],
                [
                    [
                        SAMPLER_NAMES.get(r["sampler"], r["sampler"]),
                        _options(r["options"]),
                        _fid(r["val_fid"], r.get("diverged", 0), r.get("images")),
                        "yes" if r.get("chosen") else "",
                    ]
                    for r in tuning
                ],
            ),
            "",
        ]
    check = results.get("time_shift_check")
    if check and check.get("rows"):
        lines += [
            f"Time-shift rule on the training marginal: validation digits forward-noised to each nominal "
            f"step the rule acts on ({TARGET_STEPS_FEW} steps, window {check['window']}, cutoff "
            f"{check['cutoff']}); a rule that read noise levels right would not move them. Clean digits' "
            f"mean pixel variance: {check['x0_pixel_variance']:.3f}.",
            "",
            markdown_table(
                ["nominal t", "1 − ᾱ_t", "mean pixel variance of x_t", "mean shift (train steps)"],
                [
                    [
                        r["t"],
                        f"{r['one_minus_alpha_bar']:.3f}",
                        f"{r['pixel_variance']:.3f}",
                        f"{r['mean_shift']:+.1f}",
                    ]
                    for r in check["rows"]
                ],
            ),
            "",
        ]
    if check and check.get("reach") and any(r.get("diverged") for r in results["samplers"]):
        lines += [
            "Diverged cells: the time-shift window (±"
            f"{check['window'] // 2} train steps) around the first step that shifts reaches up to where the "
            "cosine schedule's ᾱ is nearly 0, and x̂0 = (x_t − √(1 − ᾱ) ε) / √ᾱ (DDIM eq. 12) multiplies the "
            "error of the guided ε by 1 / √ᾱ there:",
            "",
            markdown_table(
                ["steps", "first shifted nominal t", "window reaches t", "ᾱ there", "1 / √ᾱ"],
                [
                    [
                        r["steps"],
                        r["first_shifted_t"],
                        r["window_top"],
                        f"{r['alpha_bar']:.2g}",
                        f"{r['alpha_bar'] ** -0.5:,.0f}",
                    ]
                    for r in check["reach"]
                ],
            ),
            "",
        ]

    lines += ["### PTQ4DM 8-bit (W8A8)", ""]
    lines += [
        "Quality: every graph samples with DDIM, "
        f"{QUALITY_STEPS} steps, guidance {results['guidance']:g}, the same {s['per_class'] * 10} labels and "
        "seed as the sampler cells (fp32 is that cell). The int8 graphs are onnxruntime static QDQ "
        "quantization (`export/quantize.py`, `_DiffusionW8A8`) of the same fp32 graph, differing only in the "
        "calibration set (`export/diffusion.py`): *ndtc* — PTQ4DM's normally distributed time steps "
        "(N(0.4, 0.4) of a 50-step DDIM trajectory from the noise end) with x_t from the fp32 sampler; "
        "*uniform* — the same trajectories, steps uniform; *forward-noise* — training digits forward-noised "
        "at uniform t.",
        "",
    ]
    fp32 = _find(results["quantized"], graph="fp32")
    rows = []
    for r in results["quantized"]:
        rows.append(
            [
                r["graph"],
                r["calibration"] if r["graph"] != "fp32" else "-",
                _quantized_what(r),
                _fid_of(r),
                _change(r["fid_digits"], fp32["fid_digits"]) if fp32 and r is not fp32 else "",
                _acc(r["conditional_accuracy"]),
                fmt(r["seconds_per_100"], 1),
            ]
        )
    lines += [
        markdown_table(
            [
                "graph",
                "calibration",
                "quantized",
                "FID-digits",
                "vs fp32",
                "conditional accuracy",
                "s / 100 images",
            ],
            rows,
        ),
        "",
    ]
    lines += [
        f"Denoiser throughput: onnxruntime, {results['threads']} intra-op threads, one fixed batch of "
        f"random (x_t, t, label) rows per batch size; {s['throughput_warmup']} warm-up call(s) per cell, "
        "then "
        f"{s['throughput_duration_s']:g} s per cell split into {s['throughput_rounds']} interleaved rounds "
        "(every graph and batch once per round); samples/s is the median over rounds, with the slowest and "
        "fastest round beside it.",
        "",
    ]
    rows = []
    for r in results["throughput"]:
        base = _find(results["throughput"], graph="fp32", batch=r["batch"])
        rows.append(
            [
                r["graph"],
                r["batch"],
                fmt(r["samples_per_s"]),
                f"{fmt(r['samples_per_s_min'])}-{fmt(r['samples_per_s_max'])}",
                fmt(r["latency_ms_p50"], 2),
                fmt(r["latency_ms_p99"], 2),
                f"{r['samples_per_s'] / base['samples_per_s']:.2f}x" if base else "-",
            ]
        )
    lines += [
        markdown_table(
            ["graph", "batch", "samples/s", "rounds min-max", "p50 ms", "p99 ms", "vs fp32"], rows
        ),
        "",
    ]
    lines += _int8_graph_lines(results.get("int8_graph", {}))

    for key, section in results.get("sections", {}).items():
        renderer = next((x.render for x in SECTIONS if x.key == key), None)
        if renderer is not None:
            lines += ["", renderer(section).strip()]
    return "\n".join(lines)


def _int8_graph_lines(g: dict[str, Any]) -> list[str]:
    """What onnxruntime made of the int8 graph, from the op counts and profiles of this run."""
    if not g:
        return []
    file_ops, rt_ops, fp32_ops = (
        g.get("file_ops", {}),
        g.get("onnxruntime_ops", {}),
        g.get("fp32_onnxruntime_ops", {}),
    )
    integer = {k: v for k, v in rt_ops.items() if k.startswith(("QLinear", "QGemm")) or k.endswith("Integer")}
    still_float = {
        k: rt_ops[k] for k in ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm") if rt_ops.get(k)
    }

    def top(shares: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.0%}" for k, v in list(shares.items())[:7])

    return [
        "What onnxruntime runs: op counts of the int8-ptq4dm file and of the graph onnxruntime builds from "
        "it (its CPU optimizations, as a session loads it), and the share of kernel time per op from "
        f"onnxruntime's profiler at batch {g.get('profile_batch', '?')}:",
        "",
        f"- the file: {file_ops.get('QuantizeLinear', 0)} QuantizeLinear and "
        f"{file_ops.get('DequantizeLinear', 0)} DequantizeLinear nodes around "
        f"{file_ops.get('Conv', 0)} Conv, "
        f"{file_ops.get('MatMul', 0)} MatMul and {file_ops.get('Gemm', 0)} Gemm nodes (QDQ format);",
        "- as onnxruntime runs it: "
        + (", ".join(f"{v} {k}" for k, v in integer.items()) or "no integer kernels")
        + (f"; still float: {', '.join(f'{v} {k}' for k, v in still_float.items())}" if still_float else "")
        + f"; {rt_ops.get('QuantizeLinear', 0)} QuantizeLinear and {rt_ops.get('DequantizeLinear', 0)} "
        "DequantizeLinear kernels left between them and the fp32 ops; "
        f"{rt_ops.get('Transpose', 0)} Transposes "
        f"(the fp32 graph: {fp32_ops.get('Transpose', 0)}, with its convolutions in the blocked NCHWc layout "
        f"instead, {fp32_ops.get('ReorderInput', 0)} ReorderInput / {fp32_ops.get('ReorderOutput', 0)} "
        "ReorderOutput);",
        f"- fp32 kernel time: {top(g.get('fp32_kernel_share', {}))};",
        f"- int8 kernel time: {top(g.get('int8_kernel_share', {}))}.",
        "",
        "So the QDQ graph does reach onnxruntime's integer kernels: per-channel int8 weights, uint8 "
        "activations, every convolution a QLinearConv. Tried while writing this suite (once, on this "
        "machine and model; not re-measured by it): the QOperator format, and quantizing the convolutions "
        "only (attention and time-embedding MatMul / Gemm left fp32), were within a few percent of this "
        "graph and inside its round-to-round spread, nowhere near the target; so `_DiffusionW8A8` keeps "
        "PTQ4DM's W8A8 of every convolution and linear layer. What limits the speed-up is the fp32 work "
        "around the convolutions, which int8 does not shrink and adds conversions to.",
    ]


def _quantized_what(row: dict[str, Any]) -> str:
    if row["graph"] == "fp32":
        return "-"
    ops = "/".join(row.get("quantized_ops") or []) or "?"
    per = "per-channel" if row.get("per_channel") else "per-tensor"
    return f"{row.get('quantized_nodes', '?')} {ops} nodes, W8 {per}, A8"


_SYMBOLS = {"eta": "η", "gamma": "γ"}


def _options(opts: dict[str, Any]) -> str:
    shown = (f"{_SYMBOLS.get(k, k)} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in opts.items())
    return ", ".join(shown) or "-"


def _num(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else "-"


def _sci(value: Any) -> str:
    return f"{value:.1e}" if isinstance(value, float) else "-"
