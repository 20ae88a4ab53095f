"""Quality gates on derived graphs: a graph that loses more than allowed is discarded, recorded, logged,
and never served; one that passes is measured independently of the pipeline's own numbers."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest

from export.classification import ClassifierExport
from export.diffusion import DiffusionExport
from export.gates import QualityGate, evaluate, parse_max_loss, with_overrides
from export.pipeline import SPECS, ExportError, export_artifact
from export.sessions import open_session
from kiln.artifacts import get_artifact
from serving.runtime import available_backends, export_for
from training.data import split_inputs
from training.recipes import RECIPES
from training.trainer import train

# A small softmax ViT on 16×16 digits: ~0.8 validation accuracy in about 10 s on one core, so the int8
# graph has accuracy to lose (a 1-epoch model sits at chance, where every graph "passes").
TINY = dataclasses.replace(
    RECIPES["vit-softmax"],
    image_size=(16, 16),
    model_args={"img_size": 16, "embed_dim": 32, "depth": 2},
    epochs=15,
    warmup_epochs=1,
    lr=3e-3,
)
MAX_LOSS = 0.05  # 13 of the 270 validation digits

# --- the gate arithmetic ---------------------------------------------------------------------------


def test_absolute_gate_on_an_accuracy():
    gate = QualityGate("val_accuracy", 0.01)
    assert gate.check({"val_accuracy": 0.95}, {"val_accuracy": 0.945})["passed"]
    assert gate.check({"val_accuracy": 0.95}, {"val_accuracy": 0.97})["passed"]  # better is fine
    failed = gate.check({"val_accuracy": 0.95}, {"val_accuracy": 0.93})
    assert not failed["passed"] and failed["loss"] == pytest.approx(0.02)
    assert "val_accuracy 0.9300 vs fp32 0.9500" in failed["reason"] and "0.01" in failed["reason"]


def test_relative_gate_on_a_distance():
    gate = QualityGate("fid_digits", 0.2, higher_is_better=False, relative=True)
    assert gate.check({"fid_digits": 0.5}, {"fid_digits": 0.59})["passed"]  # 18% worse
    assert gate.check({"fid_digits": 0.5}, {"fid_digits": 0.3})["passed"]  # lower FID is better
    failed = gate.check({"fid_digits": 0.5}, {"fid_digits": 0.65})
    assert not failed["passed"] and failed["loss"] == pytest.approx(0.3) and "30.0%" in failed["reason"]


@pytest.mark.parametrize("value", [None, math.nan, "0.9", True])
def test_an_unmeasured_metric_fails_the_gate(value):
    verdict = evaluate(
        (QualityGate("val_accuracy", 0.5),),
        {"val_accuracy": 0.9},
        {"val_accuracy": value, "quality_note": "x"},
    )
    assert not verdict["passed"] and "unknown" in verdict["reason"]


def test_overrides_name_a_gated_metric():
    gates = ClassifierExport.quality_gates
    assert with_overrides(gates, {"val_accuracy": 0.05})[0].max_loss == 0.05
    with pytest.raises(ValueError, match="val_accuracy"):
        with_overrides(gates, {"fid_digits": 0.1})
    assert parse_max_loss(["val_accuracy=0.02"]) == {"val_accuracy": 0.02}
    with pytest.raises(ValueError, match="METRIC=VALUE"):
        parse_max_loss(["val_accuracy"])


def test_every_task_gates_metrics_its_quality_returns():
    """Each export spec declares gates; their metrics are among what ``quality()`` returns (checked on
    the two families whose keys are known here; a new family's keys are checked by its own export)."""
    for spec in SPECS.values():
        assert spec.quality_gates, f"{spec.task} declares no quality gates"
    assert {g.metric for g in ClassifierExport.quality_gates} == {"val_accuracy"}
    assert {g.metric for g in DiffusionExport.quality_gates} == {"fid_digits", "conditional_accuracy"}


# --- the pipeline on a real model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact():
    art = train("vit-softmax", progress=False, recipe=TINY).artifact
    export_artifact(art.tag, ["onnx"], log=lambda _: None, progress=False)
    return get_artifact(art.tag)


def _accuracy(path, split):
    x, y = split_inputs(split, TINY.image_size)
    return float((open_session(path).run(None, {"input": x})[0].argmax(1) == y).mean())


def test_a_passing_int8_graph_is_kept_served_and_measured_on_its_own(artifact):
    export_artifact(
        artifact.tag, ["int8-static"], log=lambda _: None, progress=False, max_loss={"val_accuracy": MAX_LOSS}
    )
    art = get_artifact(artifact.tag)
    entry = art.export("int8-static")
    assert entry["gate"]["passed"] and entry["gate"]["checks"][0]["max_loss"] == MAX_LOSS
    fp32_graph, int8_graph = art.file(art.export("onnx")["file"]), art.file(entry["file"])
    fp32_val, int8_val = _accuracy(fp32_graph, "val"), _accuracy(int8_graph, "val")
    assert fp32_val >= 0.6, f"the tiny recipe reaches ~0.8; got {fp32_val}"
    assert fp32_val - int8_val <= MAX_LOSS
    # the test split is reported, not gated on; the int8 graph still generalises like fp32
    assert _accuracy(int8_graph, "test") >= _accuracy(fp32_graph, "test") - 2 * MAX_LOSS
    assert entry["val_accuracy"] == pytest.approx(int8_val) and entry["fp32_val_accuracy"] == pytest.approx(
        fp32_val
    )
    assert available_backends(art)["onnxruntime-int8"] == ""


def test_a_graph_failing_its_gate_is_discarded_recorded_logged_and_never_served(artifact, caplog):
    """A threshold the int8 graph cannot meet (it would have to beat fp32 by 100 points)."""
    logs: list[str] = []
    with caplog.at_level(logging.WARNING, logger="kiln.export"):
        export_artifact(
            artifact.tag, ["int8-static"], log=logs.append, progress=False, max_loss={"val_accuracy": -1.0}
        )
    art = get_artifact(artifact.tag)
    entry = art.export("int8-static")
    assert entry["gate"]["passed"] is False and "val_accuracy" in entry["gate"]["reason"]
    assert entry["discarded"].startswith("failed its quality gate") and "file" not in entry
    assert not list(art.path.glob("*.int8.onnx*")), "the discarded graph (and the older one) are deleted"
    assert any("int8-static DISCARDED" in line for line in logs)
    assert any("discarded by its quality gate" in r.getMessage() for r in caplog.records)
    # serving does not pick it, and says why
    assert export_for(art, "onnxruntime-int8")[1] is None
    reason = available_backends(art)["onnxruntime-int8"]
    assert "int8-static export failed its quality gate" in reason and "val_accuracy" in reason
    assert available_backends(art)["onnxruntime"] == ""


def test_a_served_model_skips_a_discarded_graph_and_refuses_it_as_its_backend(artifact):
    import dataclasses

    from serving.config import ServeConfig
    from serving.tasks.classification import Classifier

    art = get_artifact(artifact.tag)
    assert "discarded" in art.export("int8-static")  # left by the test above
    config = dataclasses.replace(ServeConfig.from_env(), models=(art.name,), backend="onnxruntime", threads=1)
    model = Classifier(art, config)
    try:
        assert "onnxruntime-int8" not in model.backends and "onnxruntime" in model.backends
    finally:
        model.close()
    with pytest.raises(RuntimeError, match="quality gate"):
        Classifier(art, dataclasses.replace(config, backend="onnxruntime-int8"))


def test_an_engine_built_from_a_discarded_graph_is_refused(artifact, monkeypatch):
    """int8 TensorRT engines are built from the int8 QDQ graph: a discarded one stops the build, with the
    reason (TensorRT's presence is faked here only to reach that check; nothing is built)."""
    monkeypatch.setattr("export.pipeline.tensorrt_status", lambda: (True, ""))
    with pytest.raises(ExportError, match="failed its quality gate"):
        export_artifact(artifact.tag, ["int8-trt"], log=lambda _: None, progress=False)


@pytest.mark.gpu
def test_a_tensorrt_engine_is_gated_on_quality_measured_through_the_engine(artifact):
    """The gate measures an engine by running it (export.tensorrt.EngineSession), not its source graph."""
    from kiln.accelerators import tensorrt_status
    from serving.runtime import TensorRTRuntime

    ok, reason = tensorrt_status()
    if not ok:
        pytest.skip(reason)
    export_artifact(artifact.tag, ["fp16-trt"], progress=False, max_loss={"val_accuracy": MAX_LOSS})
    art = get_artifact(artifact.tag)
    entry = art.export("fp16-trt")
    assert entry["gate"]["passed"], entry["gate"]
    x, y = split_inputs("val", TINY.image_size)
    served = TensorRTRuntime(art, "tensorrt-fp16").run({"input": x})["logits"]
    assert entry["val_accuracy"] == pytest.approx(float((served.argmax(1) == y).mean()))
    assert available_backends(art)["tensorrt-fp16"] == ""

    export_artifact(artifact.tag, ["fp16-trt"], progress=False, max_loss={"val_accuracy": -1.0})
    art = get_artifact(artifact.tag)
    assert "discarded" in art.export("fp16-trt") and not list(art.path.glob("*.fp16.plan*"))
    assert "quality gate" in available_backends(art)["tensorrt-fp16"]
