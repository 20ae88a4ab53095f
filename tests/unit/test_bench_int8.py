"""The int8 parts of ``kiln bench vit`` on a tiny wide ViT: trained, exported through the classifier's export
spec (parity + quality gate), and measured by the format grid with onnxruntime."""

from __future__ import annotations

import pytest

from benchmarks import runtimes
from export.pipeline import export_artifact
from export.quantize import Int8StaticQuantizer
from kiln.artifacts import get_artifact
from training.recipes import RECIPES, ClassifierRecipe
from training.trainer import train


@pytest.fixture(scope="module")
def wide_artifact():
    """``vit-softmax-wide``'s recipe on a tiny config (48 wide, one block, one epoch)."""
    base = RECIPES["vit-softmax-wide"]
    recipe = ClassifierRecipe(
        architecture=base.architecture, epochs=1, model_args={"embed_dim": 48, "depth": 1, "num_heads": 2}
    )
    art = train("vit-softmax-wide-test", recipe=recipe, progress=False).artifact
    export_artifact(art.tag, ["onnx", "int8-static"], log=lambda _: None, progress=False)
    return get_artifact(art.tag)


def test_wide_recipes_are_registered_but_not_defaults():
    from training.recipes import DEFAULT_MODELS

    for name in ("vit-softmax-wide", "vit-soft-wide"):
        assert RECIPES[name].architecture.endswith("_wide")
        assert name not in DEFAULT_MODELS


def test_wide_variant_exports_with_parity_and_records_its_int8_format(wide_artifact):
    onnx_entry, int8_entry = wide_artifact.export("onnx"), wide_artifact.export("int8-static")
    assert onnx_entry["max_abs_diff"] <= onnx_entry["atol"]
    assert int8_entry["settings"] == Int8StaticQuantizer().settings()
    assert int8_entry["gate"]["checks"][0]["metric"] == "val_accuracy"  # gated, whatever the verdict


def test_int8_grid_measures_each_cell_against_fp32(wide_artifact):
    grid = (
        ("shipped format", "int8-static", {}),
        ("QOperator per-channel", "int8-static", {"quant_format": "qoperator", "per_channel": True}),
        ("dynamic", "int8-dynamic", {}),
    )
    logs = []
    rows = runtimes.run_int8_grid(
        {"wide": wide_artifact}, batch=8, warmup=1, duration_s=0.2, grid=grid, log=logs.append, rounds=2
    )
    assert [r["cell"] for r in rows] == [g[0] for g in grid]
    for r in rows:
        assert r["speedup"] > 0 and r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
        assert 0 <= r["val_accuracy"] <= 1 and 0 <= r["test_accuracy"] <= 1 and r["quantized_nodes"] > 0
        assert r["fp32_val_accuracy"] == wide_artifact.export("onnx")["val_accuracy"]
    assert [r["shipped"] for r in rows] == [True, False, False]
    assert rows[1]["format"] == "qoperator" and rows[2]["format"] == "dynamic"
    assert any("shipped format" in line for line in logs)


def test_grid_table_marks_the_shipped_format(tmp_path):
    from benchmarks.vit import _int8_grid_markdown

    row = {
        "model": "vit-softmax-wide",
        "batch": 32,
        "threads": 2,
        "rounds": 5,
        "speedup": 1.8,
        "speedup_min": 1.6,
        "speedup_max": 2.0,
        "samples_per_s": 500.0,
        "val_accuracy": 0.95,
        "fp32_val_accuracy": 0.955,
        "test_accuracy": 0.96,
        "fp32_test_accuracy": 0.96,
        "quantized_nodes": 12,
    }
    text = "\n".join(
        _int8_grid_markdown(
            [{**row, "cell": "a", "shipped": True}, {**row, "cell": "b", "shipped": False}],
            {"int8_grid_duration_s": 2},
        )
    )
    assert "| **a** | 1.80x | 1.60-2.00 |" in text and "| b | 1.80x |" in text
    assert "0.9500 (-0.5)" in text and "0.9600 (+0.0)" in text
    assert _int8_grid_markdown([], {}) == []


def test_bench_trains_and_exports_a_missing_wide_model(monkeypatch):
    """`kiln bench vit` trains the wide model when the store lacks it (here its recipe on a tiny config)."""
    from benchmarks.vit import BenchmarkError, load_models

    tiny = ClassifierRecipe(
        architecture="vit_soft_wide", epochs=1, model_args={"embed_dim": 48, "depth": 1, "num_heads": 2}
    )
    monkeypatch.setitem(RECIPES, "vit-soft-wide-bench-test", tiny)
    logs = []
    arts = load_models(log=logs.append, models=(), wide=("vit-soft-wide-bench-test",))
    art = arts["vit-soft-wide-bench-test"]
    assert art.export("onnx") and art.export("int8-static")
    assert any("not in the model store; training it" in line for line in logs)
    logs.clear()
    assert load_models(log=logs.append, models=(), wide=("vit-soft-wide-bench-test",))  # found: no training
    assert not logs
    with pytest.raises(BenchmarkError, match="make serve"):
        load_models(log=logs.append, models=("vit-no-such-model",), wide=())
