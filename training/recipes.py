"""Named training recipes: which registry variant, which data, which hyperparameters.

``kiln train NAME`` looks the name up here; the artifact in the model store is saved under the same
name (``vit-soft:<version>``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    architecture: str  # model_zoo registry name
    dataset: str = "digits"
    image_size: tuple[int, int] = (32, 32)  # digits are 8×8; the ViTs see them upsampled to 32×32
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3  # 3e-3 left the softmax baseline at chance
    weight_decay: float = 0.05
    warmup_epochs: int = 3
    label_smoothing: float = 0.1
    model_args: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RECIPES: dict[str, Recipe] = {
    "vit-soft": Recipe(
        architecture="vit_soft_tiny",
        epochs=40,
        description="SOFT: softmax-free linear-attention ViT (Gaussian kernel + Newton pseudo-inverse)",
    ),
    "vit-soft-norm": Recipe(
        architecture="vit_soft_norm_tiny",
        epochs=40,
        description="SOFT with symmetric normalisation D^-1/2 · pinv · D^-1/2",
    ),
    "vit-softmax": Recipe(
        architecture="vit_softmax_tiny",
        description="Baseline: the same ViT with standard softmax attention",
    ),
}

DEFAULT_MODELS = ("vit-soft", "vit-softmax")  # what `make serve` trains and serves


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; trainable: {sorted(RECIPES)}") from None
