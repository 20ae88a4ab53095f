"""Galleries: create, upsert, delete, search, and the model upgrade story — upgrade, backfill, rollback.

The upgrade story (BCT, Shen et al. 2020; BT², Zhou et al. 2023; OCA; XBT): a gallery embedded by an old
model keeps its vectors. **Upgrade** makes a backward-compatible new model the active *query* model at
once: its queries are written into the old space — the first ``dims`` coordinates of its embedding
re-normalised (``how: "subspace"``: BCT's and BT²'s compatible part) or a projection head's output
(``how: "projection"``: XBT) — and searched against the old vectors. Zero items are re-embedded.
**Backfill** then re-embeds the items' stored raw input with the new model in resumable batches into a new
generation of the collection that holds the old space's vectors (copied exactly) and the new space's;
when complete, queries move to the new model's native space. **Rollback** pops the last upgrade: the
previous model queries the old space again — the same vectors, exact FLAT search, so the same results.

Durable state (Milvus' ``kiln_galleries`` collection, :mod:`serving.gallery.store`) is saved before each
answer, so a restart resumes: a backfill that was running continues from its cursor (the last id of the
last flushed batch; ids are processed in sorted order and written by upsert, so a batch redone after a
kill -9 adds no duplicates).

Within a process, writes to a gallery are serialised by an asyncio lock and blocking Milvus calls run in
worker threads. Milvus Lite allows one process per file, so with several server workers the gallery
routes need a Milvus server (``KILN_MILVUS_URI``). There, every worker and replica reads and writes the
same collections and re-reads the state rows every ``SHARED_REFRESH_S``; searches and upserts scale out
with them (Milvus itself scales query nodes), while a backfill runs in one process — the one that
started it, or the first worker after a restart — writing its cursor to the shared state row. Admin
operations on one gallery from two replicas at the same moment are not coordinated across processes, and
an upsert in another process within ``SHARED_REFRESH_S`` of a backfill's start can miss the new
generation: the cut-over then finds the counts differ, refuses, and marks the backfill failed (start it
again) rather than lose the item.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from serving import metrics
from serving.gallery.store import (
    MAX_SOURCE_CHARS,
    MilvusStore,
    StoreError,
    check_id,
    check_name,
    collection_name,
    decode_source,
    encode_source,
    field_for,
    is_lite,
)
from serving.repository import InferenceError

log = logging.getLogger("kiln.serving.gallery")

MAX_K = 1000
MAX_ITEMS = 1000  # per upsert request
RETIRE_AFTER_S = 30.0  # a replaced collection generation is dropped after in-flight searches are done
SHARED_REFRESH_S = 1.0  # on a Milvus server shared by several processes, re-read gallery states this often


class EmbeddingModel(Protocol):
    """What a gallery needs of an embedding model (``serving.tasks.embedding.Embedder``)."""

    name: str
    modality: str  # "image" | "text" | "image+text"
    space: str  # native space
    dim: int

    def how(self, space: str) -> str | None:
        """ "native", "subspace", "projection" for a space it can write, else None."""

    def space_dim(self, space: str) -> int: ...

    async def embed(self, kind: str, values: list[Any], space: str | None = None) -> np.ndarray:
        """(N, d) L2-normalised float32 in ``space`` (default native); kind "image" or "text"."""


@dataclass
class Item:
    id: str
    kind: str  # "image" | "text" | "vector"
    value: Any  # (H, W) float32 image, str, or (d,) float32 vector
    metadata: dict


def _accepts(model: EmbeddingModel, kind: str) -> bool:
    return kind in model.modality.split("+")


class Galleries:
    """Every gallery of one Milvus deployment, owned by this process.

    Args:
        store: the Milvus store.
        lookup: model name → loaded embedding model; raises :class:`InferenceError` 404 for unknown names.
        ray_address: when set, backfills run as Ray Data jobs (``serving.gallery.ray_backfill``).
    """

    def __init__(
        self,
        store: MilvusStore,
        lookup: Callable[[str], EmbeddingModel],
        ray_address: str = "",
    ):
        self.store = store
        self.lookup = lookup
        self.ray_address = ray_address
        self.shared = not is_lite(store.uri)  # other workers/replicas may change states
        self.states: dict[str, dict] = store.load_states()
        self._loaded = time.monotonic()
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        for name, state in self.states.items():
            self._drop_orphans(name, state)
            for coll in (state["collection"], state["backfill"].get("collection")):
                if coll:
                    store.load(coll)
            self._publish(name)

    # --- lifecycle -------------------------------------------------------------------------------

    def resume(self) -> None:
        """Restart the backfills that were running when the process stopped (call inside the loop)."""
        for name, state in self.states.items():
            if state["backfill"].get("status") == "running":
                log.info("gallery %s: resuming the backfill at %s", name, state["backfill"].get("cursor"))
                self._start_backfill_task(name)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def state(self, name: str) -> dict:
        if self.shared and time.monotonic() - self._loaded > SHARED_REFRESH_S:
            self.states, self._loaded = self.store.load_states(), time.monotonic()
        state = self.states.get(name)
        if state is None:
            raise InferenceError(404, f"unknown gallery {name!r}; galleries: {sorted(self.states)}")
        return state

    async def _save(self, name: str, state: dict) -> None:
        await asyncio.to_thread(self.store.save_state, name, state)
        self.states[name] = state
        self._publish(name)

    def _publish(self, name: str) -> None:
        bf = self.states[name]["backfill"]
        metrics.GALLERY_BACKFILL_ITEMS.labels(name, "done").set(bf.get("done", 0))
        metrics.GALLERY_BACKFILL_ITEMS.labels(name, "total").set(bf.get("total", 0))

    def _drop_orphans(self, name: str, state: dict) -> None:
        keep = {c for s in self.states.values() for c in (s["collection"], s["backfill"].get("collection"))}
        prefix = collection_name(name, 0)[: -len("0")]
        for coll in self.store.collections():
            if coll.startswith(prefix) and coll[len(prefix) :].isdigit() and coll not in keep:
                log.info("gallery %s: dropping the retired collection %s", name, coll)
                self.store.drop_collection(coll)

    def _retire(self, collection: str) -> None:
        """Drop a replaced generation once searches that started on it are done."""

        async def later() -> None:
            await asyncio.sleep(RETIRE_AFTER_S)
            if all(
                collection not in (s["collection"], s["backfill"].get("collection"))
                for s in self.states.values()
            ):
                await asyncio.to_thread(self.store.drop_collection, collection)

        asyncio.get_running_loop().create_task(later())

    # --- galleries -------------------------------------------------------------------------------

    async def create(self, name: str, model_name: str) -> tuple[dict, bool]:
        """Create ``name`` indexed by ``model_name``'s native space; (state, created). Idempotent for
        the same model; 409 if it exists with another."""
        try:
            check_name(name)
        except ValueError as exc:
            raise InferenceError(400, str(exc)) from None
        model = self.lookup(model_name)
        async with self._lock(name):
            if name in self.states:
                state = self.states[name]
                first = state["history"][0]["model"] if state["history"] else state["model"]
                if model_name in (state["model"], first):
                    return state, False
                raise InferenceError(
                    409,
                    f"gallery {name!r} exists, created with model {first!r}; delete it or pick another name",
                )
            collection = collection_name(name, 1)
            await asyncio.to_thread(self.store.create_collection, collection, {model.space: model.dim})
            state = {
                "name": name,
                "collection": collection,
                "generation": 1,
                "spaces": {model.space: {"dim": model.dim, "model": model.name}},
                "model": model.name,
                "space": model.space,
                "how": "native",
                "history": [],
                "backfill": {"status": "none"},
                "created": time.time(),
            }
            await self._save(name, state)
            return state, True

    async def drop(self, name: str) -> None:
        state = self.state(name)
        async with self._lock(name):
            task = self._tasks.pop(name, None)
            if task is not None:
                task.cancel()
            for coll in {state["collection"], state["backfill"].get("collection")} - {None}:
                await asyncio.to_thread(self.store.drop_collection, coll)
            await asyncio.to_thread(self.store.delete_state, name)
            self.states.pop(name, None)

    def describe(self, name: str) -> dict:
        """``{"model", "space", "how", "spaces": {space: count}, "backfill": {...}, ...}``."""
        state = self.state(name)
        count = self.store.count(state["collection"])
        spaces = {space: count for space in state["spaces"]}
        bf = dict(state["backfill"])
        if bf.get("status") == "running":
            spaces[bf["space"]] = self.store.count(bf["collection"])
        if bf.get("total"):
            bf["progress"] = round(bf.get("done", 0) / bf["total"], 4)
        return {
            "name": name,
            "model": state["model"],
            "space": state["space"],
            "how": state["how"],
            "spaces": spaces,
            "backfill": bf,
            "history": [h["model"] for h in state["history"]],
            "collection": state["collection"],
        }

    # --- items -----------------------------------------------------------------------------------

    def _write_spaces(self, state: dict) -> dict[str, str]:
        """space → the model that writes it natively, for every space an upsert must fill now."""
        spaces = {space: info["model"] for space, info in state["spaces"].items()}
        bf = state["backfill"]
        if bf.get("status") == "running":
            spaces[bf["space"]] = bf["model"]
        return spaces

    async def _vectors(self, state: dict, items: list[Item], spaces: dict[str, str]) -> dict[str, np.ndarray]:
        """space → (len(items), dim) vectors: raw inputs embedded by each space's own model."""
        out = {}
        for space, model_name in spaces.items():
            dim = state["spaces"].get(space, {}).get("dim") or state["backfill"].get("dim")
            vecs = np.zeros((len(items), dim), dtype=np.float32)
            for kind in ("image", "text"):
                rows = [i for i, it in enumerate(items) if it.kind == kind]
                if not rows:
                    continue
                model = self.lookup(model_name)
                if not _accepts(model, kind):
                    raise InferenceError(
                        400,
                        f"space {space!r} of gallery {state['name']!r} is written by {model.name!r}, "
                        f"which embeds {model.modality} only; this item is {kind}",
                    )
                vecs[rows] = await model.embed(kind, [items[i].value for i in rows])
            for i, it in enumerate(items):
                if it.kind == "vector":
                    vecs[i] = it.value
            out[space] = vecs
        return out

    async def upsert(self, name: str, items: list[Item]) -> int:
        """Embed and write ``items`` (replacing ids that exist); returns once flushed (durable)."""
        self.state(name)
        if not items:
            raise InferenceError(400, "items is empty; send at least one item")
        if len(items) > MAX_ITEMS:
            raise InferenceError(400, f"{len(items)} items in one request; at most {MAX_ITEMS}")
        seen: set[str] = set()
        twice = sorted({it.id for it in items if it.id in seen or seen.add(it.id)})
        if twice:
            raise InferenceError(400, f"item ids appear more than once in one request: {twice[:10]}")
        sources = []
        for it in items:
            try:
                check_id(it.id)
            except ValueError as exc:
                raise InferenceError(400, str(exc)) from None
            src = encode_source(it.kind, it.value)
            if len(src) > MAX_SOURCE_CHARS:
                raise InferenceError(
                    413,
                    f"item {it.id!r}: its {it.kind} takes {len(src)} characters stored; at most "
                    f"{MAX_SOURCE_CHARS} (send a smaller image, e.g. ≤ 180×180)",
                )
            sources.append(src)
        async with self._lock(name):
            state = self.state(name)
            spaces = self._write_spaces(state)
            vector_items = [it for it in items if it.kind == "vector"]
            if vector_items:
                if len(spaces) > 1:
                    raise InferenceError(
                        400,
                        f"gallery {name!r} holds spaces {sorted(spaces)}; items given as `vector` need a "
                        "gallery with one space — send `image` or `text` so every space can be written",
                    )
                (space,) = spaces
                dim = state["spaces"][space]["dim"]
                for it in vector_items:
                    if it.value.shape != (dim,):
                        raise InferenceError(
                            400, f"item {it.id!r}: vector has {it.value.size} dims, space {space!r} has {dim}"
                        )
                    norm = float(np.linalg.norm(it.value))
                    if not np.isfinite(norm) or norm == 0:
                        raise InferenceError(400, f"item {it.id!r}: vector must be finite and non-zero")
                    it.value = it.value / norm
            vectors = await self._vectors(state, items, spaces)

            def rows(space_names) -> list[dict]:
                return [
                    {
                        "id": it.id,
                        "metadata": it.metadata,
                        "kind": it.kind,
                        "source": sources[i],
                        **{field_for(s): vectors[s][i].tolist() for s in space_names},
                    }
                    for i, it in enumerate(items)
                ]

            await asyncio.to_thread(self.store.upsert, state["collection"], rows(state["spaces"]))
            bf = state["backfill"]
            if bf.get("status") == "running":  # the generation being filled gets the write too
                await asyncio.to_thread(self.store.upsert, bf["collection"], rows(spaces))
        metrics.GALLERY_UPSERTS.labels(name).inc(len(items))
        return len(items)

    async def delete(self, name: str, item_id: str) -> None:
        try:
            check_id(item_id)
        except ValueError as exc:
            raise InferenceError(400, str(exc)) from None
        async with self._lock(name):
            state = self.state(name)
            if not await asyncio.to_thread(self.store.exists, state["collection"], [item_id]):
                raise InferenceError(404, f"gallery {name!r} has no item {item_id!r}")
            await asyncio.to_thread(self.store.delete, state["collection"], [item_id])
            if state["backfill"].get("status") == "running":
                await asyncio.to_thread(self.store.delete, state["backfill"]["collection"], [item_id])

    async def search(
        self, name: str, kind: str, value: Any, k: int, expr: str = ""
    ) -> tuple[list[dict], dict]:
        """Top-k items for one query; returns (hits, the state it was answered under)."""
        state = self.state(name)
        if not 1 <= k <= MAX_K:
            raise InferenceError(400, f"k must be in [1, {MAX_K}], got {k}")
        space = state["space"]
        if kind == "vector":
            dim = state["spaces"][space]["dim"]
            vec = np.asarray(value, dtype=np.float32)
            if vec.shape != (dim,):
                raise InferenceError(
                    400,
                    f"query vector has {vec.size} dims; gallery {name!r} searches space {space!r} "
                    f"({dim} dims)",
                )
            norm = float(np.linalg.norm(vec))
            if not np.isfinite(norm) or norm == 0:
                raise InferenceError(400, "query vector must be finite and non-zero")
            query = vec[None] / norm
        else:
            model = self.lookup(state["model"])
            if not _accepts(model, kind):
                raise InferenceError(
                    400, f"gallery {name!r} is queried by {model.name!r}, which embeds {model.modality} only"
                )
            query = await model.embed(kind, [value], space)
        try:
            hits = await asyncio.to_thread(self.store.search, state["collection"], space, query, k, expr)
        except StoreError as exc:
            raise InferenceError(400, f"Milvus rejected the search (filter {expr!r}?): {exc}") from None
        metrics.GALLERY_SEARCHES.labels(name, space).inc()
        return hits[0], state

    # --- upgrade, backfill, rollback ---------------------------------------------------------------

    async def upgrade(self, name: str, model_name: str) -> dict:
        """Make ``model_name`` the query model now, through the compatible space the gallery holds."""
        model = self.lookup(model_name)
        async with self._lock(name):
            state = self.state(name)
            if model_name == state["model"]:
                raise InferenceError(409, f"gallery {name!r} is already queried by {model_name!r}")
            if state["backfill"].get("status") == "running":
                raise InferenceError(
                    409, f"gallery {name!r} is backfilling {state['backfill']['model']!r}; roll back first"
                )
            # Prefer the model's native space when the gallery holds it (a re-upgrade after a backfill).
            usable = [(s, model.how(s)) for s in state["spaces"] if model.how(s)]
            if not usable:
                raise InferenceError(
                    409,
                    f"model {model_name!r} cannot write queries into any space of gallery {name!r} "
                    f"(spaces: {sorted(state['spaces'])}); its own space is {model.space!r}",
                )
            space, how = sorted(usable, key=lambda p: p[1] != "native")[0]
            new = {
                **state,
                "model": model.name,
                "space": space,
                "how": how,
                "history": [*state["history"], {k: state[k] for k in ("model", "space", "how")}],
                "backfill": {"status": "none"}
                if how == "native"
                else {"status": "pending", "model": model.name},
            }
            await self._save(name, new)
            return new

    async def rollback(self, name: str) -> dict:
        """Back to the previous query model and space; a running backfill is cancelled and discarded."""
        async with self._lock(name):
            state = self.state(name)
            if not state["history"]:
                raise InferenceError(409, f"gallery {name!r} has no upgrade to roll back")
            task = self._tasks.pop(name, None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            bf = state["backfill"]
            prev = state["history"][-1]
            new = {
                **state,
                **prev,
                "history": state["history"][:-1],
                "backfill": {"status": "none"},
            }
            if bf.get("status") == "running":
                new["backfill"] = {**bf, "status": "cancelled", "collection": None}
            await self._save(name, new)
            if bf.get("status") == "running":
                await asyncio.to_thread(self.store.drop_collection, bf["collection"])
            return new

    async def start_backfill(self, name: str, batch_size: int = 256, pause_ms: float = 0.0) -> dict:
        """Start re-embedding the gallery with its active model into that model's native space; a no-op
        when the gallery holds that space already or the backfill is running."""
        async with self._lock(name):
            state = self.state(name)
            bf = state["backfill"]
            if bf.get("status") == "running":
                return state
            model = self.lookup(state["model"])
            if model.space in state["spaces"]:  # already backfilled: nothing to do (idempotent)
                return state
            kinds = {"image", "text"} - set(model.modality.split("+"))
            for kind in sorted(kinds):
                n = await asyncio.to_thread(self.store.count_where, state["collection"], f'kind == "{kind}"')
                if n:
                    raise InferenceError(
                        409,
                        f"model {model.name!r} embeds {model.modality} only and gallery {name!r} has {n} "
                        f"{kind} items: it can query the gallery through {state['space']!r} but cannot "
                        "backfill it",
                    )
            n_vec = await asyncio.to_thread(self.store.count_where, state["collection"], 'kind == "vector"')
            if n_vec:
                raise InferenceError(
                    409,
                    f"gallery {name!r} has {n_vec} items given as vectors, with no image or text to "
                    "re-embed; "
                    "upsert them again with `image` or `text` first",
                )
            generation = state["generation"] + 1
            target = collection_name(name, generation)
            dims = {s: info["dim"] for s, info in state["spaces"].items()} | {model.space: model.dim}
            await asyncio.to_thread(self.store.drop_collection, target)  # a cancelled attempt's leftovers
            await asyncio.to_thread(self.store.create_collection, target, dims)
            new = {
                **state,
                "backfill": {
                    "status": "running",
                    "model": model.name,
                    "space": model.space,
                    "dim": model.dim,
                    "collection": target,
                    "generation": generation,
                    "cursor": "",
                    "done": 0,
                    "total": await asyncio.to_thread(self.store.count, state["collection"]),
                    "reembedded": 0,
                    "batch_size": batch_size,
                    "pause_ms": pause_ms,
                    "engine": "ray" if self.ray_address else "in-process",
                    "started": time.time(),
                    "seconds": 0.0,
                },
            }
            await self._save(name, new)
        self._start_backfill_task(name)
        return new

    def _start_backfill_task(self, name: str) -> None:
        task = asyncio.get_running_loop().create_task(self._backfill(name))
        self._tasks[name] = task

        def done(t: asyncio.Task) -> None:
            if self._tasks.get(name) is t:
                self._tasks.pop(name, None)
            if not t.cancelled() and t.exception() is not None:
                log.error("gallery %s: backfill failed", name, exc_info=t.exception())

        task.add_done_callback(done)

    async def wait_backfill(self, name: str) -> None:
        task = self._tasks.get(name)
        if task is not None:
            await asyncio.shield(task)

    async def _backfill(self, name: str) -> None:
        state = self.state(name)
        bf = state["backfill"]
        source_coll, target = state["collection"], bf["collection"]
        model = self.lookup(bf["model"])
        fields = ["metadata", "kind", "source", *(field_for(s) for s in state["spaces"])]
        ids = await asyncio.to_thread(self.store.all_ids, source_coll)
        todo = [i for i in ids if i > bf["cursor"]]
        done, total = len(ids) - len(todo), len(ids)
        started = time.perf_counter() - bf.get("seconds", 0.0)
        batch = int(bf.get("batch_size", 256))
        if bf.get("engine") == "ray":
            from serving.gallery.ray_backfill import embedded_batches

            batches = embedded_batches(self.store, source_coll, todo, model, batch, self.ray_address)
        else:
            batches = ((todo[i : i + batch], None) for i in range(0, len(todo), batch))
        try:
            while (item := await asyncio.to_thread(next, batches, None)) is not None:
                chunk, embedded = item
                async with self._lock(name):
                    state = self.state(name)
                    if state["backfill"].get("status") != "running":
                        return  # rolled back meanwhile
                    rows = await asyncio.to_thread(self.store.get, source_coll, chunk, fields)
                    if embedded is not None:  # Ray's vectors, with the source each was embedded from
                        # a row upserted since Ray read it was written to both generations already
                        rows = [r for r in rows if embedded.get(r["id"], (None,))[0] == r["source"]]
                        new_vecs = [embedded[r["id"]][1] for r in rows]
                    else:
                        new_vecs = await self._reembed(model, rows)
                    if rows:
                        out = [
                            {**r, field_for(model.space): np.asarray(new_vecs[i]).tolist()}
                            for i, r in enumerate(rows)
                        ]
                        await asyncio.to_thread(self.store.upsert, target, out)
                    done += len(chunk)
                    bf = {
                        **state["backfill"],
                        "cursor": chunk[-1],
                        "done": done,
                        "total": total,
                        "reembedded": state["backfill"].get("reembedded", 0) + len(rows),
                        "seconds": round(time.perf_counter() - started, 3),
                    }
                    await self._save(name, {**state, "backfill": bf})
                metrics.GALLERY_REEMBEDDED.labels(name, model.name).inc(len(rows))
                if bf.get("pause_ms"):
                    await asyncio.sleep(bf["pause_ms"] / 1000)
            await self._cutover(name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            async with self._lock(name):
                state = self.state(name)
                if state["backfill"].get("status") == "running":
                    bf = {**state["backfill"], "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                    await self._save(name, {**state, "backfill": bf})
            raise

    async def _reembed(self, model: EmbeddingModel, rows: list[dict]) -> np.ndarray:
        decoded = [decode_source(r["source"]) for r in rows]
        vecs = np.zeros((len(rows), model.dim), dtype=np.float32)
        for kind in ("image", "text"):
            idx = [i for i, (k, _) in enumerate(decoded) if k == kind]
            if idx:
                vecs[idx] = await model.embed(kind, [decoded[i][1] for i in idx])
        return vecs

    async def _cutover(self, name: str) -> None:
        """Backfill complete: the new generation becomes the gallery, queries move to the native space."""
        async with self._lock(name):
            state = self.state(name)
            bf = state["backfill"]
            if bf.get("status") != "running":
                return
            n_old, n_new = await asyncio.gather(
                asyncio.to_thread(self.store.count, state["collection"]),
                asyncio.to_thread(self.store.count, bf["collection"]),
            )
            if n_old != n_new:  # cannot happen while every write goes to both; refuse rather than lose items
                raise RuntimeError(
                    f"backfill of {name!r} ended with {n_new} items in the new space, {n_old} in the old"
                )
            old = state["collection"]
            new = {
                **state,
                "collection": bf["collection"],
                "generation": bf["generation"],
                "spaces": {**state["spaces"], bf["space"]: {"dim": bf["dim"], "model": bf["model"]}},
                "space": bf["space"],
                "how": "native",
                "backfill": {**bf, "status": "complete", "collection": None, "finished": time.time()},
            }
            await self._save(name, new)
        log.info("gallery %s: backfill complete, queries in %s", name, bf["space"])
        self._retire(old)
