"""The benchmarks' small pure pieces: percentiles, tables, section replacement, targets, timing at tiny N."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import attention
from benchmarks.report import markdown_table, percentile, replace_section
from benchmarks.vit import evaluate_targets, render_markdown


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy(q):
    values = list(np.random.default_rng(0).random(37))
    assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_percentile_rejects_empty_and_out_of_range():
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_markdown_table_escapes_pipes_and_checks_widths():
    table = markdown_table(["a", "b"], [[1, "x|y"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |"]
    with pytest.raises(ValueError, match="columns"):
        markdown_table(["a", "b"], [[1]])


def test_replace_section_keeps_the_rest_and_appends_when_absent():
    doc = "# Benchmarks\n\nintro\n<!-- bench:vit:start -->\nold\n<!-- bench:vit:end -->\n\n## other\nkeep\n"
    out = replace_section(doc, "vit", "new table")
    new = "<!-- bench:vit:start -->\nnew table\n<!-- bench:vit:end -->"
    assert out == f"# Benchmarks\n\nintro\n{new}\n\n## other\nkeep\n"
    assert replace_section(out, "vit", "new table") == out  # idempotent
    appended = replace_section("# Benchmarks\n", "vit", "t")
    assert appended == "# Benchmarks\n\n<!-- bench:vit:start -->\nt\n<!-- bench:vit:end -->\n"
    with pytest.raises(ValueError, match="unbalanced"):
        replace_section("<!-- bench:vit:start -->\n", "vit", "t")


def test_explicit_softmax_matches_sdpa():
    import torch

    from model_zoo.soft import SoftmaxAttention

    attn = SoftmaxAttention(16, 2).eval()
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(
            attention.explicit_softmax_attention(attn, x), attn(x, 3, 3), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("kind", attention.KINDS)
def test_attention_measure_at_tiny_n(kind):
    res = attention.measure(kind, side=8, dim=16, heads=2, warmup=1, reps=3, budget_s=1.0)
    assert res["tokens"] == 64 and len(res["latency_ms_all"]) == 3 and res["latency_ms"] > 0
    assert res["peak_mib"] >= 0 and res["memory_method"]
    if kind == "soft":
        assert res["landmark_ratio"] == 1 and res["landmarks"] == 64


def test_landmark_ratio_keeps_64_landmarks():
    assert [attention.landmark_ratio(s) for s in (8, 16, 32, 64, 128)] == [1, 2, 4, 8, 16]


def _fake_results(quick: bool) -> dict:
    attn = [
        {
            "kind": "soft",
            "tokens": 4096,
            "grid": "64x64",
            "dim": 64,
            "heads": 2,
            "latency_ms": 10.0,
            "peak_mib": 10.0,
            "landmark_ratio": 8,
            "landmarks": 64,
            "torch_threads": 2,
        },
        {"kind": "softmax-explicit", "tokens": 4096, "grid": "64x64", "latency_ms": 30.0, "peak_mib": 100.0},
        {"kind": "softmax-sdpa", "tokens": 4096, "grid": "64x64", "latency_ms": 20.0, "peak_mib": 5.0},
        {"kind": "softmax-explicit", "tokens": 16384, "grid": "128x128", "skipped": "too big"},
    ]
    attn += _attention_comparison_rows({4096: (5.0, 3.0)})
    rt = [
        {
            "model": m,
            "backend": b,
            "batch": 32,
            "threads": 2,
            "samples_per_s": s,
            "latency_ms_p50": 1.0,
            "latency_ms_p99": 2.0,
            "test_accuracy": a,
        }
        for m in ("vit-soft", "vit-softmax", "vit-soft-wide")
        for b, s, a in (
            ("pytorch", 100.0, 0.9),
            ("onnxruntime", 200.0, 0.9),
            ("onnxruntime-int8", 250.0, 0.9),
        )
    ]
    served = [
        {
            "batching": "on",
            "protocol": "grpc",
            "concurrency": 32,
            "req_per_s": 150.0,
            "latency_ms_p50": 5.0,
            "latency_ms_p99": 9.0,
            "requests": 300,
            "errors": 0,
        }
    ]
    ref = [
        {
            "backend": "onnxruntime",
            "batch": 32,
            "samples_per_s": 200.0,
            "latency_ms_p50": 1.0,
            "latency_ms_p99": 2.0,
        }
    ]
    settings = {
        "attn_dim": 64,
        "attn_heads": 2,
        "attn_warmup": 1,
        "attn_reps": 3,
        "attn_budget_s": 1,
        "runtime_warmup": 1,
        "runtime_duration_s": 1,
        "served_duration_s": 1,
        "served_warmup_s": 1,
    }
    machine = {
        "date": "today",
        "cpu": "cpu",
        "usable_cores": 2,
        "logical_cores": 2,
        "memory_gib": 8,
        "os": "linux",
        "python": "3",
        "torch": "t",
        "onnxruntime": "o",
        "numpy": "n",
    }
    res = {
        "quick": quick,
        "command": "kiln bench vit",
        "machine": machine,
        "settings": settings,
        "onnxruntime_providers": ["CPUExecutionProvider"],
        "models": {"vit-soft": {"tag": "vit-soft:1"}},
        "attention": attn,
        "runtimes": rt,
        "served": served,
        "served_reference": ref,
        "wall_seconds": 1.0,
    }
    res["targets"] = evaluate_targets(res)
    return res


def _attention_comparison_rows(speedups: dict[int, tuple[float, float]]) -> list[dict]:
    """Rows of kinds "interleaved" and "onnxruntime" with SOFT at 2 ms and the given speed-ups."""
    rows = []
    for tokens, (eager, ort) in speedups.items():
        side = int(tokens**0.5)
        rows.append(
            {
                "kind": "interleaved",
                "tokens": tokens,
                "grid": f"{side}x{side}",
                "latency_ms": {"soft": 2.0, "softmax-sdpa": 2.0 * eager},
                "speedup": eager,
                "rounds": 7,
                "torch_threads": 2,
            }
        )
        kinds = {
            "soft": {"latency_ms": 2.0, "fused_attention_nodes": 0, "max_abs_diff": 1e-7},
            "softmax-mha": {"latency_ms": 2.0 * ort, "fused_attention_nodes": 1, "max_abs_diff": 1e-7},
            "softmax-attention23": {
                "latency_ms": 3.0 * ort,
                "fused_attention_nodes": 1,
                "max_abs_diff": 1e-7,
            },
            "softmax-unfused": {"skipped": "N x N scores"},
        }
        rows.append(
            {
                "kind": "onnxruntime",
                "tokens": tokens,
                "grid": f"{side}x{side}",
                "threads": 2,
                "kinds": kinds,
                "fastest_fused_softmax": "softmax-mha",
                "speedup_vs_fused": ort,
            }
        )
    return rows


@pytest.mark.parametrize(
    "speedups, met",
    [
        ({4096: (5.0, 4.5), 16384: (20.0, 16.0)}, True),
        ({4096: (5.0, 4.5)}, None),  # a quick run: 16384 tokens not measured
        ({4096: (5.0, 4.5), 16384: (14.0, 16.0)}, False),
    ],
)
def test_attention_target_needs_every_size_in_both_runtimes(speedups, met):
    from benchmarks.vit import _attention_target

    t = _attention_target(_attention_comparison_rows(speedups))
    assert t["met"] is met
    assert ("PyTorch at 16384 tokens 14.00x < 15x" in t["reason"]) == (met is False)


def test_markdown_shows_the_attention_comparisons(tmp_path):
    text = render_markdown(_fake_results(False), tmp_path / "x.json")
    assert "| 4096 | 64x64 | 2.00 | 10.00 | 5.00x | 7 | 2 | - |" in text
    assert (
        "| 4096 | softmax, com.microsoft.MultiHeadAttention | 6.00 | 3.00x | 1 | 1.0e-07 | fastest fused |"
        in text
    )
    assert "| 4096 | softmax, exported at opset 18 (MatMul-Softmax-MatMul) | skipped |" in text


def test_targets_are_computed_from_the_figures():
    t_attn, t_int8, t_served = _fake_results(False)["targets"]
    assert t_attn["met"] is False  # onnxruntime at 4096 tokens: 3x < 4x
    assert "4096 tokens PyTorch: SOFT 2.00 ms vs SDPA 10.00 ms = 5.00x" in t_attn["measured"]
    assert "4096 tokens onnxruntime: SOFT 2.00 ms vs softmax-mha 6.00 ms = 3.00x" in t_attn["measured"]
    assert "not measured in this run: PyTorch at 16384, onnxruntime at 16384 tokens" in t_attn["measured"]
    assert "speed-up 3.00x, peak-memory reduction 10.0x" in t_attn["measured"]  # explicit softmax, beside
    assert (
        "onnxruntime at 4096 tokens 3.00x < 4x" in t_attn["reason"] and "PyTorch at" not in t_attn["reason"]
    )
    assert t_int8["met"] is False and "1.25x fp32 throughput" in t_int8["measured"] and t_int8["reason"]
    assert t_served["met"] is True and "75%" in t_served["measured"] and not t_served["reason"]


def test_markdown_marks_quick_runs_and_skips(tmp_path):
    quick = render_markdown(_fake_results(True), tmp_path / "x.json")
    assert "(quick run — not for the record)" in quick and "MISSED" in quick and "MET" in quick
    assert "too big" in quick and "kiln bench vit" in quick
    assert "not for the record" not in render_markdown(_fake_results(False), tmp_path / "x.json")



def test_every_suite_header_names_command_machine_load_and_raw_file():
    from pathlib import Path

    from benchmarks.report import machine_info, run_header

    raw = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "x.json"
    results = {"command": "kiln bench x", "machine": machine_info(), "wall_seconds": 12.4, "quick": True}
    lines = run_header(results, raw, "- models: m `m:1`")
    text = "\n".join(lines)
    assert lines[0].startswith("**(quick run")
    assert "- command: `kiln bench x`" in text and "(wall time 12 s)" in text
    assert "1-min load average" in text and "usable cores" in text
    assert lines[-2:] == ["- models: m `m:1`", "- raw figures: `benchmarks/results/x.json`"]
    # an older results file without some machine fields still renders
    assert "?" in "\n".join(run_header({"command": "c", "machine": {"cpu": "x"}}, raw))
