"""The step-level batching benchmark's pure parts: the speed-up and its verdict (no server here)."""

from benchmarks import step_batching

BODY = {"n": 4, "label": 7, "steps": 20, "sampler": "ddim", "guidance": 2.0}


def _results(step_rate: float, request_rate: float) -> dict:
    rows = [
        {"mode": mode, "concurrency": c, "requests": 10, "errors": 0, "images_per_s": rate,
         "p50_s": 1.0, "p99_s": 2.0, "mean_batch_rows": 8.0}
        for mode, rate in (("step", step_rate), ("request", request_rate))
        for c in step_batching.CONCURRENCY
    ]  # fmt: skip
    return {"request": BODY, "warmup_s": 1, "duration_s": 2, "rows": rows,
            "in_process_rows_per_s": {"8": 1000.0, "64": 1250.0}}  # fmt: skip


def test_speedup_is_step_over_request_images_per_second():
    assert step_batching.speedup(_results(30.0, 10.0), 16) == 3.0
    assert step_batching.speedup({"rows": []}, 16) is None


def test_render_says_met_or_missed_with_the_measured_reason():
    met = step_batching.render(_results(30.0, 10.0))
    assert "3.00×; **MET**" in met and "why" not in met
    missed = step_batching.render(_results(15.0, 10.0))
    assert "1.50×; **MISSED**" in missed
    assert "1000 rows/s at a 8-row batch and 1250 at 64 rows (1.25×)" in missed
    assert "| step | 16 | 10 | 0 | 15.0 |" in missed
