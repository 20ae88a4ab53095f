"""Technical-indicator features for the forecasters, scale-free, and the model's input windows.

The indicators come from ``ta`` (Technical Analysis Library in Python, bukosabino/ta): pure pandas with
no compiled parts (TA-Lib needs a C library that ``pip`` cannot always build, and pandas-ta pins numpy
and pandas versions Kiln does not use), it follows the textbook definitions (Wilder's RSI and ATR,
Appel's MACD, Bollinger's bands, Lambert's CCI, Lane's stochastic, Granville's OBV) and it is maintained
and widely used. Every indicator is causal: its value at bar t is computed from bars ≤ t only
(``tests/unit/kiln/test_market_features.py`` recomputes on truncated series to prove it).

The features are scale-free so one forecaster serves any series of its bar frequency (a $1 FX rate or a
$60 000 coin): prices enter only as log-ratios (log-returns, bar range, distance to a moving average,
MACD and ATR as fractions of the close), oscillators as centred fractions (RSI, %B, %K/%D, CCI/100), and
volume as OBV's net share of recent volume and the log of volume over its own average. Within each
input window the return-like features are further divided by the window's volatility σ (the standard
deviation of its 1-bar log-returns), and the model predicts in σ units; σ travels with the window as
the model's second input, so the graph outputs log-returns.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import ta

__all__ = [
    "FEATURES",
    "RETURN_FEATURES",
    "WARMUP",
    "compute_features",
    "indicators",
    "last_window",
    "targets",
    "windows",
]

# Bars before the first usable feature row: SMA50 needs 50, and EMA-based indicators (MACD 26/9, Wilder's
# RSI/ATR 14) have forgotten their start to < 1e-3 of their weight after ~2.5 slow spans.
WARMUP = 64
_OBV_WINDOW = 20
_CLIP = 10.0  # standardised features beyond ±10 are clipped (flash crashes, bad ticks)

FEATURES = (
    "log_return",
    "log_range",  # log(high / low)
    "log_body",  # log(close / open)
    "rsi",  # RSI(14) / 100 − 0.5
    "macd",  # MACD(12, 26) / close
    "macd_signal",  # its 9-bar EMA / close
    "macd_hist",  # MACD − signal, / close
    "bb_pband",  # Bollinger(20, 2) %B − 0.5
    "bb_width",  # (upper − lower) / middle
    "ema12_gap",  # log(close / EMA12)
    "sma20_gap",  # log(close / SMA20)
    "sma50_gap",  # log(close / SMA50)
    "atr",  # ATR(14) / close
    "cci",  # CCI(20) / 100
    "obv_flow",  # (OBV_t − OBV_{t−20}) / Σ volume over the 20 bars: net signed volume share, in [−1, 1]
    "stoch_k",  # %K(14) / 100 − 0.5
    "stoch_d",  # %D (3-bar SMA of %K) / 100 − 0.5
    "volume_ratio",  # log((1 + volume) / (1 + SMA20(volume)))
)
# Features measured in price-return units: divided by the window's σ.
RETURN_FEATURES = (
    "log_return", "log_range", "log_body", "macd", "macd_signal", "macd_hist", "bb_width", "ema12_gap",
    "sma20_gap", "sma50_gap", "atr",
)  # fmt: skip


def indicators(bars: pd.DataFrame) -> pd.DataFrame:
    """The raw indicators from ``ta`` (in price units), one row per bar; NaN during each one's warm-up."""
    o, h, lo, c, v = (bars[k] for k in ("open", "high", "low", "close", "volume"))
    macd = ta.trend.MACD(c, window_slow=26, window_fast=12, window_sign=9)
    bb = ta.volatility.BollingerBands(c, window=20, window_dev=2)
    stoch = ta.momentum.StochasticOscillator(h, lo, c, window=14, smooth_window=3)
    return pd.DataFrame(
        {
            "rsi": ta.momentum.RSIIndicator(c, window=14).rsi(),
            "macd": macd.macd(),
            "macd_signal": macd.macd_signal(),
            "macd_hist": macd.macd_diff(),
            "bb_high": bb.bollinger_hband(),
            "bb_low": bb.bollinger_lband(),
            "bb_mid": bb.bollinger_mavg(),
            "bb_pband": bb.bollinger_pband(),
            "ema12": ta.trend.EMAIndicator(c, window=12).ema_indicator(),
            "sma20": ta.trend.SMAIndicator(c, window=20).sma_indicator(),
            "sma50": ta.trend.SMAIndicator(c, window=50).sma_indicator(),
            # ta's ATR writes 0 (not NaN) for its first window-1 bars; the warm-up drops them
            "atr": ta.volatility.AverageTrueRange(h, lo, c, window=14).average_true_range(),
            "cci": ta.trend.CCIIndicator(h, lo, c, window=20, constant=0.015).cci(),
            "obv": ta.volume.OnBalanceVolumeIndicator(c, v).on_balance_volume(),
            "stoch_k": stoch.stoch(),
            "stoch_d": stoch.stoch_signal(),
        },
        index=bars.index,
    )


def compute_features(bars: pd.DataFrame) -> pd.DataFrame:
    """The scale-free features (:data:`FEATURES`) of validated bars; rows before :data:`WARMUP` dropped.

    Raises:
        ValueError: fewer than ``WARMUP + 1`` bars.
    """
    if len(bars) <= WARMUP:
        raise ValueError(f"{len(bars)} bars; the indicators need more than {WARMUP} bars of look-back")
    ind = indicators(bars)
    o, h, lo, c, v = (bars[k] for k in ("open", "high", "low", "close", "volume"))
    vol_sum = v.rolling(_OBV_WINDOW).sum()
    obv_flow = (ind["obv"] - ind["obv"].shift(_OBV_WINDOW)) / vol_sum.where(vol_sum > 0)
    feats = pd.DataFrame(
        {
            "log_return": np.log(c / c.shift(1)),
            "log_range": np.log(h / lo),
            "log_body": np.log(c / o),
            "rsi": ind["rsi"] / 100 - 0.5,
            "macd": ind["macd"] / c,
            "macd_signal": ind["macd_signal"] / c,
            "macd_hist": ind["macd_hist"] / c,
            "bb_pband": ind["bb_pband"] - 0.5,
            "bb_width": (ind["bb_high"] - ind["bb_low"]) / ind["bb_mid"],
            "ema12_gap": np.log(c / ind["ema12"]),
            "sma20_gap": np.log(c / ind["sma20"]),
            "sma50_gap": np.log(c / ind["sma50"]),
            "atr": ind["atr"] / c,
            "cci": ind["cci"] / 100,
            "obv_flow": obv_flow.fillna(0.0),  # no volume at all in the window (some FX feeds): no flow
            "stoch_k": ind["stoch_k"] / 100 - 0.5,
            "stoch_d": ind["stoch_d"] / 100 - 0.5,
            "volume_ratio": np.log((1 + v) / (1 + v.rolling(20).mean())),
        },
        index=bars.index,
    )
    # Flat windows (high = low over 14/20 bars, e.g. filled gaps) make %B, %K and CCI 0/0: no signal.
    feats = feats.fillna({"bb_pband": 0.0, "stoch_k": 0.0, "stoch_d": 0.0, "cci": 0.0}).iloc[WARMUP:]
    return feats.replace([np.inf, -np.inf], np.nan).fillna(0.0).astype("float32")


def _sigma(log_returns: np.ndarray) -> np.ndarray:
    """The window's volatility: std of its 1-bar log-returns, floored so a flat window is not 0."""
    return np.maximum(log_returns.std(axis=-1), 1e-6).astype(np.float32)


def _normalise(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    idx = [FEATURES.index(f) for f in RETURN_FEATURES]
    x = x.copy()
    x[..., idx] /= sigma[..., None, None]
    return np.clip(x, -_CLIP, _CLIP)


def windows(features: pd.DataFrame, context: int, origins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs ending at each origin row (inclusive) of ``features``.

    Returns:
        ``x`` (N, context, F) float32 with return-like features divided by σ, and σ (N, 1) float32.
    """
    values = features.to_numpy(dtype=np.float32)
    idx = origins[:, None] + np.arange(-context + 1, 1)[None, :]
    if (idx < 0).any():
        raise ValueError(f"an origin is less than {context - 1} feature rows into the series")
    x = values[idx]
    sigma = _sigma(x[..., FEATURES.index("log_return")])
    return _normalise(x, sigma), sigma[:, None]


def last_window(bars: pd.DataFrame, context: int) -> tuple[np.ndarray, np.ndarray]:
    """The input window ending at the last bar (what ``/forecast`` feeds the model): (1, L, F), (1, 1).

    Raises:
        ValueError: fewer than ``WARMUP + context`` bars (the message says how many are needed).
    """
    needed = WARMUP + context
    if len(bars) < needed:
        raise ValueError(
            f"{len(bars)} bars given; this forecaster needs at least {needed} "
            f"({WARMUP} for the indicators' look-back + {context} of context)"
        )
    feats = compute_features(bars)  # all the bars, as training computed them over its whole series
    return windows(feats, context, np.array([len(feats) - 1]))


def targets(close: pd.Series, features: pd.DataFrame, origins: np.ndarray, horizon: int) -> np.ndarray:
    """The h-step log-returns log(C_{t+h} / C_t), h = 1..horizon, at each origin row: (N, horizon)."""
    c = np.log(close.loc[features.index[0] :].to_numpy(dtype=np.float64))
    idx = origins[:, None] + np.arange(1, horizon + 1)[None, :]
    if (idx >= len(c)).any():
        raise ValueError("an origin has fewer than `horizon` bars after it")
    return (c[idx] - c[origins][:, None]).astype(np.float32)
