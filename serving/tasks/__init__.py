"""Task plugs: each task is a served model class (a :class:`~serving.model.LoadedModel` with the task's
methods) and a router of typed HTTP routes. The service loads every artifact through
:func:`load_model`, by the ``task`` its manifest names, and mounts every router.

A new family adds ``serving/tasks/<task>.py`` with those two pieces and one entry in :data:`TASKS`.

Two optional slots of the same seam:

- **tools**: a task module may export ``tools(repo) -> list[serving.agent.tools.Tool]`` — its operations
  as tools (name, description, the *same* pydantic request model its route validates with, an async
  handler). :func:`tools` collects them from every module in :data:`TASKS`; the agent calls them through
  OpenAI tool calling and ``/mcp`` serves them to MCP clients. Copy ``classification.tools``.
- **no artifact**: a task that serves no trained model (the agent, a proxy to an LLM) puts ``None`` as
  its model class. It has routes (and may have tools) but :func:`load_model` never builds it; its
  router factory gets the same repository, to reach the other tasks' models.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from fastapi import APIRouter

from kiln.artifacts import Artifact
from serving.agent.tools import Tool
from serving.config import ServeConfig
from serving.model import LoadedModel
from serving.repository import ModelRepository
from serving.tasks import (
    agent,
    classification,
    embedding,
    forecasting,
    generation,
    onnx_graph,
    text_classification,
)

# task name → (served model class, or None for a task without an artifact; router factory)
TASKS: dict[str, tuple[type[LoadedModel] | None, Callable[[ModelRepository], APIRouter]]] = {
    classification.Classifier.task: (classification.Classifier, classification.router),
    generation.Generator.task: (generation.Generator, generation.router),
    agent.TASK: (None, agent.router),
    forecasting.Forecaster.task: (forecasting.Forecaster, forecasting.router),
    embedding.Embedder.task: (embedding.Embedder, embedding.router),
    text_classification.TextClassifier.task: (text_classification.TextClassifier, text_classification.router),
    onnx_graph.OnnxModel.task: (onnx_graph.OnnxModel, onnx_graph.router),
}


def load_model(art: Artifact, config: ServeConfig) -> LoadedModel:
    """Load an artifact as its task's served model; raises ValueError for a task Kiln cannot serve."""
    task = art.manifest.get("task", "")
    served = {name: cls for name, (cls, _) in TASKS.items() if cls is not None}
    if task not in served:
        raise ValueError(f"{art.tag} is a {task!r} model; Kiln serves these tasks: {sorted(served)}")
    return served[task](art, config)


def routers(repo: ModelRepository) -> list[APIRouter]:
    return [make_router(repo) for _, make_router in TASKS.values()]


def tools(repo: ModelRepository) -> list[Tool]:
    """Every task's tools (the optional ``tools(repo)`` export of each module in :data:`TASKS`)."""
    found: list[Tool] = []
    for _, make_router in TASKS.values():
        make_tools = getattr(inspect.getmodule(make_router), "tools", None)
        if make_tools is not None:
            found.extend(make_tools(repo))
    names = [t.name for t in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"tool names must be unique across tasks; defined twice: {duplicates}")
    return found
