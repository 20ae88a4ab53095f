"""``kiln bench diffusion``'s pure pieces: target evaluation, rendering, section replacement (no training)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from benchmarks import diffusion
from benchmarks.diffusion import (
    Section,
    _cell,
    denoiser_inputs,
    diverged,
    evaluate_targets,
    few_steps_target,
    int8_quality_target,
    int8_speed_target,
    render_markdown,
)
from benchmarks.report import replace_section

FID = {  # (sampler, steps) -> FID-digits with the papers' settings
    ("ddpm", 10): 40.0,
    ("ddim", 10): 10.0,
    ("time-shift", 10): 12.0,
    ("bdia", 10): 9.0,
    ("ddpm", 50): 12.0,
    ("ddim", 50): 5.0,
    ("time-shift", 50): 5.5,
    ("bdia", 50): 4.5,
}


def _results(quick: bool = False) -> dict:
    samplers = [
        {
            "sampler": s,
            "steps": n,
            "variant": "paper",
            "images": 500,
            "fid_digits": f,
            "conditional_accuracy": 0.95 if n == 50 else 0.85,
            "seconds": 10.0,
            "seconds_per_100": 2.0,
        }
        for (s, n), f in FID.items()
    ]
    samplers.append(
        {
            "sampler": "time-shift",
            "steps": 10,
            "variant": "val-tuned",
            "options": {"window": 5, "cutoff": 550},
            "images": 500,
            "fid_digits": 8.0,
            "conditional_accuracy": 0.85,
            "seconds": 10.0,
            "seconds_per_100": 2.0,
        }
    )
    tuning = [
        {"sampler": "ddim", "options": {}, "val_fid": 11.0, "seconds": 1.0},
        {"sampler": "time-shift", "options": {"window": 80, "cutoff": 300}, "val_fid": 13.0, "seconds": 1.0},
        {"sampler": "time-shift", "options": {"window": 5, "cutoff": 550}, "val_fid": 10.5, "chosen": True},
        {"sampler": "bdia", "options": {"gamma": 0.5}, "val_fid": 10.0, "seconds": 1.0, "chosen": True},
        {"sampler": "bdia", "options": {"gamma": 1.0}, "val_fid": 30.0, "seconds": 1.0},
    ]
    quantized = [
        {
            "graph": g,
            "file": f"{g}.onnx",
            "calibration": c,
            "per_channel": g != "fp32" or None,
            "quantized_ops": ["Conv", "MatMul", "Gemm"] if g != "fp32" else None,
            "quantized_nodes": 60 if g != "fp32" else None,
            "fid_digits": f,
            "conditional_accuracy": 0.9,
            "seconds_per_100": 3.0,
        }
        for g, c, f in (
            ("fp32", "-", 10.0),
            ("int8-ptq4dm", "ndtc", 10.5),
            ("int8-uniform", "uniform", 12.0),
            ("int8-noised", "forward-noise", 30.0),
        )
    ]
    throughput = [
        {
            "graph": g,
            "batch": b,
            "samples_per_s": tput * b,
            "samples_per_s_min": tput * b * 0.9,
            "samples_per_s_max": tput * b * 1.1,
            "latency_ms_p50": 1.0,
            "latency_ms_p99": 2.0,
        }
        for g, tput in (("fp32", 10.0), ("int8-ptq4dm", 12.0))
        for b in (1, 16, 64)
    ]
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
        "load_average_1m_at_start": 0.3,
    }
    res = {
        "quick": quick,
        "command": "kiln bench diffusion",
        "machine": machine,
        "load_average_1m_at_end": 2.5,
        "onnxruntime_providers": ["CPUExecutionProvider"],
        "settings": {
            "per_class": 50,
            "steps": [10, 50],
            "throughput_batches": [1, 16, 64],
            "throughput_warmup": 1,
            "throughput_duration_s": 1,
            "throughput_rounds": 3,
            "profile_runs": 1,
        },
        "threads": 2,
        "guidance": 2.0,
        "seed": 0,
        "sampler_options": {
            "ddpm": {},
            "ddim": {"eta": 0.0},
            "time-shift": {"window": 80, "cutoff": 300, "eta": 0.0},
            "bdia": {"gamma": 0.5},
        },
        "tuning": tuning,
        "seed_spread": {
            "sampler": "ddim",
            "steps": 10,
            "fid_digits_by_seed": {"0": 10.0, "1": 11.5, "2": 9.0},
        },
        "time_shift_check": {
            "window": 80,
            "cutoff": 300,
            "x0_pixel_variance": 0.405,
            "rows": [
                {"t": 800, "one_minus_alpha_bar": 0.907, "pixel_variance": 0.94, "mean_shift": 11.8},
                {"t": 400, "one_minus_alpha_bar": 0.354, "pixel_variance": 0.616, "mean_shift": 40.0},
            ],
        },
        "models": {
            "diffusion-digits": {
                "tag": "diffusion-digits:1",
                "command": "kiln train diffusion-digits --export",
                "parameters": 1114209,
                "epochs": 100,
                "best_epoch": 97,
                "train_seconds": 900.0,
                "val_loss": 0.0512,
                "onnx_max_abs_diff": 3e-6,
                "onnx_atol": 1e-4,
                "onnx_parity_inputs": "64 forward-noised validation-split digits",
            },
            "vit-soft": {"tag": "vit-soft:1", "test_accuracy": 0.9889},
        },
        "floor": {
            "train_vs_test": 1.5,
            "train_vs_test_samples": 1257,
            "matched": 2.5,
            "matched_samples": 500,
        },
        "samplers": samplers,
        "quantized": quantized,
        "int8_graph": {
            "file_ops": {"QuantizeLinear": 70, "DequantizeLinear": 130, "Conv": 25, "MatMul": 8, "Gemm": 13},
            "onnxruntime_ops": {"QLinearConv": 25, "QuantizeLinear": 40, "DequantizeLinear": 40},
            "profile_batch": 64,
            "fp32_kernel_share": {"Conv": 0.45, "Mul": 0.1},
            "int8_kernel_share": {"QLinearConv": 0.3, "QuantizeLinear": 0.2},
        },
        "throughput": throughput,
        "sections": {},
        "wall_seconds": 600.0,
    }
    res["targets"] = evaluate_targets(res)
    return res


def test_targets_from_the_figures():
    few, acc, quality, speed = _results()["targets"]
    # judged on the validation-chosen time shift (8.0) and the papers' BDIA (9.0, chosen on validation too)
    assert few["met"] is True and "DDIM 10.000" in few["measured"]
    assert "12.000 (+20.0%) with the papers' setting, 8.000 (-20.0%)" in few["measured"]
    assert "window 5, cutoff 550" in few["measured"] and "BDIA-DDIM 9.000 (-10.0%)" in few["measured"]
    assert acc["met"] is True and "95.0% of 500 images" in acc["measured"]
    assert (
        quality["met"] is True
        and "+5.0%" in quality["measured"]
        and "int8-noised 30.000" in quality["measured"]
    )
    assert speed["met"] is False and "1.20x" in speed["measured"]
    # the bound on the speed-up follows from the measured convolution share: 1 / (1 - 0.45)
    assert "45%" in speed["reason"] and "1.82x" in speed["reason"]


def test_few_steps_target_names_the_sampler_that_lost():
    rows = [
        {"sampler": "ddim", "steps": 10, "variant": "paper", "fid_digits": 10.0},
        {"sampler": "time-shift", "steps": 10, "variant": "paper", "fid_digits": 11.0},
        {"sampler": "bdia", "steps": 10, "variant": "paper", "fid_digits": 10.0},  # a tie does not beat DDIM
    ]
    tuning = [
        {"sampler": "ddim", "options": {}, "val_fid": 1.0},
        {"sampler": "time-shift", "options": {"window": 80, "cutoff": 300}, "val_fid": 2.0, "chosen": True},
        {"sampler": "bdia", "options": {"gamma": 0.5}, "val_fid": 1.5, "chosen": True},
    ]
    check = {"window": 80, "x0_pixel_variance": 0.4, "rows": [{"t": 500, "mean_shift": 39.7}]}
    t = few_steps_target(rows, tuning, check)
    assert t["met"] is False
    assert "t 500: +40" in t["reason"] and "±40" in t["reason"] and "(0.40 in [−1, 1])" in t["reason"]
    assert "window 80, cutoff 300, FID 2.000 vs DDIM 1.000" in t["reason"]
    assert "γ of the grid (γ 0.5) scored FID 1.500 vs DDIM 1.000" in t["reason"]
    # without the tuning and the check, a plainer reason, never an empty one
    assert few_steps_target(rows, [])["reason"]
    assert few_steps_target(rows[:1], [])["met"] is None


def test_quick_runs_leave_unmeasured_targets_open():
    res = _results(quick=True)
    res["samplers"] = [r for r in res["samplers"] if r["steps"] == 10]  # no 50-step cells
    _, acc, _, _ = evaluate_targets(res)
    assert acc["met"] is None and acc["measured"] == "not measured in this run"


def test_int8_targets_miss_with_a_reason():
    res = _results()
    res["quantized"][1]["fid_digits"] = 12.0  # +20% over fp32
    t = int8_quality_target(res["quantized"])
    assert t["met"] is False and "+20.0%" in t["measured"] and t["reason"]
    fast = copy.deepcopy(res["throughput"])
    for r in fast:
        if r["graph"] == "int8-ptq4dm":
            r["samples_per_s"] *= 2
    met = int8_speed_target(fast, res["int8_graph"])
    assert met["met"] is True and met["reason"] == ""
    assert int8_speed_target([], {})["met"] is None


def test_markdown_renders_every_table(tmp_path):
    md = render_markdown(_results(), tmp_path / "diffusion.json")
    assert md.startswith("## Diffusion") and "not for the record" not in md
    assert "kiln bench diffusion" in md and "`diffusion-digits:1`" in md and "`vit-soft:1`" in md
    # the papers' rows, then the validation-chosen one of the same step count
    paper = "| 10 | time-shift DDIM | window 80, cutoff 300, η 0 | 12.000 | +20.0% | 85.0% | 2.0 |"
    tuned = "| 10 | time-shift DDIM | val-tuned: window 5, cutoff 550 | 8.000 | -20.0% | 85.0% | 2.0 |"
    assert paper in md and tuned in md and md.index(paper) < md.index(tuned) < md.index("| 50 | DDPM |")
    assert "| BDIA-DDIM | γ 0.5 | 10.000 | yes |" in md and "| BDIA-DDIM | γ 1 | 30.000 |  |" in md
    assert "seeds 0 / 1 / 2: 10.000 / 11.500 / 9.000" in md
    assert "| 400 | 0.354 | 0.616 | +40.0 |" in md
    assert "| int8-ptq4dm | ndtc | 60 Conv/MatMul/Gemm nodes, W8 per-channel, A8 | 10.500 | +5.0% |" in md
    assert "| int8-ptq4dm | 64 | 768.0 |" in md and "1.20x" in md
    assert "25 QLinearConv" in md and "Conv 45%" in md
    assert "**MET**" in md and "**MISSED**" in md
    assert "2.500 for 500 train-split digits" in md
    assert "0.3 at start, 2.5 at the end" in md
    quick = render_markdown(_results(quick=True), tmp_path / "x.json")
    assert "(quick run — not for the record)" in quick


def test_further_sections_render_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(
        diffusion,
        "SECTIONS",
        [
            Section("one", lambda c: {"n": 1}, lambda r: f"### One\n\nn = {r['n']}\n"),
            Section("two", lambda c: {"n": 2}, lambda r: f"### Two\n\nn = {r['n']}"),
        ],
    )
    res = _results()
    res["sections"] = {"one": {"n": 1}, "two": {"n": 2}}
    md = render_markdown(res, tmp_path / "diffusion.json")
    assert md.index("### One") < md.index("### Two") and md.rstrip().endswith("n = 2")


def test_section_replacement_keeps_the_vit_section(tmp_path):
    doc = "# Kiln benchmarks\n\n<!-- bench:vit:start -->\nvit\n<!-- bench:vit:end -->\n\n## Set-up\nkeep\n"
    body = render_markdown(_results(), tmp_path / "diffusion.json")
    once = replace_section(doc, "diffusion", body)
    assert once.startswith(doc) and once.count("<!-- bench:diffusion:start -->") == 1
    assert replace_section(once, "diffusion", body) == once
    again = replace_section(once, "diffusion", "new")
    assert (
        again.startswith(doc) and "<!-- bench:diffusion:start -->\nnew\n<!-- bench:diffusion:end -->" in again
    )


@pytest.mark.parametrize("batch", [1, 64])
def test_denoiser_inputs_are_fixed_and_valid(batch):
    a, b = denoiser_inputs(batch), denoiser_inputs(batch)
    assert a["sample"].shape == (batch, 1, 16, 16) and a["sample"].dtype.name == "float32"
    assert (a["timestep"] >= 0).all() and (a["timestep"] < 1000).all() and (a["label"] <= 10).all()
    assert all((a[k] == b[k]).all() for k in a)


def test_diverged_cells_get_no_fid_and_miss_their_targets(tmp_path):
    class NoFid:  # a cell with diverged samples must not be scored at all
        def fid(self, images):
            raise AssertionError("scored a diverged cell")

        conditional_accuracy = fid

    images = np.zeros((4, 16, 16), np.float32)
    images[1, 3, 3], images[2] = np.nan, np.inf
    assert diverged(images) == 2 and diverged(np.zeros((3, 16, 16))) == 0
    row = _cell(NoFid(), images, np.arange(4), 2.0, log=lambda _: None, sampler="time-shift", steps=50)
    assert row["diverged"] == 2 and row["fid_digits"] is None and row["conditional_accuracy"] is None

    res = _results()
    res["samplers"] = [r for r in res["samplers"] if r.get("variant") != "val-tuned"]
    cell = next(r for r in res["samplers"] if (r["sampler"], r["steps"]) == ("time-shift", 10))
    cell.update(diverged=3, fid_digits=None, conditional_accuracy=None)
    res["time_shift_check"]["reach"] = [
        {"steps": 50, "first_shifted_t": 960, "window_top": 999, "alpha_bar": 2.43e-9}
    ]
    few = evaluate_targets(res)[0]
    assert few["met"] is False and "diverged (3 of 500 samples NaN/Inf)" in few["measured"]
    md = render_markdown(res, tmp_path / "diffusion.json")
    assert (
        "| 10 | time-shift DDIM | window 80, cutoff 300, η 0 | diverged (3 of 500 samples NaN/Inf) | - | - |"
        in md
    )
    assert "| 50 | 960 | 999 | 2.4e-09 | 20,286 |" in md
