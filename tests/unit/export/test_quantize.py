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


# --------------------------------------------------------------------------------------------------
# the format knobs of int8-static (measured as a grid by `kiln bench vit`)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def soft_graph(tmp_path_factory):
    """A one-block SOFT ViT: it has MatMuls of two activations (kernel products, Newton iterations)."""
    torch.manual_seed(0)
    model = create_model("vit_soft_wide", embed_dim=48, depth=1, num_heads=2, newton_iters=4).eval()
    path = tmp_path_factory.mktemp("soft") / "model.onnx"
    export_onnx(model, torch.rand(2, 1, 32, 32), path)
    return path


def _calib(n=32):
    return CalibrationReader("input", np.random.default_rng(1).random((n, 1, 32, 32), dtype=np.float32))


def _dequantized_inputs(model: onnx.ModelProto) -> dict[str, list[bool]]:
    """node name -> for each input, whether a DequantizeLinear computes it."""
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name: [i in dq for i in n.input] for n in model.graph.node}


def _quantize(src, tmp_path, **settings):
    dst = tmp_path / "q.onnx"
    facts = get_quantizer("int8-static", **settings).quantize(src, dst, _calib())
    return facts, onnx.load(str(dst)), dst


def _by_name(model):
    return {n.name: n for n in model.graph.node}


def test_ops_all_quantizes_elementwise_ops_and_activation_products(soft_graph, tmp_path):
    facts, q, _ = _quantize(soft_graph, tmp_path, ops="all")
    fed = _dequantized_inputs(q)
    assert any(all(fed[n.name][:2]) for n in q.graph.node if n.op_type == "Add")
    assert any(all(fed[n.name][:2]) for n in q.graph.node if n.op_type == "Mul")
    linear = set(weight_bearing_nodes(onnx.load(str(soft_graph))))
    # SOFT's kernel products and Newton-Raphson steps: MatMuls of two activations, quantized too
    assert any(all(fed[n.name]) for n in q.graph.node if n.op_type == "MatMul" and n.name not in linear)
    assert facts["settings"]["ops"] == "all" and facts["quantized_nodes"] > len(linear)


def test_linear_quantizes_only_weight_bearing_nodes_and_head_can_stay_fp32(fp32_graph, tmp_path):
    _, src = fp32_graph
    linear = weight_bearing_nodes(onnx.load(str(src)))
    _, q, _ = _quantize(src, tmp_path, ops="linear")
    fed = _dequantized_inputs(q)
    assert all(fed[n][0] for n in linear)
    assert not any(
        fed[n.name][0] for n in q.graph.node if n.op_type in ("Conv", "Softmax", "LayerNormalization")
    )
    facts, q, _ = _quantize(src, tmp_path, ops="linear", quantize_head=False)
    fed = _dequantized_inputs(q)
    assert not any(fed[linear[-1]]) and all(fed[n][0] for n in linear[:-1])
    assert facts["quantize_head"] is False
    _, q, _ = _quantize(src, tmp_path, ops="linear+conv")
    assert any(all(_dequantized_inputs(q)[n.name][:2]) for n in q.graph.node if n.op_type == "Conv")


def test_per_channel_activation_type_and_qoperator_reach_the_graph(fp32_graph, tmp_path):
    _, src = fp32_graph
    facts, q, _ = _quantize(src, tmp_path, per_channel=True, activations="int8", reduce_range=True)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    weight_dq = [
        n
        for n in q.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 2
    ]
    assert weight_dq and all(inits[n.input[1]].size > 1 for n in weight_dq)  # one scale per channel
    act_q = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert act_q and all(inits[n.input[2]].dtype == np.int8 for n in act_q)  # S8S8
    assert max(int(np.abs(inits[n.input[0]]).max()) for n in weight_dq) <= 64  # 7-bit weights
    assert facts["settings"] == {
        "format": "qdq",
        "per_channel": True,
        "ops": "linear",
        "activations": "int8",
        "reduce_range": True,
        "calibration_method": "minmax",
        "quantize_head": True,
        "quantize_linear_outputs": False,
    }
    facts, q, _ = _quantize(src, tmp_path, quant_format="qoperator")
    ops = {n.op_type for n in q.graph.node}
    assert "QLinearMatMul" in ops and "DequantizeLinear" in ops and facts["format"] == "QOperator"


def test_dynamic_quantization_needs_no_calibration(fp32_graph, tmp_path):
    _, src = fp32_graph
    dst = tmp_path / "dyn.onnx"
    facts = get_quantizer("int8-dynamic").quantize(src, dst, None)
    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert "DynamicQuantizeLinear" in ops and "MatMulInteger" in ops and facts["format"] == "dynamic"
    x = np.random.default_rng(3).random((8, 1, 32, 32), dtype=np.float32)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.98


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"quant_format": "qdq2"}, "qoperator"),
        ({"ops": "everything"}, "linear"),
        ({"activations": "fp8"}, "uint8"),
    ],
)
def test_unknown_settings_name_the_valid_ones(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_quantizer("int8-static", **kwargs)


def test_fp32_linear_outputs_fuse_into_matmul_integer_to_float(fp32_graph, tmp_path):
    """Without output quantization, onnxruntime runs each linear layer as one MatMulIntegerToFloat."""
    _, src = fp32_graph

    def fused_ops(settings):
        _, _, dst = _quantize(src, tmp_path, **settings)
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
        ort.InferenceSession(str(dst), opts, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]

    linear = len(weight_bearing_nodes(onnx.load(str(src))))
    unfused = fused_ops({"ops": "linear", "quantize_linear_outputs": True})
    fused = fused_ops({"ops": "linear", "quantize_linear_outputs": False})
    assert fused.count("MatMulIntegerToFloat") >= linear - 1  # the head may stay a Gemm
    assert fused.count("DequantizeLinear") < unfused.count("DequantizeLinear")


def test_tensorrt_builds_do_not_import_the_quantizer_map():
    """export.quantize imports export.tensorrt (its engine builds are quantizers), never the reverse."""
    import subprocess
    import sys

    code = "import sys, export.tensorrt; sys.exit('export.quantize' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
