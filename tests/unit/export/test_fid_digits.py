"""FID-digits: the Fréchet distance itself, and the metric on a 1-epoch vit-soft from the store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.fid_digits import FidDigits, feature_statistics, frechet_distance
from kiln.artifacts import ArtifactError, get_artifact, load_torch_model
from kiln.imaging import resize_bilinear, to_model_input
from training.data import digits_splits


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n", [500, 20], ids=["full-rank", "fewer-samples-than-dims"])
def test_identical_features_give_zero(n):
    feats = np.random.default_rng(1).normal(size=(n, 64))
    mu, sigma = feature_statistics(feats)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_unknown_classifier_names_the_training_command():
    with pytest.raises(ArtifactError, match="kiln train vit-soft"):
        FidDigits("no-such-classifier")


@pytest.fixture(scope="module")
def fid_digits() -> FidDigits:
    from training.trainer import train

    result = train("vit-soft", epochs=1, progress=False)
    return FidDigits(result.artifact.tag)


def _test_images_16() -> tuple[np.ndarray, np.ndarray]:
    """The test split as a generator would emit it: 16×16 in [-1, 1]."""
    test = digits_splits()["test"]
    return resize_bilinear(test.images, (16, 16)) * 2 - 1, test.labels


def test_classifier_names_its_version(fid_digits):
    name, version = fid_digits.classifier.split(":")
    assert name == "vit-soft" and version


def test_test_split_against_itself_is_zero(fid_digits):
    images, _ = _test_images_16()
    assert fid_digits.fid(images) == pytest.approx(0.0, abs=1e-6)
    as_tensor = torch.from_numpy(images)[:, None]  # (N, 1, H, W), as a sampler returns them
    assert fid_digits.fid(as_tensor) == pytest.approx(0.0, abs=1e-6)


def test_fid_grows_with_noise(fid_digits):
    images, _ = _test_images_16()
    rng = np.random.default_rng(0)
    noise = rng.normal(size=images.shape).astype(np.float32)
    fids = [fid_digits.fid(np.clip(images + s * noise, -1, 1)) for s in (0.1, 0.3, 0.6)]
    assert 0 < fids[0] < fids[1] < fids[2], fids


def test_floor_is_small_but_positive(fid_digits):
    floor = fid_digits.floor()
    images, _ = _test_images_16()
    noisy = np.clip(images + 0.6 * np.random.default_rng(0).normal(size=images.shape), -1, 1)
    assert 0 < floor < fid_digits.fid(noisy)
    assert fid_digits.floor() == floor  # cached


def test_conditional_accuracy_of_real_images_is_the_classifier_accuracy(fid_digits):
    images, labels = _test_images_16()
    model = load_torch_model(get_artifact(fid_digits.classifier))
    x = torch.from_numpy(to_model_input((images + 1) / 2, (32, 32)))
    with torch.inference_mode():
        expected = float((model(x).argmax(1).numpy() == labels).mean())
    assert fid_digits.conditional_accuracy(images, labels) == pytest.approx(expected)
    with pytest.raises(ValueError, match="labels"):
        fid_digits.conditional_accuracy(images, labels[:-1])


def test_rejects_wrong_shapes_and_non_finite(fid_digits):
    with pytest.raises(ValueError, match="16, 16"):
        fid_digits.fid(np.zeros((4, 8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        fid_digits.fid(np.full((4, 16, 16), np.nan))
