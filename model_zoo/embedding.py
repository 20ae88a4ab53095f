"""Image embedding networks for backward-compatible retrieval (BCT, BT², OCA), with heads apart.

A small CNN backbone over 16×16 grayscale digits gives pooled features (``forward_features``); the
embedding head maps them to the native embedding (``forward_head(pre_logits=True)``), and a cosine
classifier (NormFace: logits = s · ŵ·ẑ) sits on top for training (``forward_head(pre_logits=False)``).
``forward(images)`` is what is served and exported: the L2-normalised embedding.

The compatibility heads are separate modules that a variant composes, never ``if`` branches in forward:

* :class:`BT2BasisChange` / :class:`BT2EmbeddingNet` — BT² (Zhou et al., "BT²: Backward-compatible
  Training with Basis Transformation", ICCV 2023, §3.3 and the official ``ResNet_ortho``): the new
  model's own losses act on its new feature ``f`` (L2-normalised); the served embedding is an orthogonal
  change of basis of ``[extra; C·f]``, whose first old-size coordinates are compared with old
  embeddings. The orthogonal layers are ``torch.nn.utils.parametrizations.orthogonal`` while training.
* :class:`BasisTransform` — the pre-fix "BT²" head (``embed_bt2_cnn_base``): an orthogonal layer right
  after the free embedding layer with every loss on its output, i.e. just another linear map. Kept only
  so artifacts trained with it (and galleries embedded by them) keep loading and serving; nothing trains
  it any more.
* :class:`OrthogonalClassifierHead` — OCA (Ricci et al., "Backward-Compatible Aligned Representations
  via an Orthogonal Transformation Layer", 2024): the L2-normalised old+extra feature is rotated by an
  orthogonal layer before the classifier; the compatible part is the first old-size coordinates of the
  *un-rotated* feature, so the rotation lets the new classes use the whole space without disturbing it.

Variant names: ``embed_cnn_small`` (the old model), ``embed_cnn_base`` (independent / BCT new model),
``embed_bt2_ortho_cnn_base`` (BT², named after the official ``ResNet50_ortho``), ``embed_oca_cnn_base``,
and the legacy ``embed_bt2_cnn_base``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

from model_zoo._registry import register_model

__all__ = [
    "BT2BasisChange",
    "BT2EmbeddingNet",
    "BasisTransform",
    "CosineClassifier",
    "DigitsCNN",
    "EmbeddingNet",
    "OrthogonalClassifierHead",
    "embed_bt2_cnn_base",
    "embed_bt2_ortho_cnn_base",
    "embed_cnn_base",
    "embed_cnn_small",
    "embed_oca_cnn_base",
    "rebase_orthogonal",
]


class DigitsCNN(nn.Module):
    """Conv–BN–ReLU stages, each halving the grid, then global average pooling: (N,1,H,W) → (N, C)."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for i, c in enumerate(widths):
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
            ]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.body = nn.Sequential(*layers)
        self.num_features = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))


def _orthogonal_linear(dim: int, parametrized: bool) -> nn.Linear:
    """A bias-free ``dim × dim`` linear layer kept orthogonal by torch's parametrization while training.

    ``parametrized=False`` builds the plain layer an artifact is saved as: the trainer bakes the
    orthogonal weight in (``parametrize.remove_parametrizations(..., leave_parametrized=True)``), so the
    served and exported graph is one MatMul instead of a matrix exponential (the zoo's export form).
    """
    linear = nn.Linear(dim, dim, bias=False)
    return orthogonal(linear) if parametrized else linear


def rebase_orthogonal(model: nn.Module, max_generator_norm: float = 1.0) -> int:
    """Dynamic trivialization (Lezcano-Casado 2019, §4): fold a large rotation into the base.

    torch's orthogonal parametrization is ``W = B · exp(A)`` with ``A`` skew-symmetric, built from the
    trained parameter. Large steps grow ``‖A‖`` and float32's ``matrix_exp`` then drifts off the
    orthogonal group (1e-4 after a few steps at ``‖A‖ ≈ 500``). Where ``‖A‖_F`` exceeds the bound, the
    current ``W`` (re-orthogonalised by QR if it drifted) becomes the base and ``A`` restarts at 0 —
    the same ``W``, so training is unchanged but the exponential stays in its accurate range. Call it
    after an optimiser step; returns how many layers were rebased.
    """
    rebased = 0
    for module in model.modules():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        plist = module.parametrizations.weight
        if not hasattr(plist[0], "base"):  # not an orthogonal trivialization
            continue
        x = plist.original.detach().tril()
        if torch.linalg.matrix_norm(x - x.mT) > max_generator_norm:
            with torch.no_grad():
                module.weight = module.weight  # right_inverse: base ← W, A ← 0 (in place; optimisers keep it)
            rebased += 1
    return rebased


class CosineClassifier(nn.Module):
    """NormFace classifier: ``s · normalize(W) · normalize(z)`` (Wang et al. 2017), no bias."""

    def __init__(self, dim: int, num_classes: int, scale: float = 16.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * dim**-0.5)
        self.scale = scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(z, dim=-1) @ F.normalize(self.weight, dim=-1).T


class BasisTransform(nn.Module):
    """Legacy (``embed_bt2_cnn_base``): an orthogonal ``dim × dim`` layer right after the embedding layer.

    With every loss on its output this is only another linear map, not BT²'s basis transformation (see
    :class:`BT2BasisChange`); kept so stored artifacts of the old recipe still load.
    """

    def __init__(self, dim: int, parametrized: bool = True) -> None:
        super().__init__()
        self.linear = _orthogonal_linear(dim, parametrized)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)


class BT2BasisChange(nn.Module):
    """BT²'s change of basis of ``[extra; C·f]`` (official ``ResNet_ortho.forward``; paper §3.3, Fig. 3).

    ``u = [extra; P(C·f)]`` with ``P`` an orthogonal ``new_dim × new_dim`` layer (``ortholinear_p``), then
    the leading ``old_dim`` coordinates pass through a second orthogonal layer ``Q``
    (``ortholinear_old2``): ``z = [Q·u[:old_dim]; u[old_dim:]]``. The whole map is orthogonal (a block
    rotation of ``[extra; C·f]``), so ``z`` keeps every bit of ``f`` while its first ``old_dim``
    coordinates, a rotated mix of the extra dimensions and part of ``f``, can be pulled onto the old
    space without moving ``f`` itself.

    ``transform="none"`` is the ablation without the change of basis (``P = Q = I``): the compatibility
    losses then act directly on ``[extra; C·f]``, i.e. on ``f``'s own leading coordinates — BT²'s "naively
    adding dimensions" baseline.
    """

    def __init__(
        self,
        new_dim: int,
        old_dim: int,
        extra_dim: int,
        c: float = 2.0,
        transform: str = "bt2",
        parametrized: bool = True,
    ) -> None:
        super().__init__()
        if not 0 < extra_dim < old_dim <= new_dim + extra_dim:
            raise ValueError(
                f"BT² needs 0 < extra_dim ({extra_dim}) < old_dim ({old_dim}) <= new_dim + extra_dim "
                f"({new_dim + extra_dim}): the compatible part mixes the extra dimensions with part of f"
            )
        if transform not in ("bt2", "none"):
            raise ValueError(f"unknown transform {transform!r}; valid: ['bt2', 'none']")
        rotate = transform == "bt2"
        self.p = _orthogonal_linear(new_dim, parametrized) if rotate else nn.Identity()
        self.q = _orthogonal_linear(old_dim, parametrized) if rotate else nn.Identity()
        self.old_dim, self.c = old_dim, c

    def forward(self, extra: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        u = torch.cat([extra, self.p(self.c * f)], dim=1)  # [extra; P(C·f)]
        return torch.cat([self.q(u[:, : self.old_dim]), u[:, self.old_dim :]], dim=1)


class OrthogonalClassifierHead(nn.Module):
    """OCA's head: an orthogonal layer on the normalised feature, then the classifier.

    Only training uses it; the served embedding is the un-rotated feature, whose first old-size
    coordinates are the old-compatible part.
    """

    def __init__(self, dim: int, num_classes: int, scale: float = 16.0, parametrized: bool = True) -> None:
        super().__init__()
        self.rotation = _orthogonal_linear(dim, parametrized)
        self.classifier = CosineClassifier(dim, num_classes, scale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.rotation(F.normalize(z, dim=-1)))


class EmbeddingNet(nn.Module):
    """Backbone → embedding head (→ optional basis transform) → classifier head.

    Args:
        widths: channels of the CNN stages.
        embed_dim: native embedding dimension (old dim + extra dims for the compatible variants).
        num_classes: classes of the training head (the old model sees only the old classes).
        compat_dim: the leading coordinates that are compatible with an old model (0 = none); recorded
            here so the artifact carries it, used by the trainers and the manifest.
        transform: ``"none"`` or ``"bt2"`` — a :class:`BasisTransform` after the embedding head.
        head: ``"cosine"`` or ``"oca"`` — the training classifier.
        orthogonal_param: orthogonal layers carry torch's orthogonal parametrization (training) or are
            plain linear layers holding an already-orthogonal weight (saved artifacts, export).
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (16, 32, 64),
        embed_dim: int = 32,
        num_classes: int = 10,
        compat_dim: int = 0,
        transform: str = "none",
        head: str = "cosine",
        orthogonal_param: bool = True,
    ) -> None:
        super().__init__()
        if compat_dim > embed_dim:
            raise ValueError(f"compat_dim {compat_dim} exceeds embed_dim {embed_dim}")
        self.backbone = DigitsCNN(tuple(widths))
        self.embed = nn.Linear(self.backbone.num_features, embed_dim)
        transforms = {"none": nn.Identity, "bt2": lambda: BasisTransform(embed_dim, orthogonal_param)}
        heads = {
            "cosine": lambda: CosineClassifier(embed_dim, num_classes),
            "oca": lambda: OrthogonalClassifierHead(embed_dim, num_classes, parametrized=orthogonal_param),
        }
        if transform not in transforms:
            raise ValueError(f"unknown transform {transform!r}; valid: {sorted(transforms)}")
        if head not in heads:
            raise ValueError(f"unknown head {head!r}; valid: {sorted(heads)}")
        self.transform = transforms[transform]()
        self.head = heads[head]()
        self.embed_dim, self.compat_dim, self.num_classes = embed_dim, compat_dim, num_classes

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Un-normalised embedding (``pre_logits=True``) or the training classifier's logits."""
        z = self.transform(self.embed(features))
        return z if pre_logits else self.head(z)

    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The un-normalised native embedding (what the compatibility losses act on)."""
        return self.forward_head(self.forward_features(images), pre_logits=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The served embedding: L2-normalised, ``(N, embed_dim)``."""
        return F.normalize(self.embedding(images), dim=-1)


class BT2EmbeddingNet(nn.Module):
    """BT²'s new model (official ``ResNet_ortho``): backbone → new feature ``f`` → change of basis.

    The backbone's embedding layer emits ``new_dim + compat_dim`` values ``h`` (official: the ResNet's
    ``embedding_dim + embedding_dim_old`` output); the new feature is ``f = normalize(h[:new_dim])`` and
    the extra dimensions are ``normalize(W·relu(h) + b)`` (official ``fc3``, of which only the first
    ``to_add_dim`` outputs are ever read, so it is built that size). The classifier and the
    independent-model loss act on ``f``; the served embedding is :class:`BT2BasisChange` of
    ``[extra; C·f]``, ``new_dim + extra_dim`` wide, L2-normalised, with the old-compatible part first.

    The classifier is the zoo's cosine classifier (as the independent reference model's), where the
    official code has a bias-free linear layer on the normalised ``f``.

    Args:
        widths: channels of the CNN stages.
        new_dim: dimension of the new feature ``f`` (= the independent reference model's embedding).
        compat_dim: the old model's dimension; the leading coordinates of the served embedding.
        extra_dim: dimensions added (official ``to_add_dim``; 32 for 128-d there).
        c: the weight ``C`` of ``f`` against the unit-norm extra part (official CIFAR-100 and ImageNet
            configs: 2).
        num_classes: classes of the training head.
        transform: ``"bt2"`` (the change of basis) or ``"none"`` (the ablation).
        orthogonal_param: orthogonal parametrization (training) or plain layers with baked weights.
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (16, 32, 64),
        new_dim: int = 64,
        compat_dim: int = 32,
        extra_dim: int = 8,
        c: float = 2.0,
        num_classes: int = 10,
        transform: str = "bt2",
        orthogonal_param: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = DigitsCNN(tuple(widths))
        self.embed = nn.Linear(self.backbone.num_features, new_dim + compat_dim)
        self.extra = nn.Linear(new_dim + compat_dim, extra_dim)
        self.basis = BT2BasisChange(new_dim, compat_dim, extra_dim, c, transform, orthogonal_param)
        self.head = CosineClassifier(new_dim, num_classes)
        self.new_dim, self.compat_dim, self.num_classes = new_dim, compat_dim, num_classes
        self.embed_dim = new_dim + extra_dim

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def new_feature(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, extra)``: the normalised new feature and the normalised extra dimensions."""
        h = self.embed(features)
        f = F.normalize(h[:, : self.new_dim], dim=-1)
        return f, F.normalize(self.extra(F.relu(h)), dim=-1)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The un-normalised served embedding (``pre_logits=True``) or the classifier's logits on ``f``."""
        f, extra = self.new_feature(features)
        return self.basis(extra, f) if pre_logits else self.head(f)

    def bt2_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, z)`` from one pass: what BT²'s losses act on (``f`` before, ``z`` after the basis change)."""
        f, extra = self.new_feature(self.forward_features(images))
        return f, self.basis(extra, f)

    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images), pre_logits=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The served embedding: L2-normalised, ``(N, new_dim + extra_dim)``."""
        return F.normalize(self.embedding(images), dim=-1)


@register_model
def embed_cnn_small(
    widths: tuple[int, ...] = (8, 16, 32), embed_dim: int = 32, num_classes: int = 5, compat_dim: int = 0
) -> EmbeddingNet:
    """The old model: a narrower CNN, 32-d embedding, trained on the old classes only."""
    return EmbeddingNet(widths, embed_dim, num_classes, compat_dim)


@register_model
def embed_cnn_base(
    widths: tuple[int, ...] = (16, 32, 64), embed_dim: int = 64, num_classes: int = 10, compat_dim: int = 0
) -> EmbeddingNet:
    """The new backbone with a plain head (independent training, or BCT with ``embed_dim`` = old dim)."""
    return EmbeddingNet(widths, embed_dim, num_classes, compat_dim)


@register_model
def embed_bt2_cnn_base(
    widths: tuple[int, ...] = (16, 32, 64),
    embed_dim: int = 64,
    num_classes: int = 10,
    compat_dim: int = 32,
    orthogonal_param: bool = True,
) -> EmbeddingNet:
    """Legacy pre-fix "BT²" (a linear head; see :class:`BasisTransform`): loads artifacts trained before
    ``embed_bt2_ortho_cnn_base``, so galleries embedded by them keep serving. Retrain with
    ``kiln train embed-new-bt2`` for BT² as the paper defines it."""
    return EmbeddingNet(widths, embed_dim, num_classes, compat_dim, "bt2", "cosine", orthogonal_param)


@register_model
def embed_bt2_ortho_cnn_base(
    widths: tuple[int, ...] = (16, 32, 64),
    new_dim: int = 64,
    compat_dim: int = 32,
    extra_dim: int = 8,
    c: float = 2.0,
    num_classes: int = 10,
    transform: str = "bt2",
    orthogonal_param: bool = True,
) -> BT2EmbeddingNet:
    """BT² new model: 64-d new feature (the independent model's size) + 8 extra dims, change of basis.

    ``extra_dim`` 8 for a 32-d old model keeps the official ratio (32 extra for 128-d); ``c`` 2 is the
    official configs' ``C``. ``transform="none"`` builds the ablation.
    """
    return BT2EmbeddingNet(
        widths, new_dim, compat_dim, extra_dim, c, num_classes, transform, orthogonal_param
    )


@register_model
def embed_oca_cnn_base(
    widths: tuple[int, ...] = (16, 32, 64),
    embed_dim: int = 64,
    num_classes: int = 10,
    compat_dim: int = 32,
    orthogonal_param: bool = True,
) -> EmbeddingNet:
    """OCA new model: old dim + extra dims, orthogonal layer between the embedding and the classifier."""
    return EmbeddingNet(widths, embed_dim, num_classes, compat_dim, "none", "oca", orthogonal_param)
