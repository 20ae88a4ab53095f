"""kiln.market.features: the `ta` indicators against textbook reference implementations written here
as plain loops, no look-ahead (features on a truncated series equal the full series' features up to the
cut), scale-freeness (one forecaster for any price level), and the input windows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kiln.market.bars import bundled_bars, validate_bars
from kiln.market.features import (
    FEATURES,
    WARMUP,
    compute_features,
    indicators,
    last_window,
    targets,
    windows,
)

SETTLED = 300  # Wilder/EMA recursions have forgotten their initialisation (< 1e-9) by this bar


@pytest.fixture(scope="module")
def goog() -> pd.DataFrame:
    return validate_bars(bundled_bars("GOOG"))[0].iloc[:800]


@pytest.fixture(scope="module")
def ind(goog) -> pd.DataFrame:
    return indicators(goog)


def _ema(x: np.ndarray, n: int, alpha: float | None = None) -> np.ndarray:
    a = alpha if alpha is not None else 2 / (n + 1)
    out = np.empty_like(x)
    out[0] = x[0]
    for i in range(1, len(x)):
        out[i] = a * x[i] + (1 - a) * out[i - 1]
    return out


def _sma(x: np.ndarray, n: int) -> np.ndarray:
    out = np.full_like(x, np.nan)
    for i in range(n - 1, len(x)):
        out[i] = x[i - n + 1 : i + 1].mean()
    return out


def _close(a, b, start=SETTLED, rtol=1e-6):
    np.testing.assert_allclose(np.asarray(a)[start:], np.asarray(b)[start:], rtol=rtol, atol=1e-8)


def test_moving_averages_and_macd(goog, ind):
    c = goog["close"].to_numpy()
    _close(ind["sma20"], _sma(c, 20), start=19)
    _close(ind["sma50"], _sma(c, 50), start=49)
    _close(ind["ema12"], _ema(c, 12))
    macd = _ema(c, 12) - _ema(c, 26)  # Appel: EMA12 − EMA26, signal = EMA9 of MACD
    _close(ind["macd"], macd)
    _close(ind["macd_signal"], _ema(macd, 9))
    _close(ind["macd_hist"], macd - _ema(macd, 9))


def test_rsi_is_wilders(goog, ind):
    c = goog["close"].to_numpy()
    d = np.diff(c, prepend=np.nan)[1:]
    up, down = _ema(np.maximum(d, 0), 14, alpha=1 / 14), _ema(np.maximum(-d, 0), 14, alpha=1 / 14)
    with np.errstate(divide="ignore"):  # no down move yet in the first bars: RS = ∞, RSI = 100
        rsi = 100 - 100 / (1 + up / down)
    _close(ind["rsi"].to_numpy()[1:], rsi, start=SETTLED)


def test_bollinger_bands(goog, ind):
    c = goog["close"].to_numpy()
    mid = _sma(c, 20)
    sd = np.array([np.nan] * 19 + [c[i - 19 : i + 1].std() for i in range(19, len(c))])  # population std
    _close(ind["bb_high"], mid + 2 * sd, start=19)
    _close(ind["bb_low"], mid - 2 * sd, start=19)
    _close(ind["bb_pband"], (c - (mid - 2 * sd)) / (4 * sd), start=19)


def test_atr_is_wilders_true_range(goog, ind):
    h, lo, c = (goog[k].to_numpy() for k in ("high", "low", "close"))
    prev = np.roll(c, 1)
    tr = np.maximum.reduce([h - lo, np.abs(h - prev), np.abs(lo - prev)])
    atr = np.full_like(c, np.nan)
    atr[13] = tr[:14].mean()
    for i in range(14, len(c)):
        atr[i] = (atr[i - 1] * 13 + tr[i]) / 14
    _close(ind["atr"], atr, start=SETTLED)


def test_cci(goog, ind):
    tp = ((goog["high"] + goog["low"] + goog["close"]) / 3).to_numpy()
    sma = _sma(tp, 20)
    mad = np.array([np.nan] * 19 + [np.abs(tp[i - 19 : i + 1] - sma[i]).mean() for i in range(19, len(tp))])
    _close(ind["cci"], (tp - sma) / (0.015 * mad), start=19)


def test_stochastic(goog, ind):
    h, lo, c = (goog[k].to_numpy() for k in ("high", "low", "close"))
    k = np.full_like(c, np.nan)
    for i in range(13, len(c)):
        lowest, highest = lo[i - 13 : i + 1].min(), h[i - 13 : i + 1].max()
        k[i] = 100 * (c[i] - lowest) / (highest - lowest)  # Lane's %K over 14 bars
    _close(ind["stoch_k"], k, start=13)
    _close(ind["stoch_d"], _sma(k, 3), start=15)


def test_obv_steps_by_signed_volume(goog, ind):
    # Granville: OBV moves by +volume on an up close and −volume on a down close. (ta counts an unchanged
    # close as +volume; those bars are left out of the comparison.)
    c, v = goog["close"].to_numpy(), goog["volume"].to_numpy()
    step = np.diff(ind["obv"].to_numpy())
    moved = np.diff(c) != 0
    np.testing.assert_allclose(step[moved], (np.sign(np.diff(c)) * v[1:])[moved])


def test_no_feature_uses_later_bars(goog):
    full = compute_features(goog)
    for cut in (WARMUP + 1, 200, 451, 799):
        part = compute_features(goog.iloc[:cut])
        pd.testing.assert_frame_equal(part, full.loc[part.index], check_exact=False, rtol=1e-5, atol=1e-6)
    # and the model's last window at a cut equals the windows of the full series at that bar
    x_cut, s_cut = last_window(goog.iloc[:600], 48)
    row = full.index.get_loc(goog.index[599])
    x_full, s_full = windows(full, 48, np.array([row]))
    np.testing.assert_allclose(x_cut, x_full, atol=1e-5)
    np.testing.assert_allclose(s_cut, s_full, rtol=1e-5)


def test_features_are_scale_free(goog):
    scaled = goog.assign(**{k: goog[k] * 1234.5 for k in ("open", "high", "low", "close")})
    a, b = compute_features(goog), compute_features(scaled)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-4, atol=1e-5)
    assert list(a.columns) == list(FEATURES) and np.isfinite(a.to_numpy()).all()


def test_window_inputs_and_targets(goog):
    feats = compute_features(goog)
    origins = np.array([100, 200])
    x, s = windows(feats, 48, origins)
    assert x.shape == (2, 48, len(FEATURES)) and s.shape == (2, 1) and x.dtype == np.float32
    ret = feats["log_return"].to_numpy()
    np.testing.assert_allclose(s[:, 0], [ret[53:101].std(), ret[153:201].std()], rtol=1e-5)
    np.testing.assert_allclose(x[0, -1, FEATURES.index("log_return")], ret[100] / s[0, 0], rtol=1e-5)
    y = targets(goog["close"], feats, origins, 3)
    c = goog["close"].to_numpy()[WARMUP:]
    np.testing.assert_allclose(y[0], np.log(c[101:104] / c[100]), rtol=1e-5)


def test_too_few_bars_says_how_many(goog):
    with pytest.raises(ValueError, match=f"at least {WARMUP + 48}"):
        last_window(goog.iloc[:100], 48)
