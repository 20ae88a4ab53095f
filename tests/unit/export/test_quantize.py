import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.onnx import export_onnx
from export.quantize import QUANTIZERS, CalibrationReader, get_quantizer, weight_bearing_nodes
from model_zoo import create_model


@pytest.fixture(scope="module", params=["vit_softmax_tiny", "vit_soft_tiny"])
def fp32_graph(request, tmp_path_factory):
    torch.manual_seed(0)
    model = create_model(request.param, depth=1).eval()
    path = tmp_path_factory.mktemp("q") / "model.onnx"
    export_onnx(model, torch.rand(2, 1, 32, 32), path)
    return request.param, path


def test_only_layers_with_constant_weights_are_selected(fp32_graph):
    _, path = fp32_graph
    model = onnx.load(str(path))
    nodes = weight_bearing_nodes(model)
    consts = {i.name for i in model.graph.initializer} | {
        n.output[0] for n in model.graph.node if n.op_type == "Constant"
    }
    by_name = {n.name: n for n in model.graph.node}
    assert nodes
    assert all(by_name[n].input[1] in consts for n in nodes)
    activation_products = [n for n in model.graph.node if n.op_type == "MatMul" and n.name not in nodes]
    assert all(n.input[1] not in consts for n in activation_products)


def test_int8_static_quantization_tracks_fp32(fp32_graph, tmp_path):
    name, src = fp32_graph
    rng = np.random.default_rng(0)
    calib = CalibrationReader("input", rng.random((64, 1, 32, 32), dtype=np.float32), batch_size=16)
    dst = tmp_path / "model.int8.onnx"
    facts = get_quantizer("int8-static").quantize(src, dst, calib)
    assert facts["quantized_nodes"] > 0 and facts["format"] == "QDQ"
    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x = rng.random((16, 1, 32, 32), dtype=np.float32)
    fp32 = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    int8 = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.corrcoef(fp32.ravel(), int8.ravel())[0, 1] > 0.98, name


def test_calibration_reader_batches_and_rewinds():
    reader = CalibrationReader("input", np.zeros((10, 3), np.float32), batch_size=4)
    sizes = [len(b["input"]) for b in iter(reader.get_next, None)]
    assert sizes == [4, 4, 2]
    reader.rewind()
    assert len(reader.get_next()["input"]) == 4
    with pytest.raises(ValueError):
        CalibrationReader("input", np.zeros((0, 3), np.float32))


def test_quantizer_map():
    assert {"int8-static", "fp16-trt", "int8-trt"} <= set(QUANTIZERS)
    with pytest.raises(ValueError, match="int8-static"):
        get_quantizer("int4-magic")
    with pytest.raises(ValueError, match="minmax"):
        get_quantizer("int8-static", method="percentile-ish")
