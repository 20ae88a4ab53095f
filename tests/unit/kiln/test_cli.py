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
