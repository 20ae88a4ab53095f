"""benchmarks/forecast.py's pure pieces: the Diebold-Mariano test, the metrics (directional accuracy's
coin-flip rule for no-change forecasts, interval coverage), the walk-forward baselines and the markdown."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import forecast as fb
from training.forecasting import load_series


def test_diebold_mariano_h1_is_a_corrected_t_statistic():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1.0, 400)
    better = rng.normal(0, 0.5, 400)
    dm, p = fb.diebold_mariano(better, base, 1)
    d = better**2 - base**2
    n = len(d)
    expected = d.mean() / math.sqrt(d.var() / n) * math.sqrt((n - 1) / n)  # HLN factor at h = 1
    assert dm == pytest.approx(expected) and dm < -5 and p < 1e-6
    same, p_same = fb.diebold_mariano(rng.normal(0, 1, 400), rng.normal(0, 1, 400), 3)
    assert abs(same) < 3 and p_same > 0.001


def test_score_rules():
    last = np.array([100.0, 100.0, 100.0, 100.0])
    actual = np.log(np.array([1.01, 0.99, 1.02, 1.0]))
    zero = np.zeros(4)
    m = fb.score(last, actual, zero, zero - 0.015, zero + 0.015, None, 1)
    assert m["directional_accuracy"] == 0.5  # a no-change forecast is a coin flip
    assert m["mae"] == pytest.approx(1.0, rel=1e-6) and m["coverage_80"] == 0.75
    up = np.full(4, 0.01)
    m = fb.score(last, actual, up, up - 1, up + 1, None, 1)
    assert m["directional_accuracy"] == 0.5  # right on +1 % and +2 %, wrong on −1 % and 0
    assert math.isnan(m["dm_vs_random_walk"])


def test_naive_baselines_use_only_the_past():
    series = load_series("GOOG")
    rows = series.origins("test", 48, 10)[:5]
    med, lo, hi = fb._naive_forecasts(series, rows, 10, drift=False)
    assert (med == 0).all() and (lo < 0).all() and (hi > 0).all()
    assert np.allclose(hi[:, 3] / hi[:, 0], 2.0)  # widens as √h
    dmed, _, _ = fb._naive_forecasts(series, rows, 10, drift=True)
    close = np.log(series.bars["close"].to_numpy())
    t = rows[0] + len(close) - len(fb._log_close(series))
    assert dmed[0, 0] == pytest.approx((close[t] - close[0]) / t)


def test_markdown_and_targets_from_results(tmp_path):
    metric = {"mae": 1.0, "rmse": 1.0, "mape": 1.0, "directional_accuracy": 0.5, "coverage_80": 0.8}
    rows = [
        {"model": m, "h": h, **metric, "mae": mae, "dm_vs_random_walk": math.nan, "dm_p_value": math.nan}
        for m, mae in (("random walk", 1.0), ("ARIMA(1,1,0)", 1.1), ("performer", 0.9))
        for h in fb.HORIZONS
    ]
    d = {
        "dataset": "GOOG",
        "frequency": "daily",
        "bars": 10,
        "test_period": ["a", "b"],
        "origins": 3,
        "origin_stride": 1,
        "models": {
            "performer": {
                "tag": "x:1",
                "parameters": 1,
                "train_seconds": 60.0,
                "best_epoch": 1,
                "val_pinball": 0.1,
            }
        },
        "metrics": rows,
        "int8": {
            "holds_accuracy_on_validation": True,
            "onnx": {"mae_h1": 1.0, "latency_ms_batch1": 1.0},
            "int8-static": {"mae_h1": 1.0, "latency_ms_batch1": 1.0},
        },
    }
    results = {"datasets": [d]}
    targets = fb.evaluate_targets(results)
    assert targets[0]["met"] is False and "GOOG h=1 vs random walk" in targets[0]["reason"]  # DA ties 0.5
    assert targets[1]["met"] is True and targets[2]["met"] is True
    results.update(
        targets=targets,
        command="kiln bench forecast",
        wall_seconds=1.0,
        load_average_1m_at_end=0.0,
        machine={
            "date": "d",
            "cpu": "c",
            "usable_cores": 2,
            "load_average_1m_at_start": 0.0,
            "python": "3",
            "torch": "t",
            "onnxruntime": "o",
        },
    )
    md = fb.render_markdown(results, tmp_path / "forecast.json")
    assert "| performer | 10 |" in md and "**MISSED**" in md and "Diebold-Mariano" in md
