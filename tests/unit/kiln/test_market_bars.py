"""kiln.market.bars: reading exchange/tool layouts, validation errors, the gap policy, calendars and the
timestamps that continue a series (business days, FX hours, 24/7 hours, month ends)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kiln.market.bars import (
    BarsError,
    Calendar,
    bars_from_records,
    bundled_bars,
    detect_calendar,
    future_timestamps,
    read_bars,
    validate_bars,
)


def _bars(n: int = 10, freq: str = "B", start: str = "2024-01-01") -> pd.DataFrame:
    idx = pd.date_range(start, periods=n, freq=freq)
    close = 100 * np.exp(np.cumsum(np.random.default_rng(0).normal(0, 0.01, n)))
    return pd.DataFrame(
        {"open": close * 0.999, "high": close * 1.01, "low": close * 0.99, "close": close, "volume": 1e3},
        index=idx,
    )


# --- layouts ---------------------------------------------------------------------------------------------


def test_yahoo_csv(tmp_path):
    p = tmp_path / "goog.csv"
    p.write_text(
        "Date,Open,High,Low,Close,Adj Close,Volume\n"
        "2024-01-02,10,11,9,10.5,10.4,100\n2024-01-03,10.5,11,10,10.8,10.7,200\n"
    )
    bars = read_bars(p)
    assert list(bars.columns) == ["open", "high", "low", "close", "volume"]
    assert bars["close"].tolist() == [10.5, 10.8]  # Close, not Adj Close
    assert bars.index[0] == pd.Timestamp("2024-01-02")


def test_binance_epoch_milliseconds(tmp_path):
    p = tmp_path / "btc.csv"
    p.write_text(
        "open_time,open,high,low,close,volume,close_time\n"
        "1704067200000,42000,42500,41800,42300,12.5,1704070799999\n"
        "1704070800000,42300,42400,42100,42200,8.1,1704074399999\n"
    )
    bars = read_bars(p)
    assert bars.index[0] == pd.Timestamp("2024-01-01T00:00:00Z")
    assert bars.index[1] - bars.index[0] == pd.Timedelta(hours=1)


def test_binance_vision_klines_without_header_in_microseconds(tmp_path):
    p = tmp_path / "BTCUSDT-1h-2025-01.csv"
    p.write_text(
        "1735689600000000,93576.0,94509.4,93489.0,94401.1,1000.5,1735693199999999,9.4e7,12345,500.1,4.7e7,0\n"
        "1735693200000000,94401.1,94500.0,94200.0,94300.0,900.1,1735696799999999,8.5e7,11111,450.0,4.2e7,0\n"
    )
    bars = read_bars(p)
    assert bars.index[0] == pd.Timestamp("2025-01-01T00:00:00Z") and bars["close"].tolist() == [
        94401.1,
        94300.0,
    ]


def test_cryptodatadownload_url_line_newest_first_and_unit_volume(tmp_path):
    p = tmp_path / "cdd.csv"
    p.write_text(
        "https://www.CryptoDataDownload.com\n"
        "unix,date,symbol,open,high,low,close,Volume BTC,Volume USDT\n"
        "1704153600,2024-01-02 00:00:00,BTC/USDT,2,3,1.5,2.5,7,17\n"
        "1704067200,2024-01-01 00:00:00,BTC/USDT,1,2,0.5,1.5,5,8\n"
    )
    bars = read_bars(p)
    assert bars.index.is_monotonic_increasing and bars["volume"].tolist() == [5, 7]


def test_metatrader_separate_date_and_time_tab_separated(tmp_path):
    p = tmp_path / "mt5.csv"
    p.write_text(
        "<DATE>\t<TIME>\t<OPEN>\t<HIGH>\t<LOW>\t<CLOSE>\t<TICKVOL>\t<VOL>\t<SPREAD>\n"
        "2024.01.02\t10:00:00\t1.1\t1.2\t1.0\t1.15\t50\t0\t2\n"
        "2024.01.02\t11:00:00\t1.15\t1.2\t1.1\t1.12\t40\t0\t2\n"
    )
    bars = read_bars(p)
    assert bars.index[1] == pd.Timestamp("2024-01-02 11:00") and bars["volume"].tolist() == [50, 40]


def test_parquet_with_datetime_index(tmp_path):
    p = tmp_path / "bars.parquet"
    _bars(5).rename(columns=str.title).to_parquet(p)
    bars = read_bars(p)
    assert len(bars) == 5 and bars.index[0] == pd.Timestamp("2024-01-01")


def test_missing_columns_are_named(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("time,open,high,close\n2024-01-01,1,2,1.5\n")
    with pytest.raises(BarsError, match=r"missing column\(s\) \['low', 'volume'\]"):
        read_bars(p)


def test_bundled_series():
    goog, eurusd, btc = (bundled_bars(n) for n in ("GOOG", "EURUSD", "BTCUSD"))
    assert len(goog) == 2148 and len(eurusd) == 5000 and len(btc) > 100
    assert validate_bars(goog)[1] == Calendar("daily", sessions="weekdays")
    cal = validate_bars(eurusd)[1]
    assert cal.frequency == "hourly" and cal.sessions == "fx"
    assert validate_bars(btc)[1] == Calendar("monthly", month_end=True)
    with pytest.raises(BarsError, match="available"):
        bundled_bars("AAPL")


# --- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b.iloc[:1], "at least 2"),
        (lambda b: b.assign(close=b["close"].where(b.index != b.index[3])), r"close is NaN .* bar 3"),
        (lambda b: b.set_axis(b.index.where(b.index != b.index[4], b.index[3])), r"duplicate bar: bar 4"),
        (
            lambda b: b.set_axis(list(b.index[:4]) + [b.index[5], b.index[4]] + list(b.index[6:])),
            "must increase",
        ),
        (lambda b: b.assign(low=-b["low"]), "low must be positive"),
        (lambda b: b.assign(volume=-1.0), "volume must not be negative"),
        (lambda b: b.assign(high=b["low"] * 0.5), "high < low in bar 0"),
        (lambda b: b.assign(close=b["high"] * 1.1), r"close .* outside \[low, high\]"),
    ],
)
def test_validation_errors_name_the_problem(mutate, message):
    with pytest.raises(BarsError, match=message):
        validate_bars(mutate(_bars()))


def test_unparseable_timestamp_is_named():
    rec = [
        {"timestamp": "2024-01-02", "open": 1, "high": 1, "low": 1, "close": 1, "volume": 0},
        {"timestamp": "yesterday-ish", "open": 1, "high": 1, "low": 1, "close": 1, "volume": 0},
    ]
    with pytest.raises(BarsError, match="unparseable timestamp 'yesterday-ish'"):
        bars_from_records(rec)


def test_unknown_spacing_lists_the_known_ones():
    with pytest.raises(BarsError, match="Kiln knows these spacings"):
        validate_bars(_bars(freq="7min"))


# --- gap policy ------------------------------------------------------------------------------------------


def test_weekends_are_not_gaps_but_a_missing_business_day_is():
    bars = _bars(15)
    holed = bars.drop(bars.index[6])  # a Tuesday
    kept, cal = validate_bars(holed)  # "keep": the default
    assert len(kept) == 14 and cal.sessions == "weekdays"
    filled, _ = validate_bars(holed, gaps="fill")
    assert len(filled) == 15 and filled.index.equals(bars.index)
    row = filled.loc[bars.index[6]]
    assert row["volume"] == 0 and row["open"] == row["close"] == kept["close"].iloc[5]
    with pytest.raises(
        BarsError, match=r"gap: 1 missing bar\(s\) between 2024-01-08T00:00:00 and 2024-01-10"
    ):
        validate_bars(holed, gaps="error")
    validate_bars(bars, gaps="error")  # weekends alone are fine


def test_too_long_a_gap_is_refused_even_when_kept():
    bars = _bars(100, freq="h")
    holed = pd.concat([bars.iloc[:10], bars.iloc[70:]])
    with pytest.raises(BarsError, match="gap too long"):
        validate_bars(holed, max_gap=48)
    assert len(validate_bars(holed, max_gap=60)[0]) == 40


def test_unknown_gap_policy():
    with pytest.raises(ValueError, match="valid"):
        validate_bars(_bars(), gaps="interpolate")


# --- calendars and future timestamps ------------------------------------------------------------------------


def test_business_days_continue_over_the_weekend():
    cal = detect_calendar(pd.date_range("2024-01-01", "2024-01-05", freq="B"))  # Mon..Fri
    assert cal == Calendar("daily", sessions="weekdays")
    got = future_timestamps(pd.Timestamp("2024-01-05"), cal, 3)
    assert got == [pd.Timestamp("2024-01-08"), pd.Timestamp("2024-01-09"), pd.Timestamp("2024-01-10")]


def test_crypto_daily_keeps_weekends():
    cal = detect_calendar(pd.date_range("2024-01-01", periods=10, freq="D"))
    assert future_timestamps(pd.Timestamp("2024-01-05"), cal, 2) == [
        pd.Timestamp("2024-01-06"),
        pd.Timestamp("2024-01-07"),
    ]


def test_fx_hours_skip_the_weekend_close():
    eurusd = bundled_bars("EURUSD")
    cal = detect_calendar(eurusd.index)
    friday = pd.Timestamp("2018-02-09") + pd.Timedelta(hours=cal.fx_close[0] - 1)  # last open Friday hour
    got = future_timestamps(friday, cal, 3)
    assert got[0].day_of_week == 6 and got[0].hour == cal.fx_close[1]  # Sunday's reopening
    assert got[1] - got[0] == pd.Timedelta(hours=1)
    # a plain weekday hour continues by one hour
    assert future_timestamps(pd.Timestamp("2018-02-07 15:00"), cal, 1) == [pd.Timestamp("2018-02-07 16:00")]


def test_hourly_with_saturday_bars_is_24_7():
    cal = detect_calendar(pd.date_range("2024-01-06", periods=48, freq="h"))  # a Saturday
    assert cal.sessions == "all"
    assert future_timestamps(pd.Timestamp("2024-01-12 23:00"), cal, 2)[1] == pd.Timestamp("2024-01-13 01:00")


def test_month_ends_continue_as_month_ends():
    cal = detect_calendar(pd.date_range("2023-01-31", periods=6, freq="ME"))
    assert future_timestamps(pd.Timestamp("2024-01-31"), cal, 2) == [
        pd.Timestamp("2024-02-29"),
        pd.Timestamp("2024-03-31"),
    ]


def test_utc_timestamps_stay_utc():
    rec = [
        {"timestamp": f"2024-01-0{d}T00:00:00Z", "open": 1, "high": 1, "low": 1, "close": 1, "volume": 0}
        for d in (2, 3, 4)
    ]
    bars, cal = validate_bars(bars_from_records(rec))
    nxt = future_timestamps(bars.index[-1], cal, 1)[0]
    assert str(nxt.tz) == "UTC" and nxt.isoformat() == "2024-01-05T00:00:00+00:00"


# --- issue 16: input that overflows or outgrows the work budget is a BarsError (400), never a 500 ------


@pytest.mark.parametrize("stamp", [1e30, 9.2e18, -1e20, "2300-01-02T00:00:00Z", 1e300])
def test_out_of_range_timestamps_are_a_bars_error(stamp):
    records = [
        {"timestamp": stamp, "open": 1, "high": 1, "low": 1, "close": 1, "volume": 0},
        {"timestamp": "2024-01-02T00:00:00Z" if isinstance(stamp, str) else 1.7e9,
         "open": 1, "high": 1, "low": 1, "close": 1, "volume": 0},
    ]  # fmt: skip
    with pytest.raises(BarsError, match="out of range|timestamps must"):
        validate_bars(bars_from_records(records))


def test_gap_filling_past_max_bars_is_refused_before_filling():
    # 24/7 daily bars in runs of 3 days, 40 days apart: 37 missing bars per gap, 199 gaps, ~7400 to fill
    every = pd.date_range("2001-01-01", periods=300 * 40, freq="D")
    days = every[(np.arange(len(every)) % 40) < 3][:600]
    bars = pd.DataFrame(
        {"open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0, "volume": 0.0}, index=pd.DatetimeIndex(days)
    )
    with pytest.raises(BarsError, match="at most 1000"):
        validate_bars(bars, gaps="fill", max_bars=1000)
    with pytest.raises(BarsError, match="at most 100 are accepted"):
        validate_bars(bars, gaps="keep", max_bars=100)
    filled, _ = validate_bars(bars, gaps="fill", max_bars=10_000)
    assert len(filled) == 199 * 40 + 3
