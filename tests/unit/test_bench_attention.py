"""The SOFT-vs-softmax comparisons of ``kiln bench vit`` at tiny sizes: interleaved PyTorch timing, and the
exported layers in a real onnxruntime (export, parity, which graphs hold a fused attention node)."""

from __future__ import annotations

import pytest

from benchmarks import attention, attention_onnx


def test_interleaved_comparison_at_tiny_n():
    res = attention.measure_interleaved(side=8, dim=16, heads=2, warmup=1, rounds=3, budget_s=1.0)
    assert res["kind"] == "interleaved" and res["tokens"] == 64 and res["rounds"] == 3
    lat = res["latency_ms"]
    assert set(lat) == {"soft", "softmax-sdpa"} and all(len(v) == 3 for v in res["latency_ms_all"].values())
    assert res["speedup"] == pytest.approx(lat["softmax-sdpa"] / lat["soft"])


def test_cli_needs_exactly_one_mode():
    with pytest.raises(SystemExit):
        attention.main(["--side", "8"])
    with pytest.raises(SystemExit):
        attention.main(["--side", "8", "--kind", "soft", "--compare"])


@pytest.fixture(scope="module")
def onnx_result():
    return attention_onnx.measure(side=8, dim=16, heads=2, threads=1, warmup=1, rounds=3, budget_s=5.0)


def test_onnx_graphs_match_their_layers(onnx_result):
    kinds = onnx_result["kinds"]
    assert set(kinds) == set(attention_onnx.KINDS)  # 64 tokens: the unfused softmax runs too
    for kind, cell in kinds.items():
        assert cell["max_abs_diff"] < 1e-4, kind
        assert len(cell["latency_ms_all"]) == 3 and cell["latency_ms"] > 0


def test_onnxruntime_fuses_only_the_explicit_attention_ops(onnx_result):
    """The opset-18 softmax export stays MatMul-Softmax-MatMul after onnxruntime's optimizer; the
    contrib-op and opset-23 graphs keep their one attention node; SOFT has none."""
    kinds = onnx_result["kinds"]
    assert kinds["softmax-unfused"]["fused_attention_nodes"] == 0
    assert kinds["softmax-unfused"]["optimized_ops"].get("Softmax") == 1
    assert kinds["softmax-mha"]["optimized_ops"].get("MultiHeadAttention") == 1
    assert kinds["softmax-attention23"]["optimized_ops"].get("Attention") == 1
    assert kinds["soft"]["fused_attention_nodes"] == 0
    best = onnx_result["fastest_fused_softmax"]
    assert best in attention_onnx.FUSED_SOFTMAX
    assert onnx_result["speedup_vs_fused"] == pytest.approx(
        kinds[best]["latency_ms"] / kinds["soft"]["latency_ms"]
    )


def test_unfused_softmax_is_skipped_past_its_limit(monkeypatch):
    monkeypatch.setattr(attention_onnx, "UNFUSED_MAX_TOKENS", 16)
    res = attention_onnx.measure(side=8, dim=16, heads=2, threads=1, kinds=("softmax-unfused",))
    assert "skipped" in res["kinds"]["softmax-unfused"]
    assert "speedup_vs_fused" not in res  # nothing measured: no ratio


def test_sessions_without_spinning_run_the_same_graph():
    res = attention_onnx.measure(side=8, dim=16, heads=2, threads=2, kinds=("softmax-mha",), spinning=False)
    cell = res["kinds"]["softmax-mha"]
    assert res["spinning"] is False and cell["max_abs_diff"] < 1e-5 and cell["latency_ms"] > 0
