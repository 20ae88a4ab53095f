"""benchmarks/hallucination_toy.py: the data and the label rule, and the quick pipeline end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import hallucination_toy as toy

FIELDS = {
    "n_samples",
    "n_calibration",
    "hallucinated_fraction",
    "removed_hallucinated_fraction",
    "kept_in_support_fraction",
    "threshold",
    "settings",
    "target",
    "train_seconds",
    "sample_seconds",
}


def test_grid_is_the_official_normalised_mixture_and_real_points_are_in_support():
    points = toy.sample_grid(25_000, np.random.default_rng(0))
    assert points.std(axis=0) == pytest.approx([1.0, 1.0], abs=0.02)  # normalised to unit variance per axis
    assert len(toy.MODES) == 25
    assert np.diff(np.unique(toy.MODES[:, 0])) == pytest.approx([0.707] * 4, abs=1e-3)  # 40 σ apart
    dist = toy.nearest_mode_distance(points)
    assert (dist <= toy.DEFAULT.support_radius_sigmas * toy.SIGMA).all()  # real data is all in support
    midpoint = (toy.MODES[0] + toy.MODES[1]) / 2
    assert toy.nearest_mode_distance(np.array([midpoint, [np.nan, 0.0]])) == pytest.approx(
        [np.linalg.norm(toy.MODES[1] - toy.MODES[0]) / 2, np.inf]
    )


def test_denoiser_shapes_and_shared_temporal_layer():
    model = toy.ToyDenoiser(width=16, layers=3)
    out = model(torch.randn(5, 2), torch.tensor([0, 1, 2, 3, 999]))
    assert out.shape == (5, 2)
    # one embedding for a whole sampling step gives the same ε as per-row embeddings
    x = torch.randn(4, 2)
    with torch.inference_mode():
        per_row = torch.cat([model(x[i : i + 1], torch.tensor([7])) for i in range(4)])
        torch.testing.assert_close(model(x, torch.full((4,), 7)), per_row)


@pytest.fixture(scope="module")
def quick_results():
    return toy.run(quick=True, seed=0)


def test_quick_run_end_to_end(quick_results):
    r = quick_results
    assert set(r) >= FIELDS
    assert r["n_samples"] == toy.QUICK.n_eval and r["settings"]["timesteps"] == 1000
    assert r["settings"]["last_k"] == 10
    assert 0 <= r["hallucinated_fraction"] <= 1
    assert r["hallucinated_count"] + r["in_support_count"] == r["n_samples"]
    assert r["target"]["met"] in (True, False, None)


def test_between_mode_samples_score_higher(quick_results):
    r = quick_results
    assert r["hallucinated_count"] > 0 and r["in_support_count"] > 0, "the quick model makes both kinds"
    assert r["median_score_hallucinated"] > r["median_score_in_support"]
    assert r["mean_score_hallucinated"] > r["mean_score_in_support"]


def test_render_has_heading_table_and_verdict(quick_results):
    text = toy.render(quick_results)
    assert text.startswith("### ")
    assert "| figure | value |" in text
    assert "quick setting" in text
    target = [line for line in text.splitlines() if line.startswith("- target:")]
    assert len(target) == 1 and any(v in target[0] for v in ("**MET**", "**MISSED**", "**NOT MEASURED**"))
    if quick_results["target"]["met"] is False:
        assert "why:" in target[0]
