"""Triton model repositories, served unchanged through Kiln's own seams.

A directory laid out as Triton's (``DIR/<name>/config.pbtxt``, ``DIR/<name>/<version>/model.onnx``,
an optional ``label_filename`` file) is read by :mod:`serving.triton.config` (``config.pbtxt`` parsed with
protobuf's ``text_format`` against Triton's own ``ModelConfig`` message, as ``tritonclient`` ships it),
each version is served by :class:`serving.triton.model.TritonModel` (a
:class:`~serving.model.LoadedModel`: the same runtime, batcher, admission, statistics and metrics as the
built-in models), and :class:`serving.triton.repository.TritonRepository` loads the directory into the
server's :class:`~serving.repository.ModelRepository`, at start-up, on model-control loads and, in
polling mode, whenever a version directory appears or goes.

Nothing in the repository is executed: Kiln reads ``config.pbtxt``, the label files and ONNX graphs
(run by onnxruntime) and refuses every other platform and backend (Python backends, ensembles,
TensorFlow, PyTorch, TensorRT plans) with a message naming the field.
"""
