"""Named training recipes: which registry variant, which task, which data, which hyperparameters.

``kiln train NAME`` looks the name up here; the artifact in the model store is saved under the same
name (``vit-soft:<version>``). Every task plugs in the same way: a frozen dataclass deriving from
:class:`Recipe` with the task's hyperparameters and a :meth:`Recipe.trainer` naming the function that
trains it, plus entries in :data:`RECIPES`. The trainer is imported only when it runs, so listing recipes
(``kiln train --help``) stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from kiln.settings import DEFAULT_MODELS  # noqa: F401  (re-exported: what `make serve` trains and serves)

if TYPE_CHECKING:
    from training.trainer import TrainResult


@dataclass(frozen=True)
class Recipe:
    """What every recipe has; task recipes add their own fields."""

    architecture: str  # model_zoo registry name
    epochs: int
    description: str = ""
    model_args: dict[str, Any] = field(default_factory=dict)
    task: str = ""  # the artifact's task; set by each subclass
    # Models that must be in the store before this one trains (kiln.prepare orders them).
    requires: tuple[str, ...] = ()
    # Models only its export needs (a quality gate's classifier): training starts without them and the
    # export waits for them.
    export_requires: tuple[str, ...] = ()

    def trainer(self) -> Callable[..., TrainResult]:
        """``train(name, recipe, *, epochs, seed, progress) -> TrainResult`` for this recipe's task."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClassifierRecipe(Recipe):
    """Supervised image classification (``training.classification``) on the bundled digits or, with
    ``dataset`` an ImageFolder directory (``kiln train NAME --data DIR --name MINE``), on a user's images."""

    task: str = "image-classification"
    dataset: str = "digits"  # "digits" or an ImageFolder directory (training.imagefolder)
    channels: int = 0  # 0 = from the data (1 grayscale, 3 RGB)
    image_size: tuple[int, int] = (32, 32)  # digits are 8×8; the ViTs see them upsampled to 32×32
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3  # 3e-3 left the softmax baseline at chance
    weight_decay: float = 0.05
    warmup_epochs: int = 3
    label_smoothing: float = 0.1

    def trainer(self):
        from training.classification import train_classifier

        return train_classifier


@dataclass(frozen=True)
class DiffusionRecipe(Recipe):
    """Class-conditional ε-prediction diffusion (``training.diffusion``) on the bundled digits or a
    grayscale ImageFolder directory (``dataset``)."""

    task: str = "image-generation"
    dataset: str = "digits"  # "digits" or an ImageFolder directory (training.imagefolder)
    channels: int = 0  # 0 = from the data; the denoiser and its serving are 1-channel (grayscale) only
    image_size: tuple[int, int] = (16, 16)
    epochs: int = 30  # ~600 steps: recognisable digits in under 5 minutes on 2 cores
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_epochs: int = 2
    schedule: str = "cosine"  # model_zoo.schedulers.schedule.NoiseSchedule kind
    num_train_timesteps: int = 1000
    label_dropout: float = 0.1  # classifier-free guidance: share of labels replaced by the null label
    ema_decay: float = 0.999
    augment: bool = True  # random ±1 px shifts of the training images

    def trainer(self):
        from training.diffusion import train_diffusion

        return train_diffusion


@dataclass(frozen=True)
class ForecastRecipe(Recipe):
    """Quantile forecasts of the next ``horizon`` log-returns of an OHLCV series (``training.forecasting``).

    ``data`` is a bundled series (``GOOG``, ``EURUSD``, ``BTCUSD`` from the ``backtesting`` package) or a
    CSV/Parquet file (``kiln train NAME --data FILE``). The last ``test_fraction`` of the bars is the
    final period no choice looks at (``kiln bench forecast`` reports it); the ``val_fraction`` before it
    picks the checkpoint.
    """

    task: str = "price-forecasting"
    data: str = "GOOG"
    gaps: str = "keep"  # kiln.market.bars.GAP_POLICIES
    max_gap: int = 48  # missing bars tolerated in one gap
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_epochs: int = 1
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    max_train_windows: int = 0  # > 0: keep only the newest windows (bounds training time on long series)

    def trainer(self):
        from training.forecasting import train_forecaster

        return train_forecaster


@dataclass(frozen=True)
class EmbeddingRecipe(Recipe):
    """Image embedding for retrieval, old or backward-compatible new (``training.retrieval``).

    ``method``: ``old`` (trained on ``classes`` only), ``independent``, ``bct``, ``bt2`` or ``oca``;
    the compatible methods name the ``old_model`` artifact they must be compatible with, and BT² its
    independently trained ``reference_model`` (the λ1 term).
    """

    task: str = "embedding"
    method: str = "independent"
    dataset: str = "digits"  # "digits" or an ImageFolder directory (old / independent methods)
    channels: int = 0  # 0 = from the data (1 grayscale, 3 RGB)
    classes: tuple[int, ...] = tuple(range(10))
    old_model: str = ""
    reference_model: str = ""
    image_size: tuple[int, int] = (16, 16)
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3  # Adam 1e-3 with cosine decay, as BT²
    weight_decay: float = 5e-4
    loss_weights: tuple[float, ...] = ()  # method's λs; () = official code's (BT²: 1, 10, 10; OCA: 5, 10, 5)
    augment: bool = True
    train_per_class: int = 0  # > 0: only this many training images of each class (a fixed subset)

    def trainer(self):
        from training.retrieval import train_embedding

        return train_embedding


@dataclass(frozen=True)
class XBTRecipe(Recipe):
    """XBT (``training.xbt``): ``stage="dual"`` trains the old image–text dual encoder on digits + captions;
    ``stage="projection"`` trains the new text model's projection into ``old_model``'s space, first on
    captions alone (``epochs``), then on ``paired_images`` image–caption pairs (``pair_epochs``)."""

    task: str = "embedding"
    stage: str = "dual"
    old_model: str = ""
    image_size: tuple[int, int] = (16, 16)
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    captions_per_class: int = 60  # caption corpus size per digit (text-only stage)
    paired_images: int = 100  # projection: image–text pairs of the second stage
    pair_epochs: int = 20

    def trainer(self):
        from training.xbt import train_xbt

        return train_xbt


RECIPES: dict[str, Recipe] = {
    "vit-soft": ClassifierRecipe(
        architecture="vit_soft_tiny",
        epochs=40,
        description="SOFT: softmax-free linear-attention ViT (Gaussian kernel + Newton pseudo-inverse)",
    ),
    "vit-soft-norm": ClassifierRecipe(
        architecture="vit_soft_norm_tiny",
        epochs=40,
        description="SOFT with symmetric normalisation D^-1/2 · pinv · D^-1/2",
    ),
    "vit-softmax": ClassifierRecipe(
        architecture="vit_softmax_tiny",
        description="Baseline: the same ViT with standard softmax attention",
    ),
    # 192-wide ViTs, where the linear layers dominate a batch: what int8 static quantization is measured
    # on (`kiln bench vit` trains them when they are missing). Not default models.
    "vit-softmax-wide": ClassifierRecipe(
        architecture="vit_softmax_wide",
        epochs=30,  # 94% validation accuracy (batch 32: 91%); softmax attention learns slowly on 1.3k digits
        description="Softmax ViT, 192 wide (3 heads, 4x MLP, depth 3): GEMM-bound, for int8",
    ),
    "vit-soft-wide": ClassifierRecipe(
        architecture="vit_soft_wide",
        epochs=30,
        batch_size=32,  # 99.6% validation accuracy; twice the steps of batch 64 at about the same cost
        description="SOFT ViT, 192 wide (3 heads, 4x MLP, depth 3): GEMM-bound, for int8",
    ),
    "diffusion-digits": DiffusionRecipe(
        architecture="unet_digits16",
        # FID-digits, the export's quality gate, embeds with the vit-soft classifier; training does not
        export_requires=("vit-soft",),
        description="Class-conditional DDPM/DDIM UNet on 16×16 digits, classifier-free guidance, EMA",
    ),
    "forecaster-goog-daily": ForecastRecipe(
        architecture="performer_bilstm_forecaster",
        data="GOOG",
        description="Performer (FAVOR+) + BiLSTM quantile forecaster of daily bars, trained on GOOG",
    ),
    "forecaster-eurusd-hourly": ForecastRecipe(
        architecture="performer_bilstm_forecaster",
        data="EURUSD",
        epochs=6,  # the validation loss bottomed out at epoch 5 of 8 (first run); 3500 windows an epoch
        batch_size=128,
        description="Performer (FAVOR+) + BiLSTM quantile forecaster of hourly bars, trained on EURUSD",
    ),
    "embed-old": EmbeddingRecipe(
        architecture="embed_cnn_small",
        method="old",
        classes=(0, 1, 2, 3, 4),
        epochs=30,
        description="Retrieval: the old image embedding model (small CNN, 32-d, digits 0-4 only)",
    ),
    "embed-new-independent": EmbeddingRecipe(
        architecture="embed_cnn_base",
        method="independent",
        description="Retrieval: new image embedding model trained independently (64-d, all digits)",
    ),
    "embed-new-bct": EmbeddingRecipe(
        architecture="embed_cnn_base",
        model_args={"embed_dim": 32, "compat_dim": 32},
        method="bct",
        old_model="embed-old",
        requires=("embed-old",),
        description="Retrieval: BCT new model (influence loss through the old classifier, 32-d)",
    ),
    "embed-new-bt2": EmbeddingRecipe(
        architecture="embed_bt2_ortho_cnn_base",
        method="bt2",
        old_model="embed-old",
        reference_model="embed-new-independent",
        requires=("embed-old", "embed-new-independent"),
        description="Retrieval: BT² new model (64-d feature + 8 extra dims, change of basis; 32 compatible)",
    ),
    "embed-new-oca": EmbeddingRecipe(
        architecture="embed_oca_cnn_base",
        method="oca",
        old_model="embed-old",
        requires=("embed-old",),
        description="Retrieval: OCA new model (32 compatible + 32 extra dims, orthogonal layer, prototypes)",
    ),
    "xbt-old": XBTRecipe(
        architecture="xbt_dual_small",
        stage="dual",
        description="XBT: old image–text dual encoder on digits and generated captions (32-d)",
    ),
    "xbt-new-text": XBTRecipe(
        architecture="xbt_minilm_text",
        stage="projection",
        old_model="xbt-old",
        requires=("xbt-old",),
        epochs=40,
        description="XBT: frozen all-MiniLM-L6-v2 + projection into xbt-old's space (text, then pairs)",
    ),
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; trainable: {sorted(RECIPES)}") from None
