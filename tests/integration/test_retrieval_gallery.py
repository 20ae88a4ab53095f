"""Retrieval in a real `kiln serve` process on a real Milvus Lite file: the OpenAI embeddings API (unmodified
`openai` client), /embed, model listings, the Open Inference Protocol (unmodified tritonclient), galleries
and the upgrade story — upgrade with zero re-embedding, backfill, rollback to the exact old results — and
reliability: an acknowledged upsert survives kill -9, searches during upgrade and backfill all succeed, a
backfill killed with -9 resumes after a restart and completes without duplicates.

The models are the tiny recipes of the retrieval family (training.retrieval / training.xbt TINY_RECIPES),
trained and exported here once per module.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from serverproc import metric_total, start_server, stop_server

TOKEN = "test-admin-token"
WRITER = "test-write-token"
OLD, NEW = "tiny-embed-old", "tiny-embed-new-oca"
XOLD, XNEW = "tiny-xbt-old", "tiny-xbt-new-text"
MODELS = [OLD, NEW, XOLD, XNEW]
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
WRITE = {"Authorization": f"Bearer {WRITER}"}  # gallery create, upsert, item delete (serving.admin)


def _train_and_export() -> None:
    from export.pipeline import export_artifact, spec_for
    from kiln.artifacts import ArtifactError, get_artifact
    from training.retrieval import TINY_RECIPES as IMAGE
    from training.trainer import train
    from training.xbt import TINY_RECIPES as XBT

    for name in MODELS:
        try:
            art = get_artifact(name)
        except ArtifactError:
            recipe = {**IMAGE, **XBT}[name]
            art = train(name, recipe=recipe, progress=False).artifact
        missing = [f for f in spec_for(art).default_formats if not art.export(f)]
        if missing:
            export_artifact(art.tag, missing, log=lambda *a, **k: None)


def _digits(n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images[offset : offset + n] / 16.0).astype(np.float32), d.target[offset : offset + n]


def _png(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray((image * 255).round().astype(np.uint8), mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class Retrieval:
    """A `kiln serve` of the tiny retrieval models on its own Milvus Lite file; restartable."""

    def __init__(self, home, milvus):
        self.home, self.milvus, self.srv = home, milvus, None

    def start(self):
        env = {
            "KILN_MILVUS_URI": str(self.milvus),
            "KILN_ADMIN_TOKEN": TOKEN,
            "KILN_WRITE_TOKEN": WRITER,
            "KILN_DEMO_GALLERIES": f"demo={OLD}",
            "KILN_THREADS": "1",
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.srv = start_server(
                self.home, "--models", ",".join([OLD, NEW, XOLD, XNEW]), "--no-train", timeout=300
            )
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return self.srv

    def kill9(self):
        """SIGKILL every process of the server: BentoML starts its workers in their own sessions."""
        import psutil

        procs = [psutil.Process(self.srv.process.pid)]
        procs += procs[0].children(recursive=True)
        for p in procs:
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=30)
        self.srv.process.wait()

    @property
    def url(self):
        return self.srv.http

    def post(self, path, body=None, **kw):
        return httpx.post(f"{self.url}{path}", json=body, timeout=120, **kw)

    def get(self, path):
        return httpx.get(f"{self.url}{path}", timeout=60)


@pytest.fixture(scope="module")
def tiny_models():
    _train_and_export()


@pytest.fixture(scope="module")
def retrieval(kiln_home, tmp_path_factory, tiny_models):
    r = Retrieval(kiln_home, tmp_path_factory.mktemp("milvus") / "galleries.db")
    r.start()
    yield r
    stop_server(r.srv.process)


def _search_image(r, gallery, image, k=5, **extra):
    return r.post(f"/galleries/{gallery}/search", {"image": image.tolist(), "k": k, **extra})


# --- embeddings ----------------------------------------------------------------------------------------


def test_openai_client_embeds_text_in_the_old_space(retrieval):
    import openai

    client = openai.OpenAI(base_url=f"{retrieval.url}/v1", api_key="unused", max_retries=0)
    texts = ["a handwritten seven", "the digit 3"]
    got = client.embeddings.create(model=f"{XNEW}@{XOLD}", input=texts)  # the client asks for base64
    assert [d.index for d in got.data] == [0, 1] and got.model == f"{XNEW}@{XOLD}"
    vecs = np.array([d.embedding for d in got.data])
    assert vecs.shape == (2, 16) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    same = retrieval.post("/embed", {"model": XNEW, "space": XOLD, "texts": texts}).json()
    assert same["how"] == "projection" and np.allclose(vecs, same["vectors"], atol=1e-6)
    floats = client.embeddings.create(model=XNEW, input="seven", encoding_format="float", dimensions=64)
    assert len(floats.data[0].embedding) == 64 and got.usage.total_tokens == 6
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")
    with pytest.raises(openai.BadRequestError, match="cannot write into space"):
        client.embeddings.create(model=f"{XNEW}@nowhere", input="x")


def test_model_listings(retrieval):
    ids = {m["id"] for m in retrieval.get("/v1/models").json()["data"]}
    assert ids == {OLD, NEW, XOLD, XNEW}
    models = {m["name"]: m for m in retrieval.get("/embedding-models").json()["models"]}
    assert (
        models[NEW]["compatible"][0] | {"space": OLD, "how": "subspace", "dims": 8}
        == models[NEW]["compatible"][0]
    )
    assert models[XNEW]["modality"] == "text" and models[XNEW]["dim"] == 384
    assert models[XNEW]["compatible"][0]["how"] == "projection"


def test_embed_images_and_bad_input(retrieval):
    images, _ = _digits(3)
    r = retrieval.post("/embed", {"model": NEW, "images": [images[0].tolist(), _png(images[1])]})
    assert r.status_code == 200, r.text
    assert r.json()["space"] == NEW and np.array(r.json()["vectors"]).shape == (2, 12)
    sub = retrieval.post("/embed", {"model": f"{NEW}@{OLD}", "images": [images[0].tolist()]}).json()
    full = np.array(r.json()["vectors"][0])
    assert np.allclose(sub["vectors"][0], full[:8] / np.linalg.norm(full[:8]), atol=1e-5)  # the subspace
    for body, status, words in [
        ({"model": "nope", "texts": ["x"]}, 404, "unknown model"),
        ({"model": OLD, "texts": ["x"]}, 400, "not text"),
        ({"model": OLD, "images": []}, 400, "empty"),
        ({"model": OLD, "space": XOLD, "images": [images[0].tolist()]}, 400, "cannot write into space"),
        ({"model": XNEW, "texts": [""]}, 400, "empty string"),
    ]:
        r = retrieval.post("/embed", body)
        assert r.status_code == status and words in r.json()["error"], (body, r.text)


def test_embedding_models_answer_over_oip(retrieval):
    import tritonclient.http as thttp

    client = thttp.InferenceServerClient(retrieval.srv.http_hostport)
    images, _ = _digits(2)
    from kiln.imaging import to_model_input

    x = to_model_input(images, (16, 16))
    inp = thttp.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    z = client.infer(OLD, [inp]).as_numpy("embedding")
    rest = retrieval.post("/embed", {"model": OLD, "images": [i.tolist() for i in images]}).json()["vectors"]
    assert np.allclose(z, rest, atol=1e-5)
    text = thttp.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"a handwritten seven", b"the digit 3"], dtype=object))
    out = client.infer(XNEW, [text])
    assert out.as_numpy("embedding").shape == (2, 384)
    assert out.as_numpy(f"embedding_{XOLD}").shape == (2, 16)


# --- galleries -----------------------------------------------------------------------------------------


def test_demo_gallery_created_at_start_up(retrieval):
    d = retrieval.get("/galleries/demo").json()
    assert d["model"] == OLD and d["spaces"] == {OLD: 100}


def test_gallery_search_and_embed_are_tools_over_mcp(retrieval):
    """The task's tools slot: `search_gallery` and `embed` over MCP (the `mcp` package's client) answer as
    the HTTP routes do, with the routes' request schemas."""
    import asyncio

    from mcp import Client

    from serving.tasks.embedding import EmbedRequest

    images, _ = _digits(1, offset=50)
    direct = _search_image(retrieval, "demo", images[0], k=3).json()

    async def session():
        async with Client(f"{retrieval.url}/mcp") as client:
            listed = await client.list_tools()
            found = await client.call_tool(
                "search_gallery", {"gallery": "demo", "image": images[0].tolist(), "k": 3}
            )
            vec = await client.call_tool("embed", {"model": OLD, "images": [images[0].tolist()]})
            missing = await client.call_tool("search_gallery", {"gallery": "nope", "text": "a seven"})
            return listed, found, vec, missing

    listed, found, vec, missing = asyncio.run(session())
    tools = {t.name: t for t in listed.tools}
    assert {"embed", "search_gallery"} <= set(tools)
    assert tools["embed"].input_schema == EmbedRequest.model_json_schema()
    assert not found.is_error
    assert [h["id"] for h in found.structured_content["results"]] == [h["id"] for h in direct["results"]]
    assert not vec.is_error and len(vec.structured_content["vectors"][0]) == vec.structured_content["dim"]
    assert missing.is_error and "nope" in missing.content[0].text


def test_gallery_bad_input(retrieval):
    images, labels = _digits(10)
    assert retrieval.post("/galleries/bad", {"model": OLD}, headers=WRITE).status_code == 200
    items = [
        {"id": f"b{i}", "image": img.tolist(), "metadata": {"label": int(y)}}
        for i, (img, y) in enumerate(zip(images, labels, strict=True))
    ]
    assert retrieval.post("/galleries/bad/items", {"items": items}, headers=WRITE).status_code == 200
    cases = [
        ("/galleries/nope/search", {"text": "x"}, 404, "unknown gallery"),
        ("/galleries/bad/search", {"vector": [0.1] * 5}, 400, "5 dims"),
        ("/galleries/bad/search", {"image": images[0].tolist(), "k": 0}, 400, "k must be"),
        ("/galleries/bad/search", {"image": images[0].tolist(), "k": 5000}, 400, "k must be"),
        (
            "/galleries/bad/search",
            {"image": images[0].tolist(), "filter": "metadata[label] === 1"},
            400,
            "Milvus",
        ),
        ("/galleries/bad/search", {"text": "  "}, 400, "empty"),
        ("/galleries/bad/search", {}, 400, "exactly one"),
        ("/galleries/bad/search", {"text": "a seven"}, 400, "embeds image only"),
        ("/galleries/bad/items", {"items": [{"id": "v", "vector": [1.0, 2.0]}]}, 400, "2 dims"),
        ("/galleries/bad", {"model": "nope"}, 404, "unknown model"),
        ("/galleries/bad", {"model": NEW}, 409, "exists"),
        ("/galleries/bad!", {"model": OLD}, 400, "gallery name"),
    ]
    for path, body, status, words in cases:
        r = retrieval.post(path, body, headers=WRITE)
        assert r.status_code == status and words in r.json()["error"], (path, body, r.text)
    assert httpx.delete(f"{retrieval.url}/galleries/bad/items/b0", headers=WRITE).status_code == 200
    assert httpx.delete(f"{retrieval.url}/galleries/bad/items/b0", headers=WRITE).status_code == 404
    # admin routes: 401 without a token, 403 with a wrong one
    assert retrieval.post("/galleries/bad/upgrade", {"model": NEW}).status_code == 401
    r = retrieval.post("/galleries/bad/upgrade", {"model": NEW}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 403
    r = retrieval.post("/galleries/bad/upgrade", {"model": XNEW}, headers=ADMIN)
    assert r.status_code == 409 and "cannot write queries" in r.json()["error"]


def test_gallery_writes_need_a_token_and_ids_never_rewrite_the_filter(retrieval):
    """The audit's findings against a real server: unauthenticated gallery writes, and an item id closing
    the quote of Milvus' ``id in ['…']`` that deleted every item of the gallery."""
    images, labels = _digits(6, offset=600)
    items = [
        {"id": f"h{i}", "image": img.tolist(), "metadata": {"label": int(y)}}
        for i, (img, y) in enumerate(zip(images, labels, strict=True))
    ]
    for headers, status in [
        ({}, 401),
        ({"Authorization": "Bearer"}, 401),
        ({"Authorization": "Bearer x"}, 403),
    ]:
        r = retrieval.post("/galleries/hostile", {"model": OLD}, headers=headers)
        assert r.status_code == status, r.text
        assert "KILN_WRITE_TOKEN" in r.json()["error"]
    assert (
        retrieval.post("/galleries/hostile", {"model": OLD}, headers=ADMIN).status_code == 200
    )  # admin writes
    assert retrieval.post("/galleries/hostile/items", {"items": items}).status_code == 401
    assert retrieval.post("/galleries/hostile/items", {"items": items}, headers=WRITE).status_code == 200
    assert httpx.delete(f"{retrieval.url}/galleries/hostile/items/h0").status_code == 401
    for hostile in ["x'] or id != ['", 'x"] or id != ["', "h0' or '1", "a b"]:
        r = httpx.delete(f"{retrieval.url}/galleries/hostile/items/{hostile}", headers=WRITE)
        assert r.status_code == 400 and "item id" in r.json()["error"], (hostile, r.text)
        r = retrieval.post(
            "/galleries/hostile/items", {"items": [{**items[0], "id": hostile}]}, headers=WRITE
        )
        assert r.status_code == 400 and "item id" in r.json()["error"], (hostile, r.text)
    assert retrieval.get("/galleries/hostile").json()["spaces"] == {OLD: 6}  # nothing deleted

    # `a-b` and `a_b` are two galleries: dropping one leaves the other whole
    for name, chunk in (("a-b", items[:2]), ("a_b", items[2:5])):
        assert retrieval.post(f"/galleries/{name}", {"model": OLD}, headers=WRITE).status_code == 200
        assert retrieval.post(f"/galleries/{name}/items", {"items": chunk}, headers=WRITE).status_code == 200
    assert httpx.delete(f"{retrieval.url}/galleries/a-b", headers=WRITE).status_code == 403  # admin only
    assert httpx.delete(f"{retrieval.url}/galleries/a-b", headers=ADMIN).status_code == 200
    assert retrieval.get("/galleries/a_b").json()["spaces"] == {OLD: 3}
    assert retrieval.get("/galleries/a-b").status_code == 404


def test_upgrade_backfill_rollback_with_searches_throughout(retrieval):
    images, labels = _digits(120, offset=200)
    items = [
        {"id": f"d{i:03d}", "image": img.tolist() if i % 2 else _png(img), "metadata": {"label": int(y)}}
        for i, (img, y) in enumerate(zip(images, labels, strict=True))
    ]
    assert retrieval.post("/galleries/photos", {"model": OLD}, headers=WRITE).status_code == 200
    r = retrieval.post("/galleries/photos/items", {"items": items}, headers=WRITE)
    assert r.status_code == 200 and r.json()["upserted"] == 120
    queries, _ = _digits(6, offset=400)
    before = [_search_image(retrieval, "photos", q, k=10).json() for q in queries]
    assert all(b["model"] == OLD and b["space"] == OLD and len(b["results"]) == 10 for b in before)
    only7 = _search_image(retrieval, "photos", queries[0], k=5, filter='metadata["label"] == 7').json()
    assert {h["metadata"]["label"] for h in only7["results"]} == {7}

    stop, statuses = False, []

    def hammer():
        i = 0
        while not stop:
            statuses.append(_search_image(retrieval, "photos", queries[i % 6]).status_code)
            i += 1

    pool = ThreadPoolExecutor(2)
    futures = [pool.submit(hammer) for _ in range(2)]
    try:
        metrics_before = retrieval.get("/metrics").text
        r = retrieval.post("/galleries/photos/upgrade", {"model": NEW}, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["reembedded"] == 0 and r.json()["how"] == "subspace" and r.json()["space"] == OLD
        up = _search_image(retrieval, "photos", queries[0]).json()
        assert up["model"] == NEW and up["space"] == OLD
        reembedded = metric_total(retrieval.get("/metrics").text, "kiln_gallery_reembedded_items_total")
        assert reembedded == metric_total(metrics_before, "kiln_gallery_reembedded_items_total")

        r = retrieval.post("/galleries/photos/backfill", {"batch_size": 16, "pause_ms": 50}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["backfill"]["status"] == "running", r.text
        late = {"id": "late", "image": queries[5].tolist(), "metadata": {"label": 99}}
        assert retrieval.post("/galleries/photos/items", {"items": [late]}, headers=WRITE).status_code == 200
        deadline = time.time() + 120
        while (d := retrieval.get("/galleries/photos").json())["backfill"]["status"] == "running":
            assert time.time() < deadline, d
            time.sleep(0.2)
        assert d["backfill"]["status"] == "complete", d
        assert d["model"] == NEW and d["space"] == NEW and d["spaces"] == {OLD: 121, NEW: 121}
        assert 'kiln_gallery_backfill_items{gallery="photos",kind="done"}' in retrieval.get("/metrics").text
        native = _search_image(retrieval, "photos", queries[5]).json()
        assert native["space"] == NEW and native["results"][0]["id"] == "late"
    finally:
        stop = True
        for f in futures:
            f.result()
        pool.shutdown()
    assert statuses and set(statuses) == {200}, f"{len(statuses)} searches, statuses {set(statuses)}"

    r = retrieval.post("/galleries/photos/rollback", headers=ADMIN)
    assert r.status_code == 200 and r.json()["model"] == OLD
    httpx.delete(f"{retrieval.url}/galleries/photos/items/late", headers=WRITE)
    after = [_search_image(retrieval, "photos", q, k=10).json() for q in queries]
    assert [a["results"] for a in after] == [b["results"] for b in before]  # ids, scores, metadata: exact


def test_xbt_text_queries_over_an_image_gallery(retrieval):
    images, labels = _digits(60, offset=600)
    assert retrieval.post("/galleries/xbt", {"model": XOLD}, headers=WRITE).status_code == 200
    items = [
        {"id": f"x{i}", "image": img.tolist(), "metadata": {"label": int(y)}}
        for i, (img, y) in enumerate(zip(images, labels, strict=True))
    ]
    assert retrieval.post("/galleries/xbt/items", {"items": items}, headers=WRITE).status_code == 200
    old = retrieval.post("/galleries/xbt/search", {"text": "a handwritten seven", "k": 5}).json()
    assert old["model"] == XOLD and len(old["results"]) == 5
    r = retrieval.post("/galleries/xbt/upgrade", {"model": XNEW}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["how"] == "projection", r.text
    new = retrieval.post("/galleries/xbt/search", {"text": "a handwritten seven", "k": 5}).json()
    assert new["model"] == XNEW and new["space"] == XOLD and len(new["results"]) == 5
    r = retrieval.post("/galleries/xbt/backfill", headers=ADMIN)
    assert r.status_code == 409 and "cannot backfill" in r.json()["error"]


def test_acked_upsert_and_backfill_survive_kill9(retrieval):
    images, labels = _digits(160, offset=900)
    items = [
        {"id": f"k{i:03d}", "image": img.tolist(), "metadata": {"label": int(y)}}
        for i, (img, y) in enumerate(zip(images, labels, strict=True))
    ]
    assert retrieval.post("/galleries/durable", {"model": OLD}, headers=WRITE).status_code == 200
    assert retrieval.post("/galleries/durable/items", {"items": items}, headers=WRITE).status_code == 200
    assert retrieval.post("/galleries/durable/upgrade", {"model": NEW}, headers=ADMIN).status_code == 200
    r = retrieval.post("/galleries/durable/backfill", {"batch_size": 4, "pause_ms": 100}, headers=ADMIN)
    assert r.status_code == 200
    while retrieval.get("/galleries/durable").json()["backfill"]["done"] < 24:
        time.sleep(0.05)
    last = {"id": "acked", "image": images[0].tolist(), "metadata": {"label": 42}}
    assert retrieval.post("/galleries/durable/items", {"items": [last]}, headers=WRITE).status_code == 200
    assert retrieval.get("/galleries/durable").json()["backfill"]["status"] == "running"
    retrieval.kill9()  # the acknowledged upsert and the backfill's cursor must survive

    retrieval.start()
    d = retrieval.get("/galleries/durable").json()
    assert d["backfill"]["status"] in ("running", "complete") and d["backfill"]["done"] >= 24, d
    hit = _search_image(retrieval, "durable", images[0], k=2, filter='metadata["label"] == 42').json()
    assert [h["id"] for h in hit.get("results", [])] == ["acked"], hit
    deadline = time.time() + 120
    while (d := retrieval.get("/galleries/durable").json())["backfill"]["status"] == "running":
        assert time.time() < deadline, d
        time.sleep(0.2)
    assert d["backfill"]["status"] == "complete" and d["spaces"] == {OLD: 161, NEW: 161}, d
    everything = _search_image(retrieval, "durable", images[1], k=1000).json()["results"]
    ids = [h["id"] for h in everything]
    assert len(ids) == len(set(ids)) == 161  # resumed without duplicates
    assert retrieval.get("/galleries/demo").json()["spaces"] == {OLD: 100}  # created once, not again


def test_ray_data_backfill_on_a_local_ray_instance(tiny_models, tmp_path):
    """The same backfill as a Ray Data job (map_batches with the new model; the driver writes to Milvus)."""
    ray = pytest.importorskip("ray", reason="the optional [ray] extra is not installed")
    import asyncio

    from kiln.artifacts import get_artifact
    from serving.config import ServeConfig
    from serving.gallery.manager import Galleries, Item
    from serving.gallery.store import MilvusStore
    from serving.tasks.embedding import Embedder

    config = ServeConfig.from_env()
    models = {n: Embedder(get_artifact(n), config) for n in (OLD, NEW)}
    images, labels = _digits(48, offset=1200)

    async def scenario():
        store = MilvusStore(str(tmp_path / "ray.db"))
        g = Galleries(store, models.__getitem__, ray_address="local")
        await g.create("r", OLD)
        await g.upsert(
            "r",
            [
                Item(f"r{i:02d}", "image", img, {"label": int(y)})
                for i, (img, y) in enumerate(zip(images, labels, strict=True))
            ],
        )
        await g.upgrade("r", NEW)
        state = await g.start_backfill("r", batch_size=16)
        assert state["backfill"]["engine"] == "ray"
        await g.wait_backfill("r")
        d = g.describe("r")
        assert d["backfill"]["status"] == "complete" and d["spaces"] == {OLD: 48, NEW: 48}, d
        assert d["backfill"]["reembedded"] == 48
        # Ray's vectors are the served model's: an item's own native embedding finds it, score 1
        query = await models[NEW].embed("image", [images[5]])
        hits, answered = await g.search("r", "vector", query[0], 1)
        assert answered["space"] == NEW and hits[0]["id"] == "r05" and hits[0]["score"] > 0.999
        await g.close()
        store.close()

    os.environ["KILN_RAY_ACTORS"] = "1"  # one model replica: two cores here
    try:
        asyncio.run(scenario())
    finally:
        os.environ.pop("KILN_RAY_ACTORS")
        ray.shutdown()
        for m in models.values():
            m.close()
