"""Supervised image-classification trainer: AdamW, warm-up + cosine schedule, best-on-val checkpoints.

Everything is seeded (data order, augmentation, initialisation), so the same recipe and seed give the
same weights on the same machine. The best-on-validation weights are checkpointed to
``$KILN_HOME/runs/<name>/<run>/best.safetensors`` during training and become the artifact's weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kiln.artifacts import Artifact, save_artifact
from kiln.settings import kiln_home
from model_zoo import create_model
from training.data import split_inputs
from training.recipes import Recipe, get_recipe


@dataclass
class TrainResult:
    artifact: Artifact
    val_accuracy: float
    test_accuracy: float
    seconds: float


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random affine jitter (±10° rotation, ±10% scale, ±2 px shift at 32 px) per image."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 / 16)  # normalised coords: 2 px of 32
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum().item()
    return correct / len(x)


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    name: str,
    *,
    epochs: int | None = None,
    seed: int = 0,
    progress: bool = True,
    recipe: Recipe | None = None,
) -> TrainResult:
    """Train recipe ``name`` on the bundled digits and save the best-on-val model as an artifact."""
    recipe = recipe or get_recipe(name)
    epochs = epochs if epochs is not None else recipe.epochs
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for split in ("train", "val", "test"):
        x, y = split_inputs(split, recipe.image_size)
        tensors[split] = (torch.from_numpy(x), torch.from_numpy(y))
    x_train, y_train = tensors["train"]
    model = create_model(recipe.architecture, **recipe.model_args)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / recipe.batch_size)
    total_steps = epochs * steps_per_epoch
    warmup = recipe.warmup_epochs * steps_per_epoch

    run_dir = kiln_home() / "runs" / name / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    best_path = run_dir / "best.safetensors"
    best_val, best_epoch, step = -1.0, -1, 0
    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"train {name}", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        running = 0.0
        for i in range(0, len(order), recipe.batch_size):
            idx = order[i : i + recipe.batch_size]
            xb = _augment(x_train[idx], gen)
            loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=recipe.label_smoothing)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total_steps, warmup, recipe.lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item() * len(idx)
            step += 1
        val_acc = evaluate(model, *tensors["val"])
        if val_acc > best_val:
            best_val, best_epoch = val_acc, epoch
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(best_path))
        bar.set_postfix(loss=f"{running / len(order):.3f}", val=f"{val_acc:.3f}", best=f"{best_val:.3f}")
    seconds = time.perf_counter() - t0

    model.load_state_dict(load_file(str(best_path)))
    test_acc = evaluate(model, *tensors["test"])
    n_params = sum(p.numel() for p in model.parameters())
    manifest = {
        **model.kiln_config,
        "task": "image-classification",
        "labels": [str(i) for i in range(10)],
        "preprocess": {
            "kind": "grayscale-image",
            "size": list(recipe.image_size),
            "value_range": [0.0, 1.0],
            "note": "ink = 1, background = 0; any H×W is resized bilinearly (half-pixel centres)",
        },
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, *recipe.image_size]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
        "metrics": {
            "val_accuracy": best_val,
            "test_accuracy": test_acc,
            "best_epoch": best_epoch,
            "train_seconds": round(seconds, 1),
            "parameters": n_params,
        },
        "training": {
            "recipe": name,
            **recipe.to_dict(),
            "epochs": epochs,
            "seed": seed,
            "split": {"train": len(y_train), "val": len(tensors["val"][1]), "test": len(tensors["test"][1])},
            "run_dir": str(run_dir),
        },
    }
    artifact = save_artifact(name, best_path, manifest, labels={"task": "image-classification"})
    return TrainResult(artifact, best_val, test_acc, seconds)
