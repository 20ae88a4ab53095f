"""The price-forecasting task: ``POST /forecast`` over the loaded forecasters.

Decode at the edge: the request's bars (or a series the server holds, ``"dataset": "GOOG"``) go through
:func:`kiln.market.bars.validate_bars` and :mod:`kiln.market.features` — the code the trainer used —
so a bad bar is a 400 naming it, and the model sees the same features it was trained on. Predict: the
last window (features, σ) through the model's batcher (any backend; the graph is the same one the Open
Inference Protocol serves). Encode: quantiles of the h-step log-return become prices
``close_t · exp(q)``; ``close`` is the median path; the timestamps continue the series' own calendar
(business days for daily equity bars, FX hours skipping the weekend close, every hour for 24/7 markets).

Without ``model`` the server picks the forecaster trained for the bars' frequency (``hourly``,
``daily``...; of several, the first in ``KILN_MODELS``), or answers 400 naming the frequencies it has.
Requested quantile levels between the trained ones are interpolated linearly (the trained levels are
non-crossing, so the result is too).
"""

from __future__ import annotations

import asyncio
import time
from functools import lru_cache

import numpy as np
import pandas as pd
from fastapi import APIRouter
from pydantic import BaseModel, Field

from kiln.market.bars import (
    BUNDLED,
    GAP_POLICIES,
    BarsError,
    Calendar,
    bars_from_records,
    bundled_bars,
    future_timestamps,
    validate_bars,
)
from kiln.market.features import last_window
from serving import metrics
from serving.agent.tools import Tool
from serving.model import LoadedModel
from serving.repository import InferenceError, ModelRepository
from serving.routes import observed, task_model

MAX_BARS = 20_000  # per request, given and after gap-filling; the features need about a hundred


class Forecaster(LoadedModel):
    task = "price-forecasting"

    def __init__(self, art, config):
        super().__init__(art, config)
        m = art.manifest
        self.frequency: str = m["frequency"]
        self.context: int = m["context"]
        self.horizon: int = m["horizon"]
        self.quantiles: tuple[float, ...] = tuple(m["quantiles"])
        self.min_bars: int = m["min_bars"]

    def check(self, horizon: int, levels: list[float]) -> None:
        if horizon > self.horizon:
            raise InferenceError(
                400,
                f"horizon {horizon} is beyond {self.name}'s {self.horizon} bars; ask for 1..{self.horizon}",
            )
        lo, hi = self.quantiles[0], self.quantiles[-1]
        bad = [q for q in levels if not lo <= q <= hi]
        if bad:
            raise InferenceError(400, f"quantiles {bad} are outside {self.name}'s range [{lo:g}, {hi:g}]")

    async def forecast(
        self, bars: pd.DataFrame, calendar: Calendar, horizon: int, levels: list[float], backend: str
    ) -> tuple[list[pd.Timestamp], np.ndarray, dict[float, np.ndarray]]:
        """Prices: (timestamps, median close path (horizon,), {level: (horizon,) prices})."""
        try:
            x, scale = await asyncio.to_thread(last_window, bars, self.context)  # pandas work off the loop
        except ValueError as exc:
            raise InferenceError(400, str(exc)) from None
        t0 = time.perf_counter()
        q = (await self.infer({"features": x, "scale": scale}, backend))["quantiles"][0, :horizon]  # (H, Q)
        labels = {"model": self.name, "version": self.version, "backend": backend}
        metrics.FORECASTS.labels(**labels).inc()
        metrics.FORECAST_INPUT_BARS.labels(**labels).observe(len(bars))
        metrics.FORECAST_SECONDS.labels(**labels).observe(time.perf_counter() - t0)
        last = float(bars["close"].iloc[-1])
        trained = np.asarray(self.quantiles)
        out = {lv: last * np.exp([np.interp(lv, trained, row) for row in q]) for lv in levels}
        median = last * np.exp([np.interp(0.5, trained, row) for row in q])
        return future_timestamps(bars.index[-1], calendar, horizon), median, out


# --- HTTP ---------------------------------------------------------------------------------------------


class Bar(BaseModel):
    timestamp: str | int | float = Field(
        description='ISO 8601 ("2024-01-02T00:00:00Z") or epoch seconds/milliseconds.'
    )
    open: float
    high: float
    low: float
    close: float
    volume: float = Field(0.0, description="Traded volume; 0 where the feed has none.")


class ForecastRequest(BaseModel):
    bars: list[Bar] | None = Field(
        None, max_length=MAX_BARS, description="OHLCV bars, oldest first (or give `dataset`)."
    )
    dataset: str | None = Field(
        None, description=f"A series the server holds instead of bars: {sorted(BUNDLED)}."
    )
    horizon: int = Field(5, ge=1, description="Bars to forecast (at most the forecaster's horizon).")
    quantiles: list[float] = Field(
        [0.1, 0.5, 0.9], min_length=1, max_length=32, description="Quantile levels, within the trained range."
    )
    model: str = Field(
        "", description="A loaded forecaster; default: the one trained for the bars' frequency."
    )
    version: str = Field("", description="A loaded version; default the newest.")
    backend: str = Field("", description="Runtime: onnxruntime, onnxruntime-int8, pytorch...")
    gaps: str = Field("keep", description=f"Gap policy for missing bars: {list(GAP_POLICIES)}.")


class ForecastResponse(BaseModel):
    timestamps: list[str] = Field(description="The next `horizon` bar times in the series' calendar.")
    close: list[float] = Field(description="Median forecast of each future close.")
    quantiles: dict[str, list[float]] = Field(description="Forecast close at each requested quantile level.")
    model: str
    version: str


@lru_cache(maxsize=len(BUNDLED))
def _bundled(name: str) -> pd.DataFrame:
    return bundled_bars(name)


def _iso(t: pd.Timestamp) -> str:
    return t.isoformat().replace("+00:00", "Z")


def _decode(req: ForecastRequest) -> tuple[pd.DataFrame, Calendar]:
    if (req.bars is None) == (req.dataset is None):
        raise InferenceError(400, "give either `bars` or `dataset` (one of them)")
    if req.gaps not in GAP_POLICIES:
        raise InferenceError(400, f"gaps={req.gaps!r} is not a gap policy; valid: {list(GAP_POLICIES)}")
    try:
        if req.dataset is not None:
            if req.dataset not in BUNDLED:
                raise InferenceError(
                    400, f"unknown dataset {req.dataset!r}; the server holds {sorted(BUNDLED)}"
                )
            raw = _bundled(req.dataset)
        else:
            raw = bars_from_records([b.model_dump() for b in req.bars])
        return validate_bars(raw, gaps=req.gaps, max_bars=MAX_BARS)
    except BarsError as exc:
        raise InferenceError(400, f"invalid bars: {exc}") from None


def _pick(repo: ModelRepository, req: ForecastRequest, calendar: Calendar) -> Forecaster:
    if req.model:
        served = task_model(repo, Forecaster, req.model, req.version)
        if served.frequency != calendar.frequency:
            raise InferenceError(
                400, f"{served.name} forecasts {served.frequency} bars; these bars are {calendar.frequency}"
            )
        return served
    loaded = {
        name: repo.get(name)
        for name, versions in repo.models.items()  # load order = KILN_MODELS order: the first one wins
        if any(isinstance(m, Forecaster) for m in versions.values())
    }
    fitting = [m for m in loaded.values() if isinstance(m, Forecaster) and m.frequency == calendar.frequency]
    if not fitting:
        have = sorted({f"{m.frequency} ({m.name})" for m in loaded.values() if isinstance(m, Forecaster)})
        raise InferenceError(
            400,
            f"no forecaster for {calendar.frequency} bars is loaded; frequencies served: {have or 'none'}",
        )
    return fitting[0]


async def forecast_series(repo: ModelRepository, req: ForecastRequest) -> ForecastResponse:
    """Quantile forecasts of one series (the route and the ``forecast`` tool both run this)."""
    with observed() as labels:
        levels = sorted(set(req.quantiles))
        # parsing, validation and gap-filling are pandas and Python loops: off the event loop
        bars, calendar = await asyncio.to_thread(_decode, req)
        served = _pick(repo, req, calendar)
        backend = served.resolve_backend(req.backend or None)
        labels.update(model=served.name, version=served.version, backend=backend)
        served.check(req.horizon, levels)
        if len(bars) < served.min_bars:
            raise InferenceError(
                400,
                f"{len(bars)} bars given; {served.name} needs at least {served.min_bars} "
                f"({served.min_bars - served.context} for the indicators' look-back + {served.context} "
                "of context)",
            )
        stamps, median, quantiles = await served.forecast(bars, calendar, req.horizon, levels, backend)
    return ForecastResponse(
        timestamps=[_iso(t) for t in stamps],
        close=[float(v) for v in median],
        quantiles={f"{lv:g}": [float(v) for v in quantiles[lv]] for lv in levels},
        model=served.name,
        version=served.version,
    )


def router(repo: ModelRepository) -> APIRouter:
    api = APIRouter(tags=["forecasting"])

    @api.post("/forecast", response_model=ForecastResponse)
    async def forecast(req: ForecastRequest) -> ForecastResponse:
        """Quantile forecasts of the next closes of an OHLCV series."""
        return await forecast_series(repo, req)

    return api


def tools(repo: ModelRepository) -> list[Tool]:
    """The task's tools slot: ``/forecast`` for the agent and MCP clients (same request model)."""

    async def handler(req: ForecastRequest) -> ForecastResponse:
        return await forecast_series(repo, req)

    return [
        Tool(
            name="forecast",
            description="Forecast the next closes of a price series with quantile intervals: OHLCV `bars` "
            f"(oldest first, at least ~112) or a `dataset` the server holds ({', '.join(sorted(BUNDLED))}); "
            "returns future timestamps, the median close path and the requested quantiles.",
            request_model=ForecastRequest,
            handler=handler,
        )
    ]
