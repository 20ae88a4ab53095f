"""Task plugs: each task is a served model class (a :class:`~serving.model.LoadedModel` with the task's
methods) and a router of typed HTTP routes. The service loads every artifact through
:func:`load_model`, by the ``task`` its manifest names, and mounts every router.

A new family adds ``serving/tasks/<task>.py`` with those two pieces and one entry in :data:`TASKS`.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter

from kiln.artifacts import Artifact
from serving.config import ServeConfig
from serving.model import LoadedModel
from serving.repository import ModelRepository
from serving.tasks import classification, embedding, generation

# task name → (served model class, router factory)
TASKS: dict[str, tuple[type[LoadedModel], Callable[[ModelRepository], APIRouter]]] = {
    classification.Classifier.task: (classification.Classifier, classification.router),
    generation.Generator.task: (generation.Generator, generation.router),
    embedding.Embedder.task: (embedding.Embedder, embedding.router),
}


def load_model(art: Artifact, config: ServeConfig) -> LoadedModel:
    """Load an artifact as its task's served model; raises ValueError for a task Kiln cannot serve."""
    task = art.manifest.get("task", "")
    if task not in TASKS:
        raise ValueError(f"{art.tag} is a {task!r} model; Kiln serves these tasks: {sorted(TASKS)}")
    return TASKS[task][0](art, config)


def routers(repo: ModelRepository) -> list[APIRouter]:
    return [make_router(repo) for _, make_router in TASKS.values()]
