"""The galleries' storage: Milvus through ``pymilvus.MilvusClient``, Lite file or server alike.

Layout:

* one **collection per gallery generation** (``kiln_gallery_<escaped gallery>_<generation>``, one-to-one:
  :func:`collection_name`): ``id`` (VARCHAR primary
  key), ``metadata`` (JSON; search filters are Milvus boolean expressions over it), ``source`` (the item's
  raw input as JSON text — ``{"text": ...}`` or ``{"image": <float16 base64>, "shape": [h, w]}``, or
  ``{"vector": true}`` for items given as vectors — kept so a backfill can re-embed the item), ``kind``
(``image`` | ``text`` | ``vector``) and **one
  FLOAT_VECTOR field per embedding space** (``v_<space>``, inner product over L2-normalised vectors =
  cosine, FLAT index: exact search, so a rollback restores old results exactly).
  Milvus Lite cannot add a field to an existing collection, so a backfill writes a *new generation*
  holding the old spaces' vectors (copied, bit for bit) plus the new space's, and the gallery switches to
  it when complete. Upserts replace by primary key; every write is followed by ``flush`` before it is
  acknowledged (durable across kill -9: Milvus Lite's flush persists the segment to the file).
* one **state collection** (``kiln_galleries``): a row per gallery with its durable state (JSON) — the
  active query model and space, the spaces held, the rollback history and the backfill cursor. State
  lives in Milvus rather than a side file so it is exactly as durable as the vectors and shared by every
  replica when the URI is a Milvus standalone/cluster. Milvus needs a vector field in every collection;
  the state rows carry a constant 2-d placeholder.

``KILN_MILVUS_URI``: a path (Milvus Lite, the default ``$KILN_HOME/milvus/galleries.db``) or
``http://host:19530`` (standalone/cluster; ``KILN_MILVUS_TOKEN`` for authentication).
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from kiln.settings import kiln_home

STATE_COLLECTION = "kiln_galleries"
MAX_SOURCE_CHARS = 65_535  # Milvus' VARCHAR limit: an item's raw input must fit (≈ a 180×180 image)
MAX_ID_CHARS = 512  # the id field's VARCHAR length (ids are validated to MAX_ID_LENGTH)
# Gallery names and item ids (validated at the edge, 400 otherwise): letters, digits and ``._:-``, not
# only dots (a client would resolve ``..`` in a URL path). Names are shorter than ids so the collection
# name they encode into (``collection_name``) stays under Milvus' 255 characters.
KEY_PATTERN = r"^[A-Za-z0-9._:-]*[A-Za-z0-9_:-][A-Za-z0-9._:-]*$"  # no lookaround: pydantic's engine too
MAX_NAME_LENGTH = 100
MAX_ID_LENGTH = 256
_KEY = re.compile(KEY_PATTERN)
# Injective: every character outside [A-Za-z0-9] becomes "_" + a letter, so distinct names (``a-b``,
# ``a_b``) never share a collection. Milvus collection names allow letters, digits and "_".
_ESCAPES = {"_": "_u", "-": "_d", ".": "_p", ":": "_c"}


class StoreError(Exception):
    """Milvus refused an operation (a malformed filter, a missing collection...); message from Milvus."""


_LITE_KEEPALIVE = {"grpc.keepalive_time_ms": 300_000, "grpc.keepalive_permit_without_calls": False}


def milvus_uri() -> str:
    """``KILN_MILVUS_URI`` or the Milvus Lite file under ``$KILN_HOME``."""
    uri = os.environ.get("KILN_MILVUS_URI", "").strip()
    if uri:
        return uri
    path = kiln_home() / "milvus" / "galleries.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


def is_lite(uri: str) -> bool:
    """Milvus Lite (a local file, one process at a time) rather than a server."""
    return not re.match(r"^(https?|tcp|grpc)://", uri)


def _lock_lite_file(uri: str):
    """Hold an exclusive lock beside a Milvus Lite file for this process's life. Milvus Lite serves one
    process per file, and a second opener waits on it instead of failing; this fails at once, naming it."""
    import fcntl

    path = Path(uri).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path.with_name(path.name + ".kiln-lock"), "w")  # noqa: SIM115 - held until the process ends
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise RuntimeError(
            f"Milvus Lite file {path} is in use by another process (one process per file): stop the other "
            "`kiln serve`, give this one its own KILN_MILVUS_URI file, or use a Milvus standalone server"
        ) from None
    return lock


def check_name(name: str, what: str = "gallery name") -> str:
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or not _KEY.match(name):
        raise ValueError(
            f"{what} {name!r:.120} must be 1 to 100 letters, digits, '.', '_', ':' or '-' (not only dots)"
        )
    return name


def check_id(item_id: str) -> str:
    if not isinstance(item_id, str) or len(item_id) > MAX_ID_LENGTH or not _KEY.match(item_id):
        raise ValueError(
            f"item id {item_id!r:.300} must be 1 to 256 letters, digits, '.', '_', ':' or '-' (not only dots)"
        )
    return item_id


def collection_name(gallery: str, generation: int) -> str:
    """The Milvus collection of a gallery's generation: ``kiln_gallery_<escaped name>_<generation>``,
    one-to-one (galleries made before this encoding keep the ``kiln_g_`` names saved in their state)."""
    check_name(gallery)
    escaped = "".join(_ESCAPES.get(c, c) for c in gallery)
    return f"kiln_gallery_{escaped}_{int(generation)}"


def _literal(value: str) -> str:
    """A Milvus expression string literal holding ``value`` exactly: backslash and double quote escaped.
    Only for stores without expression templates (Milvus Lite); ids reaching it passed :func:`check_id`
    or are read back from the store."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def field_for(space: str) -> str:
    """Milvus field name of a space's vectors (field names allow letters, digits and '_')."""
    return "v_" + re.sub(r"[^A-Za-z0-9_]", "_", space)


def encode_source(item_kind: str, value: Any) -> str:
    """An item's raw input → the ``source`` field's JSON text (images as float16, their values in [0, 1])."""
    if item_kind == "text":
        return json.dumps({"text": value})
    if item_kind == "image":
        arr = np.asarray(value, dtype=np.float16)
        return json.dumps({"image": base64.b64encode(arr.tobytes()).decode(), "shape": list(arr.shape)})
    return json.dumps({"vector": True})


def decode_source(source: str) -> tuple[str, Any]:
    """``source`` JSON text → ("text", str) | ("image", (h, w) float32) | ("vector", None)."""
    doc = json.loads(source)
    if "text" in doc:
        return "text", doc["text"]
    if "image" in doc:
        raw = np.frombuffer(base64.b64decode(doc["image"]), dtype=np.float16)
        return "image", raw.reshape(doc["shape"]).astype(np.float32)
    return "vector", None


class MilvusStore:
    """Thin, typed access to the galleries' collections; every write is flushed before it returns.

    Not thread-safe on its own: :class:`serving.gallery.manager.Galleries` serialises each gallery's
    writes and runs these blocking calls in worker threads.
    """

    def __init__(self, uri: str | None = None):
        from pymilvus import MilvusClient

        self.uri = uri or milvus_uri()
        token = os.environ.get("KILN_MILVUS_TOKEN", "")
        self._lock = _lock_lite_file(self.uri) if is_lite(self.uri) else None
        try:
            options = {"token": token} if token else {}
            if is_lite(self.uri):
                # pymilvus pings every 10 s even with no call in flight; Milvus Lite's gRPC server allows
                # a ping only every 5 min without data (gRPC's default) and answers GOAWAY too_many_pings,
                # which gRPC logs as an error. Ping as the server allows, and never on an idle channel.
                options["grpc_options"] = _LITE_KEEPALIVE
            self.client = MilvusClient(self.uri, **options)
        except Exception as exc:  # pymilvus raises its own ConnectionConfigException for a locked Lite file
            hint = (
                " — Milvus Lite allows one process per file: is another `kiln serve` using it? "
                "Stop it, or point KILN_MILVUS_URI at a Milvus standalone server"
                if is_lite(self.uri)
                else ""
            )
            raise RuntimeError(f"cannot open Milvus at {self.uri}: {exc}{hint}") from exc
        self._ensure_state_collection()
        self.templates = self._supports_templates()

    def _supports_templates(self) -> bool:
        """Whether the server takes parameterised filters (``filter_params``; Milvus >= 2.5). Milvus Lite
        3.2 does not: it answers "unexpected character '{'"."""
        from pymilvus.exceptions import MilvusException

        try:
            self.client.query(
                STATE_COLLECTION, filter="id in {ids}", filter_params={"ids": [""]}, output_fields=["id"]
            )
            return True
        except MilvusException:
            return False

    def _by_ids(self, ids: list[str]) -> dict[str, Any]:
        """``filter`` (+ ``filter_params``) selecting rows by primary key, the ids never spliced into the
        expression where the server takes templates. pymilvus' own ``ids=`` arguments build
        ``id in ['…']`` without escaping, so an id holding ``'`` rewrites the filter; never used here."""
        ids = [str(i) for i in ids]
        if self.templates:
            return {"filter": "id in {ids}", "filter_params": {"ids": ids}}
        return {"filter": f"id in [{', '.join(_literal(i) for i in ids)}]"}

    # --- state -----------------------------------------------------------------------------------

    def _ensure_state_collection(self) -> None:
        from pymilvus import DataType

        if self.client.has_collection(STATE_COLLECTION):
            self.client.load_collection(STATE_COLLECTION)
            return
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=128)
        schema.add_field("state", DataType.JSON)
        schema.add_field("_placeholder", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs one vector field
        index = self.client.prepare_index_params()
        index.add_index("_placeholder", index_type="FLAT", metric_type="IP")
        self._create(STATE_COLLECTION, schema, index)

    def load_states(self) -> dict[str, dict]:
        rows = self.client.query(STATE_COLLECTION, filter='id != ""', output_fields=["id", "state"])
        return {r["id"]: r["state"] for r in rows}

    def save_state(self, name: str, state: dict) -> None:
        self.client.upsert(STATE_COLLECTION, [{"id": name, "state": state, "_placeholder": [1.0, 0.0]}])
        self.client.flush(STATE_COLLECTION)

    def delete_state(self, name: str) -> None:
        self._call(self.client.delete, STATE_COLLECTION, **self._by_ids([name]))
        self.client.flush(STATE_COLLECTION)

    # --- collections -----------------------------------------------------------------------------

    def create_collection(self, collection: str, spaces: dict[str, int]) -> None:
        """A gallery generation with one vector field per space (``{space: dim}``); no-op if it exists."""
        from pymilvus import DataType

        if self.client.has_collection(collection):
            self.client.load_collection(collection)
            return
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_CHARS)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("kind", DataType.VARCHAR, max_length=8)  # image | text | vector
        schema.add_field("source", DataType.VARCHAR, max_length=MAX_SOURCE_CHARS)
        index = self.client.prepare_index_params()
        for space, dim in spaces.items():
            schema.add_field(field_for(space), DataType.FLOAT_VECTOR, dim=int(dim))
            # FLAT: exact inner-product search (vectors are L2-normalised, so IP = cosine)
            index.add_index(field_for(space), index_type="FLAT", metric_type="IP")
        self._create(collection, schema, index)

    def _create(self, collection: str, schema, index) -> None:
        # Index apart and unsynced: create_collection(index_params=...) waits on the index through
        # AllocTimestamp, which Milvus Lite does not implement (it logs an error, then carries on).
        self.client.create_collection(collection, schema=schema)
        self.client.create_index(collection, index, sync=False)
        self.client.load_collection(collection)

    def load(self, collection: str) -> None:
        """Load a collection for search (collections are released when the process that opened them ends)."""
        self.client.load_collection(collection)

    def drop_collection(self, collection: str) -> None:
        if self.client.has_collection(collection):
            self.client.drop_collection(collection)

    def collections(self) -> list[str]:
        return list(self.client.list_collections())

    def upsert(self, collection: str, rows: list[dict]) -> None:
        """Insert or replace rows (by id) and flush: durable when this returns."""
        if rows:
            self._call(self.client.upsert, collection, rows)
            self.client.flush(collection)

    def delete(self, collection: str, ids: list[str]) -> None:
        if ids:
            self._call(self.client.delete, collection, **self._by_ids(ids))
            self.client.flush(collection)

    def count(self, collection: str) -> int:
        rows = self.client.query(collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def exists(self, collection: str, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        rows = self._call(self.client.query, collection, output_fields=["id"], **self._by_ids(ids))
        return {r["id"] for r in rows}

    def all_ids(self, collection: str) -> list[str]:
        """Every id, sorted (the backfill's cursor order)."""
        # One unbounded query: Milvus Lite has no query_iterator timestamps (AllocTimestamp).
        rows = self.client.query(collection, filter='id != ""', output_fields=["id"])
        return sorted(r["id"] for r in rows)

    def get(self, collection: str, ids: list[str], fields: Iterable[str]) -> list[dict]:
        if not ids:
            return []
        rows = self._call(self.client.query, collection, output_fields=["id", *fields], **self._by_ids(ids))
        return list(rows)

    def count_where(self, collection: str, expr: str) -> int:
        rows = self._call(self.client.query, collection, filter=expr, output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def search(
        self, collection: str, space: str, vectors: np.ndarray, k: int, expr: str = ""
    ) -> list[list[dict]]:
        """Top-``k`` by inner product in ``space`` for each query row; each hit {id, score, metadata}."""
        hits = self._call(
            self.client.search,
            collection,
            data=[v.tolist() for v in np.asarray(vectors, dtype=np.float32)],
            anns_field=field_for(space),
            limit=k,
            filter=expr,
            output_fields=["metadata"],
            search_params={"metric_type": "IP"},
        )
        return [
            [{"id": h["id"], "score": float(h["distance"]), "metadata": h["entity"]["metadata"]} for h in row]
            for row in hits
        ]

    def _call(self, fn, *args, **kwargs):
        from pymilvus.exceptions import MilvusException

        try:
            return fn(*args, **kwargs)
        except MilvusException as exc:
            raise StoreError(getattr(exc, "message", None) or str(exc)) from exc

    def close(self) -> None:
        self.client.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
