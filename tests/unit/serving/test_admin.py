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


def test_an_unwritable_state_directory_turns_admin_routes_off(tmp_path, monkeypatch):
    """In a container with a read-only KILN_HOME and no KILN_ADMIN_TOKEN the server still starts; admin
    routes answer 403 saying what to set. (A path under a regular file cannot be made, even by root.)"""
    import serving.admin as admin

    monkeypatch.delenv(admin.ADMIN_TOKEN_ENV, raising=False)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setattr(admin, "kiln_home", lambda: blocker / "state")
    assert admin.admin_token() == ""
    with pytest.raises(InferenceError) as err:
        admin.require_admin("Bearer anything")
    assert err.value.status == 403 and admin.ADMIN_TOKEN_ENV in str(err.value)
