import json
import os

import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

from kiln.artifacts import ArtifactError, get_artifact, save_artifact
from kiln.cli import app
from model_zoo import create_model

runner = CliRunner()


@pytest.fixture
def restore_environ():
    """`kiln serve` exports its settings as KILN_* variables; keep them from leaking into other tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def artifact(tmp_path):
    model = create_model("vit_softmax_tiny")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return save_artifact("cli-model", path, {**model.kiln_config, "metrics": {"test_accuracy": 0.5}})


def test_models_list_json_and_show(artifact):
    r = runner.invoke(app, ["models", "list", "--json"])
    assert r.exit_code == 0, r.output
    assert artifact.tag in [m["tag"] for m in json.loads(r.output)]
    r = runner.invoke(app, ["models", "show", artifact.tag])
    assert r.exit_code == 0 and '"architecture": "vit_softmax_tiny"' in r.output


def test_models_delete_asks_then_deletes(artifact):
    r = runner.invoke(app, ["models", "delete", artifact.tag], input="n\n")
    assert r.exit_code == 1
    get_artifact(artifact.tag)  # still there
    r = runner.invoke(app, ["models", "delete", artifact.tag, "--yes"])
    assert r.exit_code == 0 and f"deleted {artifact.tag}" in r.output
    with pytest.raises(ArtifactError):
        get_artifact(artifact.tag)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "resnet50"], "unknown model 'resnet50'"),
        (["export", "no-such-model"], "no model 'no-such-model'"),
        (["models", "show", "no-such-model"], "no model 'no-such-model'"),
        (["serve", "--backend", "tensorflow", "--no-train"], "KILN_BACKEND='tensorflow'"),
        (["serve", "--max-in-flight", "lots", "--no-train"], "KILN_MAX_IN_FLIGHT='lots' is not an integer"),
        (["bench", "resnet"], "unknown benchmark suite"),
    ],
)
def test_errors_are_one_clear_line(argv, message, restore_environ):
    r = runner.invoke(app, argv)
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output


def test_serve_reads_settings_from_kiln_environment_variables(restore_environ):
    """The Kubernetes ConfigMap sets KILN_*; `kiln serve` with no flags must honour them."""
    r = runner.invoke(app, ["serve", "--no-train"], env={"KILN_BACKEND": "bogus-backend"})
    assert r.exit_code == 1 and "KILN_BACKEND='bogus-backend'" in r.output
    r = runner.invoke(
        app, ["serve", "--no-train", "--backend", "also-bogus"], env={"KILN_BACKEND": "pytorch"}
    )
    assert "KILN_BACKEND='also-bogus'" in r.output  # a flag wins over the environment


def test_missing_models_point_to_commands_that_exist():
    from training.recipes import RECIPES

    r = runner.invoke(app, ["models", "show", "nope"])
    assert r.exit_code == 1 and "'nope' is no recipe" in r.output
    assert "kiln train nope" not in r.output and all(name in r.output for name in RECIPES)
    r = runner.invoke(app, ["models", "show", "embed-new-bct"])  # a recipe no test store holds
    assert r.exit_code == 1 and "`kiln prepare embed-new-bct`" in r.output


def test_models_list_is_aligned_and_shows_each_family_its_own_quality(artifact):
    r = runner.invoke(app, ["models", "list"])
    assert r.exit_code == 0, r.output
    header, *rows = r.output.splitlines()
    column = header.index("QUALITY")
    assert header.index("ARCHITECTURE") > max(len(row.split()[0]) for row in rows)  # long tags fit
    [row] = [row for row in rows if row.startswith(artifact.tag)]
    assert row[column:].startswith("test accuracy 0.500")


@pytest.mark.parametrize(
    ("manifest", "shown"),
    [
        ({"task": "image-classification", "metrics": {"test_accuracy": 0.9871}}, "test accuracy 0.987"),
        (
            {
                "task": "image-generation",
                "exports": {"onnx": {"fid_digits": 3.129, "conditional_accuracy": 0.8}},
            },
            "FID-digits 3.13, cond. accuracy 0.80",
        ),
        (
            {
                "task": "price-forecasting",
                "metrics": {"val_mae_log_return": 0.0269, "val_mae_random_walk": 0.03},
            },
            "val MAE 0.0269 (random walk 0.0300)",
        ),
        (
            {"task": "embedding", "metrics": {"test_self_top1": 60.74, "test_self_map": 39.3}},
            "test top-1 60.7% (self)",
        ),
        (
            {"task": "embedding", "metrics": {"test_old_old_r1": 34.0, "test_new_old_projection_r1": 91.0}},
            "test recall@1 91.0% (new old projection)",
        ),
        ({"task": "image-generation", "metrics": {}}, "-"),
    ],
)
def test_quality_is_the_metric_each_family_records(manifest, shown):
    from kiln.cli import _quality

    assert _quality(manifest) == shown


def test_kiln_token_prints_the_active_admin_token(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_ADMIN_TOKEN", "from-the-variable")
    r = runner.invoke(app, ["token"])
    assert r.exit_code == 0 and r.output.strip() == "from-the-variable"
    monkeypatch.delenv("KILN_ADMIN_TOKEN")
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    (tmp_path / "admin-token").write_text("from-the-file\n")
    r = runner.invoke(app, ["token"])
    assert r.exit_code == 0 and r.output.strip() == "from-the-file"


def test_token_prints_the_active_token_from_any_directory(tmp_path, monkeypatch):
    """`kiln token`: the file under KILN_HOME (made as the server makes it), KILN_ADMIN_TOKEN over it, the
    write scope's own token; the same answer whatever the current directory."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("KILN_HOME", str(home))
    for name in ("KILN_ADMIN_TOKEN", "KILN_WRITE_TOKEN", "KILN_READ_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    first = runner.invoke(app, ["token"])
    assert first.exit_code == 0, first.output
    token = first.output.strip()
    assert token == (home / "admin-token").read_text().strip() and len(token) >= 24
    monkeypatch.chdir(elsewhere)
    assert runner.invoke(app, ["token"]).output.strip() == token
    assert runner.invoke(app, ["token", "--scope", "write"]).output.strip() == token  # admin may write
    monkeypatch.setenv("KILN_WRITE_TOKEN", "writer")
    assert runner.invoke(app, ["token", "--scope", "write"]).output.strip() == "writer"
    monkeypatch.setenv("KILN_ADMIN_TOKEN", "from-env")
    assert runner.invoke(app, ["token"]).output.strip() == "from-env"  # the variable overrides the file
    bad = runner.invoke(app, ["token", "--scope", "root"])
    assert bad.exit_code == 1 and "valid: read, write, admin" in bad.output


def test_kiln_home_never_depends_on_the_current_directory(tmp_path, monkeypatch):
    import kiln.settings as settings

    monkeypatch.delenv("KILN_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert settings.kiln_home() == settings._REPO_ROOT / ".kiln"  # a source checkout
    monkeypatch.setattr(settings, "_REPO_ROOT", tmp_path / "site-packages")  # an installed package
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert settings.kiln_home() == tmp_path / "user" / ".kiln"
