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


def _status(fn, *args, **kwargs) -> tuple[int, str, dict]:
    with pytest.raises(InferenceError) as e:
        fn(*args, **kwargs)
    return e.value.status, e.value.message, e.value.headers


def test_an_empty_bearer_is_401_and_messages_name_the_token_source(monkeypatch, tmp_path):
    from serving.admin import check_bearer

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.delenv("KILN_ADMIN_TOKEN", raising=False)
    token = admin_token()
    for header in ("Bearer ", "Bearer", "bearer   ", " "):
        status, message, headers = _status(require_admin, header)
        assert status == 401 and "WWW-Authenticate" in headers, header
        assert "$KILN_HOME/admin-token" in message and "kiln token" in message
        assert _status(check_bearer, token, header)[0] == 401
    status, message, _ = _status(require_admin, "Bearer nope")
    assert status == 403 and "KILN_ADMIN_TOKEN is unset" in message and "overrides the file" in message
    monkeypatch.setenv("KILN_ADMIN_TOKEN", "from-env")
    status, message, _ = _status(require_admin, f"Bearer {token}")  # the old file's token is refused...
    assert status == 403 and "KILN_ADMIN_TOKEN" in message and "overrides" in message  # ...saying why
    assert message.startswith("wrong admin token")
    assert _status(check_bearer, "from-env", f"Bearer {token}")[1] == message  # one message, both paths


def test_scopes_write_and_read(monkeypatch, tmp_path):
    from serving.admin import require, scope_token

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.setenv("KILN_ADMIN_TOKEN", "adm")
    monkeypatch.delenv("KILN_WRITE_TOKEN", raising=False)
    monkeypatch.delenv("KILN_READ_TOKEN", raising=False)
    require("read", None)  # reads are open without KILN_READ_TOKEN
    require("write", "Bearer adm")  # the admin token may write
    assert _status(require, "write", None)[0] == 401
    assert _status(require, "write", "Bearer wrt")[0] == 403
    assert scope_token("write") == "adm"

    monkeypatch.setenv("KILN_WRITE_TOKEN", "wrt")
    monkeypatch.setenv("KILN_READ_TOKEN", "rd")
    require("write", "Bearer wrt")
    require("write", "Bearer adm")
    status, message, _ = _status(require, "write", "Bearer rd")
    assert status == 403 and "KILN_WRITE_TOKEN" in message
    assert _status(require, "admin", "Bearer wrt")[0] == 403  # a writer is no admin
    for token in ("rd", "wrt", "adm"):
        require("read", f"Bearer {token}")
    assert _status(require, "read", None)[0] == 401
    assert _status(require, "read", "Bearer other")[0] == 403
    assert (scope_token("read"), scope_token("write"), scope_token("admin")) == ("rd", "wrt", "adm")
    with pytest.raises(ValueError, match="valid"):
        require("root", "Bearer adm")


def test_writes_are_off_without_any_token(tmp_path, monkeypatch):
    """A read-only home, no KILN_ADMIN_TOKEN, no KILN_WRITE_TOKEN: writes answer 403 saying what to set."""
    import serving.admin as admin

    for name in ("KILN_ADMIN_TOKEN", "KILN_WRITE_TOKEN", "KILN_READ_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setattr(admin, "kiln_home", lambda: blocker / "state")
    status, message, _ = _status(admin.require, "write", "Bearer x")
    assert status == 403 and "KILN_WRITE_TOKEN" in message and "KILN_ADMIN_TOKEN" in message
