"""ONNX export of every model-zoo variant, and onnxruntime parity on one dynamic-batch graph."""

import numpy as np
import onnx
import pytest
import torch

from export.onnx import export_onnx, max_abs_diff
from model_zoo import create_model, list_models
from model_zoo.soft import is_exportable


@pytest.mark.parametrize("name", list_models("vit_*"))
def test_export_parity_dynamic_batch(name, tmp_path):
    torch.manual_seed(0)
    # depth 1 keeps the unrolled Newton graph (and the export time) small; every block is the same.
    model = create_model(name, depth=1)
    path = export_onnx(model, torch.rand(1, 1, 32, 32), tmp_path / f"{name}.onnx")
    assert not is_exportable()  # the switch is restored
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["input"]
    assert [o.name for o in graph.graph.output] == ["logits"]
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        inputs = rng.random((batch, 1, 32, 32), dtype=np.float32)
        assert max_abs_diff(model, path, inputs) < 1e-4


def test_max_abs_diff_errors(tmp_path):
    model = create_model("vit_softmax_tiny", depth=1)
    with pytest.raises(FileNotFoundError):
        max_abs_diff(model, tmp_path / "missing.onnx", np.zeros((1, 1, 32, 32), np.float32))
    (tmp_path / "x.onnx").write_bytes(b"")
    with pytest.raises(TypeError, match="numpy"):
        max_abs_diff(model, tmp_path / "x.onnx", torch.zeros(1, 1, 32, 32))


def test_export_onnx_rejects_non_tensor(tmp_path):
    with pytest.raises(TypeError, match="torch.Tensor"):
        export_onnx(create_model("vit_softmax_tiny", depth=1), np.zeros((1, 1, 32, 32)), tmp_path / "m.onnx")
