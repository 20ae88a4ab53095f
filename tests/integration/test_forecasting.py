"""The forecasting family in a real `kiln serve` process: /forecast from bars and from a held dataset, the
model picked by bar frequency, timestamps continuing business days and FX hours, 400s that name the
problem, the forecaster over the Open Inference Protocol (unmodified tritonclient), and its metrics.

The served quantiles are compared with onnxruntime run in this process on the artifact's graph.
"""

from __future__ import annotations

import httpx
import numpy as np
import pandas as pd
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from serverproc import metric_total

from export.forecasting import onnx_quantiles
from kiln.artifacts import get_artifact
from kiln.market.bars import bundled_bars, validate_bars
from kiln.market.features import last_window

DAILY, HOURLY = "forecaster-goog-daily", "forecaster-eurusd-hourly"


def _records(bars: pd.DataFrame) -> list[dict]:
    return [
        {"timestamp": t.isoformat() + "Z", **{k: float(row[k]) for k in bars.columns}}
        for t, row in bars.iterrows()
    ]


def _forecast(server, **body) -> httpx.Response:
    return httpx.post(f"{server.http}/forecast", json=body, timeout=60)


@pytest.fixture(scope="module")
def goog() -> pd.DataFrame:
    return validate_bars(bundled_bars("GOOG"))[0]


def test_dataset_forecast_matches_the_graph_and_continues_business_days(server, goog):
    r = _forecast(server, dataset="GOOG", horizon=5, quantiles=[0.1, 0.5, 0.9])
    assert r.status_code == 200, r.text
    body = r.json()
    art = get_artifact(DAILY)
    assert body["model"] == DAILY and body["version"] == art.version
    assert set(body["quantiles"]) == {"0.1", "0.5", "0.9"}
    # the last GOOG bar is Friday 2013-03-01: the next five business days
    assert body["timestamps"] == [f"2013-03-0{d}T00:00:00" for d in (4, 5, 6, 7, 8)]
    x, scale = last_window(goog, art.manifest["context"])
    q = onnx_quantiles(art.file(art.export("onnx")["file"]), x, scale)[0, :5]
    levels = art.manifest["quantiles"]
    last = goog["close"].iloc[-1]
    np.testing.assert_allclose(body["quantiles"]["0.9"], last * np.exp(q[:, levels.index(0.9)]), rtol=1e-4)
    np.testing.assert_allclose(body["close"], body["quantiles"]["0.5"])
    lo, mid, hi = (np.array(body["quantiles"][k]) for k in ("0.1", "0.5", "0.9"))
    assert (lo < mid).all() and (mid < hi).all()


def test_bars_pick_the_forecaster_of_their_frequency(server):
    eurusd = bundled_bars("EURUSD").iloc[-300:]
    r = _forecast(server, bars=_records(eurusd), horizon=3, quantiles=[0.25, 0.75])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == HOURLY and set(body["quantiles"]) == {"0.25", "0.75"}
    assert body["timestamps"] == ["2018-02-07T16:00:00Z", "2018-02-07T17:00:00Z", "2018-02-07T18:00:00Z"]
    # the daily forecaster on another daily series (scale-free features): bars from a different price level
    goog = bundled_bars("GOOG").iloc[-200:]
    cheap = goog.assign(**{k: goog[k] / 400 for k in ("open", "high", "low", "close")})
    r = _forecast(server, bars=_records(cheap), horizon=2, model=DAILY)
    assert r.status_code == 200, r.text
    assert 1.0 < r.json()["close"][0] < 3.0


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"dataset": "BTCUSD"}, 400, "no forecaster for monthly bars is loaded; frequencies served"),
        ({"dataset": "GOOG", "model": HOURLY}, 400, "forecasts hourly bars; these bars are daily"),
        ({"dataset": "GOOG", "horizon": 500}, 400, "horizon 500 is beyond"),
        ({"dataset": "GOOG", "quantiles": [0.5, 0.999]}, 400, "quantiles [0.999] are outside"),
        ({"dataset": "GOOG", "horizon": 0}, 400, "horizon"),
        ({"dataset": "AAPL"}, 400, "unknown dataset 'AAPL'"),
        ({"horizon": 3}, 400, "either `bars` or `dataset`"),
        ({"dataset": "GOOG", "model": "nope"}, 404, "unknown model 'nope'"),
        ({"dataset": "GOOG", "model": "vit-soft"}, 400, "not a price-forecasting model"),
        ({"dataset": "GOOG", "gaps": "interpolate"}, 400, "not a gap policy"),
    ],
)
def test_bad_requests_name_the_problem(server, body, status, message):
    r = _forecast(server, **body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_bars_that_fail_validation_or_are_too_few(server, goog):
    recs = _records(goog.iloc[-150:])
    recs[10]["close"] = recs[10]["high"] * 2
    r = _forecast(server, bars=recs)
    assert (
        r.status_code == 400 and "close" in r.json()["error"] and "outside [low, high]" in r.json()["error"]
    )
    recs = _records(goog.iloc[-150:])
    recs[20]["timestamp"] = recs[19]["timestamp"]
    r = _forecast(server, bars=recs)
    assert r.status_code == 400 and "duplicate bar: bar 20" in r.json()["error"]
    r = _forecast(server, bars=_records(goog.iloc[-40:]))
    assert (
        r.status_code == 400
        and "40 bars given" in r.json()["error"]
        and "needs at least" in r.json()["error"]
    )
    r = _forecast(server, bars=[{"timestamp": "2024-01-02", "open": 1, "high": 1, "low": 1}])
    assert r.status_code == 400 and "close" in r.json()["error"]
    # the server keeps serving
    assert _forecast(server, dataset="GOOG").status_code == 200


def test_forecaster_over_the_open_inference_protocol(server, goog):
    art = get_artifact(DAILY)
    x, scale = last_window(goog, art.manifest["context"])
    expected = onnx_quantiles(art.file(art.export("onnx")["file"]), x, scale)
    client = thttp.InferenceServerClient(server.http_hostport)
    inputs = [thttp.InferInput("features", list(x.shape), "FP32"), thttp.InferInput("scale", [1, 1], "FP32")]
    inputs[0].set_data_from_numpy(x, binary_data=True)
    inputs[1].set_data_from_numpy(scale, binary_data=True)
    out = client.infer(DAILY, inputs).as_numpy("quantiles")
    np.testing.assert_allclose(out, expected, atol=1e-5)
    g = tgrpc.InferenceServerClient(server.grpc)
    meta = g.get_model_metadata(HOURLY)
    assert [i.name for i in meta.inputs] == ["features", "scale"] and meta.outputs[0].name == "quantiles"


def test_forecast_metrics(server):
    before = httpx.get(f"{server.http}/metrics", timeout=10).text
    assert _forecast(server, dataset="EURUSD", horizon=2).status_code == 200
    after = httpx.get(f"{server.http}/metrics", timeout=10).text
    for name in ("kiln_forecasts_total", "kiln_forecast_input_bars_count", "kiln_forecast_seconds_count"):
        assert metric_total(after, name, model=HOURLY) == metric_total(before, name, model=HOURLY) + 1
    assert metric_total(after, "kiln_forecast_input_bars_sum", model=HOURLY) - metric_total(
        before, "kiln_forecast_input_bars_sum", model=HOURLY
    ) == pytest.approx(5000)
