"""The admin bearer token: from KILN_ADMIN_TOKEN, else made once under KILN_HOME; 401 / 403."""

from __future__ import annotations

import stat

import pytest

from serving.admin import admin_token, require_admin
from serving.repository import InferenceError


def test_token_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.setenv("KILN_ADMIN_TOKEN", "s3cret")
    assert admin_token() == "s3cret"
    require_admin("Bearer s3cret")
    assert not (tmp_path / "admin-token").exists()


def test_token_made_once_under_kiln_home(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.delenv("KILN_ADMIN_TOKEN", raising=False)
    first = admin_token()
    assert len(first) >= 24 and admin_token() == first  # the same for every caller (worker)
    path = tmp_path / "admin-token"
    assert path.read_text() == first and stat.S_IMODE(path.stat().st_mode) == 0o600
    require_admin(f"bearer {first}")
    for header, status in [(None, 401), ("", 401), ("Bearer nope", 403), (f"Basic {first}", 403)]:
        with pytest.raises(InferenceError) as e:
            require_admin(header)
        assert e.value.status == status
