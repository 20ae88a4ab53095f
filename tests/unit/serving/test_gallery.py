"""Galleries against a real Milvus Lite file: the store, upgrade with zero re-embedding, backfill (resumed,
no duplicates), rollback that restores results exactly, bad input.

The embedding models here are test doubles: fixed random linear maps of a 6-d "raw" signal, built so the
new model's first coordinates *are* the old space (a perfect compatible subspace, as BT² aims for). The
real models run in tests/integration/test_retrieval_gallery.py.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serving.gallery.manager import Galleries, Item
from serving.gallery.store import MilvusStore, decode_source, encode_source
from serving.repository import InferenceError

RAW = 6  # the test doubles embed a text "x,y,z,..." of RAW floats


class LinearModel:
    """Test double of :class:`serving.tasks.embedding.Embedder`: text "a,b,c..." → normalize(W @ x)."""

    modality = "text"

    def __init__(self, name: str, weight: np.ndarray, compatible: dict[str, tuple[str, int]] | None = None):
        self.name = self.space = name
        self.weight = weight.astype(np.float32)
        self.dim = weight.shape[0]
        self.compatible = compatible or {}
        self.calls = 0

    def how(self, space: str) -> str | None:
        if space == self.space:
            return "native"
        return self.compatible.get(space, (None,))[0]

    def space_dim(self, space: str) -> int:
        return self.dim if space == self.space else self.compatible[space][1]

    async def embed(self, kind, values, space=None):
        assert kind == "text"
        self.calls += len(values)
        x = np.array([[float(v) for v in s.split(",")] for s in values], dtype=np.float32)
        z = x @ self.weight.T
        if space not in (None, self.space):
            z = z[:, : self.compatible[space][1]]  # the compatible subspace
        return z / np.linalg.norm(z, axis=1, keepdims=True)


@pytest.fixture
def models():
    rng = np.random.default_rng(0)
    w_old = rng.normal(size=(4, RAW))
    w_new = np.concatenate([w_old, rng.normal(size=(4, RAW))])  # first 4 dims = the old space
    return {
        "old": LinearModel("old", w_old),
        "new": LinearModel("new", w_new, {"old": ("subspace", 4)}),
        "other": LinearModel("other", rng.normal(size=(5, RAW))),
    }


def _lookup(models):
    def lookup(name):
        if name not in models:
            raise InferenceError(404, f"unknown model {name!r}")
        return models[name]

    return lookup


def _text(rng) -> str:
    return ",".join(f"{v:.4f}" for v in rng.normal(size=RAW))


def _items(n, seed=1):
    rng = np.random.default_rng(seed)
    return [Item(f"i{i:04d}", "text", _text(rng), {"label": i % 5}) for i in range(n)]


def run(coro):
    return asyncio.run(coro)


def test_source_round_trip():
    image = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    kind, back = decode_source(encode_source("image", image))
    assert kind == "image" and back.shape == (8, 8) and np.abs(back - image).max() < 1e-3
    assert decode_source(encode_source("text", "a seven")) == ("text", "a seven")


def test_upgrade_backfill_rollback(tmp_path, models):
    async def scenario():
        store = MilvusStore(str(tmp_path / "g.db"))
        g = Galleries(store, _lookup(models))
        await g.create("digits", "old")
        assert (await g.create("digits", "old"))[1] is False  # idempotent
        with pytest.raises(InferenceError) as e:
            await g.create("digits", "other")
        assert e.value.status == 409
        await g.upsert("digits", _items(300))
        await g.upsert("digits", [Item("i0000", "text", "1,0,0,0,0,0", {"label": 9})])  # replaces
        assert g.describe("digits")["spaces"] == {"old": 300}
        query = "0.5,1,0,-1,0,2"
        before, _ = await g.search("digits", "text", query, 10)
        only3, _ = await g.search("digits", "text", query, 5, 'metadata["label"] == 3')
        assert all(h["metadata"]["label"] == 3 for h in only3)

        models["new"].calls = 0
        state = await g.upgrade("digits", "new")
        assert (state["model"], state["space"], state["how"]) == ("new", "old", "subspace")
        upgraded, answered = await g.search("digits", "text", query, 10)
        assert answered["model"] == "new" and models["new"].calls == 1  # the query only: 0 re-embedded
        # the new model's compatible subspace is the old space here, so the results are the old ones
        assert [h["id"] for h in upgraded] == [h["id"] for h in before]

        await g.start_backfill("digits", batch_size=64)
        await g.upsert("digits", [Item("late", "text", "0,0,1,0,0,0", {"label": 1})])  # during backfill
        await g.wait_backfill("digits")
        d = g.describe("digits")
        assert d["space"] == "new" and d["how"] == "native" and d["backfill"]["status"] == "complete"
        assert d["spaces"] == {"old": 301, "new": 301}
        assert d["backfill"]["reembedded"] >= 300
        native, _ = await g.search("digits", "text", query, 10)
        assert native[0]["score"] > 0.5

        await g.rollback("digits")
        restored, answered = await g.search("digits", "text", query, 10)
        assert answered["model"] == "old"
        assert [(h["id"], h["score"]) for h in restored] == [(h["id"], h["score"]) for h in before]
        store.close()

        # a fresh process sees the same durable state
        store = MilvusStore(str(tmp_path / "g.db"))
        g2 = Galleries(store, _lookup(models))
        assert g2.describe("digits")["model"] == "old"
        again, _ = await g2.search("digits", "text", query, 10)
        assert [h["id"] for h in again] == [h["id"] for h in before]
        store.close()

    run(scenario())


def test_backfill_resumes_from_its_cursor_without_duplicates(tmp_path, models):
    async def interrupted():
        store = MilvusStore(str(tmp_path / "g.db"))
        g = Galleries(store, _lookup(models))
        await g.create("g", "old")
        await g.upsert("g", _items(200))
        await g.upgrade("g", "new")
        await g.start_backfill("g", batch_size=20, pause_ms=30)
        while g.states["g"]["backfill"]["done"] < 60:
            await asyncio.sleep(0.01)
        await g.close()  # the process stops mid-backfill (the integration test uses kill -9)
        store.close()
        return g.states["g"]["backfill"]["cursor"]

    cursor = run(interrupted())
    assert cursor

    async def resumed():
        store = MilvusStore(str(tmp_path / "g.db"))
        g = Galleries(store, _lookup(models))
        assert g.states["g"]["backfill"]["status"] == "running"
        assert g.states["g"]["backfill"]["cursor"] >= cursor
        models["new"].calls = 0
        g.resume()
        await g.wait_backfill("g")
        d = g.describe("g")
        assert d["backfill"]["status"] == "complete" and d["spaces"] == {"old": 200, "new": 200}
        assert models["new"].calls < 200  # only what was left
        ids = store.all_ids(d["collection"])
        assert len(ids) == len(set(ids)) == 200
        store.close()

    run(resumed())


def test_bad_input_names_the_problem(tmp_path, models):
    async def scenario():
        store = MilvusStore(str(tmp_path / "g.db"))
        g = Galleries(store, _lookup(models))
        await g.create("g", "old")
        await g.upsert("g", _items(5))

        async def status(coro):
            with pytest.raises(InferenceError) as e:
                await coro
            return e.value.status, e.value.message

        assert (await status(g.search("nope", "text", "1,2,3,4,5,6", 3)))[0] == 404
        s, m = await status(g.search("g", "vector", [1.0, 2.0], 3))
        assert s == 400 and "2 dims" in m and "4 dims" in m
        s, m = await status(g.search("g", "text", "1,2,3,4,5,6", 0))
        assert s == 400 and "k must be" in m
        s, m = await status(g.search("g", "text", "1,2,3,4,5,6", 3, "metadata[label] === 3"))
        assert s == 400 and "Milvus rejected" in m
        s, m = await status(g.upgrade("g", "other"))
        assert s == 409 and "cannot write queries" in m
        s, m = await status(g.upgrade("g", "missing"))
        assert s == 404
        s, m = await status(g.rollback("g"))
        assert s == 409
        s, m = await status(g.create("bad name!", "old"))
        assert s == 400
        s, m = await status(g.upsert("g", _items(2) + _items(1)))
        assert s == 400 and "more than once" in m and "i0000" in m
        s, m = await status(g.upsert("g", [Item("v", "vector", np.ones(3, np.float32), {})]))
        assert s == 400 and "3 dims" in m
        await g.upsert("g", [Item("v", "vector", np.ones(4, np.float32), {})])
        await g.upgrade("g", "new")
        s, m = await status(g.start_backfill("g"))
        assert s == 409 and "given as vectors" in m
        await g.delete("g", "v")
        s, _ = await status(g.delete("g", "v"))
        assert s == 404
        store.close()

    run(scenario())


def test_a_second_process_on_a_lite_file_fails_at_once_naming_it(tmp_path):
    """Milvus Lite serves one process per file; a second opener (another `kiln serve` on the same state
    directory) is refused at once with the reason instead of waiting on the file."""
    import subprocess
    import sys

    db = tmp_path / "g.db"
    first = MilvusStore(str(db))
    code = f"from serving.gallery.store import MilvusStore; MilvusStore({str(db)!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "in use by another process" in r.stderr
    first.close()


def test_an_id_that_closes_the_filter_quote_deletes_nothing_else(tmp_path, models):
    """The audit's hole: pymilvus' ``delete(ids=...)`` built ``id in ['…']`` unescaped, so an id closing
    the quote deleted every item. The edge refuses such ids (400) and the store never splices one: rows
    with quotes written before (legacy data) are read, re-embedded and deleted one by one."""

    async def scenario():
        store = MilvusStore(str(tmp_path / "g.db"))
        g = Galleries(store, _lookup(models))
        await g.create("g", "old")
        await g.upsert("g", _items(5))
        for hostile in ["x'] or id != ['", 'x"] or id != ["', "a b", "", "..", "é", "x" * 257]:
            with pytest.raises(InferenceError) as e:
                await g.delete("g", hostile)
            assert e.value.status == 400 and "item id" in e.value.message
            with pytest.raises(InferenceError) as e:
                await g.upsert("g", [Item(hostile, "text", "1,0,0,0,0,0", {})])
            assert e.value.status == 400
        assert g.describe("g")["spaces"] == {"old": 5}

        coll = g.states["g"]["collection"]
        legacy = ["it's", 'say "hi"', "back\\slash", "x'] or id != ['"]
        rows = [
            {"id": i, "metadata": {}, "kind": "text", "source": encode_source("text", "0,1,0,0,0,0"),
             "v_old": [0.5, 0.5, 0.5, 0.5]}
            for i in legacy
        ]  # fmt: skip
        store.upsert(coll, rows)
        assert store.exists(coll, legacy) == set(legacy)
        assert {r["id"] for r in store.get(coll, legacy, ["source"])} == set(legacy)
        store.delete(coll, ["x'] or id != ['"])
        assert store.count(coll) == 5 + 3 and store.exists(coll, ["it's", "i0000"]) == {"it's", "i0000"}

        await g.upgrade("g", "new")  # the backfill reads every row by id, quotes included
        await g.start_backfill("g", batch_size=3)
        await g.wait_backfill("g")
        assert g.describe("g")["spaces"] == {"old": 8, "new": 8}
        store.close()

    run(scenario())


def test_gallery_names_map_to_collections_one_to_one(tmp_path, models):
    """``a-b`` and ``a_b`` once shared one collection: dropping one destroyed the other."""
    from serving.gallery.store import collection_name

    names = ["a-b", "a_b", "a.b", "a:b", "a__b", "a_ub", "A-b", "a"]
    assert len({collection_name(n, 1) for n in names}) == len(names)
    assert len(collection_name("x" * 100, 10**9)) <= 255  # Milvus' limit

    async def scenario():
        store = MilvusStore(str(tmp_path / "g.db"))
        g = Galleries(store, _lookup(models))
        for name in ("a-b", "a_b", "a"):
            await g.create(name, "old")
            await g.upsert(name, _items(3))
        await g.drop("a-b")
        assert g.describe("a_b")["spaces"] == {"old": 3} and g.describe("a")["spaces"] == {"old": 3}
        store.close()
        store = MilvusStore(str(tmp_path / "g.db"))  # a restart drops orphans: none of a's or a_b's
        g = Galleries(store, _lookup(models))
        assert sorted(g.states) == ["a", "a_b"] and g.describe("a_b")["spaces"] == {"old": 3}
        store.close()

    run(scenario())


def test_a_gallery_made_before_the_name_encoding_still_loads(tmp_path, models):
    """State lives in Milvus with its collection name, so a gallery on an old ``kiln_g_`` collection is
    served as it is; its next generation gets the new encoding."""

    async def scenario():
        store = MilvusStore(str(tmp_path / "g.db"))
        store.create_collection("kiln_g_old_one_1", {"old": 4})
        state = {
            "name": "old-one", "collection": "kiln_g_old_one_1", "generation": 1,
            "spaces": {"old": {"dim": 4, "model": "old"}}, "model": "old", "space": "old", "how": "native",
            "history": [], "backfill": {"status": "none"}, "created": 0.0,
        }  # fmt: skip
        store.save_state("old-one", state)
        store.close()
        store = MilvusStore(str(tmp_path / "g.db"))
        g = Galleries(store, _lookup(models))
        await g.upsert("old-one", _items(4))
        hits, _ = await g.search("old-one", "text", "1,0,0,0,0,0", 2)
        assert len(hits) == 2
        await g.upgrade("old-one", "new")
        await g.start_backfill("old-one")
        await g.wait_backfill("old-one")
        assert g.describe("old-one")["collection"] == "kiln_gallery_old_done_2"
        store.close()

    run(scenario())
