"""One way to open any exported graph for measuring it: ONNX files in onnxruntime (CPU), TensorRT
engines (``*.plan``) in :class:`export.tensorrt.EngineSession`, which answers the same calls. Export specs
measure quality through :func:`open_session`, so the same metric gates an int8 graph and an engine."""

from __future__ import annotations

from pathlib import Path


def open_session(path: Path | str, threads: int | None = None):
    """An ``onnxruntime.InferenceSession``-like object over ``path`` (``get_inputs()``, ``run(None, feeds)``).

    A TensorRT engine is recognised by ``.plan`` among the file's suffixes (``model.fp16.plan``, also while
    staged as ``model.fp16.plan.staged``); it needs a CUDA GPU and the ``tensorrt`` package.
    """
    if ".plan" in Path(path).suffixes:
        from export.tensorrt import EngineSession

        return EngineSession(path)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
