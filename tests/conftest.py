"""Suite-wide set-up: markers from folders, an isolated KILN_HOME, and the GPU skip.

KILN_HOME points at a fresh temporary directory before anything imports bentoml, so tests never
touch the user's model store (or home).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# KILN_TEST_HOME reuses a store a previous run left (its trained models make the server start in
# seconds) while iterating on tests; CI and `make test` always start from an empty, temporary one.
_SESSION_HOME = Path(os.environ.get("KILN_TEST_HOME") or tempfile.mkdtemp(prefix="kiln-test-home-"))
os.environ["KILN_HOME"] = str(_SESSION_HOME)
os.environ["BENTOML_DO_NOT_TRACK"] = "true"

_FOLDER_MARKERS = {"unit", "integration", "e2e"}


def pytest_collection_modifyitems(config, items):
    from kiln.accelerators import cuda_available

    has_gpu = cuda_available()
    for item in items:
        parts = Path(str(item.fspath)).parts
        for marker in _FOLDER_MARKERS & set(parts):
            item.add_marker(getattr(pytest.mark, marker))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (none visible on this machine)"))


@pytest.fixture(scope="session")
def kiln_home() -> Path:
    return _SESSION_HOME


from serverproc import start_server, stop_server  # noqa: E402


@pytest.fixture(scope="session")
def server(kiln_home):
    """`kiln serve` on an empty store: trains (2 epochs) and exports the default models (the two ViTs,
    the diffusion model and the two forecasters), then serves.

    This is the first-run path of `make serve`, shortened only in epochs.
    """
    srv = start_server(kiln_home, "--train-epochs", "2", "--batch-window-ms", "5")
    yield srv
    stop_server(srv.process)
