"""The embedding task: vectors for images and text, OpenAI-compatible embeddings, and retrieval galleries.

Served model :class:`Embedder` (task ``embedding``): the artifact's ``embedding`` block names its modality,
native space and dimension, and the old spaces it can write into (``compatible``: BCT/BT²/OCA's compatible
*subspace* — the first ``dims`` coordinates, re-normalised — or XBT's *projection* head, an extra graph
output ``embedding_<space>``). Images run on the artifact's exported graph (or PyTorch) through the adaptive
batcher; text runs the artifact's PyTorch text tower (``encode_text``: a word tokenizer for the XBT dual
encoder, sentence-transformers' all-MiniLM-L6-v2 for the new text model — no ONNX export of the tokenizer
path) on the same batcher machinery. Over the Open Inference Protocol an image model takes ``images``
(N, 1, H, W) and a text model ``text`` (BYTES), and both return ``embedding`` (+ projections).

Routes:

* ``POST /v1/embeddings`` — the OpenAI embeddings API (``model`` may name a target space:
  ``xbt-new-text@xbt-old``), so the ``openai`` client, LangChain and LlamaIndex use Kiln as a provider;
* ``GET /v1/models`` (OpenAI list) and ``GET /embedding-models`` (modality, dimension, compatibility);
* ``POST /embed`` — images or texts → vectors in a chosen space;
* ``/galleries/...`` — Milvus-backed galleries with the upgrade story (:mod:`serving.gallery.manager`);
  create, upsert and item delete need a write-scope bearer token (``KILN_WRITE_TOKEN`` or the admin
  token), upgrade, backfill, rollback and drop the admin token (:mod:`serving.admin`). Gallery names and
  item ids are letters, digits and ``._:-`` (``serving.gallery.store.KEY_PATTERN``), 400 otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import os
import time
import weakref
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Header, Path
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from kiln.artifacts import Artifact, load_torch_model
from kiln.imaging import to_model_input
from serving.admin import admin_token, require_admin, require_write
from serving.agent.tools import Tool
from serving.config import ServeConfig
from serving.gallery.store import KEY_PATTERN, MAX_ID_LENGTH, MAX_NAME_LENGTH
from serving.images import check_image_budget, decode_image, decode_images
from serving.model import LoadedModel
from serving.repository import InferenceError, ModelRepository, TensorSpec
from serving.routes import observed, task_model
from serving.runtime import OnnxTextRuntime

log = logging.getLogger("kiln.serving.embedding")

_RO_HINT = "give the server a writable KILN_HOME or KILN_MILVUS_URI (a Milvus server)"
MAX_INPUTS = 256  # texts or images per /embed or /v1/embeddings request


def check_texts(texts: list[Any], limit: int, what: str = "`texts`") -> list[str]:
    """Texts as ``str``: UTF-8 (BYTES elements are decoded here, at the edge, not in the batch) and at
    most ``limit`` characters each, checked before anything is tokenised.

    Raises:
        InferenceError: 400 naming the first text that is not valid UTF-8, empty, or too long.
    """
    out = []
    for i, t in enumerate(texts):
        if isinstance(t, bytes):
            try:
                t = t.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InferenceError(400, f"{what}[{i}] is not valid UTF-8: {exc}") from None
        elif not isinstance(t, str):
            raise InferenceError(400, f"{what}[{i}] must be a string, got {type(t).__name__}")
        if not t.strip():
            raise InferenceError(400, f"{what}[{i}] is an empty string")
        if len(t) > limit:
            raise InferenceError(
                400, f"{what}[{i}] has {len(t)} characters; at most {limit} per text (max_text_chars)"
            )
        out.append(t)
    return out


def _normalize(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float32)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def to_space(outputs: dict[str, np.ndarray], how: str, space: str, dims: int) -> np.ndarray:
    """Model outputs → L2-normalised vectors in ``space``, written ``how`` (native, subspace, projection)."""
    if how == "native":
        z = outputs["embedding"]
    elif how == "subspace":
        # BCT/BT²/OCA: the compatible part is the first d_old coordinates (BT² §3: φ_new = [φ_c; φ_extra])
        z = outputs["embedding"][:, :dims]
    elif how == "projection":
        z = outputs[f"embedding_{space}"]  # XBT: the projection head's output, already in the old space
    else:
        raise ValueError(
            f"unknown compatibility {how!r} for space {space!r}; valid: native, subspace, projection"
        )
    return _normalize(z)


class TextRuntime:
    """Runs an artifact's text tower: ``model.encode_text(list[str])`` → {output name: (N, d)}."""

    backend = "pytorch"

    def __init__(self, art: Artifact, backend: str, threads: int):
        import torch

        t0 = time.perf_counter()
        torch.set_num_threads(threads)
        self._torch = torch
        self.model = load_torch_model(art)
        self.load_seconds = time.perf_counter() - t0

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [t.decode() if isinstance(t, bytes) else str(t) for t in inputs["text"].reshape(-1)]
        with self._torch.inference_mode():
            out = self.model.encode_text(texts)
        return {k: v.float().cpu().numpy() for k, v in out.items()}


def _imported_text_runtime(art: Artifact, backend: str, threads: int) -> OnnxTextRuntime:
    if backend != "onnxruntime":
        raise ValueError(f"an imported text model runs on onnxruntime only, not {backend!r}")
    return OnnxTextRuntime(art, backend, threads)


class Embedder(LoadedModel):
    task = "embedding"

    def __init__(self, art: Artifact, config: ServeConfig):
        e = art.manifest["embedding"]
        self.modality: str = e["modality"]
        self.dim: int = int(e["dim"])
        self.space: str = e.get("space") or art.name
        self.compatible: dict[str, dict] = {c["space"]: c for c in e.get("compatible", [])}
        self.text_batcher = None
        if "image" in self.modality:
            super().__init__(art, config)  # graphs discarded by their quality gate are not loadable
            self.image_size = tuple(art.manifest["preprocess"]["size"])
            if "text" in self.modality:  # the dual encoder's text tower, beside the image graph
                text = LoadedModel(
                    art,
                    dataclasses.replace(config, backend="pytorch"),
                    backends={"pytorch": ""},
                    runtime_factory=TextRuntime,
                )
                self.text_batcher = text.batchers["pytorch"]
        elif "text" in art.manifest:  # imported (kiln import): tokenizer + ONNX graph, parity-checked
            super().__init__(art, config, runtime_factory=_imported_text_runtime)
        else:
            super().__init__(
                art,
                dataclasses.replace(config, backend="pytorch"),
                backends={"pytorch": ""},
                runtime_factory=TextRuntime,
            )
        if "image" not in self.modality:
            # over OIP a text model takes strings; the manifest's tensors describe its PyTorch projection
            self.inputs = [TensorSpec("text", "BYTES", (-1,))]
            self.outputs = [TensorSpec("embedding", "FP32", (-1, self.dim))] + [
                TensorSpec(f"embedding_{s}", "FP32", (-1, int(c["dims"])))
                for s, c in self.compatible.items()
                if c["how"] == "projection"
            ]
            self.text_batcher = self.batchers[self.backends[0]]

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        """Over the Open Inference Protocol a text model's ``text`` elements must be UTF-8 of at most
        ``max_text_chars`` characters: one bad text must not fail the batch it shares with others."""
        super().check_inputs(inputs)
        if "text" in inputs and "image" not in self.modality:
            check_texts(list(inputs["text"].reshape(-1)), self.settings.max_text_chars, "input 'text'")

    # --- spaces --------------------------------------------------------------------------------

    def how(self, space: str) -> str | None:
        """How this model writes vectors into ``space``: native, subspace, projection, or None."""
        if space == self.space:
            return "native"
        entry = self.compatible.get(space)
        return entry["how"] if entry else None

    def space_dim(self, space: str) -> int:
        return self.dim if space == self.space else int(self.compatible[space]["dims"])

    def spaces(self) -> list[str]:
        return [self.space, *self.compatible]

    def resolve_space(self, space: str | None) -> str:
        if space in (None, "", self.space):
            return self.space
        if space not in self.compatible:
            raise InferenceError(
                400,
                f"model {self.name!r} cannot write into space {space!r}; its spaces: {self.spaces()}",
            )
        return space

    # --- embedding -----------------------------------------------------------------------------

    async def embed(
        self, kind: str, values: list[Any], space: str | None = None, backend: str | None = None
    ) -> np.ndarray:
        """(N, d) L2-normalised float32 vectors of images ((H, W) in [0, 1]) or texts, in ``space``."""
        space = self.resolve_space(space)
        if kind == "image":
            if "image" not in self.modality:
                raise InferenceError(400, f"model {self.name!r} embeds {self.modality} only, not images")
            x = await asyncio.to_thread(  # resizing up to max_image_pixels of images: off the event loop
                lambda: np.concatenate([to_model_input(np.asarray(v)[None], self.image_size) for v in values])
            )
            out = await self.infer({"images": x}, backend)
        elif kind == "text":
            if self.text_batcher is None:
                raise InferenceError(400, f"model {self.name!r} embeds {self.modality} only, not text")
            texts = check_texts(values, self.settings.max_text_chars)
            out = await self.text_batcher.submit({"text": np.array(texts, dtype=object)})
        else:
            raise ValueError(f"unknown input kind {kind!r}; valid: image, text")
        return to_space(out, self.how(space), space, self.space_dim(space))

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "modality": self.modality,
            "dim": self.dim,
            "space": self.space,
            "compatible": [
                {k: c.get(k) for k in ("space", "model", "method", "how", "dims")}
                for c in self.compatible.values()
            ],
            "backends": self.backends,
        }


# --- galleries --------------------------------------------------------------------------------------


def _demo_galleries() -> list[tuple[str, str]]:
    """``KILN_DEMO_GALLERIES`` ("name=model,..."; empty disables) → [(gallery, model)]."""
    raw = os.environ.get("KILN_DEMO_GALLERIES", "digits=embed-old,digits-xbt=xbt-old")
    out = []
    for part in filter(None, (p.strip() for p in raw.split(","))):
        name, sep, model = part.partition("=")
        if not sep or not name or not model:
            raise ValueError(f"KILN_DEMO_GALLERIES entry {part!r} must be NAME=MODEL, e.g. digits=embed-old")
        out.append((name.strip(), model.strip()))
    return out


DEMO_ITEMS = 100  # digits of the bundled test split in each demo gallery: cheap to embed at start-up


def _demo_digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` of sklearn's bundled digits (8×8, ink = 1), the same data the models train on."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images[-n:] / 16.0).astype(np.float32), d.target[-n:]


class _GalleryHost:
    """The process's galleries: opened at start-up when embedding models are loaded (one owner per Lite
    file: with several workers on Milvus Lite the gallery routes answer 503 and say what to do)."""

    def __init__(self, repo: ModelRepository):
        self.repo = repo
        self.galleries = None
        self.unavailable = ""

    def lookup(self, name: str) -> Embedder:
        return task_model(self.repo, Embedder, name, None)

    async def open(self) -> None:
        from serving.gallery.manager import Galleries
        from serving.gallery.store import MilvusStore, is_lite, milvus_uri

        if not any(isinstance(m, Embedder) for v in self.repo.models.values() for m in v.values()):
            self.unavailable = "no embedding model is loaded; galleries need one (KILN_MODELS)"
            return
        try:
            uri = milvus_uri()
        except OSError as exc:  # a read-only KILN_HOME: galleries 503 with the reason, the rest serves
            self.unavailable = f"galleries are off: the Milvus Lite file cannot be made ({exc}); {_RO_HINT}"
            log.error(self.unavailable)
            return
        workers = ServeConfig.from_env().workers
        if is_lite(uri) and workers > 1:
            self.unavailable = (
                f"galleries are off: Milvus Lite ({uri}) allows one process per file and this server runs "
                f"{workers} workers; serve with --workers 1, or set KILN_MILVUS_URI to a Milvus standalone"
            )
            log.warning(self.unavailable)
            return
        admin_token()  # made now, so the admin routes' token is on disk before the first call
        try:
            store = await asyncio.to_thread(MilvusStore, uri)
        except RuntimeError as exc:  # e.g. a Lite file another server holds: galleries 503, the rest serves
            self.unavailable = f"galleries are off: {exc}"
            log.error(self.unavailable)
            return
        except OSError as exc:  # the Lite file's lock or directory in a read-only KILN_HOME
            self.unavailable = f"galleries are off: {type(exc).__name__}: {exc}; {_RO_HINT}"
            log.error(self.unavailable)
            return
        self.galleries = Galleries(store, self.lookup, ray_address=os.environ.get("KILN_RAY_ADDRESS", ""))
        from bentoml._internal.context import server_context

        # On a shared Milvus with several workers, the first worker resumes backfills and makes the demo
        if getattr(server_context, "worker_index", None) in (None, 1):
            self.galleries.resume()
            await self._demo()
        log.info("galleries on %s: %s", uri, sorted(self.galleries.states))

    async def _demo(self) -> None:
        from serving.gallery.manager import Item

        for name, model in _demo_galleries():
            if name in self.galleries.states:
                continue
            if model not in self.repo.models:
                log.info("demo gallery %s skipped: model %s is not loaded", name, model)
                continue
            images, labels = _demo_digits(DEMO_ITEMS)
            await self.galleries.create(name, model)
            items = [
                Item(f"digit-{i:03d}", "image", img, {"label": int(y), "split": "demo"})
                for i, (img, y) in enumerate(zip(images, labels, strict=True))
            ]
            await self.galleries.upsert(name, items)
            log.info("demo gallery %s: %d digits embedded by %s", name, len(items), model)

    async def close(self) -> None:
        if self.galleries is not None:
            await self.galleries.close()
            self.galleries.store.close()

    def get(self):
        if self.galleries is None:
            raise InferenceError(503, self.unavailable or "galleries are starting")
        return self.galleries


# --- HTTP: OpenAI-compatible ---------------------------------------------------------------------------


class EmbeddingsRequest(BaseModel):
    model: str = Field(description="A Kiln embedding model, optionally @space: `xbt-new-text@xbt-old`.")
    input: str | list[str] | list[int] | list[list[int]] = Field(description="Text or texts to embed.")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32.")
    dimensions: int | None = Field(
        None, ge=1, description="Keep the first `dimensions` coordinates, re-normalised."
    )
    user: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kiln"


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class EmbedRequest(BaseModel):
    model: str = Field(description="A Kiln embedding model, optionally @space.")
    space: str = Field("", description="Target space (default: the model's own, or the one after @).")
    images: list[list[Any] | str] | None = Field(
        None, description="Images: H×W nested lists in [0, 1] (ink = 1) or base64 PNG/JPEG."
    )
    texts: list[str] | None = Field(None, description="Texts.")
    backend: str = Field("", description="Runtime for images (onnxruntime, pytorch...).")


class EmbedResponse(BaseModel):
    model: str
    version: str
    space: str
    how: str = Field(description="native, subspace (compatible part) or projection.")
    dim: int
    vectors: list[list[float]]


class GalleryCreate(BaseModel):
    model: str = Field(description="The embedding model that indexes the gallery (its native space).")


# Documented in the schema; checked by the gallery manager, whose 400 names the rule ("gallery name ...").
GalleryName = Annotated[
    str, Path(json_schema_extra={"pattern": KEY_PATTERN, "maxLength": MAX_NAME_LENGTH, "minLength": 1})
]
ItemId = Annotated[
    str, Path(json_schema_extra={"pattern": KEY_PATTERN, "maxLength": MAX_ID_LENGTH, "minLength": 1})
]


def _links(**targets: dict[str, str]) -> dict:
    """OpenAPI links of a gallery route's 200 answer (operation id → its parameters), so a client or a
    stateful fuzzer (schemathesis) can chain create → upsert → search → delete."""
    return {200: {"links": {op: {"operationId": op, "parameters": params} for op, params in targets.items()}}}


_SAME_GALLERY = {"name": "$request.path.name"}


def _write_scope(authorization: str | None = Header(None)) -> None:
    """The write check (serving.admin), run before the body is validated: 401 without a token, 403 wrong."""
    require_write(authorization)


class GalleryItem(BaseModel):
    id: str = Field(json_schema_extra={"pattern": KEY_PATTERN, "maxLength": MAX_ID_LENGTH, "minLength": 1})
    image: list[Any] | str | None = None
    text: str | None = None
    vector: list[float] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class GalleryItems(BaseModel):
    items: list[GalleryItem]


class GallerySearch(BaseModel):
    image: list[Any] | str | None = None
    text: str | None = None
    vector: list[float] | None = None
    k: int = Field(10, description="How many results, 1..1000.")
    filter: str = Field("", description='Milvus boolean expression over metadata: `metadata["label"] == 3`.')


class SearchHit(BaseModel):
    id: str
    score: float
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    results: list[SearchHit]
    model: str
    space: str
    how: str


class UpgradeRequest(BaseModel):
    model: str


class BackfillRequest(BaseModel):
    batch_size: int = Field(256, ge=1, le=4096, description="Items re-embedded and flushed per batch.")
    pause_ms: float = Field(0.0, ge=0, le=60_000, description="Pause between batches (a gentle backfill).")


def _one_query(body, what: str) -> tuple[str, Any]:
    given = [(k, getattr(body, k)) for k in ("image", "text", "vector") if getattr(body, k) is not None]
    if len(given) != 1:
        raise InferenceError(400, f"{what}: give exactly one of `image`, `text`, `vector`")
    kind, value = given[0]
    if kind == "text" and not value.strip():
        raise InferenceError(400, f"{what}: `text` is empty")
    if kind == "vector":
        if not value:
            raise InferenceError(400, f"{what}: `vector` is empty")
        value = np.asarray(value, dtype=np.float32)
    if kind == "image":
        value = decode_image(value)
    return kind, value


def _split_model(spec: str) -> tuple[str, str]:
    name, _, space = spec.partition("@")
    return name, space


# One host per repository, keyed by the repository itself: an id() key could be reused by a later one.
_HOSTS: weakref.WeakKeyDictionary[ModelRepository, _GalleryHost] = weakref.WeakKeyDictionary()


def _host(repo: ModelRepository) -> _GalleryHost:
    """The repository's galleries, one host shared by its routes and its tools (opened by the router)."""
    host = _HOSTS.get(repo)
    if host is None:
        host = _HOSTS[repo] = _GalleryHost(repo)
    return host


def _embedder(repo: ModelRepository, spec: str, labels: dict) -> tuple[Embedder, str]:
    name, space = _split_model(spec)
    served = task_model(repo, Embedder, name, None)
    labels.update(model=served.name, version=served.version, backend=served.backends[0])
    return served, served.resolve_space(space)


async def embed_request(repo: ModelRepository, req: EmbedRequest) -> EmbedResponse:
    """``POST /embed`` (and the ``embed`` tool): images or texts → vectors in the model's or an old space."""
    with observed() as labels:
        served, space = _embedder(repo, req.model, labels)
        space = served.resolve_space(req.space or space)
        if (req.images is None) == (req.texts is None):
            raise InferenceError(400, "give exactly one of `images` or `texts`")
        values = req.images if req.images is not None else req.texts
        if not values:
            raise InferenceError(400, "nothing to embed: the list is empty")
        if len(values) > MAX_INPUTS:
            raise InferenceError(400, f"{len(values)} inputs; at most {MAX_INPUTS} per request")
        if req.images is not None:
            backend = served.resolve_backend(req.backend or None)
            # the pixel budget from the headers first, then the decoding, off the event loop
            images = await decode_images(values, served.settings.max_image_pixels, "images")
            z = await served.embed("image", images, space, backend)
        else:
            z = await served.embed("text", check_texts(values, served.settings.max_text_chars), space)
    return EmbedResponse(
        model=served.name,
        version=served.version,
        space=space,
        how=served.how(space),
        dim=z.shape[1],
        vectors=z.tolist(),
    )


class GallerySearchTool(GallerySearch):
    """A gallery search as a tool call: the gallery's name travels in the body."""

    gallery: str = Field(description="The gallery to search (e.g. the demo gallery `digits`).")


async def search_gallery(repo: ModelRepository, name: str, req: GallerySearch) -> SearchResponse:
    """``POST /galleries/{name}/search`` (and the ``search_gallery`` tool)."""
    g = _host(repo).get()
    kind, value = _one_query(req, "query")
    hits, state = await g.search(name, kind, value, req.k, req.filter)
    return SearchResponse(
        results=[SearchHit(**h) for h in hits],
        model=state["model"],
        space=state["space"],
        how=state["how"],
    )


def tools(repo: ModelRepository) -> list[Tool]:
    """The task's tools slot: ``embed`` and ``search_gallery`` for the agent and MCP clients, with the
    request models their HTTP routes validate with."""

    async def embed_handler(req: EmbedRequest) -> EmbedResponse:
        return await embed_request(repo, req)

    async def search_handler(req: GallerySearchTool) -> SearchResponse:
        return await search_gallery(repo, req.gallery, req)

    return [
        Tool(
            name="embed",
            description="Embed images (H×W lists in [0, 1] or base64 PNG) or texts with a Kiln embedding "
            "model; `model@space` (or `space`) writes into an old model's space for backward-compatible "
            "search. Returns L2-normalised vectors.",
            request_model=EmbedRequest,
            handler=embed_handler,
        ),
        Tool(
            name="search_gallery",
            description="Search a Milvus gallery for the k items nearest an image, a text or a vector, "
            "embedded by the gallery's active model; `filter` is a Milvus expression over item metadata "
            '(e.g. `metadata["label"] == 3`). Returns ids, scores and metadata.',
            request_model=GallerySearchTool,
            handler=search_handler,
        ),
    ]


def router(repo: ModelRepository) -> APIRouter:
    host = _host(repo)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await host.open()
        yield
        await host.close()

    api = APIRouter(tags=["embedding"], lifespan=lifespan)

    def embedder(spec: str, labels: dict) -> tuple[Embedder, str]:
        return _embedder(repo, spec, labels)

    @api.post("/v1/embeddings", response_model=EmbeddingsResponse)
    async def embeddings(req: EmbeddingsRequest) -> EmbeddingsResponse | JSONResponse:
        """OpenAI-compatible text embeddings (errors in OpenAI's shape, so its clients show the message)."""
        try:
            return await _embeddings(req)
        except InferenceError as exc:
            kind = {401: "authentication_error", 404: "not_found_error"}.get(
                exc.status, "invalid_request_error"
            )
            return JSONResponse(
                {"error": {"message": exc.message, "type": kind, "param": None, "code": None}},
                status_code=exc.status,
            )

    async def _embeddings(req: EmbeddingsRequest) -> EmbeddingsResponse:
        with observed() as labels:
            served, space = embedder(req.model, labels)
            texts = [req.input] if isinstance(req.input, str) else req.input
            if not texts:
                raise InferenceError(400, "`input` is empty")
            if not all(isinstance(t, str) for t in texts):
                raise InferenceError(400, "`input` as token ids is not supported; send strings")
            if len(texts) > MAX_INPUTS:
                raise InferenceError(400, f"{len(texts)} inputs; at most {MAX_INPUTS} per request")
            texts = check_texts(texts, served.settings.max_text_chars, "`input`")
            z = await served.embed("text", texts, space)
            if req.dimensions is not None:
                if req.dimensions > z.shape[1]:
                    raise InferenceError(
                        400, f"dimensions={req.dimensions} is over space {space!r}'s {z.shape[1]}"
                    )
                z = _normalize(z[:, : req.dimensions])
        data = [
            EmbeddingData(
                index=i,
                embedding=base64.b64encode(v.astype("<f4").tobytes()).decode()
                if req.encoding_format == "base64"
                else v.tolist(),
            )
            for i, v in enumerate(z)
        ]
        words = sum(len(t.split()) for t in texts)  # "tokens" = whitespace words (no shared tokenizer)
        return EmbeddingsResponse(
            data=data, model=req.model, usage=Usage(prompt_tokens=words, total_tokens=words)
        )

    @api.get("/v1/models", response_model=OpenAIModelList)
    async def openai_models() -> OpenAIModelList:
        """The embedding models, in the OpenAI list format."""
        out = []
        for versions in repo.models.values():
            for m in versions.values():
                if isinstance(m, Embedder) and m.version == repo.default_versions[m.name]:
                    out.append(OpenAIModel(id=m.name, created=int(m.artifact.path.stat().st_mtime)))
        return OpenAIModelList(data=sorted(out, key=lambda m: m.id))

    @api.get("/embedding-models")
    async def embedding_models() -> dict:
        """Each embedding model's modality, dimension, native space and compatible (old) spaces."""
        return {
            "models": [
                m.describe()
                for name in sorted(repo.models)
                for m in [repo.get(name)]
                if isinstance(m, Embedder)
            ]
        }

    @api.post("/embed", response_model=EmbedResponse)
    async def embed(req: EmbedRequest) -> EmbedResponse:
        """Images or texts → L2-normalised vectors in the model's space or a compatible old space."""
        return await embed_request(repo, req)

    # --- galleries ----------------------------------------------------------------------------------

    @api.post(
        "/galleries/{name}",
        dependencies=[Depends(_write_scope)],
        operation_id="create_gallery",
        responses=_links(
            upsert_gallery_items=_SAME_GALLERY,
            search_gallery=_SAME_GALLERY,
            describe_gallery=_SAME_GALLERY,
            drop_gallery=_SAME_GALLERY,
        ),
    )
    async def create_gallery(name: GalleryName, req: GalleryCreate) -> dict:
        """Create a gallery indexed by `model` (idempotent for the same model)."""
        g = host.get()
        _, created = await g.create(name, req.model)
        return {**(await asyncio.to_thread(g.describe, name)), "created": created}

    @api.get("/galleries/{name}", operation_id="describe_gallery")
    async def describe_gallery(name: GalleryName) -> dict:
        """Active query model and space, items per space, backfill progress."""
        g = host.get()
        g.state(name)
        return await asyncio.to_thread(g.describe, name)

    @api.get("/galleries")
    async def list_galleries() -> dict:
        g = host.get()
        return {"galleries": sorted(g.states)}

    @api.post(
        "/galleries/{name}/items",
        dependencies=[Depends(_write_scope)],
        operation_id="upsert_gallery_items",
        responses=_links(
            delete_gallery_item={**_SAME_GALLERY, "item_id": "$response.body#/ids/0"},
            search_gallery=_SAME_GALLERY,
        ),
    )
    async def upsert_items(name: GalleryName, req: GalleryItems) -> dict:
        """Upsert items (an existing id is replaced); answers once they are flushed to Milvus."""
        from serving.gallery.manager import MAX_ITEMS, Item

        g = host.get()
        # Budgets before work (issue 16): the item count, then the images' pixels from their headers;
        # the items are decoded off the event loop.
        if len(req.items) > MAX_ITEMS:
            raise InferenceError(400, f"{len(req.items)} items in one request; at most {MAX_ITEMS}")
        budget = g.lookup(g.state(name)["model"]).settings.max_image_pixels
        await check_image_budget([it.image for it in req.items if it.image is not None], budget, "items")

        def decode() -> list[Item]:
            items = []
            for i, it in enumerate(req.items):
                kind, value = _one_query(it, f"items[{i}] ({it.id!r})")
                items.append(Item(it.id, kind, value, it.metadata))
            return items

        items = await asyncio.to_thread(decode)
        n = await g.upsert(name, items)
        return {"upserted": n, "ids": [it.id for it in items]}

    @api.delete(
        "/galleries/{name}/items/{item_id}",
        dependencies=[Depends(_write_scope)],
        operation_id="delete_gallery_item",
        responses=_links(describe_gallery=_SAME_GALLERY, search_gallery=_SAME_GALLERY),
    )
    async def delete_item(name: GalleryName, item_id: ItemId) -> dict:
        g = host.get()
        await g.delete(name, item_id)
        return {"deleted": item_id}

    @api.post("/galleries/{name}/search", response_model=SearchResponse, operation_id="search_gallery")
    async def search(name: GalleryName, req: GallerySearch) -> SearchResponse:
        """Top-k items for an image, text or vector query, embedded by the gallery's active model."""
        return await search_gallery(repo, name, req)

    @api.post("/galleries/{name}/upgrade")
    async def upgrade(
        name: GalleryName, req: UpgradeRequest, authorization: str | None = Header(None)
    ) -> dict:
        """Admin: query with a compatible new model now — zero items re-embedded."""
        require_admin(authorization)
        g = host.get()
        started = time.perf_counter()
        await g.upgrade(name, req.model)
        seconds = round(time.perf_counter() - started, 4)
        return {**(await asyncio.to_thread(g.describe, name)), "seconds": seconds, "reembedded": 0}

    @api.post("/galleries/{name}/backfill")
    async def backfill(
        name: GalleryName, req: BackfillRequest | None = None, authorization: str | None = Header(None)
    ) -> dict:
        """Admin: start re-embedding the items with the active model (resumable; progress in GET)."""
        require_admin(authorization)
        g = host.get()
        req = req or BackfillRequest()
        await g.start_backfill(name, batch_size=req.batch_size, pause_ms=req.pause_ms)
        return await asyncio.to_thread(g.describe, name)

    @api.post("/galleries/{name}/rollback")
    async def rollback(name: GalleryName, authorization: str | None = Header(None)) -> dict:
        """Admin: back to the previous query model and space (a running backfill is discarded)."""
        require_admin(authorization)
        g = host.get()
        await g.rollback(name)
        return await asyncio.to_thread(g.describe, name)

    @api.delete(
        "/galleries/{name}", operation_id="drop_gallery", responses=_links(describe_gallery=_SAME_GALLERY)
    )
    async def drop_gallery(name: GalleryName, authorization: str | None = Header(None)) -> dict:
        """Admin: delete the gallery and its collections."""
        require_admin(authorization)
        g = host.get()
        await g.drop(name)
        return {"deleted": name}

    return api
