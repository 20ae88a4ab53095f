"""One version of a Triton repository model, served as a :class:`~serving.model.LoadedModel`.

The version directory becomes an :class:`~kiln.artifacts.Artifact` whose manifest is written from the
completed ``config.pbtxt`` (tensors, labels, the ONNX file as the ``onnxruntime`` export), so the model
runs on Kiln's own onnxruntime runtime, adaptive batcher and admission control, with the same statistics
and metrics as a built-in model. What Triton does around the graph happens at the edge of :meth:`infer`:

- ``reshape``: a request's tensors (the config's ``dims``) are reshaped to what the graph takes, and
  the graph's outputs back to the config's ``dims``;
- ``max_batch_size: 0``: the tensors have no batch dimension, so each request runs alone (the batcher
  sees it as one row; the runtime takes the row dimension off again);
- ``TYPE_STRING``: BYTES elements are handed to onnxruntime as UTF-8 strings.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from kiln.artifacts import Artifact
from serving.config import ServeConfig
from serving.model import LoadedModel
from serving.repository import InferenceError
from serving.runtime import OnnxRuntime
from serving.triton import config as tc


class TritonModel(LoadedModel):
    task = "triton"

    def __init__(self, art: Artifact, config: ServeConfig, model_config: Any):
        """``model_config``: the completed ``ModelConfig`` of this version (:func:`load_version`)."""
        self.model_config = model_config
        self._batched = model_config.max_batch_size > 0
        self._reshape_in = {
            t.name: tuple(t.reshape.shape) for t in model_config.input if t.HasField("reshape")
        }
        self._reshape_out = {t.name: tuple(t.dims) for t in model_config.output if t.HasField("reshape")}
        self._strings = {t.name for t in model_config.input if t.data_type == tc.mc.TYPE_STRING}
        super().__init__(art, config, backends={tc.BACKEND: ""}, runtime_factory=self._runtime)
        self.max_batch_size = model_config.max_batch_size
        # The model-configuration answers (serving.oip): Triton's JSON over HTTP, its message over gRPC.
        self.triton_config = tc.config_json(model_config)
        self.triton_config_proto = model_config.SerializeToString()
        self.notes: list[str] = []  # what auto-complete filled in and what was ignored, for the log

    def _runtime(self, art: Artifact, backend: str, threads: int) -> _TritonRuntime:
        return _TritonRuntime(
            OnnxRuntime(art, backend, threads), [t.name for t in self.model_config.output], self._batched
        )

    async def infer(self, inputs: dict[str, np.ndarray], backend: str | None = None) -> dict[str, np.ndarray]:
        rows = next(iter(inputs.values())).shape[0] if self._batched else 1
        fed = {}
        for name, array in inputs.items():
            if name in self._strings:
                array = _utf8(name, array)
            if name in self._reshape_in:
                shape = ((rows,) if self._batched else ()) + self._reshape_in[name]
                try:
                    array = array.reshape(shape)
                except ValueError:
                    raise InferenceError(
                        400, f"input {name!r} of shape {list(array.shape)} does not reshape to {list(shape)}"
                    ) from None
            fed[name] = array if self._batched else array[None]  # one row for the batcher
        outputs = await super().infer(fed, backend)
        served = {}
        for name, array in outputs.items():
            if not self._batched:
                array = array[0]  # the row added for the batcher
            if name in self._reshape_out:
                array = array.reshape(((rows,) if self._batched else ()) + self._reshape_out[name])
            served[name] = array
        return served


class _TritonRuntime:
    """onnxruntime with the configured outputs only; for a model without a batch dimension, the row
    the batcher added comes off before the graph runs and goes back on its outputs."""

    def __init__(self, runtime: OnnxRuntime, outputs: list[str], batched: bool):
        self.runtime = runtime
        self.backend = runtime.backend
        self.load_seconds = runtime.load_seconds
        self.outputs = outputs
        self.batched = batched

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.runtime.session
        if self.batched:
            return dict(zip(self.outputs, session.run(self.outputs, inputs), strict=True))
        results = session.run(self.outputs, {k: v[0] for k, v in inputs.items()})
        return {name: np.asarray(r)[None] for name, r in zip(self.outputs, results, strict=True)}


def _utf8(name: str, array: np.ndarray) -> np.ndarray:
    out = np.empty(array.shape, dtype=object)
    flat = out.reshape(-1)
    for i, element in enumerate(array.reshape(-1)):
        try:
            flat[i] = element if isinstance(element, str) else bytes(element).decode()
        except UnicodeDecodeError:
            raise InferenceError(400, f"input {name!r}: element {i} is not UTF-8 text") from None
    return out


def load_version(model_dir: Path, version: int, config: ServeConfig) -> TritonModel:
    """Load version ``version`` of the repository model in ``model_dir`` (blocking).

    Raises:
        TritonConfigError: the config is malformed, not servable, or contradicts the graph; the version,
            its model file or the label file is missing or unreadable.
        RuntimeError: onnxruntime could not load the graph.
    """
    name = model_dir.name
    model_config, notes = read_config(model_dir)
    version_dir = model_dir / str(version)
    if not version_dir.is_dir():
        raise tc.TritonConfigError(f"version {version} has no directory {version_dir}")
    model_file = model_config.default_model_filename or tc.DEFAULT_MODEL_FILENAME
    graph_path = version_dir / model_file
    if not graph_path.is_file():
        raise tc.TritonConfigError(f"version {version} has no {model_file} (in {version_dir})")
    model_config, completed = tc.complete_config(model_config, tc.read_graph(graph_path), model_file)
    labels = read_labels(model_dir, model_config)
    manifest = {
        "name": name,
        "task": TritonModel.task,
        "source": {"triton_repository": str(model_dir.parent), "config": tc.CONFIG_FILE},
        "inputs": [_spec(s) for s in tc.tensor_specs(model_config, "input")],
        "outputs": [_spec(s) for s in tc.tensor_specs(model_config, "output")],
        "labels": labels,
        "exports": {"onnx": {"file": model_file, "backend": tc.BACKEND}},
    }
    art = Artifact(name, str(version), version_dir, manifest)
    # The config's scheduling is this model's settings; an operator's own (KILN_MODEL_CONFIG) still win.
    settings = {**tc.model_settings(model_config), **config.model_settings.get(name, {})}
    model = TritonModel(
        art, replace(config, model_settings={**config.model_settings, name: settings}), model_config
    )
    model.notes = notes + completed
    return model


def read_config(model_dir: Path) -> tuple[Any, list[str]]:
    """The parsed and checked ``config.pbtxt`` of ``model_dir`` (an empty one when it has none: Triton
    auto-completes ONNX models entirely from the graph)."""
    path = model_dir / tc.CONFIG_FILE
    if not path.exists():
        text = ""
    else:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise tc.TritonConfigError(f"{tc.CONFIG_FILE} is unreadable: {exc}") from None
    return tc.parse_config(text, model_dir.name)


def read_labels(model_dir: Path, model_config: Any) -> list[str]:
    """The lines of the config's ``label_filename`` (relative to the model directory), or []."""
    relpath = tc.labels_file(model_config)
    if not relpath:
        return []
    path = (model_dir / relpath).resolve()
    if model_dir.resolve() not in path.parents:
        raise tc.TritonConfigError(f"label_filename: {relpath!r} is outside the model directory")
    try:
        return path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise tc.TritonConfigError(f"label_filename: {relpath!r} is unreadable: {exc}") from None


def _spec(spec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}
