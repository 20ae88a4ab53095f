"""The operations tests' own server (the ``ops_server`` fixture of tests/integration/test_lifecycle.py).

Its store holds copies of the session's trained vit-soft: the model itself (pinned to its version),
one copy whose ONNX graph is corrupt and one whose int8 graph file is missing, so isolation, model
control (with ``TOKEN``) and the soak run against one process beside the session's default server.
The soak's queue bound is generous (``--max-queue-delay-ms``): it looks for failures and leaks under
sustained load on a shared two-core machine, where a neighbour's burst can stall a request past the
default 1 s bound; admission control has its own tests.
"""

from __future__ import annotations

from pathlib import Path

from modelstore import copy_model
from serverproc import Server, start_server

TOKEN = "lifecycle-test-token"
NEW_VERSION = "zzzznewversion01"  # sorts after BentoML's generated versions; 16 characters like them


def start_ops_server(trained_home: Path, home: Path) -> tuple[Server, str]:
    """Build the store under ``home`` from ``trained_home``'s vit-soft and start the server on it.

    Returns:
        The server (not ready: two of its models are broken) and vit-soft's version.
    """
    first = copy_model(trained_home, "vit-soft", home).name
    corrupt = copy_model(trained_home, "vit-soft", home, as_name="vit-corrupt")
    (corrupt / "model.onnx").write_bytes(b"\x08\x07 this is not an ONNX graph")
    missing = copy_model(trained_home, "vit-soft", home, as_name="vit-missing")
    (missing / "model.int8.onnx").unlink()
    srv = start_server(
        home,
        "--no-train",
        "--models",
        f"vit-soft:{first},vit-corrupt,vit-missing",
        "--batch-window-ms",
        "2",
        "--max-queue-delay-ms",
        "10000",
        "--drain-timeout-s",
        "5",
        env={"KILN_ADMIN_TOKEN": TOKEN, "KILN_THREADS": "1"},
        ready_path="/v2/health/live",
        timeout=180,
    )
    srv.home = home
    return srv, first
