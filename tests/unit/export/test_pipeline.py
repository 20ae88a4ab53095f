import onnxruntime as ort
import pytest

from export.pipeline import ExportError, export_artifact
from kiln.artifacts import get_artifact
from training.data import split_inputs
from training.trainer import train


@pytest.fixture(scope="module")
def artifact():
    return train("vit-softmax", epochs=1, progress=False).artifact


def test_export_records_parity_and_accuracy_under_one_tag(artifact):
    logs = []
    export_artifact(artifact.tag, ["onnx", "int8-static", "fp16-trt"], log=logs.append, progress=False)
    art = get_artifact(artifact.tag)
    onnx_entry, int8_entry = art.export("onnx"), art.export("int8-static")
    assert onnx_entry["max_abs_diff"] <= onnx_entry["atol"]
    assert art.file(onnx_entry["file"]).is_file() and art.file(int8_entry["file"]).is_file()
    x, y = split_inputs("test", (32, 32))

    def accuracy(graph):  # measured here, not read back from the pipeline
        sess = ort.InferenceSession(str(art.file(graph)), providers=["CPUExecutionProvider"])
        return float((sess.run(None, {"input": x})[0].argmax(1) == y).mean())

    assert onnx_entry["test_accuracy"] == pytest.approx(accuracy(onnx_entry["file"]))
    assert int8_entry["fp32_test_accuracy"] == pytest.approx(accuracy(onnx_entry["file"]))
    assert int8_entry["test_accuracy"] == pytest.approx(accuracy(int8_entry["file"]))
    assert int8_entry["gate"]["passed"] is True  # its quality loss is checked in test_gates.py
    if art.export("fp16-trt") is None:  # CPU machine: a clear skip message, nothing recorded
        assert any("skipping fp16-trt" in line for line in logs)


def test_parity_failure_discards_the_new_graph_and_keeps_the_good_one(artifact):
    before = get_artifact(artifact.tag)
    good = before.file(before.export("onnx")["file"]).read_bytes()
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_artifact(artifact.tag, ["onnx"], atol=-1.0, log=lambda _: None, progress=False)
    after = get_artifact(artifact.tag)
    assert after.export("onnx") == before.export("onnx")
    assert after.file(after.export("onnx")["file"]).read_bytes() == good
    assert not list(after.path.glob("*.staged"))


def test_int8_needs_onnx_first():
    art = train("vit-softmax", epochs=1, progress=False).artifact
    with pytest.raises(ExportError, match="needs the 'onnx' export first"):
        export_artifact(art.tag, ["int8-static"], log=lambda _: None, progress=False)


def test_unknown_format():
    with pytest.raises(ValueError, match="valid"):
        export_artifact("whatever", ["onnx", "tflite"], progress=False)
