"""The admin bearer token of every route that changes server state: model control (``/v2/repository/
models/{m}/load|unload`` and the gRPC RPCs), gallery upgrade / backfill / rollback, trajectory synthesis.

``KILN_ADMIN_TOKEN`` when set; otherwise a random token made once and kept in ``$KILN_HOME/admin-token``
(mode 600, shared by every worker of the server), so a first ``make serve`` has working admin routes and
the operator reads the token from that file. 401 without ``Authorization: Bearer``, 403 with a wrong one.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os

from kiln.settings import kiln_home
from serving.repository import InferenceError

log = logging.getLogger("kiln.serving")

ADMIN_TOKEN_ENV = "KILN_ADMIN_TOKEN"


def admin_token() -> str:
    """The token: ``KILN_ADMIN_TOKEN``, else the one in ``$KILN_HOME/admin-token`` (made if missing)."""
    import secrets

    token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    if token:
        return token
    path = kiln_home() / "admin-token"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # O_EXCL: one worker makes it, the others read it
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24))
            log.info("admin token (for %s unset) written to %s", ADMIN_TOKEN_ENV, path)
        return path.read_text().strip()
    except OSError as exc:  # e.g. a read-only state directory in a container: admin routes stay off
        log.warning("admin routes off: %s unset and %s cannot be made (%s)", ADMIN_TOKEN_ENV, path, exc)
        return ""


def check_bearer(expected: str, authorization: str | None) -> None:
    """Check an ``Authorization`` value against ``expected``: :class:`InferenceError` 401 (no bearer
    token, with ``WWW-Authenticate``) or 403 (a wrong one, or no token to compare with). HTTP headers and
    gRPC metadata alike."""
    if not expected:
        raise InferenceError(403, f"admin routes are off on this server: start it with {ADMIN_TOKEN_ENV} set")
    if not authorization:
        raise InferenceError(
            401,
            f"admin route: send the admin token, 'Authorization: Bearer <token>' "
            f"({ADMIN_TOKEN_ENV}, or the token in $KILN_HOME/admin-token)",
            headers={"WWW-Authenticate": 'Bearer realm="kiln-admin"'},
        )
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise InferenceError(403, "wrong admin token")


def require_admin(authorization: str | None) -> None:
    """:func:`check_bearer` against the server's :func:`admin_token`."""
    check_bearer(admin_token(), authorization)
