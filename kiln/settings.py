"""Where Kiln keeps its state.

``KILN_HOME`` (default: ``.kiln/`` at the repository root for a source checkout, else ``~/.kiln`` —
never relative to the current directory, so every command finds the same state from anywhere) holds
BentoML's model store (``$KILN_HOME/bentoml``) and training runs (``$KILN_HOME/runs``).
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]

# The one list of what `make serve` trains and `kiln serve` serves by default (KILN_MODELS / --models
# override it); training.recipes checks each is a recipe, serving.config reads it as its default.
DEFAULT_MODELS: tuple[str, ...] = (
    "vit-soft",
    "vit-softmax",
    "diffusion-digits",
    "forecaster-goog-daily",
    "forecaster-eurusd-hourly",
    "embed-old",
    "embed-new-oca",  # after its old model: compatible with the embed-old it finds in the store
    "xbt-old",
    "xbt-new-text",
)


def kiln_home() -> Path:
    """The state directory: ``$KILN_HOME`` if set (a relative one is resolved once, by
    :func:`configure_environment`, and exported), else the checkout's ``.kiln``, else ``~/.kiln``."""
    env = os.environ.get("KILN_HOME")
    if env:
        return Path(env).expanduser().resolve()
    if (_REPO_ROOT / "pyproject.toml").is_file():
        return _REPO_ROOT / ".kiln"
    return Path.home() / ".kiln"


def configure_environment() -> Path:
    """Point BentoML at ``$KILN_HOME/bentoml`` and turn its usage tracking off; returns KILN_HOME.

    Must run before ``bentoml`` is first imported: BentoML reads ``BENTOML_HOME`` once.
    """
    home = kiln_home()
    os.environ["KILN_HOME"] = str(home)
    os.environ["BENTOML_HOME"] = str(home / "bentoml")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")  # no network calls from a model server
    return home
