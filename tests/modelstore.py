"""Build small model stores for integration tests from artifacts a session already trained.

A BentoML model-store entry is a directory ``bentoml/models/<name>/<version>/`` holding ``model.yaml``
(name, version), Kiln's ``kiln.json`` and the artifact's files, plus ``bentoml/models/<name>/latest``.
Copying one under a new name or version gives a second model without training: that is how the tests
make a broken artifact (a corrupt graph, a missing file) or a new version to switch to.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml


def model_dir(home: Path, name: str, version: str | None = None) -> Path:
    """Directory of ``name`` (``version``, default the store's latest) in the store at ``home``."""
    root = home / "bentoml" / "models" / name
    return root / (version or (root / "latest").read_text().strip())


def copy_model(
    src_home: Path,
    name: str,
    dst_home: Path,
    *,
    as_name: str | None = None,
    as_version: str | None = None,
    latest: bool = True,
) -> Path:
    """Copy the latest version of ``name`` from one store into another (renamed / re-versioned).

    Args:
        src_home: KILN_HOME holding ``name``.
        name: The model to copy.
        dst_home: KILN_HOME to copy it into (created if needed).
        as_name: Its name in ``dst_home`` (default ``name``).
        as_version: Its version there (default the source's; BentoML versions are 16 lowercase
            letters/digits).
        latest: Point ``dst_home``'s ``latest`` for the name at the copy.

    Returns:
        The copy's directory.
    """
    src = model_dir(src_home, name)
    new_name = as_name or name
    version = as_version or src.name
    dst = dst_home / "bentoml" / "models" / new_name / version
    shutil.copytree(src, dst)
    meta = yaml.safe_load((dst / "model.yaml").read_text())
    meta.update(name=new_name, version=version)
    (dst / "model.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    manifest = json.loads((dst / "kiln.json").read_text())
    manifest["name"] = new_name
    (dst / "kiln.json").write_text(json.dumps(manifest, indent=2))
    if latest or not (dst.parent / "latest").exists():
        (dst.parent / "latest").write_text(version)
    return dst
