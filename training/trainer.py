"""The one entry point for training: ``train(name)`` runs the recipe's task trainer.

Task trainers (``training.classification``, ``training.diffusion``, ...) share what is here: the result
type, the seeded run directory under ``$KILN_HOME/runs``, the warm-up + cosine learning-rate schedule
and the ``training`` block of the manifest. Each writes one artifact to the model store.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.artifacts import Artifact
from kiln.settings import kiln_home
from training.recipes import Recipe, get_recipe


@dataclass
class TrainResult:
    artifact: Artifact
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)  # the artifact's headline metrics

    def summary(self) -> str:
        shown = ", ".join(
            f"{k.replace('_', ' ')} {v:.4f}" for k, v in self.metrics.items() if isinstance(v, float)
        )
        return f"saved {self.artifact.tag}: {shown}{', ' if shown else ''}{self.seconds:.0f}s"


def train(
    name: str,
    *,
    epochs: int | None = None,
    seed: int = 0,
    progress: bool = True,
    recipe: Recipe | None = None,
) -> TrainResult:
    """Train recipe ``name`` (or ``recipe``, saved under ``name``) and save it as an artifact.

    Raises:
        ValueError: unknown recipe, or ``epochs`` < 1.
    """
    recipe = recipe or get_recipe(name)
    epochs = epochs if epochs is not None else recipe.epochs
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    return recipe.trainer()(name, recipe, epochs=epochs, seed=seed, progress=progress)


def run_dir(name: str) -> Path:
    """A fresh ``$KILN_HOME/runs/<name>/<timestamp>`` directory for checkpoints."""
    path = kiln_home() / "runs" / name / time.strftime("%Y%m%d-%H%M%S")
    path.mkdir(parents=True, exist_ok=True)
    return path


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def training_block(name: str, recipe: Recipe, *, epochs: int, seed: int, path: Path, **extra) -> dict:
    """The manifest's ``training`` entry: recipe, hyperparameters, seed, run directory."""
    return {"recipe": name, **recipe.to_dict(), "epochs": epochs, "seed": seed, "run_dir": str(path), **extra}
