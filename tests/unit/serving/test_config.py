import pytest

from kiln.settings import DEFAULT_MODELS
from serving.config import ConfigError, ServeConfig


def test_defaults(monkeypatch):
    for k in (
        "KILN_MODELS",
        "KILN_BACKEND",
        "KILN_HTTP_PORT",
        "KILN_BATCH_MAX_SIZE",
        "KILN_GENERATION_BATCHING",
    ):
        monkeypatch.delenv(k, raising=False)
    cfg = ServeConfig.from_env()
    assert cfg.models == DEFAULT_MODELS  # the one list (kiln.settings), every entry a recipe (test_prepare)
    assert cfg.backend == "onnxruntime" and cfg.http_port == 3000 and cfg.generation_batching == "step"


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("KILN_BACKEND", "tensorflow", "valid:"),
        ("KILN_GENERATION_BATCHING", "token", "'step', 'request'"),
        ("KILN_HTTP_PORT", "http", "not an integer"),
        ("KILN_BATCH_MAX_SIZE", "0", ">= 1"),
        ("KILN_BATCH_WINDOW_MS", "-1", ">= 0"),
        ("KILN_MODELS", " , ", "at least one model"),
    ],
)
def test_bad_values_fail_at_startup_with_a_fix(monkeypatch, var, value, message):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=message):
        ServeConfig.from_env()


def test_a_model_repository_serves_alone_unless_models_are_named(monkeypatch, tmp_path):
    monkeypatch.delenv("KILN_MODELS", raising=False)
    monkeypatch.delenv("KILN_REPOSITORY_POLL_S", raising=False)
    monkeypatch.setenv("KILN_MODEL_REPOSITORY", str(tmp_path))
    cfg = ServeConfig.from_env()
    assert cfg.models == () and cfg.model_repository == str(tmp_path.resolve()) and cfg.repository_poll_s == 0
    monkeypatch.setenv("KILN_MODELS", "vit-soft")
    monkeypatch.setenv("KILN_REPOSITORY_POLL_S", "2.5")
    cfg = ServeConfig.from_env()
    assert cfg.models == ("vit-soft",) and cfg.repository_poll_s == 2.5


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KILN_MODEL_REPOSITORY": "/no/such/repository"}, "not a directory"),
        ({"KILN_REPOSITORY_POLL_S": "5"}, "needs a model repository"),
        ({"KILN_REPOSITORY_POLL_S": "-1"}, ">= 0"),
    ],
)
def test_bad_repository_settings_fail_at_startup(monkeypatch, env, message):
    monkeypatch.delenv("KILN_MODEL_REPOSITORY", raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=message):
        ServeConfig.from_env()
