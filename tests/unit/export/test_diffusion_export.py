"""The diffusion export spec: ONNX parity on the three-input denoiser, PTQ4DM calibration sets, W8A8
graphs under named quantizers, FID-digits quality per graph, and the backends the graphs serve."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export import diffusion as spec_module
from export.diffusion import DiffusionExport
from export.pipeline import export_artifact
from kiln.artifacts import get_artifact
from serving.runtime import available_backends
from training.recipes import RECIPES
from training.trainer import train

TINY = dataclasses.replace(
    RECIPES["diffusion-digits"],
    model_args={"block_out_channels": (16, 32), "norm_num_groups": 8, "attention_head_dim": 16},
    batch_size=64,
    warmup_epochs=1,
)
INT8 = ("int8-ptq4dm", "int8-uniform", "int8-noised")


@pytest.fixture(scope="module")
def exported():
    train("vit-soft", epochs=1, progress=False)  # the FID-digits feature classifier
    art = train("diffusion-digits", epochs=1, progress=False, recipe=TINY).artifact
    with pytest.MonkeyPatch.context() as mp:  # small sets: this tests the machinery, not the quality
        mp.setattr(DiffusionExport, "calibration_samples", 96)
        mp.setattr(DiffusionExport, "quality_per_class", 3)
        mp.setattr(spec_module, "CALIBRATION_TRAJECTORIES", 16)
        mp.setattr(spec_module, "CALIBRATION_STEPS", 10)
        logs: list[str] = []
        # A 1-epoch denoiser sampled 30 times: its FID is noise, so the gates are opened wide here
        # (gating itself is tested in test_gates.py).
        loose = {"fid_digits": 10.0, "conditional_accuracy": 1.0}
        export_artifact(art.tag, ["onnx", *INT8, "fp16-trt"], log=logs.append, progress=False, max_loss=loose)
    return get_artifact(art.tag), logs


def test_onnx_parity_and_quality_are_recorded(exported):
    art, _ = exported
    entry = art.export("onnx")
    assert entry["max_abs_diff"] <= entry["atol"] and entry["backend"] == "onnxruntime"
    assert "forward-noised" in entry["parity_inputs"]
    assert entry["fid_digits"] > 0 and 0 <= entry["conditional_accuracy"] <= 1
    assert entry["fid_classifier"].startswith("vit-soft:")
    graph = onnx.load(str(art.file(entry["file"])))
    assert [i.name for i in graph.graph.input] == ["sample", "timestep", "label"]
    assert [o.name for o in graph.graph.output] == ["noise"]


def test_w8a8_graphs_quantize_convolutions_and_track_fp32(exported):
    art, _ = exported
    inputs, _ = DiffusionExport().parity_inputs(art)
    fp32 = ort.InferenceSession(str(art.file(art.export("onnx")["file"])), providers=["CPUExecutionProvider"])
    reference = fp32.run(None, inputs)[0]
    files = set()
    for fmt in INT8:
        entry = art.export(fmt)
        files.add(entry["file"])
        assert entry["calibration"]["samples"] == 96 and entry["per_channel"] is True
        assert "Conv" in entry["quantized_ops"] and entry["quantized_nodes"] > 0
        assert entry["fp32_fid_digits"] == art.export("onnx")["fid_digits"] and entry["fid_digits"] > 0
        assert entry["gate"]["passed"] and {c["metric"] for c in entry["gate"]["checks"]} == {
            "fid_digits",
            "conditional_accuracy",
        }
        graph = onnx.load(str(art.file(entry["file"])))
        dequantized = {n.output[0] for n in graph.graph.node if n.op_type == "DequantizeLinear"}
        convs = [n for n in graph.graph.node if n.op_type == "Conv"]
        assert convs and all(n.input[0] in dequantized and n.input[1] in dequantized for n in convs)
        int8 = ort.InferenceSession(str(art.file(entry["file"])), providers=["CPUExecutionProvider"])
        got = int8.run(None, inputs)[0]
        assert np.corrcoef(got.ravel(), reference.ravel())[0, 1] > 0.9, fmt
    assert len(files) == 3  # one graph per calibration set
    assert art.export("int8-ptq4dm")["calibration"]["set"] == "ndtc"
    assert art.export("int8-ptq4dm")["backend"] == "onnxruntime-int8"
    assert "backend" not in art.export("int8-uniform")


def test_serving_finds_the_ptq4dm_graph_as_its_int8_backend(exported):
    art, logs = exported
    status = available_backends(art)
    assert status["onnxruntime"] == "" and status["onnxruntime-int8"] == "" and status["pytorch"] == ""
    if art.export("fp16-trt") is None:  # CPU machine: a clear skip message, nothing recorded
        assert any("skipping fp16-trt" in line for line in logs)


def test_ndtc_draws_time_steps_around_forty_percent_of_the_trajectory(exported, monkeypatch):
    art, _ = exported
    monkeypatch.setattr(DiffusionExport, "calibration_samples", 400)
    monkeypatch.setattr(spec_module, "CALIBRATION_TRAJECTORIES", 8)
    monkeypatch.setattr(spec_module, "CALIBRATION_STEPS", 10)
    spec = DiffusionExport()
    _, times, _ = spec._trajectories(art)  # descending: index 0 is the noise end
    position = {int(t): i / len(times) for i, t in enumerate(times)}
    ndtc = np.array([position[int(t)] for t in spec.calibration(art, "ndtc").inputs["timestep"]])
    uniform = np.array([position[int(t)] for t in spec.calibration(art, "uniform").inputs["timestep"]])
    assert abs(np.median(ndtc) - 0.4) < 0.1  # N(0.4, 0.4) clipped to the trajectory, from the noise end
    assert abs(uniform.mean() - 0.45) < 0.08  # uniform over the 10 positions 0, 0.1, ..., 0.9
    noised = spec.calibration(art, "forward-noise").inputs
    assert set(noised) == {"sample", "timestep", "label"} and noised["timestep"].max() < 1000
    with pytest.raises(ValueError, match="ndtc"):
        spec.calibration(art, "gaussian")


def test_a_classifier_format_is_refused_with_the_valid_ones(exported):
    art, _ = exported
    with pytest.raises(ValueError, match="int8-ptq4dm"):
        export_artifact(art.tag, ["int8-static"], progress=False)
