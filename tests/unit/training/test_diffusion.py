"""The diffusion trainer: a complete artifact, seeded weights, and a denoiser that really learns."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from kiln.artifacts import get_artifact, load_torch_model
from model_zoo.schedulers.schedule import NoiseSchedule
from training.recipes import RECIPES
from training.trainer import train

# Two levels (16x16, 8x8 with attention) of few channels: 178 k parameters, seconds an epoch on 2 cores.
TINY = dataclasses.replace(
    RECIPES["diffusion-digits"],
    model_args={"block_out_channels": (16, 32), "norm_num_groups": 8, "attention_head_dim": 16},
    batch_size=64,
    lr=4e-3,
    warmup_epochs=1,
)
# Held-out ε-MSE on the trainer's fixed validation draw (cosine schedule): predicting zeros scores 1.0, an
# untrained TINY network 1.0-1.1, and the best per-pixel Gaussian denoiser (the training images' pixel
# means and variances, no spatial structure) 0.25. TINY after LEARN_EPOCHS scores about 0.15 (seeds 1 and 2).
LEARN_EPOCHS = 3
FLOOR = 0.2


@pytest.fixture(scope="module")
def trained():
    return train("diffusion-digits", epochs=1, progress=False, recipe=TINY)


def test_train_saves_a_complete_artifact(trained):
    art = get_artifact(trained.artifact.tag)
    m = art.manifest
    assert m["task"] == "image-generation" and m["architecture"] == "unet_digits16"
    assert m["args"]["block_out_channels"] == [16, 32] and m["args"]["num_classes"] == 10
    assert m["labels"] == [str(i) for i in range(10)] and m["null_label"] == 10
    assert m["prediction"] == "epsilon"
    assert m["schedule"] == NoiseSchedule(kind=TINY.schedule, num_train_timesteps=1000).to_dict()
    assert m["image"] == {
        "size": [16, 16],
        "channels": 1,
        "value_range": [-1.0, 1.0],
        "note": "white ink (1) on black (-1)",
    }
    assert m["inputs"] == [
        {"name": "sample", "datatype": "FP32", "shape": [-1, 1, 16, 16]},
        {"name": "timestep", "datatype": "INT64", "shape": [-1]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ]
    assert m["outputs"] == [{"name": "noise", "datatype": "FP32", "shape": [-1, 1, 16, 16]}]
    metrics = m["metrics"]
    assert set(metrics) == {"train_loss", "val_loss", "train_seconds", "parameters", "best_epoch"}
    assert metrics["val_loss"] == trained.metrics["val_loss"] and metrics["best_epoch"] == 0
    assert m["training"]["seed"] == 0 and m["training"]["epochs"] == 1
    assert (
        m["training"]["recipe"] == "diffusion-digits" and m["training"]["label_dropout"] == TINY.label_dropout
    )

    model = load_torch_model(art)
    assert sum(p.numel() for p in model.parameters()) == metrics["parameters"]
    with torch.no_grad():
        noise = model(torch.randn(4, 1, 16, 16), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10]))
    assert noise.shape == (4, 1, 16, 16) and torch.isfinite(noise).all()


def test_same_seed_same_weights(trained):
    again = train("diffusion-digits", epochs=1, progress=False, recipe=TINY)
    w1 = load_file(str(get_artifact(trained.artifact.tag).weights_path))
    w2 = load_file(str(get_artifact(again.artifact.tag).weights_path))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=0)
    assert again.metrics == trained.metrics


def test_denoiser_learns():
    """After a short run the held-out denoising loss is well below what no learning of images gives.

    The floor sits under the per-pixel Gaussian baseline, so it fails when learning breaks (wrong x_t,
    labels or targets, a learning rate of zero, weights of the wrong model saved), not on seed noise.
    """
    result = train("diffusion-digits", epochs=LEARN_EPOCHS, progress=False, recipe=TINY, seed=1)
    assert result.metrics["val_loss"] < FLOOR
