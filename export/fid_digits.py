"""FID-digits: Fréchet distance of generated 16×16 digits to real ones, in a Kiln classifier's features.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium") fits a Gaussian to the features of each image set and measures

    d² = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2}).

Inception-v3 means nothing for 8×8 scans, so the features are the pre-logits of Kiln's own digits
classifier (``vit-soft`` by default, read from the model store): ``forward_head(forward_features(x),
pre_logits=True)``. The numerics of the matrix square root follow the reference implementation
(pytorch-fid's ``calculate_frechet_distance``): retry with ε·I added to both covariances when the product
is near-singular, drop an imaginary part that rounding leaves (and refuse a large one).

Real and generated images take the same path into the classifier: the test split's 8×8 digits are resized
bilinearly to 16×16 first, the generated 16×16 images in [−1, 1] are mapped to [0, 1] (clamped, as writing
them to an image file would), and both go 16 → 32 through :func:`kiln.imaging.to_model_input`.

FID is biased upwards for small sample sizes, so compare figures at equal sample counts;
:meth:`FidDigits.floor` (train split vs test split, two sets of real digits) is what a perfect generator
would get.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg

from kiln.artifacts import ArtifactError, get_artifact, load_torch_model
from kiln.imaging import resize_bilinear, to_model_input
from training.data import digits_splits

GENERATED_SIZE = (16, 16)  # the digits diffusion family's resolution
_BATCH = 512


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d² between N(mu1, sigma1) and N(mu2, sigma2), computed in float64 as pytorch-fid does.

    Raises:
        ValueError: shapes disagree, or the square root keeps a large imaginary part.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"mean / covariance shapes disagree: {mu1.shape}, {sigma1.shape} vs {mu2.shape}, {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Σ1Σ2 near-singular (fewer samples than feature dims): pytorch-fid adds ε·I to both and retries.
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # The product of two PSD matrices has a real non-negative spectrum; rounding can leave a tiny
        # imaginary part (or tiny negative eigenvalues). pytorch-fid's tolerance: 1e-3 on the diagonal.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(Σ1Σ2) has an imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    d2 = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
    return max(d2, 0.0)  # a squared distance; only rounding makes it negative (≈ −1e-12 for equal inputs)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``(N, D)`` features, float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


class FidDigits:
    """FID and conditional accuracy of generated digits, in the features of a Kiln digits classifier.

    Args:
        classifier: model-store tag of an image-classification artifact with ``forward_features`` /
            ``forward_head`` (``name`` for the latest version, or ``name:version``).

    Raises:
        ArtifactError: the tag is not in the store (the message says how to train one).
        ValueError: the artifact is not a digits classifier with pre-logit features.
    """

    def __init__(self, classifier: str = "vit-soft"):
        try:
            art = get_artifact(classifier)
        except ArtifactError as exc:
            raise ArtifactError(
                f"FID-digits needs a trained digits classifier and can not load {classifier!r}: {exc} "
                "(FID-digits' default classifier is trained by `kiln train vit-soft`.)"
            ) from None
        if art.manifest.get("task") != "image-classification":
            raise ValueError(
                f"{art.tag} is a {art.manifest.get('task')!r} artifact; FID-digits needs an "
                "image-classification one (`kiln train vit-soft`)"
            )
        self._tag = art.tag
        self._size = tuple(art.manifest["preprocess"]["size"])
        self._model = load_torch_model(art)
        if not (hasattr(self._model, "forward_features") and hasattr(self._model, "forward_head")):
            raise ValueError(
                f"{art.tag} ({art.manifest.get('architecture')}) has no forward_features/forward_head"
            )
        self._splits = digits_splits()
        self._test_stats = feature_statistics(self._features(self._real_16("test")))
        self._floor: float | None = None

    @property
    def classifier(self) -> str:
        """The ``name:version`` of the classifier whose features are used."""
        return self._tag

    def fid(self, images: np.ndarray | torch.Tensor) -> float:
        """FID of generated ``(N, 16, 16)`` or ``(N, 1, 16, 16)`` images in [−1, 1] against the test split."""
        feats = self._features(self._from_generated(images))
        return frechet_distance(*feature_statistics(feats), *self._test_stats)

    def conditional_accuracy(
        self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor
    ) -> float:
        """Share of the images generated for label k that the classifier calls k."""
        x = self._from_generated(images)
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
        if labels.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} images but {labels.shape[0]} labels")
        logits = self._run(x, features_only=False)
        return float((logits.argmax(axis=1) == labels).mean())

    def floor(self) -> float:
        """FID of real digits against real digits (train split vs test split): the best reachable value."""
        if self._floor is None:
            train = feature_statistics(self._features(self._real_16("train")))
            self._floor = frechet_distance(*train, *self._test_stats)
        return self._floor

    # -- the shared path into the classifier ------------------------------------------------------------
    def _real_16(self, split: str) -> np.ndarray:
        """A split's 8×8 digits in [0, 1], resized to the generated 16×16 first."""
        return resize_bilinear(self._splits[split].images, GENERATED_SIZE)

    @staticmethod
    def _from_generated(images: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(images, torch.Tensor):
            images = images.detach().float().cpu().numpy()
        images = np.asarray(images, np.float32)
        if images.ndim == 4 and images.shape[1] == 1:
            images = images[:, 0]
        if images.ndim != 3 or images.shape[1:] != GENERATED_SIZE:
            raise ValueError(f"expected (N, 16, 16) or (N, 1, 16, 16) images, got shape {images.shape}")
        if not np.isfinite(images).all():
            raise ValueError("images contain NaN or Inf")
        return np.clip((images + 1.0) / 2.0, 0.0, 1.0)  # [-1, 1] -> [0, 1], ink = 1

    def _features(self, images_01: np.ndarray) -> np.ndarray:
        return self._run(images_01, features_only=True)

    def _run(self, images_01: np.ndarray, features_only: bool) -> np.ndarray:
        x = torch.from_numpy(to_model_input(images_01, self._size))
        out = []
        with torch.inference_mode():
            for i in range(0, x.shape[0], _BATCH):
                pooled = self._model.forward_features(x[i : i + _BATCH])
                out.append(self._model.forward_head(pooled, pre_logits=features_only))
        return torch.cat(out).double().numpy()
