"""Integration fixtures shared by the operations tests (lifecycle, soak)."""

from __future__ import annotations

import pytest
from opsserver import start_ops_server
from serverproc import stop_server


@pytest.fixture(scope="session")
def ops_server(server, kiln_home, tmp_path_factory):
    """(server, vit-soft's first version): see tests/opsserver.py. Depends on ``server`` for the
    session's trained models."""
    srv, first = start_ops_server(kiln_home, tmp_path_factory.mktemp("ops-home"))
    yield srv, first
    stop_server(srv.process)
