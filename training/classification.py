"""Image-classification trainer (task ``image-classification``): AdamW, warm-up + cosine, best-on-val.

Everything is seeded (data order, augmentation, initialisation), so the same recipe and seed give the
same weights on the same machine. The best-on-validation weights are checkpointed to
``$KILN_HOME/runs/<name>/<run>/best.safetensors`` during training and become the artifact's weights.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kiln.artifacts import save_artifact
from model_zoo import create_model
from training.data import image_data
from training.recipes import ClassifierRecipe
from training.trainer import TrainResult, lr_at, run_dir, training_block


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


def train_classifier(
    name: str, recipe: ClassifierRecipe, *, epochs: int, seed: int = 0, progress: bool = True
) -> TrainResult:
    """Train ``recipe`` on its dataset and save the best-on-val model as artifact ``name``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = image_data(recipe.dataset, recipe.image_size, channels=recipe.channels, progress=progress)
    tensors = {s: (torch.from_numpy(x), torch.from_numpy(y)) for s, (x, y) in data.inputs.items()}
    x_train, y_train = tensors["train"]
    num_classes, channels = len(data.labels), data.channels
    args = dict(recipe.model_args)
    if recipe.dataset != "digits":  # the head and stem follow the user's data
        if recipe.image_size[0] != recipe.image_size[1]:
            raise ValueError(f"{name}: the ViTs take square images; image_size is {recipe.image_size}")
        args = {**args, "num_classes": num_classes, "in_chans": channels, "img_size": recipe.image_size[0]}
    model = create_model(recipe.architecture, **args)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / recipe.batch_size)
    total_steps = epochs * steps_per_epoch
    warmup = recipe.warmup_epochs * steps_per_epoch

    run_path = run_dir(name)
    best_path = run_path / "best.safetensors"
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
                group["lr"] = lr_at(step, total_steps, warmup, recipe.lr)
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
        "task": recipe.task,
        "labels": data.labels,
        "preprocess": {
            "kind": "grayscale-image" if channels == 1 else "rgb-image",
            "size": list(recipe.image_size),
            "channels": channels,
            "value_range": [0.0, 1.0],
            "note": (
                "ink = 1, background = 0; any H×W is resized bilinearly (half-pixel centres)"
                if recipe.dataset == "digits"
                else "pixel values / 255; any H×W is resized bilinearly (half-pixel centres)"
            ),
        },
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, channels, *recipe.image_size]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, num_classes]}],
        "metrics": {
            "val_accuracy": best_val,
            "test_accuracy": test_acc,
            "best_epoch": best_epoch,
            "train_seconds": round(seconds, 1),
            "parameters": n_params,
        },
        "data": data.record,
        "training": training_block(
            name,
            recipe,
            epochs=epochs,
            seed=seed,
            path=run_path,
            split={"train": len(y_train), "val": len(tensors["val"][1]), "test": len(tensors["test"][1])},
        ),
    }
    artifact = save_artifact(name, best_path, manifest, labels={"task": recipe.task})
    return TrainResult(artifact, seconds, {"val_accuracy": best_val, "test_accuracy": test_acc})
