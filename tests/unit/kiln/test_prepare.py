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
        "prep-gated": dataclasses.replace(base, requires=(), export_requires=("prep-old",)),
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


def test_diffusion_export_requires_the_fid_classifier_but_training_does_not():
    assert "vit-soft" in recipes.RECIPES["diffusion-digits"].export_requires
    assert "vit-soft" not in recipes.RECIPES["diffusion-digits"].requires
    for name, recipe in recipes.RECIPES.items():  # every requirement is itself a recipe
        assert set(recipe.requires) | set(recipe.export_requires) <= set(recipes.RECIPES), name


def test_plan_adds_what_an_export_requires_unless_exports_are_off(fake_recipes):
    jobs = plan(["prep-gated"])
    assert [j.tag for j in jobs] == ["prep-old", "prep-gated"]
    assert jobs[1].requires == () and jobs[1].export_requires == ("prep-old",)
    assert [j.tag for j in plan(["prep-gated"], export=False)] == ["prep-gated"]


def test_default_jobs_is_bounded_by_cores_and_models(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert default_jobs(1) == 1
    assert default_jobs(5) == 2


def test_a_model_whose_export_waits_trains_at_once_then_exports(fake_recipes, monkeypatch, tmp_path):
    """The scheduler's order with two slots; the `kiln prepare` child processes are replaced by a recorder
    (the real processes run in the integration suite's server fixture)."""
    import kiln.prepare as prep

    launched: list[list[str]] = []

    class Child:  # finishes on the scheduler's second poll, successfully
        def __init__(self, cmd, **_):
            self.cmd, self.polls, self.returncode = cmd, 0, None
            launched.append(cmd[cmd.index("prepare") + 1 :])

        def poll(self):
            self.polls += 1
            if self.polls >= 2:
                self.returncode = 0
            return self.returncode

        def terminate(self):
            pass

    monkeypatch.setattr(prep.subprocess, "Popen", Child)
    monkeypatch.setattr(prep.time, "sleep", lambda s: None)
    monkeypatch.setattr(prep, "_log_dir", lambda: tmp_path)
    lines: list[str] = []
    prep.prepare(["prep-gated"], jobs=2, log=lines.append)
    # both start together: prep-gated trains without exporting while prep-old is prepared
    assert launched[:2] == [["prep-old", "--jobs", "1"], ["prep-gated", "--jobs", "1", "--no-export"]]
    assert launched[2] == ["prep-gated", "--jobs", "1"]  # its export, once prep-old is ready
    assert len(launched) == 3
    assert any("its export waits for prep-old" in line for line in lines)


def test_every_default_model_has_a_recipe():
    from kiln.settings import DEFAULT_MODELS

    assert set(DEFAULT_MODELS) <= set(recipes.RECIPES)
    assert recipes.DEFAULT_MODELS is DEFAULT_MODELS


def test_plan_without_training_names_every_missing_model_and_kiln_prepare(fake_recipes):
    with pytest.raises(PrepareError) as info:
        plan(["prep-top", "prep-gated"], train_missing=False)
    message = str(info.value)
    assert "lacks prep-old, prep-new, prep-top, prep-gated" in message
    assert "`kiln prepare prep-old prep-new prep-top prep-gated`" in message and "--no-train" in message


def test_an_unknown_model_is_answered_with_the_recipes():
    with pytest.raises(PrepareError) as info:
        plan(["no-such-model"])
    assert "'no-such-model' is no recipe" in str(info.value)
    assert all(name in str(info.value) for name in recipes.RECIPES)
    assert "kiln train no-such-model" not in str(info.value)
    with pytest.raises(PrepareError) as info:
        plan(["vit-soft:doesnotexist"])  # a recipe, but not that version
    assert "is no recipe" not in str(info.value) and "`kiln models list` shows the stored versions" in str(
        info.value
    )
