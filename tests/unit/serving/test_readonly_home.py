"""A read-only KILN_HOME (a pod's root filesystem): every writer turns itself off with a reason, logged and
in its routes' answers, and the rest serves. The home here is a path under a regular file, which cannot be
made even by root (a chmod would not stop root)."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

from serving.agent.store import SQLiteTrajectoryStore, StoreDisabled, Trajectory
from serving.repository import ModelRepository

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


@pytest.fixture
def readonly_home(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    home = blocker / "kiln"
    monkeypatch.setenv("KILN_HOME", str(home))
    monkeypatch.delenv("KILN_MILVUS_URI", raising=False)
    monkeypatch.delenv("KILN_LLM_BASE_URL", raising=False)
    monkeypatch.setenv("KILN_ADMIN_TOKEN", "adm")
    return home


def test_the_trajectory_store_is_disabled_not_broken(readonly_home, caplog):
    with caplog.at_level(logging.WARNING, "kiln.serving.agent"):
        store = SQLiteTrajectoryStore()
    assert "cannot be written" in store.disabled and "KILN_HOME" in store.disabled
    assert store.disabled in caplog.text
    assert (store.count(), store.list(10), store.search(np.ones(4, np.float32), 3)) == (0, [], [])
    with pytest.raises(StoreDisabled, match="cannot be written"):
        store.add(Trajectory("i", "p", "s", []), np.ones(4, np.float32))


def test_a_store_with_a_file_reads_it_when_it_cannot_write(tmp_path):
    writable = SQLiteTrajectoryStore(tmp_path / "t.sqlite3")
    writable.add(Trajectory("classify a digit", "p", "s", []), np.ones(4, np.float32) / 2)
    reader = SQLiteTrajectoryStore(tmp_path / "t.sqlite3")
    reader.disabled = "read-only for this test"  # what __init__ sets when the directory is read-only
    assert reader.count() == 1 and reader.list(5)[0].instruction == "classify a digit"
    assert reader.search(np.ones(4, np.float32) / 2, 1)[0][1] == pytest.approx(1.0)


def test_agent_and_gallery_routes_build_and_answer_with_the_reason(readonly_home):
    from serving.routes import create_task_app
    from serving.tasks import agent, embedding

    repo = ModelRepository()
    embedder = object.__new__(embedding.Embedder)  # galleries open only when an embedding model is loaded
    embedder.name, embedder.version = "embed-old", "1"
    repo.models["embed-old"] = {"1": embedder}
    app = create_task_app([agent.router(repo), embedding.router(repo)])
    with TestClient(app) as client:
        listed = client.get("/agent/trajectories")
        assert listed.status_code == 200 and listed.json()["count"] == 0
        assert "cannot be written" in listed.json()["disabled"]
        synth = client.post("/agent/trajectories/synthesize", headers={"Authorization": "Bearer adm"})
        assert synth.status_code == 503 and "writable KILN_HOME" in synth.json()["error"]
        galleries = client.get("/galleries")
        assert galleries.status_code == 503 and "galleries are off" in galleries.json()["error"]
        assert "writable KILN_HOME" in galleries.json()["error"]
