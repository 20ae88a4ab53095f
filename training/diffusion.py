"""Diffusion trainer (task ``image-generation``): class-conditional ε-prediction on 16×16 digits, or on a
user's grayscale ImageFolder (``recipe.dataset``; colour images are trained on as luminance, the
denoiser and the served PNGs being 1-channel).

The objective is DDPM's simplified loss (Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS
2020, eq. 14): ``x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε`` with ``t`` uniform over the training steps and
``ε ~ N(0, I)``, and the mean squared error between ``ε`` and the network's prediction. A share of the
labels (``recipe.label_dropout``) is replaced by the null label so the same network also learns the
unconditional model that classifier-free guidance needs (Ho & Salimans 2022, Algorithm 1).

The artifact's weights are an exponential moving average of the trained weights (DDPM §4 and Appendix
B; the decay warms up as ``min(decay, (1 + n) / (10 + n))`` after n updates, as diffusers' ``EMAModel``
does, so a short run is not dominated by its random initialisation). Each epoch the EMA weights are
scored on the validation split with a fixed, seeded set of ``(t, ε)`` and the best are kept. Everything
else is seeded too (initialisation, data order, augmentation, t, ε, label dropout), so the same recipe
and seed give the same weights on the same machine.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kiln.artifacts import save_artifact
from model_zoo import create_model
from model_zoo.schedulers.schedule import NoiseSchedule
from training.data import image_data
from training.recipes import DiffusionRecipe
from training.trainer import TrainResult, lr_at, run_dir, training_block

VAL_SEED = 1234  # the validation (t, ε) draw is the same for every run, so val losses compare across runs
VAL_REPEATS = 2  # noisy copies of each validation image (different t, ε)


def _images(inputs: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """One split's ``(N, 1, h, w)`` inputs in [0, 1] as images in [-1, 1] (white ink on black) + labels."""
    x, y = inputs
    return torch.from_numpy(np.ascontiguousarray(x * 2.0 - 1.0, dtype=np.float32)), torch.from_numpy(y)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift of up to ±1 px per image (background −1 fills the border)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, n), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def _noisy(
    x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Eq. (4) of DDPM in reparametrised form: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε."""
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


@torch.no_grad()
def denoising_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    labels: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    batch_size: int = 256,
) -> float:
    """Mean ε-prediction MSE of ``model`` on clean images ``x0`` at given steps and noise (eval mode)."""
    model.eval()
    total = 0.0
    for i in range(0, len(x0), batch_size):
        sl = slice(i, i + batch_size)
        pred = model(_noisy(x0[sl], t[sl], eps[sl], alphas_cumprod), t[sl], labels[sl])
        total += F.mse_loss(pred, eps[sl], reduction="sum").item()
    return total / eps.numel()


def train_diffusion(
    name: str, recipe: DiffusionRecipe, *, epochs: int, seed: int = 0, progress: bool = True
) -> TrainResult:
    """Train ``recipe`` on its dataset and save the best-on-val EMA weights as artifact ``name``."""
    if recipe.channels not in (0, 1):
        raise ValueError(
            f"{name}: the diffusion recipes generate 1-channel (grayscale) images; --channels "
            f"{recipe.channels} is not supported (colour images are trained on as luminance)"
        )
    data = image_data(recipe.dataset, recipe.image_size, channels=1, progress=progress)
    num_classes = len(data.labels)
    null_label = num_classes
    args = dict(recipe.model_args)
    if recipe.dataset != "digits":  # the label embedding follows the user's classes
        if recipe.image_size[0] != recipe.image_size[1]:
            raise ValueError(f"{name}: the UNet takes square images; image_size is {recipe.image_size}")
        args = {**args, "num_classes": num_classes, "image_size": recipe.image_size[0]}
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    schedule = NoiseSchedule(kind=recipe.schedule, num_train_timesteps=recipe.num_train_timesteps)
    alphas_cumprod = schedule.alphas_cumprod().float()
    T = schedule.num_train_timesteps
    x_train, y_train = _images(data.inputs["train"])
    x_val, y_val = _images(data.inputs["val"])

    # The held-out draw: each validation image VAL_REPEATS times, t stratified over [0, T), fixed ε.
    val_gen = torch.Generator().manual_seed(VAL_SEED)
    x_val, y_val = x_val.repeat(VAL_REPEATS, 1, 1, 1), y_val.repeat(VAL_REPEATS)
    t_val = (torch.arange(len(x_val)) * T // len(x_val))[torch.randperm(len(x_val), generator=val_gen)]
    eps_val = torch.randn(x_val.shape, generator=val_gen)

    model = create_model(recipe.architecture, **args)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / recipe.batch_size)
    total_steps = epochs * steps_per_epoch
    warmup = recipe.warmup_epochs * steps_per_epoch

    run_path = run_dir(name)
    best_path = run_path / "best_ema.safetensors"
    best_val, best_epoch, step = math.inf, -1, 0
    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"train {name}", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        running = 0.0
        for i in range(0, len(order), recipe.batch_size):
            idx = order[i : i + recipe.batch_size]
            x0 = _augment(x_train[idx], gen) if recipe.augment else x_train[idx]
            labels = y_train[idx].clone()
            labels[torch.rand(len(idx), generator=gen) < recipe.label_dropout] = null_label
            t = torch.randint(0, T, (len(idx),), generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            loss = F.mse_loss(model(_noisy(x0, t, eps, alphas_cumprod), t, labels), eps)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup, recipe.lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            _ema_update(ema, model, min(recipe.ema_decay, (1 + step) / (10 + step)))
            running += loss.item() * len(idx)
        train_loss = running / len(order)
        val_loss = denoising_loss(ema, x_val, y_val, t_val, eps_val, alphas_cumprod)
        if not math.isfinite(val_loss):
            raise RuntimeError(
                f"{name}: training diverged in epoch {epoch} (validation loss {val_loss}); "
                f"lower the recipe's lr ({recipe.lr}) or raise its warmup_epochs ({recipe.warmup_epochs})"
            )
        if val_loss < best_val:
            best_val, best_epoch = val_loss, epoch
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(best_path))
        bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{val_loss:.4f}", best=f"{best_val:.4f}")
    seconds = time.perf_counter() - t0

    ema.load_state_dict(load_file(str(best_path)))
    n_params = sum(p.numel() for p in ema.parameters())
    size = list(recipe.image_size)
    metrics = {
        "train_loss": train_loss,
        "val_loss": best_val,
        "train_seconds": round(seconds, 1),
        "parameters": n_params,
        "best_epoch": best_epoch,
    }
    manifest = {
        **ema.kiln_config,
        "task": recipe.task,
        "labels": data.labels,
        "null_label": null_label,
        "prediction": "epsilon",
        "schedule": schedule.to_dict(),
        "image": {
            "size": size,
            "channels": 1,
            "value_range": [-1.0, 1.0],
            "note": "white ink (1) on black (-1)" if recipe.dataset == "digits" else "luminance 2·v/255 − 1",
        },
        "inputs": [
            {"name": "sample", "datatype": "FP32", "shape": [-1, 1, *size]},
            {"name": "timestep", "datatype": "INT64", "shape": [-1]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ],
        "outputs": [{"name": "noise", "datatype": "FP32", "shape": [-1, 1, *size]}],
        "metrics": metrics,
        "data": data.record,
        "training": training_block(
            name,
            recipe,
            epochs=epochs,
            seed=seed,
            path=run_path,
            split={"train": len(y_train), "val": len(y_val) // VAL_REPEATS},
            val_draw={"seed": VAL_SEED, "repeats": VAL_REPEATS},
        ),
    }
    artifact = save_artifact(name, best_path, manifest, labels={"task": recipe.task})
    return TrainResult(artifact, seconds, {"train_loss": train_loss, "val_loss": best_val})
