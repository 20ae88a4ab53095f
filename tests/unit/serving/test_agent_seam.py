"""The agent's plugs: the tools slot of the task seam, the artifact-less task, the trajectory store and
Kiln's own documentation for Learn-by-interact."""

from __future__ import annotations

import numpy as np
import pytest

from serving import tasks
from serving.agent.interact import default_docs
from serving.agent.store import SQLiteTrajectoryStore, Trajectory
from serving.repository import ModelRepository
from serving.tasks.classification import ClassifyRequest
from serving.tasks.generation import GenerateRequest


def test_every_task_module_tools_are_collected_with_their_route_request_models():
    found = {t.name: t for t in tasks.tools(ModelRepository())}
    assert found["classify"].request_model is ClassifyRequest
    assert found["generate"].request_model is GenerateRequest
    assert found["generate"].input_schema()["properties"]["n"]["maximum"] == 64
    assert {"forecast", "embed", "search_gallery"} <= set(found)  # every family that has operations


def test_duplicate_tool_names_are_refused(monkeypatch):
    from serving.tasks import classification

    monkeypatch.setattr(classification, "tools", lambda repo: tasks.generation.tools(repo))
    with pytest.raises(ValueError, match="defined twice: \\['generate'\\]"):
        tasks.tools(ModelRepository())


def test_the_agent_is_a_task_without_an_artifact():
    model_class, make_router = tasks.TASKS["agent"]
    assert model_class is None
    paths = {r.path for r in make_router(ModelRepository()).routes}
    assert {"/agent/solve", "/agent/trajectories/synthesize", "/agent/trajectories"} <= paths


def test_load_model_refuses_an_agent_artifact():
    class _Art:
        tag = "x:1"
        manifest = {"task": "agent"}

    with pytest.raises(ValueError, match="Kiln serves these tasks: ") as err:
        tasks.load_model(_Art(), None)
    assert "'image-classification'" in str(err.value) and "'agent'" not in str(err.value).split(": ", 1)[1]


def test_trajectory_store_is_durable_and_searches_by_cosine(tmp_path):
    path = tmp_path / "t.sqlite3"
    store = SQLiteTrajectoryStore(path)
    a = Trajectory(
        "classify a digit", "p", "doc", [{"tool": "classify", "arguments": "{}", "result": {}, "ok": True}]
    )
    b = Trajectory("generate sevens", "p", "doc", [])
    store.add(a, np.array([1.0, 0.0, 0.0], dtype=np.float32))
    store.add(b, np.array([0.0, 1.0, 0.0], dtype=np.float32))
    reopened = SQLiteTrajectoryStore(path)  # a new process would see the same
    assert reopened.count() == 2
    [(best, sim), (other, _)] = reopened.search(np.array([0.9, 0.1, 0.0], dtype=np.float32), k=2)
    assert best.id == a.id and best.actions == a.actions and sim == pytest.approx(0.9 / np.hypot(0.9, 0.1))
    assert other.id == b.id
    assert [t.id for t in reopened.list(1)] == [b.id]  # newest first


def test_default_docs_are_the_tool_schemas_and_the_readme():
    docs = default_docs(tasks.tools(ModelRepository()))
    names = [d.name for d in docs]
    assert names[:2] == ["tool:classify", "tool:generate"] and "README:What is served" in names
    assert '"image"' in docs[0].text and "POST /classify" in docs[-1].text


def test_minilm_embeds_offline_and_ranks_by_meaning():
    from serving.agent.store import MiniLMEmbedder

    vectors = MiniLMEmbedder().embed(
        ["classify a handwritten digit", "recognise which number is drawn", "bake a chocolate cake"]
    )
    assert vectors.shape == (3, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
