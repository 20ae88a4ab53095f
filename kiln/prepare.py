"""Get models ready to serve: train the recipes the model store lacks and build their default exports,
several models at a time.

``kiln serve`` and ``kiln prepare`` call :func:`prepare`. One model is prepared in-process, with its
progress bars. Several are prepared by a small scheduler: each model runs as its own ``kiln prepare NAME``
process with an equal share of the cores (``OMP_NUM_THREADS``), its output in a log file under
``$KILN_HOME/logs``. The models Kiln trains by default are small, and small models use two threads
poorly, so two one-thread processes on two cores finish sooner than the same models one after the other.

A recipe names the models it needs: :attr:`training.recipes.Recipe.requires` before it trains (a
backward-compatible embedding model trains against its old model), and
:attr:`~training.recipes.Recipe.export_requires` before it exports only (diffusion's FID-digits quality
gate reads the vit-soft classifier). They are added to the plan when the store lacks them. A model whose
export waits for another trains at once (``kiln prepare NAME --no-export``) and exports once that one is
ready, so the slowest chain is not trained end to end one model after another.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


class PrepareError(RuntimeError):
    pass


@dataclass
class Job:
    tag: str
    train: bool  # the store lacks the model: train it first
    formats: list[str] = field(default_factory=list)  # default exports it lacks (all of them when training)
    requires: tuple[str, ...] = ()  # before it trains (or, with nothing to train, before it exports)
    export_requires: tuple[str, ...] = ()  # before its export only

    def describe(self) -> str:
        return "train + export" if self.train else f"export {', '.join(self.formats)}"


def recipe_hint(tag: str) -> str:
    """How to get ``tag`` into the store: its training command if it is a recipe, else the recipes."""
    from training.recipes import RECIPES

    name, _, version = tag.partition(":")
    if name not in RECIPES:
        return f"{name!r} is no recipe; `kiln train` trains one of: {', '.join(RECIPES)}"
    if version:  # a pinned version is never trained anew: a new training run gets a new version
        return f"`kiln models list` shows the stored versions; `kiln prepare {name}` trains a new one"
    return f"train it with `kiln prepare {name}` (training + its default exports)"


def _missing_formats(art) -> list[str]:
    from export.pipeline import spec_for

    if "architecture" not in art.manifest:  # imported (kiln import): exported and parity-checked then
        return []
    return [f for f in spec_for(art).default_formats if not art.export(f)]


def plan(tags: tuple[str, ...] | list[str], train_missing: bool = True, export: bool = True) -> list[Job]:
    """The work that makes every tag servable, with the models they require; dependencies first.

    ``export=False`` plans training only: what the models' exports alone require is left out.
    Raises PrepareError naming what cannot be done (a pinned version the store lacks, an unknown recipe,
    missing work with ``train_missing`` off).
    """
    from kiln.artifacts import ArtifactError, get_artifact
    from kiln.settings import kiln_home
    from training.recipes import RECIPES

    jobs: dict[str, Job] = {}
    order: list[str] = []
    lacking: list[str] = []  # with train_missing off: recipes the store lacks, all named in one error

    def visit(tag: str, stack: tuple[str, ...]) -> None:
        if tag in jobs or tag in order or tag in lacking:
            return
        if tag in stack:
            raise PrepareError(f"recipes require each other in a cycle: {' -> '.join((*stack, tag))}")
        recipe = RECIPES.get(tag.split(":")[0]) if ":" not in tag else None
        requires = tuple(recipe.requires) if recipe is not None else ()
        export_requires = tuple(recipe.export_requires) if recipe is not None and export else ()
        for dep in (*requires, *export_requires):
            visit(dep, (*stack, tag))
        try:
            art = get_artifact(tag)
        except ArtifactError as exc:
            if recipe is None:
                raise PrepareError(f"{exc}; {recipe_hint(tag)}") from None
            if not train_missing:
                lacking.append(tag)
                return
            jobs[tag] = Job(tag, train=True, requires=requires, export_requires=export_requires)
        else:
            missing = _missing_formats(art) if export else []
            if missing:
                if not train_missing:
                    raise PrepareError(f"{art.tag} lacks exports {missing}; run `kiln export {art.tag}`")
                deps = tuple(dict.fromkeys((*requires, *export_requires)))
                jobs[tag] = Job(tag, train=False, formats=missing, requires=deps)
        order.append(tag)

    for tag in tags:
        visit(tag, ())
    if lacking:
        from kiln.settings import DEFAULT_MODELS

        command = (
            "kiln prepare" if set(lacking) == set(DEFAULT_MODELS) else f"kiln prepare {' '.join(lacking)}"
        )
        raise PrepareError(
            f"the model store at {kiln_home() / 'bentoml'} lacks {', '.join(lacking)} and --no-train is "
            f"set: run `{command}` (trains and exports them, one process per core), "
            "or start without --no-train"
        )
    return [jobs[t] for t in order if t in jobs]


def prepare_one(
    job: Job, epochs: int | None = None, log: Callable[[str], None] = print, export: bool = True
) -> None:
    """Train (if needed) and export (unless ``export`` is off) one model in this process."""
    from export.pipeline import export_artifact

    tag = job.tag
    if job.train:
        from training.trainer import train as run_training

        log(f"{tag}: not in the model store; training it (first run only)")
        art = run_training(tag, epochs=epochs).artifact
        # the task's default formats, as `kiln serve` needs
        tag, formats = art.tag, (_missing_formats(art) if export else [])
    else:
        formats = job.formats
    if formats:
        export_artifact(tag, formats, log=log)


def default_jobs(n_jobs: int) -> int:
    """As many processes as cores, at most one per model."""
    return max(1, min(os.cpu_count() or 1, n_jobs))


def prepare(
    tags: tuple[str, ...] | list[str],
    *,
    train_missing: bool = True,
    epochs: int | None = None,
    jobs: int | None = None,
    export: bool = True,
    log: Callable[[str], None] = print,
) -> list[Job]:
    """Make every tag servable (or only trained, with ``export`` off); returns the jobs that ran.

    Raises PrepareError if any failed.
    """
    work = plan(tags, train_missing, export)
    if not work:
        return []
    n = default_jobs(len(work)) if jobs is None else max(1, min(jobs, len(work)))
    if n == 1:
        for job in work:
            prepare_one(job, epochs, log, export)
        return work
    _run_parallel(work, n, epochs, log)
    return work


def _log_dir() -> Path:
    from kiln.settings import kiln_home

    path = kiln_home() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace").replace("\r", "\n")
    return "\n".join(line for line in text.splitlines()[-lines:])


def _run_parallel(work: list[Job], n: int, epochs: int | None, log: Callable[[str], None]) -> None:
    threads = max(1, (os.cpu_count() or 1) // n)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending = list(work)
    running: dict[str, tuple[subprocess.Popen, Path, float]] = {}
    done: set[str] = set()
    failed: dict[str, str] = {}
    total = len(work)
    log(f"preparing {total} models, {n} at a time ({threads} thread(s) each); logs in {_log_dir()}")
    try:
        _schedule(pending, running, done, failed, n, epochs, env, total, log)
    finally:  # Ctrl-C or an error here: leave no orphaned training processes behind
        for proc, _, _ in running.values():
            proc.terminate()
    if failed:
        raise PrepareError("could not prepare " + "; ".join(f"{tag} ({why})" for tag, why in failed.items()))


def _schedule(pending, running, done, failed, n, epochs, env, total, log) -> None:
    after: dict[str, Job] = {}  # trained without export: the export job that follows
    while pending or running:
        for job in list(pending):
            if len(running) >= n:
                break
            blocked = [d for d in (*job.requires, *job.export_requires) if d in failed]
            if blocked:
                pending.remove(job)
                failed[job.tag] = f"needs {', '.join(blocked)}, which failed"
                continue
            waiting = {j.tag for j in pending} | set(running)
            if any(d in waiting for d in job.requires):
                continue
            pending.remove(job)
            # Its export waits for models not ready yet: train now, export in a second job afterwards.
            train_only = job.train and any(d in waiting for d in job.export_requires)
            log_path = _log_dir() / f"prepare-{job.tag.replace(':', '-')}{'-train' if train_only else ''}.log"
            cmd = [sys.executable, "-m", "kiln.cli", "prepare", job.tag, "--jobs", "1"]
            if train_only:
                cmd.append("--no-export")
                after[job.tag] = Job(job.tag, train=False, requires=job.export_requires)
            if epochs is not None:
                cmd += ["--epochs", str(epochs)]
            with open(log_path, "w") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            running[job.tag] = (proc, log_path, time.monotonic())
            started_count = len(done) + len(failed) + len(running)
            what = job.describe()
            if train_only:
                what = f"train (its export waits for {', '.join(job.export_requires)})"
            log(f"[{started_count}/{total}] {job.tag}: {what} ({log_path.name})")
        time.sleep(0.5)
        for tag, (proc, log_path, started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[tag]
            seconds = time.monotonic() - started
            if proc.returncode == 0 and tag in after:  # trained; its export job queues now
                pending.append(after.pop(tag))
                log(f"{tag}: trained in {seconds:.0f} s")
            elif proc.returncode == 0:
                done.add(tag)
                log(f"{tag}: ready in {seconds:.0f} s")
            else:
                failed[tag] = f"exit code {proc.returncode}; last lines of {log_path}:\n{_tail(log_path)}"
                log(f"{tag}: FAILED after {seconds:.0f} s")
