"""The gallery backfill as a distributed Ray Data job (optional extra: ``pip install 'kiln[ray]'``).

Used when ``KILN_RAY_ADDRESS`` is set (``local`` starts a Ray instance in this process; ``ray://host:10001``
or ``auto`` joins a cluster); ``KILN_RAY_ACTORS`` sets how many model replicas embed in parallel.

The job is ``map_batches`` over the gallery's items: each Ray actor loads the new model from the model
store (``KILN_HOME``, which every node must reach — a shared volume or the same image) and embeds a batch
of the items' stored raw inputs; the batches come back in cursor order (``preserve_order``) and the
gallery writes them to Milvus, flushes, and saves the cursor — the same resumable path as the in-process
backfill, so a job interrupted by kill -9 resumes from its cursor.

Why the driver writes: Milvus Lite allows one process per file, so Ray workers cannot open it; and the
driver's single writer keeps the cursor exact. On Milvus standalone the write is a fraction of the cost
(embedding dominates), which is the part Ray spreads over the cluster.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from serving.gallery.store import MilvusStore, decode_source

READ_CHUNK = 4096  # rows the driver reads from Milvus at a time to build the dataset


class EmbedBatch:
    """A Ray Data actor: loads the model artifact once, embeds batches of stored sources natively."""

    def __init__(self, tag: str, threads: int = 1):
        from kiln.artifacts import get_artifact
        from serving.runtime import available_backends, load_runtime
        from serving.tasks.embedding import TextRuntime

        self.art = get_artifact(tag)
        e = self.art.manifest["embedding"]
        self.dim, self.space, self.modality = int(e["dim"]), e.get("space") or self.art.name, e["modality"]
        self.image = self.text = None
        if "image" in self.modality:
            status = available_backends(self.art)
            backend = "onnxruntime" if not status["onnxruntime"] else "pytorch"
            self.image = load_runtime(self.art, backend, threads)
            self.size = tuple(self.art.manifest["preprocess"]["size"])
        if "text" in self.modality:
            self.text = TextRuntime(self.art, "pytorch", threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from kiln.imaging import to_model_input
        from serving.tasks.embedding import to_space

        decoded = [decode_source(s) for s in batch["source"]]
        out = np.zeros((len(decoded), self.dim), dtype=np.float32)
        for kind in ("image", "text"):
            idx = [i for i, (k, _) in enumerate(decoded) if k == kind]
            if not idx:
                continue
            if kind == "image":
                x = np.concatenate([to_model_input(decoded[i][1][None], self.size) for i in idx])
                raw = self.image.run({"images": x})
            else:
                raw = self.text.run({"text": np.array([decoded[i][1] for i in idx], dtype=object)})
            out[idx] = to_space(raw, "native", self.space, self.dim)
        return {"id": batch["id"], "source": batch["source"], "vector": out}


def _init_ray(address: str) -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError(
            "KILN_RAY_ADDRESS is set but Ray is not installed: pip install 'kiln[ray]' (or unset it for the "
            "in-process backfill)"
        ) from exc
    if not ray.is_initialized():
        env = {k: os.environ[k] for k in ("KILN_HOME", "BENTOML_HOME") if k in os.environ}
        ray.init(
            address=None if address == "local" else address,
            runtime_env={"env_vars": env},
            include_dashboard=False,
            log_to_driver=False,
            ignore_reinit_error=True,
        )
    return ray


def embedded_batches(
    store: MilvusStore, collection: str, ids: list[str], model: Any, batch_size: int, address: str
) -> Iterator[tuple[list[str], dict[str, tuple[str, np.ndarray]]]]:
    """Yield (ids, {id: (source embedded, vector)}) per batch, in ``ids`` order, embedded on Ray."""
    if not ids:
        return
    ray = _init_ray(address)
    rows: list[dict] = []
    for i in range(0, len(ids), READ_CHUNK):
        got = {r["id"]: r["source"] for r in store.get(collection, ids[i : i + READ_CHUNK], ["source"])}
        rows += [{"id": k, "source": got[k]} for k in ids[i : i + READ_CHUNK] if k in got]
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # batches return in cursor order
    # KILN_RAY_ACTORS: model replicas embedding in parallel (default: one per CPU of the cluster)
    workers = int(os.environ.get("KILN_RAY_ACTORS") or max(1, int(ray.available_resources().get("CPU", 1))))
    ds = ray.data.from_items(rows).map_batches(
        EmbedBatch,
        fn_constructor_kwargs={"tag": model.artifact.tag},
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=workers,
    )
    for out in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        chunk = [str(i) for i in out["id"]]
        yield chunk, {i: (str(s), v) for i, s, v in zip(chunk, out["source"], out["vector"], strict=True)}
