"""Model control (Triton's explicit model-control mode) and statistics, shared by HTTP and gRPC.

``load`` / ``unload`` change what the server serves, so they need the admin token: HTTP
``Authorization: Bearer <KILN_ADMIN_TOKEN>``, gRPC metadata ``authorization: Bearer <token>``: the one admin
token of the server (:mod:`serving.admin`; ``$KILN_HOME/admin-token`` when the variable is unset). No token:
401; a wrong one: 403. A protocol app built without a token (``admin_token=""``) has model control off.

Request parameters (Triton's load/unload bodies carry ``parameters``): ``version`` picks a model-store
version to load (default: the store's latest) or a loaded version to unload (default: all of them).
With several worker processes each has its own repository, so model control needs ``KILN_WORKERS=1``.
"""

from __future__ import annotations

from typing import Any

from serving.admin import check_bearer
from serving.repository import InferenceError, ModelRepository


def authorize(expected: str, authorization: str | None) -> None:
    """Check an ``Authorization`` value against the admin token; raises 401/403 :class:`InferenceError`."""
    check_bearer(expected, authorization)  # "" (no token: none set, none could be made) = off, 403


def version_parameter(parameters: dict[str, Any]) -> str:
    """The optional ``version`` parameter of a load/unload request, checked."""
    unknown = sorted(set(parameters) - {"version", "unload_dependents"})
    if unknown:
        raise InferenceError(400, f"unknown parameters {unknown}; model control takes 'version'")
    version = parameters.get("version", "")
    if not isinstance(version, str):
        raise InferenceError(400, f"parameter 'version' must be a string, got {version!r}")
    return version


async def load(repo: ModelRepository, name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Load ``name`` and make it the default; returns its index row."""
    model = await repo.load(name, version_parameter(parameters))
    return {"name": model.name, "version": model.version, "state": "READY"}


async def unload(repo: ModelRepository, name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Unload ``name`` (every version, or ``parameters['version']``); returns what was unloaded."""
    versions = await repo.unload(name, version_parameter(parameters))
    return {"name": name, "unloaded_versions": versions}


def statistics(repo: ModelRepository, name: str = "", version: str = "") -> list[dict[str, Any]]:
    """Triton's ``model_stats`` entries: every loaded model (``name`` ""), every version of one model,
    or one version; 404 for an unknown one."""
    if not name:
        models = [m for versions in repo.models.values() for m in versions.values()]
    elif version:
        models = [repo.get(name, version)]
    else:
        repo.get(name)  # 404 / 503 naming the model
        models = list(repo.models[name].values())
    return [
        {"name": m.name, "version": m.version, **m.stats.as_dict()}
        for m in sorted(models, key=lambda m: (m.name, m.version))
    ]
