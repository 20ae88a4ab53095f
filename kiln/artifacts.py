"""Model artifacts in BentoML's model store.

An artifact is one model-store tag (``vit-soft:<version>``) whose directory holds everything needed to
rebuild and run the model with no training code:

- ``kiln.json``: registry architecture + constructor args, task and preprocessing, metrics, code
  version, and one entry per exported format (file, parity, accuracy);
- ``weights.safetensors``: the PyTorch weights (safetensors only: no pickle is ever written or read);
- exported graphs added later by ``kiln export`` under the same tag: ``model.onnx``,
  ``model.int8.onnx``, ``model.fp16.plan``, ``model.int8.plan``.

BentoML's own ``model.yaml`` carries labels and a copy of the creation-time metadata; ``kiln.json``
is Kiln's source of truth and is rewritten atomically when an export adds a format.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml

import kiln  # noqa: F401  (configures BENTOML_HOME before bentoml is imported)

MANIFEST = "kiln.json"
WEIGHTS = "weights.safetensors"
FORMAT_VERSION = 1
# Files that could hold pickled code. Loading refuses an artifact that has any of them.
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib")


class ArtifactError(Exception):
    """An artifact is missing, malformed, or not safe to load."""


class ArtifactNotFound(ArtifactError):
    """The model store has no artifact of that tag."""


@dataclass
class Artifact:
    """A model-store entry: its tag, directory and manifest."""

    name: str
    version: str
    path: Path
    manifest: dict[str, Any]

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    def file(self, relpath: str) -> Path:
        """Path of a file inside the artifact, refusing paths that escape it."""
        p = (self.path / relpath).resolve()
        if self.path.resolve() not in p.parents:
            raise ArtifactError(f"{self.tag}: path {relpath!r} escapes the artifact directory")
        return p

    @property
    def weights_path(self) -> Path:
        return self.file(self.manifest.get("weights", WEIGHTS))

    def export(self, fmt: str) -> dict[str, Any] | None:
        """The manifest entry of an exported format (``onnx``, ``onnx-int8``, ``trt-fp16``...)."""
        return self.manifest.get("exports", {}).get(fmt)

    def update(self, **changes: Any) -> None:
        """Merge top-level keys into the manifest (dict values are merged one level deep); atomic."""
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(self.manifest.get(key), dict):
                self.manifest[key] = {**self.manifest[key], **value}
            else:
                self.manifest[key] = value
        _write_json_atomic(self.path / MANIFEST, self.manifest)


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=5,
        check=True,
    ).stdout.strip()


def code_version() -> str:
    """Kiln's version plus the git commit of the source tree when there is one."""
    version = kiln.__version__
    try:
        sha = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return f"{version}+g{sha}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return version


def save_artifact(
    name: str, weights_file: Path | None, manifest: dict[str, Any], *, labels: dict[str, str] | None = None
) -> Artifact:
    """Create a new version of ``name`` in the model store from a safetensors file and a manifest.

    ``weights_file`` None: an artifact of exported graphs only (an imported ONNX file); its manifest
    records ``"weights": null``.
    """
    if weights_file is not None:
        _check_safetensors(weights_file)
    manifest = {"format_version": FORMAT_VERSION, "name": name, "code_version": code_version(), **manifest}
    manifest.setdefault("weights", WEIGHTS if weights_file is not None else None)
    manifest.setdefault("exports", {})
    meta = {k: manifest[k] for k in ("architecture", "task", "code_version") if k in manifest}
    with bentoml.models.create(name, labels=labels or {}, metadata=meta) as bento_model:
        dest = Path(bento_model.path)
        if weights_file is not None:
            (dest / WEIGHTS).write_bytes(Path(weights_file).read_bytes())
        _write_json_atomic(dest / MANIFEST, manifest)
        tag = bento_model.tag
    return get_artifact(f"{tag.name}:{tag.version}")


def get_artifact(tag: str) -> Artifact:
    """Load an artifact's manifest by ``name`` (latest) or ``name:version``.

    Raises:
        ArtifactError: no such tag, not a Kiln artifact, or it contains pickle-format files.
    """
    try:
        bento_model = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        known = sorted({m.tag.name for m in bentoml.models.list()})
        raise ArtifactNotFound(
            f"no model {tag!r} in the store at {os.environ['BENTOML_HOME']}; stored: {known or 'none'}"
        ) from None
    path = Path(bento_model.path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{bento_model.tag} has no {MANIFEST}: not a Kiln artifact")
    unsafe = sorted(p.name for p in path.rglob("*") if p.suffix in _PICKLE_SUFFIXES)
    if unsafe:
        raise ArtifactError(
            f"{bento_model.tag} contains pickle-capable files {unsafe}; Kiln refuses to load it"
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{bento_model.tag}: manifest format {manifest.get('format_version')!r}, "
            f"this Kiln reads {FORMAT_VERSION}"
        )
    art = Artifact(bento_model.tag.name, bento_model.tag.version, path, manifest)
    if manifest.get("weights", WEIGHTS) is not None:  # None: exported graphs only (an imported ONNX file)
        _check_safetensors(art.weights_path)
    return art


def list_artifacts(name: str | None = None) -> list[Artifact]:
    """Every Kiln artifact in the store (newest first), optionally of one name."""
    out = []
    for m in sorted(bentoml.models.list(name), key=lambda m: m.info.creation_time, reverse=True):
        try:
            out.append(get_artifact(str(m.tag)))
        except ArtifactError:
            continue  # not a Kiln artifact (e.g. a model some other tool saved): not ours to list
    return out


def delete_artifact(tag: str) -> None:
    get_artifact(tag)  # raises a helpful error for unknown tags
    bentoml.models.delete(tag)


def _check_safetensors(path: Path) -> None:
    """Refuse anything that is not a safetensors file (8-byte little-endian header size + JSON header)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"weights file {path} does not exist")
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ArtifactError(f"{path} is not a safetensors file (too short)")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > 100_000_000 or f.read(1) != b"{":
            raise ArtifactError(f"{path} is not a safetensors file; Kiln loads no other weight format")


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_torch_model(art: Artifact):
    """Rebuild the PyTorch model from the artifact's config and safetensors weights (eval mode)."""
    from safetensors.torch import load_file

    from model_zoo import create_model

    model = create_model(art.manifest["architecture"], **art.manifest.get("args", {}))
    model.load_state_dict(load_file(str(art.weights_path)), strict=True)
    return model.eval()
