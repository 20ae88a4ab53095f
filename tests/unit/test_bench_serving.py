"""`kiln bench serving`'s report: every figure comes from the results, verdicts follow the targets."""

from __future__ import annotations

from pathlib import Path

from benchmarks.serving import _markdown


def _results(admitted_p99: float, rejected_p99: float | None, server_errors: int) -> dict:
    return {
        "machine": {"cpu": "test cpu", "usable_cores": 2, "load_average_1m_at_start": 0.1},
        "command": "kiln bench serving",
        "quick": False,
        "server_args": "--no-train --models vit-soft",
        "capacity": {
            "concurrency": 32,
            "duration_s": 10.0,
            "req_per_s": 123.4,
            "latency_ms_p50": 200.0,
            "latency_ms_p99": 300.0,
            "errors": 0,
        },
        "overload": {
            "offered_rate": 493.6,
            "admitted_per_s": 120.0,
            "admitted_ms_p50": 900.0,
            "admitted_ms_p99": admitted_p99,
            "rejected_429": 3000,
            "rejected_ms_p99": rejected_p99,
            "server_errors_5xx": server_errors,
            "other_outcomes": {} if server_errors == 0 else {"500": server_errors},
        },
    }


def test_report_renders_measured_figures_and_met_targets():
    text = _markdown(_results(1200.0, 40.0, 0), Path("serving.json"))
    assert "123.4" in text and "493.6" in text and "3000" in text and "serving.json" in text
    assert text.count("**MET**") == 3


def test_report_says_missed_when_overload_is_not_contained():
    text = _markdown(_results(5000.0, 400.0, 2), Path("serving.json"))
    assert text.count("**MISSED**") == 3
    assert "500 × 2" in text


def test_histogram_quantile_reads_the_bucket_holding_the_quantile():
    from benchmarks.serving import histogram_quantile

    def scrape(counts):
        return "\n".join(
            f'kiln_x_bucket{{model="m",le="{le}"}} {c}'
            for le, c in zip(("0.1", "1.0", "+Inf"), counts, strict=True)
        )

    before, after = scrape((5, 5, 5)), scrape((95, 104, 105))  # 100 new: 90 ≤ 0.1 s, 9 ≤ 1 s, 1 above
    assert histogram_quantile(before, after, "kiln_x", 0.5, model="m") == 0.1
    assert histogram_quantile(before, after, "kiln_x", 0.95, model="m") == 1.0
    assert histogram_quantile(before, after, "kiln_x", 0.999, model="m") == float("inf")
    assert histogram_quantile(before, before, "kiln_x", 0.5, model="m") is None
