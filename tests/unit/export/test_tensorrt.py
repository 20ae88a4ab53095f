"""TensorRT engines: built and run on a CUDA GPU (marker `gpu`), a clear reason everywhere else."""

import numpy as np
import onnxruntime as ort
import pytest

from kiln.accelerators import tensorrt_status


def test_status_says_why_when_unavailable():
    ok, reason = tensorrt_status()
    if ok:
        pytest.skip("TensorRT is available here; the gpu tests cover it")
    assert "tensorrt" in reason.lower() or "cuda" in reason.lower()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "fmt,backend,atol", [("fp16-trt", "tensorrt-fp16", 5e-2), ("int8-trt", "tensorrt-int8", None)]
)
def test_engine_build_and_run_matches_onnxruntime(fmt, backend, atol):
    from export.pipeline import export_artifact
    from kiln.artifacts import get_artifact
    from serving.runtime import TensorRTRuntime
    from training.data import split_inputs
    from training.trainer import train

    ok, reason = tensorrt_status()
    if not ok:
        pytest.skip(reason)
    art = train("vit-soft", epochs=1, progress=False).artifact
    export_artifact(art.tag, ["onnx", "int8-static", fmt], progress=False)
    art = get_artifact(art.tag)
    assert art.export(fmt)["precision"] in ("fp16", "int8")
    x, _ = split_inputs("test", (32, 32))
    x = x[:40]
    ref = ort.InferenceSession(str(art.file(art.export("onnx")["file"])), providers=["CPUExecutionProvider"])
    expected = ref.run(None, {"input": x})[0]
    got = TensorRTRuntime(art, backend).run({"input": x})["logits"]
    assert got.shape == expected.shape
    if atol is not None:
        np.testing.assert_allclose(got, expected, atol=atol)
    else:
        assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.95


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,backend", [("fp16-trt", "tensorrt-fp16"), ("int8-trt", "tensorrt-int8")])
def test_denoiser_engine_build_and_run_matches_onnxruntime(fmt, backend, monkeypatch):
    """The diffusion denoiser's three inputs (sample, timestep, label) through a TensorRT engine."""
    import dataclasses

    from export.diffusion import DiffusionExport
    from export.pipeline import export_artifact
    from kiln.artifacts import get_artifact
    from serving.runtime import TensorRTRuntime
    from training.recipes import RECIPES
    from training.trainer import train

    ok, reason = tensorrt_status()
    if not ok:
        pytest.skip(reason)
    monkeypatch.setattr(DiffusionExport, "calibration_samples", 128)
    monkeypatch.setattr(DiffusionExport, "quality_per_class", 2)
    recipe = dataclasses.replace(
        RECIPES["diffusion-digits"],
        model_args={"block_out_channels": (16, 32), "norm_num_groups": 8, "attention_head_dim": 16},
    )
    art = train("diffusion-digits", epochs=1, progress=False, recipe=recipe).artifact
    export_artifact(art.tag, ["onnx", "int8-ptq4dm", fmt], progress=False)
    art = get_artifact(art.tag)
    inputs, _ = DiffusionExport().parity_inputs(art)
    ref = ort.InferenceSession(str(art.file(art.export("onnx")["file"])), providers=["CPUExecutionProvider"])
    expected = ref.run(None, inputs)[0]
    got = TensorRTRuntime(art, backend).run(inputs)["noise"]
    assert got.shape == expected.shape
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > (0.99 if fmt == "fp16-trt" else 0.9)
