"""A Triton model repository directory, loaded into the server's :class:`~serving.repository.ModelRepository`.

Layout (Triton's "Model Repository" docs): ``DIR/<name>/config.pbtxt`` and ``DIR/<name>/<version>/``
with the ONNX graph; version directories are positive integers (others, and names starting with 0, are
ignored as Triton ignores them); hidden entries are skipped. Each model serves the versions its
``version_policy`` picks; the highest loaded version is the default.

A model that cannot be served (malformed or unsupported config, a graph that contradicts it, no version
directory, an unreadable label file, a graph onnxruntime will not load) is UNAVAILABLE with the reason in
the repository index and the log; every other model serves.

Model control: at start-up every model is loaded (Triton's ``--model-control-mode=none``); the admin
load/unload routes load a version from the directory by name (Triton's explicit mode: the newest version
the policy allows, or ``parameters.version``); with polling on (:meth:`TritonRepository.poll`, Triton's
``--model-control-mode=poll``) a new model or version directory is loaded and a removed one is drained
and unloaded, a served version whose graph, config or label file changed is reloaded, and a model or
version that failed is tried again once its files change. Polling acts when a model's directory changed
since the previous scan, so a model an operator unloaded stays unloaded until its directory changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving import metrics
from serving.config import ServeConfig
from serving.repository import InferenceError, ModelRepository
from serving.triton import config as tc
from serving.triton.model import TritonModel, load_version, read_config

log = logging.getLogger("kiln.serving")


@dataclass(frozen=True)
class _Scan:
    """One model directory as found on disk: the versions its policy serves, or why none can be."""

    versions: tuple[int, ...]
    error: str
    shared: tuple  # what changes with config.pbtxt or the label file
    files: tuple  # (version, what changes with its files) per version directory
    present: tuple[int, ...] = ()
    config: Any = field(default=None, compare=False)


class TritonRepository:
    def __init__(self, root: str | Path, config: ServeConfig):
        self.root = Path(root)
        self.config = config
        self._seen: dict[str, _Scan] = {}

    # --- the directory ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The model directories, by name."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def has(self, name: str) -> bool:
        return bool(name) and not name.startswith(".") and (self.root / name).is_dir()

    def scan(self, name: str) -> _Scan:
        model_dir = self.root / name
        present = _versions(model_dir)
        shared = (_stamp(model_dir / tc.CONFIG_FILE),)
        files = tuple((v, _stamp(model_dir / str(v))) for v in present)
        try:
            model_config, _ = read_config(model_dir)
            label = tc.labels_file(model_config)
            shared += (_stamp(model_dir / label) if label else None,)
            if not present:
                raise tc.TritonConfigError(
                    f"no version directory: put the graph in {model_dir}/1/"
                    f"{model_config.default_model_filename or tc.DEFAULT_MODEL_FILENAME}"
                )
            wanted = tc.select_versions(model_config, present)
            if not wanted:
                raise tc.TritonConfigError(f"version_policy serves none of the versions present {present}")
        except tc.TritonConfigError as exc:
            return _Scan((), str(exc), shared, files)
        return _Scan(tuple(wanted), "", shared, files, tuple(present), model_config)

    def load(self, tag: str) -> TritonModel:
        """Load ``NAME`` (the newest version the policy serves) or ``NAME:VERSION`` (blocking): the
        server's loader for repository models (model control)."""
        name, _, version = tag.partition(":")
        if version:
            if not version.isdigit() or version.startswith("0"):
                raise tc.TritonConfigError(
                    f"version {version!r} is not a Triton version (a positive integer)"
                )
            number = int(version)
        else:
            found = self.scan(name)
            if found.error:
                raise tc.TritonConfigError(found.error)
            number = found.versions[-1]
        model = load_version(self.root / name, number, self.config)
        for note in model.notes:
            log.info("%s:%s: %s", name, number, note)
        return model

    # --- start-up --------------------------------------------------------------------------------------

    def load_all(self, repo: ModelRepository) -> None:
        """Load every model of the directory (blocking, at start-up); failures are recorded per model."""
        for name in self.names():
            found = self._seen[name] = self.scan(name)
            if name in repo.models:
                self._fail(repo, name, "", f"the name is taken by the model-store model {name!r}", True)
                continue
            if found.error:
                self._fail(repo, name, "", found.error, True)
                continue
            reasons = []
            for version in found.versions:  # oldest first: the newest loaded ends up the default
                try:
                    repo.add(self.load(f"{name}:{version}"))
                except Exception as exc:  # noqa: BLE001 - isolation: a failure is this version's alone
                    reasons.append(f"version {version}: {type(exc).__name__}: {exc}")
                    log.error("model %s version %s is UNAVAILABLE: %s", name, version, reasons[-1])
            if name not in repo.models:
                self._fail(repo, name, str(found.versions[-1]), "; ".join(reasons), True)

    @staticmethod
    def _fail(repo: ModelRepository, name: str, version: str, reason: str, configured: bool) -> None:
        log.error("model %s is UNAVAILABLE: %s", name, reason)
        repo.fail(name, version, reason, configured=configured)
        metrics.MODEL_READY.labels(model=name, version=version, backend=tc.BACKEND).set(0)

    # --- polling ---------------------------------------------------------------------------------------

    async def poll(self, repo: ModelRepository, interval_s: float) -> None:
        """Rescan every ``interval_s`` seconds and apply what changed, until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sync(repo)
            except Exception:  # noqa: BLE001 - one bad scan must not stop polling
                log.exception("polling the model repository %s failed", self.root)

    async def sync(self, repo: ModelRepository) -> None:
        """Apply the changes on disk since the previous scan: new models and versions are loaded,
        removed ones drained and unloaded, a failed model is retried when its files change."""
        names = await asyncio.to_thread(self.names)
        for name in sorted(set(self._seen) - set(names)):  # model directory removed
            self._seen.pop(name)
            if repo.models.get(name) or name in repo.failed:
                log.info("model %s left the repository; unloading it", name)
                await self._unload(repo, name, "")
        for name in names:
            found = await asyncio.to_thread(self.scan, name)
            before = self._seen.get(name)
            if before == found:
                continue
            self._seen[name] = found
            loaded = set(repo.models.get(name, {}))
            if found.error:
                if loaded:  # Triton keeps serving what it has when a changed config does not load
                    log.error("model %s: %s; still serving versions %s", name, found.error, sorted(loaded))
                else:
                    self._fail(repo, name, "", found.error, False)
                continue
            wanted = {str(v) for v in found.versions}
            if before is not None:  # changed files of a served version: reload it
                await self._reload_changed(repo, name, before, found, loaded & wanted)
            # What the policy serves and is not loaded: new versions, and ones that failed (a graph still
            # being copied) now that their files changed.
            failed = set()
            for version in sorted(wanted - loaded, key=int):
                try:
                    await repo.load(name, version)
                    log.info("model %s version %s appeared in the repository; serving it", name, version)
                except InferenceError as exc:
                    log.error("model %s version %s did not load: %s", name, version, exc.message)
                    failed.add(int(version))
            if failed:  # the policy over the versions that load: a broken new one does not evict an old one
                usable = [v for v in found.present if v not in failed]
                wanted = {str(v) for v in tc.select_versions(found.config, usable)}
            gone = sorted(set(repo.models.get(name, {})) - wanted, key=int)
            for version in gone:
                log.info("model %s version %s left the repository; unloading it", name, version)
                await self._unload(repo, name, version)
            serving = repo.models.get(name, {})
            if serving and repo.default_versions.get(name) != max(serving, key=int):
                await repo.load(name, max(serving, key=int))  # the highest version is the default

    async def _reload_changed(
        self, repo: ModelRepository, name: str, before: _Scan, found: _Scan, served: set[str]
    ) -> None:
        """Reload the served versions whose graph, config or labels changed (Triton's poll mode): a fresh
        copy takes the requests, the old one drains and closes, so no request fails. A version whose new
        files do not load keeps serving its old copy (Triton keeps the loaded model when a reload fails)."""
        old_files, new_files = dict(before.files), dict(found.files)
        for version in sorted(served, key=int):
            if before.shared == found.shared and old_files.get(int(version)) == new_files.get(int(version)):
                continue
            try:
                fresh = await asyncio.to_thread(self.load, f"{name}:{version}")
            except Exception as exc:  # noqa: BLE001 - the served copy keeps serving
                log.error(
                    "model %s version %s changed but does not load (%s: %s); the served copy keeps serving",
                    *(name, version, type(exc).__name__, exc),
                )
                continue
            old = repo.models.get(name, {}).get(version)
            repo.add(fresh, default=repo.default_versions.get(name) == version)
            log.info("model %s version %s changed in the repository; reloaded it", name, version)
            if old is not None:
                deadline = time.monotonic() + self.config.drain_timeout_s
                while old.in_flight and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                old.close()  # its ready gauge has the fresh copy's labels: set them again
                fresh.mark_ready()

    async def _unload(self, repo: ModelRepository, name: str, version: str) -> None:
        try:
            await repo.unload(name, version, drain_seconds=self.config.drain_timeout_s)
        except InferenceError as exc:  # already unloaded by an operator
            log.info("model %s %s: %s", name, version or "", exc.message)


def _versions(model_dir: Path) -> list[int]:
    """Triton's version directories: positive integers without a leading 0."""
    try:
        entries = list(model_dir.iterdir())
    except OSError:
        return []
    return sorted(
        int(p.name) for p in entries if p.is_dir() and p.name.isdigit() and not p.name.startswith("0")
    )


def _stamp(path: Path) -> tuple | None:
    """Size and modification time of a file, or of every file under a directory; None when absent."""
    try:
        if path.is_dir():
            return tuple(
                sorted((str(p.relative_to(path)), _stamp(p)) for p in path.rglob("*") if p.is_file())
            )
        st = path.stat()
        return (st.st_size, st.st_mtime_ns)
    except OSError:
        return None
