"""Retrieval embeddings, backward-compatible training (task ``embedding``): old, independent, BCT, BT², OCA.

Protocol of BT² (Zhou et al., ICCV 2023) scaled to the bundled digits: the old model is trained on half
the classes (0-4), every new model on all ten. The compatible methods make a new model's embeddings
comparable with the old model's, so a gallery embedded by the old model can be searched with new-model
queries (no backfill):

* BCT (Shen et al., "Towards Backward-Compatible Representation Learning", CVPR 2020, eq. 3): the new
  embedding also passes through the *frozen old classifier* (influence loss). New classes have no old
  classifier row; as BCT §3.2 they get the mean old-model embedding of their training images.
* BT² (Zhou et al., ICCV 2023, eq. 5, as the official ``TransferTrainer`` computes it): the new feature
  ``f`` (before the change of basis) carries the new model's CE and λ1 (1 − cos(f, f_independent)); the
  served ``z = B·[extra; C·f]`` (``model_zoo.embedding.BT2BasisChange``) carries, on its compatible part
  ``z[:d_old]``, λ2 CE(normalize(z[:d_old]) · pseudo-classifierᵀ) and λ3 (1 − cos(z[:d_old], z_old)).
  The pseudo-classifier is the per-class mean of the old model's (normalised) features over the new
  training set, un-normalised, logits unscaled (official ``train_feature_transfer.py``). λ = (1, 10, 10):
  the official trainer weights the old-feature cosine 10, where the paper's configs list λ3 = 5.
* OCA (Ricci et al. 2024): L2-normalised old+extra feature, orthogonal layer before the classifier;
  loss = 5 CE + 10 CE(z[:d_old] · old prototypes) + 5 (1 − cos(old prototype of y, z[:d_old])).

The evaluation (:func:`compatibility_table`) follows BT²: a fixed query/gallery split of the test
images; top-1, top-5 and mAP of cosine retrieval for old/old, new/old (new queries vs old gallery) and
new/new. Choices are made on the validation split; the test split is only reported.

The artifact holds the final weights (Adam, cosine decay to 0, as BT²) with BT²'s and OCA's orthogonal
layers baked into plain linear layers (``orthogonal_param=False``), so the served graph is plain MatMuls.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.model_selection import train_test_split
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from kiln.artifacts import Artifact, ArtifactError, get_artifact, load_torch_model, save_artifact
from model_zoo import create_model
from model_zoo.embedding import BT2EmbeddingNet, rebase_orthogonal
from training.data import ImageData, image_data, split_inputs
from training.recipes import EmbeddingRecipe
from training.trainer import TrainResult, lr_at, run_dir, training_block

METHODS = ("old", "independent", "bct", "bt2", "oca")
# BT²: (λ1 independent, λ2 old pseudo-classifier, λ3 old feature) as the official trainer hard-codes them
DEFAULT_LOSS_WEIGHTS = {"bct": (1.0,), "bt2": (1.0, 10.0, 10.0), "oca": (5.0, 10.0, 5.0)}
GALLERY_SEED = 0


# ----------------------------------------------------------------------------------------- data


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random affine jitter per image: ±10° rotation, ±10% scale, ±1 px shift at 16 px."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (1 / 8)  # normalised coords: 1 px of 16
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def split_tensors(split: str, image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = split_inputs(split, tuple(image_size))
    return torch.from_numpy(x), torch.from_numpy(y)


def query_gallery(
    split: str, image_size: tuple[int, int] = (16, 16), source: ImageData | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A fixed, stratified half/half query/gallery division of a split's images (BT²'s protocol); the
    digits', or ``source``'s (a user's ImageFolder, already at ``image_size``)."""
    x, y = source.inputs[split] if source is not None else split_inputs(split, tuple(image_size))
    q, g = train_test_split(np.arange(len(y)), test_size=0.5, stratify=y, random_state=GALLERY_SEED)
    return {"query": (x[q], y[q]), "gallery": (x[g], y[g])}


# ------------------------------------------------------------------------------------ metrics


@torch.no_grad()
def embed_images(
    model: torch.nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 256
) -> np.ndarray:
    """L2-normalised embeddings of ``(N, 1, H, W)`` images (the model's served output)."""
    model.eval()
    x = torch.as_tensor(images)
    out = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def to_space(emb: np.ndarray, dims: int | None) -> np.ndarray:
    """The subspace rule: the first ``dims`` coordinates, re-normalised (``None`` = all)."""
    e = emb if dims is None else emb[:, :dims]
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def retrieval_metrics(
    query: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray
) -> dict[str, float]:
    """Top-1, top-5 (a same-class item among the k nearest) and mAP of cosine retrieval, in percent."""
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query dim {query.shape[1]} != gallery dim {gallery.shape[1]}")
    sims = query @ gallery.T
    order = np.argsort(-sims, axis=1, kind="stable")
    match = gallery_labels[order] == query_labels[:, None]  # (Q, G) relevance in rank order
    top1 = match[:, 0].mean()
    top5 = match[:, :5].any(1).mean()
    hits = np.cumsum(match, axis=1)
    ranks = np.arange(1, match.shape[1] + 1)
    ap = (match * hits / ranks).sum(1) / np.maximum(match.sum(1), 1)
    return {"top1": 100 * float(top1), "top5": 100 * float(top5), "map": 100 * float(ap.mean())}


def compatibility_table(
    old: torch.nn.Module,
    new: torch.nn.Module | None,
    compat_dims: int | None,
    split: str = "test",
    image_size: tuple[int, int] = (16, 16),
    source: ImageData | None = None,
) -> dict[str, dict[str, float]]:
    """BT²'s cases on ``split``: old/old, and with a new model new/old (its first ``compat_dims`` dims
    against the old gallery) and new/new."""
    qg = query_gallery(split, image_size, source)
    (xq, yq), (xg, yg) = qg["query"], qg["gallery"]
    old_q, old_g = embed_images(old, xq), embed_images(old, xg)
    table = {"old/old": retrieval_metrics(old_q, yq, old_g, yg)}
    if new is not None:
        new_q, new_g = embed_images(new, xq), embed_images(new, xg)
        table["new/old"] = retrieval_metrics(to_space(new_q, compat_dims), yq, old_g, yg)
        table["new/new"] = retrieval_metrics(new_q, yq, new_g, yg)
    return table


# ------------------------------------------------------------------------------------- losses


def old_prototypes(
    old: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, renormalize: bool = True
) -> torch.Tensor:
    """Mean L2-normalised old-model embedding per class, re-normalised unless ``renormalize=False``
    (BT²'s pseudo-classifier keeps the plain means): ``(num_classes, d_old)``."""
    with torch.no_grad():
        z = torch.from_numpy(embed_images(old, x))
    protos = torch.stack([z[y == c].mean(0) for c in range(num_classes)])
    return F.normalize(protos, dim=-1) if renormalize else protos


def extended_old_classifier(old: torch.nn.Module, protos: torch.Tensor) -> torch.Tensor:
    """BCT §3.2: the frozen old classifier's rows for old classes, old-embedding prototypes for the rest."""
    w = F.normalize(old.head.weight.detach(), dim=-1)
    return torch.cat([w, protos[w.shape[0] :]])


def influence_loss(
    z_compat: torch.Tensor, y: torch.Tensor, old_weight: torch.Tensor, scale: float
) -> torch.Tensor:
    """CE of the compatible embedding through the (frozen, extended) old cosine classifier (BCT eq. 3)."""
    logits = scale * F.normalize(z_compat, dim=-1) @ old_weight.T
    return F.cross_entropy(logits, y)


def bt2_losses(
    f: torch.Tensor,
    z: torch.Tensor,
    logits: torch.Tensor,
    y: torch.Tensor,
    f_ref: torch.Tensor,
    z_old: torch.Tensor,
    pseudo_classifier: torch.Tensor,
    d_old: int,
) -> dict[str, torch.Tensor]:
    """BT²'s terms (eq. 5; official ``TransferTrainer.train``), each where the official code puts it.

    Args:
        f: the new feature before the change of basis (normalised); ``logits`` are the classifier's on it.
        z: the served embedding after the change of basis; its first ``d_old`` coordinates are compatible.
        f_ref: the independently trained new model's embedding of the same images.
        z_old: the old model's embedding of the same images.
        pseudo_classifier: per-class mean old embeddings ``(num_classes, d_old)``, not re-normalised.
    """
    zc = F.normalize(z[:, :d_old], dim=-1)
    return {
        "ce": F.cross_entropy(logits, y),  # the new model's own classification loss, on f
        "independent": (1 - F.cosine_similarity(f, f_ref, dim=-1)).mean(),  # λ1 term, on f
        "old_classifier": F.cross_entropy(zc @ pseudo_classifier.T, y),  # λ2 term: unscaled logits
        "old_feature": (1 - F.cosine_similarity(zc, z_old, dim=-1)).mean(),  # λ3 term
    }


def oca_losses(
    z: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, protos: torch.Tensor, d_old: int, scale: float
) -> dict[str, torch.Tensor]:
    """OCA's terms: CE after the orthogonal layer, CE against old prototypes, 1 − cos to own prototype."""
    zc = F.normalize(F.normalize(z, dim=-1)[:, :d_old], dim=-1)  # compatible part of the un-rotated feature
    return {
        "ce": F.cross_entropy(logits, y),
        "prototype_ce": F.cross_entropy(scale * zc @ protos.T, y),
        "prototype_cos": (1 - (zc * protos[y]).sum(-1)).mean(),
    }


# ------------------------------------------------------------------------------------ trainer


@dataclass
class _Frozen:
    """What a compatible method reads from other models, computed once."""

    old: torch.nn.Module | None = None
    reference: torch.nn.Module | None = None
    protos: torch.Tensor | None = None
    old_weight: torch.Tensor | None = None
    pseudo: torch.Tensor | None = None  # BT²'s pseudo-classifier
    old_art: Artifact | None = None


def _first_per_class(y: torch.Tensor, k: int) -> torch.Tensor:
    """A mask of ``k`` images of each class, the same for every seed and method (a fixed permutation,
    ``GALLERY_SEED``), so that seeds vary only the training and methods compare on the same images."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(GALLERY_SEED))
    mask = torch.zeros(len(y), dtype=torch.bool)
    for c in y.unique():
        mask[order[y[order] == c][:k]] = True
    return mask


def require_artifact(name: str) -> Artifact:
    """The latest stored artifact ``name``; trains its registered recipe first if the store has none."""
    try:
        return get_artifact(name)
    except ArtifactError:
        from training.recipes import RECIPES
        from training.trainer import train

        if name not in RECIPES:
            raise
        print(f"{name} is not in the model store; training it first (kiln train {name})")
        return train(name).artifact


def train_embedding(
    name: str, recipe: EmbeddingRecipe, *, epochs: int, seed: int = 0, progress: bool = True
) -> TrainResult:
    """Train one embedding recipe on its dataset and save it as artifact ``name``.

    A user's ImageFolder (``recipe.dataset``) trains the ``old`` / ``independent`` methods on all its
    classes, on luminance (the served embedding routes decode grayscale images).
    """
    if recipe.method not in METHODS:
        raise ValueError(f"unknown method {recipe.method!r}; valid: {list(METHODS)}")
    if recipe.method in ("bct", "bt2", "oca") and not recipe.old_model:
        raise ValueError(f"{name}: method {recipe.method!r} needs old_model")
    if recipe.method == "bt2" and not recipe.reference_model:
        raise ValueError(f"{name}: BT² needs reference_model (the independently trained new model)")
    source, classes, args = None, recipe.classes, dict(recipe.model_args)
    if recipe.dataset != "digits":
        source, classes, args = _user_data(name, recipe, progress)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if source is None:
        x_all, y_all = split_tensors("train", recipe.image_size)
    else:
        x_all, y_all = (torch.from_numpy(a) for a in source.inputs["train"])
    keep = torch.isin(y_all, torch.tensor(classes))
    if recipe.train_per_class > 0:
        keep &= _first_per_class(y_all, recipe.train_per_class)
    x_train, y_train = x_all[keep], y_all[keep]

    model = create_model(recipe.architecture, **args)
    d_old = model.compat_dim
    weights = recipe.loss_weights or DEFAULT_LOSS_WEIGHTS.get(recipe.method, ())
    frozen = _Frozen()
    if recipe.old_model:
        frozen.old_art = require_artifact(recipe.old_model)
        frozen.old = load_torch_model(frozen.old_art)
        old_dim = frozen.old_art.manifest["embedding"]["dim"]
        if d_old != old_dim:
            raise ValueError(f"{name}: compat_dim {d_old} != {recipe.old_model}'s dimension {old_dim}")
        frozen.protos = old_prototypes(frozen.old, x_train, y_train, model.num_classes)
        frozen.old_weight = extended_old_classifier(frozen.old, frozen.protos)
    if recipe.method == "bt2":
        if not isinstance(model, BT2EmbeddingNet):
            raise ValueError(
                f"{name}: method 'bt2' needs a BT² architecture (e.g. embed_bt2_ortho_cnn_base), "
                f"not {recipe.architecture!r}"
            )
        frozen.pseudo = old_prototypes(frozen.old, x_train, y_train, model.num_classes, renormalize=False)
    if recipe.reference_model:
        ref_art = require_artifact(recipe.reference_model)
        frozen.reference = load_torch_model(ref_art)
        ref_dim = ref_art.manifest["embedding"]["dim"]
        if recipe.method == "bt2" and ref_dim != model.new_dim:
            raise ValueError(
                f"{name}: new_dim {model.new_dim} != {recipe.reference_model}'s dimension {ref_dim} "
                "(BT²'s λ1 term compares the new feature with the independent model's)"
            )
    scale = 16.0  # the cosine classifiers' scale (model_zoo.embedding.CosineClassifier)

    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / recipe.batch_size)
    total_steps = epochs * steps_per_epoch
    run_path = run_dir(name)
    t0, step = time.perf_counter(), 0
    bar = tqdm(range(epochs), desc=f"train {name}", unit="epoch", disable=not progress)
    history: list[dict[str, float]] = []
    for _ in bar:
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        sums: dict[str, float] = {}
        for i in range(0, len(order), recipe.batch_size):
            idx = order[i : i + recipe.batch_size]
            xb = augment(x_train[idx], gen) if recipe.augment else x_train[idx]
            yb = y_train[idx]
            if recipe.method != "bt2":
                z = model.embedding(xb)
                logits = model.head(z)
            if recipe.method in ("old", "independent"):
                terms = {"ce": F.cross_entropy(logits, yb)}
                loss = terms["ce"]
            elif recipe.method == "bct":
                terms = {
                    "ce": F.cross_entropy(logits, yb),
                    "influence": influence_loss(z, yb, frozen.old_weight, scale),
                }
                loss = terms["ce"] + weights[0] * terms["influence"]
            elif recipe.method == "bt2":
                f, z = model.bt2_features(xb)  # f before, z after the change of basis
                with torch.no_grad():
                    f_ref, z_old = frozen.reference(xb), frozen.old(xb)
                terms = bt2_losses(f, z, model.head(f), yb, f_ref, z_old, frozen.pseudo, d_old)
                l1, l2, l3 = weights
                loss = (
                    terms["ce"]
                    + l1 * terms["independent"]
                    + l2 * terms["old_classifier"]
                    + l3 * terms["old_feature"]
                )
            else:  # oca
                terms = oca_losses(z, logits, yb, frozen.protos, d_old, scale)
                w_ce, w_pce, w_cos = weights
                loss = w_ce * terms["ce"] + w_pce * terms["prototype_ce"] + w_cos * terms["prototype_cos"]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, 0, recipe.lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rebase_orthogonal(model)  # keeps matrix_exp accurate (model_zoo.embedding.rebase_orthogonal)
            step += 1
            for k, v in {"loss": loss, **terms}.items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(idx)
        history.append({k: v / len(order) for k, v in sums.items()})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    seconds = time.perf_counter() - t0
    model.eval()

    # bake the orthogonal weights in (BT²'s basis transform, OCA's layer): the artifact holds plain layers
    baked = False
    for module in model.modules():
        if parametrize.is_parametrized(module):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            baked = True
    args = dict(model.kiln_config["args"])
    if baked:
        args["orthogonal_param"] = False

    metrics: dict[str, float] = {"train_seconds": round(seconds, 1)}
    for split in ("val", "test"):
        if frozen.old is None:  # old or independent: its own retrieval
            table = {
                "self": compatibility_table(model, None, None, split, recipe.image_size, source)["old/old"]
            }
        else:
            table = compatibility_table(frozen.old, model, d_old, split, recipe.image_size)
        for case, m in table.items():
            for k, v in m.items():
                metrics[f"{split}_{case.replace('/', '_')}_{k}"] = round(v, 2)

    weights_path = run_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights_path))
    compatible = []
    if frozen.old_art is not None:
        compatible.append(
            {
                "space": frozen.old_art.manifest["embedding"]["space"],
                "model": frozen.old_art.name,
                "version": frozen.old_art.version,
                "method": recipe.method,
                "how": "subspace",
                "dims": d_old,
            }
        )
    manifest = {
        "architecture": recipe.architecture,
        "args": args,
        "task": recipe.task,
        "embedding": {
            "modality": "image",
            "dim": model.embed_dim,
            "space": name,
            "normalized": True,
            "compatible": compatible,
        },
        "labels": source.labels if source is not None else [str(c) for c in recipe.classes],
        "preprocess": {
            "kind": "grayscale-image",
            "size": list(recipe.image_size),
            "value_range": [0.0, 1.0],
            "note": "ink = 1, background = 0; any H×W is resized bilinearly (half-pixel centres)",
        },
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 1, *recipe.image_size]}],
        "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, model.embed_dim]}],
        "metrics": {**metrics, "parameters": sum(p.numel() for p in model.parameters())},
        **({"data": source.record} if source is not None else {}),
        "training": training_block(
            name,
            recipe,
            epochs=epochs,
            seed=seed,
            path=run_path,
            loss_weights=list(weights),
            old_model=frozen.old_art.tag if frozen.old_art else None,
            final_losses=history[-1],
        ),
    }
    artifact = save_artifact(name, weights_path, manifest, labels={"task": recipe.task})
    headline = {k: v for k, v in metrics.items() if k.startswith("val_") and k.endswith("top1")}
    return TrainResult(artifact, seconds, headline)


def _user_data(name: str, recipe: EmbeddingRecipe, progress: bool) -> tuple[ImageData, tuple[int, ...], dict]:
    """A user's ImageFolder for ``old`` / ``independent``: its data, all its classes, the model's args."""
    if recipe.method not in ("old", "independent"):
        raise ValueError(
            f"{name}: --data trains the old / independent embedding methods (embed-old, "
            f"embed-new-independent); {recipe.method!r} is compatible with an old model trained on digits"
        )
    if recipe.channels not in (0, 1):
        raise ValueError(
            f"{name}: the embedding routes decode grayscale images; --channels {recipe.channels} is not "
            "supported (colour images are trained on as luminance)"
        )
    source = image_data(recipe.dataset, recipe.image_size, channels=1, progress=progress)
    for split in ("val", "test"):  # the query/gallery halves need two images of each class
        counts = np.bincount(source.inputs[split][1], minlength=len(source.labels))
        if counts.min() < 2:
            few = source.labels[int(counts.argmin())]
            raise ValueError(
                f"{name}: class {few!r} has {counts.min()} {split}-split image(s); retrieval's "
                "query/gallery halves need two (about 10 images a class)"
            )
    classes = tuple(range(len(source.labels)))
    return source, classes, {**recipe.model_args, "num_classes": len(classes)}


TINY_RECIPES: dict[str, EmbeddingRecipe] = {
    "tiny-embed-old": EmbeddingRecipe(
        architecture="embed_cnn_small",
        method="old",
        classes=(0, 1, 2, 3, 4),
        epochs=8,
        lr=3e-3,
        model_args={"widths": (8, 16), "embed_dim": 8},
    ),
    "tiny-embed-new-independent": EmbeddingRecipe(
        architecture="embed_cnn_base",
        method="independent",
        epochs=4,
        lr=3e-3,
        model_args={"widths": (8, 16), "embed_dim": 12},
    ),
    "tiny-embed-new-bct": EmbeddingRecipe(
        architecture="embed_cnn_base",
        method="bct",
        old_model="tiny-embed-old",
        epochs=4,
        lr=3e-3,
        model_args={"widths": (8, 16), "embed_dim": 8, "compat_dim": 8},
    ),
    "tiny-embed-new-bt2": EmbeddingRecipe(
        architecture="embed_bt2_ortho_cnn_base",
        method="bt2",
        old_model="tiny-embed-old",
        reference_model="tiny-embed-new-independent",
        epochs=4,
        lr=3e-3,
        model_args={"widths": (8, 16), "new_dim": 12, "compat_dim": 8, "extra_dim": 2},
    ),
    "tiny-embed-new-oca": EmbeddingRecipe(
        architecture="embed_oca_cnn_base",
        method="oca",
        old_model="tiny-embed-old",
        epochs=4,
        lr=3e-3,
        model_args={"widths": (8, 16), "embed_dim": 12, "compat_dim": 8},
    ),
}
"""Seconds-long configs for tests and fixtures: train in this order (each names the ones before it).
On the validation split, seeds 0-2: old self top-1 64-73; new/old top-1 independent 1-10, BT² 39-47,
OCA 49-53 (BT² with its change of basis; the pre-fix linear head measured 27-39)."""
