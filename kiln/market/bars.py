"""OHLCV bars: reading users' files, the bundled series, validation, gap policy, bar frequency, and the
timestamps that continue a series.

Training (``kiln train forecaster-... --data FILE``), export and serving (``POST /forecast``) all go
through :func:`validate_bars`, so a series the server accepts is one the trainer would have accepted.

Layouts read by :func:`read_bars` (CSV with any delimiter, or Parquet): column names are matched
case-insensitively after dropping ``<>``, spaces, underscores and units, so the exports of common tools
load as they are — yfinance / Yahoo (``Date, Open, High, Low, Close, Adj Close, Volume``), Binance
klines (``open_time`` in epoch milliseconds or microseconds, with or without the header row),
CryptoDataDownload (a URL line first, ``unix``/``date``, ``Volume BTC``, newest bar first), MetaTrader
(``<DATE> <TIME> <OPEN> ... <TICKVOL>``, separate date and time),
TradingView (``time`` in epoch seconds), backtesting.py (``Open, High, Low, Close, Volume`` with the time
as the first, unnamed column) and pandas' own ``to_csv``/``to_parquet`` of a DatetimeIndex. Epoch
numbers are read in seconds, milliseconds, microseconds or nanoseconds by magnitude. A file whose
bars are all newest-first is reversed; any other order is an error.

Gap policy (:data:`GAP_POLICIES`, the ``gaps`` argument): a *gap* is a step between consecutive bars that
is longer than the series' calendar allows — weekends are not gaps in a business-day or 24/5 FX series,
so a gap is a missing trading day or hour (an exchange holiday, a halt, a hole in the data).

* ``"keep"`` (default): use the bars as they are; a return across a gap spans the gap. Holidays make this
  the only sensible default for exchange data. Gaps longer than ``max_gap`` bars still raise, since a
  hole that long is a broken file rather than a closed market.
* ``"fill"``: insert the missing calendar bars as flat bars (open = high = low = close = the previous
  close, volume 0), as charting tools do, for at most ``max_gap`` missing bars per gap.
* ``"error"``: any gap raises, naming the first one.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "BUNDLED",
    "COLUMNS",
    "FREQUENCIES",
    "GAP_POLICIES",
    "BarsError",
    "Calendar",
    "bundled_bars",
    "detect_calendar",
    "future_timestamps",
    "read_bars",
    "validate_bars",
]

COLUMNS = ("open", "high", "low", "close", "volume")
GAP_POLICIES = ("keep", "fill", "error")
# Timestamps Kiln accepts: well inside pandas' nanosecond range (1677-09-21 .. 2262-04-11), so the
# calendar arithmetic after the last bar (filled gaps, a forecast's future bars) never overflows.
EARLIEST = pd.Timestamp("1800-01-01")
LATEST = pd.Timestamp("2200-01-01")
# Bar spacings Kiln recognises, by name; the forecaster of a frequency is chosen by this name.
FREQUENCIES: dict[str, pd.Timedelta] = {
    "1min": pd.Timedelta(minutes=1),
    "5min": pd.Timedelta(minutes=5),
    "15min": pd.Timedelta(minutes=15),
    "30min": pd.Timedelta(minutes=30),
    "hourly": pd.Timedelta(hours=1),
    "4h": pd.Timedelta(hours=4),
    "daily": pd.Timedelta(days=1),
    "weekly": pd.Timedelta(days=7),
    "monthly": pd.Timedelta(days=30),  # nominal; monthly bars step by calendar months
}
# The series that ship with the `backtesting` package (backtesting.test): real OHLCV.
BUNDLED = {
    "GOOG": "GOOG daily (2004-2013)",
    "EURUSD": "EURUSD hourly (2017-2018)",
    "BTCUSD": "BTCUSD monthly",
}
_DEFAULT_FX_CLOSE = (21, 21)  # (first closed Friday hour, first open Sunday hour): the bundled EURUSD's


class BarsError(ValueError):
    """Bars that Kiln will not use, with a message naming the problem (and the first offending bar)."""


# --- reading ---------------------------------------------------------------------------------------------

_ALIASES = {
    "timestamp": (
        "timestamp", "time", "date", "datetime", "opentime", "unix", "unixtimestamp", "gmttime",
        "localtime", "datetimeutc", "timeutc", "dateutc", "t", "index", "unnamed0", "",
    ),
    "open": ("open", "o", "openprice", "openbid", "openmid"),
    "high": ("high", "h", "highprice", "highbid", "highmid"),
    "low": ("low", "l", "lowprice", "lowbid", "lowmid"),
    "close": ("close", "c", "closeprice", "last", "closebid", "closemid", "adjclose"),
    "volume": ("volume", "vol", "v", "tickvol", "tickvolume", "realvolume", "basevolume", "volumefrom"),
}  # fmt: skip


_BINANCE_KLINES = ("open_time", "open", "high", "low", "close", "volume")


def _headerless(columns) -> bool:
    try:
        [float(c) for c in columns]
    except (TypeError, ValueError):
        return False
    return len(columns) >= len(_BINANCE_KLINES)


def _key(name: object) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _pick(columns: list[str], field: str) -> str | None:
    keys = {c: _key(c) for c in columns}
    for alias in _ALIASES[field]:  # preference order: "close" before "adjclose"
        for col, k in keys.items():
            if k == alias:
                return col
    if field == "volume":  # CryptoDataDownload: "Volume BTC", "Volume USDT" — the first is the base asset
        for col, k in keys.items():
            if k.startswith("volume"):
                return col
    return None


def _parse_times(raw: pd.Series) -> pd.DatetimeIndex:
    """Timestamps from strings, datetimes or epoch numbers (unit by magnitude), as naive UTC-or-local."""
    if pd.api.types.is_datetime64_any_dtype(raw):
        times = pd.DatetimeIndex(raw)
    elif pd.api.types.is_numeric_dtype(raw):
        values = raw.to_numpy(dtype="float64")
        if np.isnan(values).any():
            raise BarsError(f"timestamp is missing in bar {int(np.flatnonzero(np.isnan(values))[0])}")
        magnitude = np.nanmedian(np.abs(values))
        unit = "s" if magnitude < 1e11 else "ms" if magnitude < 1e14 else "us" if magnitude < 1e17 else "ns"
        try:
            times = pd.DatetimeIndex(pd.to_datetime(values, unit=unit, utc=True))
        except (ValueError, OverflowError):  # pandas' OutOfBoundsDatetime is a ValueError
            i = int(np.argmax(np.abs(values)))
            raise BarsError(
                f"timestamp {values[i]:g} in bar {i} is out of range as epoch {unit} "
                f"(timestamps must lie between {EARLIEST.year} and {LATEST.year})"
            ) from None
    else:
        text = raw.astype("string")
        try:
            times = pd.DatetimeIndex(pd.to_datetime(text, utc=_mixed_offsets(text), format="mixed"))
        except (ValueError, TypeError, OverflowError) as exc:
            bad = _first_unparseable(text)
            raise BarsError(f"unparseable timestamp {bad!r}: {exc}") from None
    if times.isna().any():
        raise BarsError(f"timestamp is missing in bar {int(np.flatnonzero(times.isna())[0])}")
    if times.tz is not None:
        times = times.tz_convert("UTC")
    naive = times.tz_localize(None) if times.tz is not None else times
    out = (naive < EARLIEST) | (naive >= LATEST)
    if out.any():  # the calendar arithmetic (gaps, the forecast's future bars) must not overflow
        i = int(np.flatnonzero(out)[0])
        raise BarsError(
            f"timestamp {times[i].isoformat()} in bar {i} is out of range "
            f"(timestamps must lie between {EARLIEST.year} and {LATEST.year})"
        )
    return times


def _mixed_offsets(text: pd.Series) -> bool:
    return bool(text.str.contains(r"(?:Z|[+-]\d\d:?\d\d)$", regex=True, na=False).any())


def _first_unparseable(text: pd.Series) -> str:
    for value in text:
        try:
            pd.Timestamp(value)
        except (ValueError, TypeError):
            return str(value)
    return str(text.iloc[0])


def read_bars(path: str | Path) -> pd.DataFrame:
    """Read a CSV or Parquet file of OHLCV bars into the frame :func:`validate_bars` takes.

    Returns:
        A frame indexed by timestamp with columns ``open, high, low, close, volume`` (not yet validated).

    Raises:
        BarsError: unreadable file, or a required column missing (the message lists the columns found).
    """
    path = Path(path)
    if not path.is_file():
        raise BarsError(f"no bars file at {path}")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
            if isinstance(frame.index, pd.DatetimeIndex):
                frame = frame.reset_index()
        else:
            text = path.read_text(errors="replace")
            lines = text.splitlines()
            skip = 1 if lines and lines[0].lower().startswith(("http", "www.")) else 0  # CryptoDataDownload
            body = "\n".join(lines[skip:])
            frame = pd.read_csv(io.StringIO(body), sep=None, engine="python")
            if _headerless(frame.columns):  # Binance's data.binance.vision klines carry no header row
                frame = pd.read_csv(io.StringIO(body), sep=None, engine="python", header=None)
                frame.columns = [*_BINANCE_KLINES, *frame.columns[len(_BINANCE_KLINES) :]]
    except (OSError, ValueError, ImportError, pd.errors.ParserError) as exc:
        raise BarsError(f"cannot read {path}: {exc}") from None
    return _standardise(frame, source=str(path))


def _standardise(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    frame = frame.rename(columns=lambda c: str(c).strip().strip("<>"))
    columns = list(frame.columns)
    picked = {f: _pick(columns, f) for f in ("timestamp", *COLUMNS)}
    date_col, time_col = picked["timestamp"], None
    dates = [c for c in columns if _key(c) == "date"]
    times = [c for c in columns if _key(c) == "time"]
    if dates and times:  # MetaTrader: separate <DATE> and <TIME>
        date_col, time_col = dates[0], times[0]
    missing = [f for f, col in picked.items() if col is None]
    if missing:
        raise BarsError(f"{source}: missing column(s) {missing}; found {columns}")
    ticks = next((c for c in columns if _key(c) in ("tickvol", "tickvolume")), None)
    if ticks is not None and (pd.to_numeric(frame[picked["volume"]], errors="coerce") == 0).all():
        picked["volume"] = ticks  # MetaTrader FX: real volume is 0, tick volume is the activity measure
    stamps = frame[date_col]
    if time_col is not None:
        stamps = frame[date_col].astype(str) + " " + frame[time_col].astype(str)
    times = _parse_times(stamps)
    out = pd.DataFrame(
        {f: pd.to_numeric(frame[picked[f]], errors="coerce").to_numpy(dtype="float64") for f in COLUMNS},
        index=times,
    )
    out.index.name = "timestamp"
    if len(out) > 1 and (np.diff(out.index.as_unit("ns").asi8) < 0).all():
        out = out.iloc[::-1]  # newest-first exports (CryptoDataDownload); any other disorder is an error
    return out


def bars_from_records(records: list[dict]) -> pd.DataFrame:
    """Bars from JSON-like records (``timestamp, open, high, low, close, volume``), as ``/forecast`` gets."""
    if not records:
        raise BarsError("no bars given")
    return _standardise(pd.DataFrame.from_records(records), source="bars")


def bundled_bars(name: str) -> pd.DataFrame:
    """One of the real series shipped with the ``backtesting`` package: GOOG, EURUSD or BTCUSD."""
    if name not in BUNDLED:
        raise BarsError(f"unknown bundled series {name!r}; available: {sorted(BUNDLED)}")
    import backtesting.test as bt  # deferred: the package prints a notice on import

    frame = getattr(bt, name).reset_index()
    return _standardise(frame, source=f"backtesting.test.{name}")


# --- validation ------------------------------------------------------------------------------------------


def validate_bars(
    bars: pd.DataFrame,
    *,
    gaps: str = "keep",
    max_gap: int = 48,
    min_bars: int = 2,
    max_bars: int | None = None,
) -> tuple[pd.DataFrame, Calendar]:
    """Check a frame of bars and apply the gap policy.

    ``max_bars`` bounds the bars given and, under ``gaps="fill"``, the bars after filling: the gaps are
    counted (and refused past the bound) before any filled bar is made.

    Returns:
        The bars (float64, increasing timestamps; with filled bars under ``gaps="fill"``) and their calendar.

    Raises:
        BarsError: naming the first problem — too few bars, NaN, duplicate or non-increasing timestamps,
            non-positive prices, negative volume, high < low, open/close outside [low, high], an
            unsupported bar spacing, or a gap the policy refuses.
    """
    if gaps not in GAP_POLICIES:
        raise ValueError(f"unknown gap policy {gaps!r}; valid: {list(GAP_POLICIES)}")
    missing = [c for c in COLUMNS if c not in bars.columns]
    if missing:
        raise BarsError(f"missing column(s) {missing}; found {list(bars.columns)}")
    if not isinstance(bars.index, pd.DatetimeIndex):
        raise BarsError("bars need a timestamp index (read them with read_bars or bars_from_records)")
    bars = bars[list(COLUMNS)].astype("float64")
    bars.index = bars.index.as_unit("ns")  # pandas may hold µs; every spacing below is in ns
    if len(bars) < min_bars:
        raise BarsError(f"{len(bars)} bars given; at least {min_bars} are needed")
    if max_bars is not None and len(bars) > max_bars:
        raise BarsError(f"{len(bars)} bars given; at most {max_bars} are accepted")
    stamp = bars.index

    def where(i: int) -> str:
        return f"bar {i} ({stamp[i].isoformat()})"

    values = bars.to_numpy()
    bad = ~np.isfinite(values)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise BarsError(f"{COLUMNS[j]} is NaN or infinite in {where(i)}")
    step = np.diff(stamp.asi8)
    if (step == 0).any():
        i = int(np.flatnonzero(step == 0)[0]) + 1
        raise BarsError(f"duplicate bar: {where(i)} has the same timestamp as the bar before it")
    if (step < 0).any():
        i = int(np.flatnonzero(step < 0)[0]) + 1
        raise BarsError(f"timestamps must increase: {where(i)} comes after {stamp[i - 1].isoformat()}")
    o, h, lo, c, v = values.T
    for name, col in (("open", o), ("high", h), ("low", lo), ("close", c)):
        if (col <= 0).any():
            raise BarsError(f"{name} must be positive; {where(int(np.flatnonzero(col <= 0)[0]))}: {name}")
    if (v < 0).any():
        raise BarsError(f"volume must not be negative: {where(int(np.flatnonzero(v < 0)[0]))}")
    if (h < lo).any():
        raise BarsError(f"high < low in {where(int(np.flatnonzero(h < lo)[0]))}")
    tol = 1e-9 * h  # float rounding in exports
    for name, col in (("close", c), ("open", o)):
        out = (col < lo - tol) | (col > h + tol)
        if out.any():
            i = int(np.flatnonzero(out)[0])
            raise BarsError(f"{name} {col[i]:g} outside [low, high] = [{lo[i]:g}, {h[i]:g}] in {where(i)}")
    calendar = detect_calendar(stamp)
    return _apply_gap_policy(bars, calendar, gaps, max_gap, max_bars), calendar


# --- calendars ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calendar:
    """How a series steps: its frequency name and which slots the market is closed in.

    ``sessions`` is ``"all"`` (every slot trades: crypto), ``"weekdays"`` (daily equity bars: business
    days; exchange holidays are not modelled and appear as gaps) or ``"fx"`` (intraday bars of a 24/5
    market: closed from Friday ``fx_close[0]`` o'clock to Sunday ``fx_close[1]`` o'clock).
    """

    frequency: str
    sessions: str = "all"
    fx_close: tuple[int, int] = _DEFAULT_FX_CLOSE
    month_end: bool = False

    @property
    def step(self) -> pd.Timedelta:
        return FREQUENCIES[self.frequency]

    def is_open(self, t: pd.Timestamp) -> bool:
        if self.sessions == "weekdays":
            return t.day_of_week < 5
        if self.sessions == "fx":
            day, hour = t.day_of_week, t.hour
            return not (
                day == 5 or (day == 4 and hour >= self.fx_close[0]) or (day == 6 and hour < self.fx_close[1])
            )
        return True

    def next(self, t: pd.Timestamp) -> pd.Timestamp:
        if self.frequency == "monthly":
            nxt = t + pd.offsets.MonthEnd(1) if self.month_end else t + pd.DateOffset(months=1)
            return nxt
        nxt = t + self.step
        while not self.is_open(nxt):
            nxt += self.step
        return nxt

    def slots_between(self, a: pd.Timestamp, b: pd.Timestamp, limit: int) -> int:
        """How many bars of this calendar lie strictly between a and b (counting stops at ``limit``)."""
        n, t = 0, self.next(a)
        while t < b and n <= limit:
            n, t = n + 1, self.next(t)
        return n


def detect_calendar(stamp: pd.DatetimeIndex) -> Calendar:
    """The calendar of a series from its timestamps (median spacing; weekend bars or not).

    Raises:
        BarsError: a spacing Kiln does not know (the message lists the known ones).
    """
    if len(stamp) < 2:
        raise BarsError("at least 2 bars are needed to tell the bar frequency")
    median = pd.Timedelta(int(np.median(np.diff(stamp.as_unit("ns").asi8))), unit="ns")
    if pd.Timedelta(days=27) <= median <= pd.Timedelta(days=32):
        return Calendar("monthly", month_end=bool(stamp.is_month_end.all()))
    frequency = next((n for n, d in FREQUENCIES.items() if n != "monthly" and d == median), None)
    if frequency is None:
        raise BarsError(
            f"bars are spaced {median} apart (median); Kiln knows these spacings: "
            f"{ {n: str(d) for n, d in FREQUENCIES.items()} }"
        )
    weekend = (stamp.day_of_week >= 5).any()
    if frequency == "daily":
        return Calendar(frequency, sessions="all" if weekend else "weekdays")
    if frequency == "weekly":
        return Calendar(frequency)
    if (stamp.day_of_week == 5).any():  # intraday with Saturday bars: a 24/7 market
        return Calendar(frequency)
    fridays, sundays = stamp[stamp.day_of_week == 4], stamp[stamp.day_of_week == 6]
    close = int(fridays.hour.max()) + 1 if len(fridays) else _DEFAULT_FX_CLOSE[0]
    reopen = int(sundays.hour.min()) if len(sundays) else _DEFAULT_FX_CLOSE[1]
    return Calendar(frequency, sessions="fx", fx_close=(close, reopen))


def future_timestamps(last: pd.Timestamp, calendar: Calendar, horizon: int) -> list[pd.Timestamp]:
    """The ``horizon`` timestamps after ``last`` in the series' calendar (business days, FX hours...)."""
    out, t = [], last
    for _ in range(horizon):
        t = calendar.next(t)
        out.append(t)
    return out


def _apply_gap_policy(
    bars: pd.DataFrame, calendar: Calendar, gaps: str, max_gap: int, max_bars: int | None
) -> pd.DataFrame:
    stamp = bars.index
    if calendar.frequency == "monthly":
        return bars  # months are never "missing" in a way the calendar can tell from irregular month lengths
    step = np.diff(stamp.asi8)
    suspects = np.flatnonzero(step > calendar.step.value)  # candidate gaps; most are weekends/closures
    fills: list[tuple[int, int]] = []
    for i in suspects:
        missing = calendar.slots_between(stamp[i], stamp[i + 1], max_gap)
        if missing == 0:
            continue
        what = (
            f"{missing if missing <= max_gap else f'more than {max_gap}'} missing bar(s) between "
            f"{stamp[i].isoformat()} and {stamp[i + 1].isoformat()}"
        )
        if gaps == "error":
            raise BarsError(f"gap: {what} (gap policy 'error'; 'keep' or 'fill' accept gaps)")
        if missing > max_gap:
            raise BarsError(f"gap too long: {what}; at most {max_gap} missing bars are accepted (max_gap)")
        fills.append((int(i), missing))
    if gaps == "fill" and max_bars is not None:
        total = len(bars) + sum(m for _, m in fills)
        if total > max_bars:
            raise BarsError(
                f"filling the {len(fills)} gaps would make {total} bars; at most {max_bars} are accepted "
                "(send fewer bars, or gaps='keep')"
            )
    if gaps != "fill" or not fills:
        return bars
    extra = []
    for i, _ in fills:
        t, prev_close = calendar.next(stamp[i]), bars["close"].iloc[i]
        while t < stamp[i + 1]:
            extra.append((t, prev_close))
            t = calendar.next(t)
    flat = pd.DataFrame(
        {"open": [p for _, p in extra], "high": [p for _, p in extra], "low": [p for _, p in extra],
         "close": [p for _, p in extra], "volume": 0.0},
        index=pd.DatetimeIndex([t for t, _ in extra], name=bars.index.name),
    )  # fmt: skip
    return pd.concat([bars, flat]).sort_index()
