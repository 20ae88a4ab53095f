"""kiln.prepare: what `kiln serve` trains and exports before serving, in dependency order."""

from __future__ import annotations

import dataclasses

import pytest

from kiln.prepare import PrepareError, default_jobs, plan
from training import recipes


@pytest.fixture()
def fake_recipes(monkeypatch):
    """Recipes whose models no store holds (names nothing else uses), wired with `requires`."""
    base = recipes.RECIPES["vit-soft"]
    table = {
        "prep-old": dataclasses.replace(base, requires=()),
        "prep-new": dataclasses.replace(base, requires=("prep-old",)),
        "prep-top": dataclasses.replace(base, requires=("prep-new", "prep-old")),
        "prep-loop-a": dataclasses.replace(base, requires=("prep-loop-b",)),
        "prep-loop-b": dataclasses.replace(base, requires=("prep-loop-a",)),
    }
    monkeypatch.setattr(recipes, "RECIPES", {**recipes.RECIPES, **table})
    return table


def test_plan_puts_required_models_first_and_adds_missing_ones(fake_recipes):
    jobs = plan(["prep-top"])
    assert [j.tag for j in jobs] == ["prep-old", "prep-new", "prep-top"]
    assert all(j.train for j in jobs)
    assert jobs[2].requires == ("prep-new", "prep-old")


def test_plan_lists_each_model_once(fake_recipes):
    assert [j.tag for j in plan(["prep-new", "prep-top", "prep-old"])] == ["prep-old", "prep-new", "prep-top"]


def test_plan_rejects_a_cycle(fake_recipes):
    with pytest.raises(PrepareError, match="cycle: prep-loop-a -> prep-loop-b -> prep-loop-a"):
        plan(["prep-loop-a"])


def test_plan_without_training_names_the_missing_model(fake_recipes):
    with pytest.raises(PrepareError, match="prep-old"):
        plan(["prep-old"], train_missing=False)


def test_plan_rejects_an_unknown_model_and_a_missing_pinned_version():
    with pytest.raises(PrepareError, match="no-such-model"):
        plan(["no-such-model"])
    with pytest.raises(PrepareError, match="vit-soft:doesnotexist"):
        plan(["vit-soft:doesnotexist"])


def test_diffusion_requires_the_fid_classifier():
    assert "vit-soft" in recipes.RECIPES["diffusion-digits"].requires
    for name, recipe in recipes.RECIPES.items():  # every requirement is itself a recipe
        assert set(recipe.requires) <= set(recipes.RECIPES), name


def test_default_jobs_is_bounded_by_cores_and_models(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert default_jobs(1) == 1
    assert default_jobs(5) == 2
