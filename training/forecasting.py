"""Forecaster trainer (task ``price-forecasting``): quantiles of the next H log-returns of an OHLCV series.

Data: a bundled real series (``backtesting``'s GOOG daily, EURUSD hourly, BTCUSD monthly) or a user's
CSV/Parquet (``kiln train NAME --data FILE``), validated by :mod:`kiln.market.bars`, featurised by
:mod:`kiln.market.features` — the same code ``/forecast`` runs. The bars are split in time: train,
then validation (picks the checkpoint), then the final test period (``recipe.test_fraction``) that no
choice looks at (``kiln bench forecast`` runs its walk-forward backtest there). Training windows whose
targets would reach into the next split are dropped (a purge of H bars), so no label leaks across.

Loss: the pinball (quantile) loss of Koenker & Bassett (1978), ``ρ_τ(u) = max(τu, (τ − 1)u)`` for the
error ``u = y − q_τ``, averaged over quantile levels τ and horizons h, measured in units of the window's
volatility × √h so calm and wild windows weigh alike. AdamW, warm-up + cosine, best-on-validation
weights; seeded (initialisation, data order, FAVOR+ redraws).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kiln.artifacts import save_artifact
from kiln.market.bars import BUNDLED, Calendar, bundled_bars, read_bars, validate_bars
from kiln.market.features import FEATURES, WARMUP, compute_features, targets, windows
from model_zoo import create_model
from training.recipes import ForecastRecipe
from training.trainer import TrainResult, lr_at, run_dir, training_block


@dataclass
class Split:
    """Model inputs of one split: windows (N, L, F), σ (N, 1), targets (N, H) and their origin times."""

    x: np.ndarray
    scale: np.ndarray
    y: np.ndarray
    origins: pd.DatetimeIndex


@dataclass
class Series:
    """A validated, featurised series and its chronological splits (by feature-row index)."""

    source: str
    bars: pd.DataFrame
    calendar: Calendar
    features: pd.DataFrame
    val_start: int
    test_start: int

    def origins(self, split: str, context: int, horizon: int) -> np.ndarray:
        """Origin rows of a split: the window ends there and all H targets stay inside the split."""
        n = len(self.features)
        lo, hi = {
            "train": (context - 1, self.val_start),
            "val": (self.val_start, self.test_start),
            "test": (self.test_start, n),
        }[split]
        return np.arange(max(lo, context - 1), hi - horizon)

    def split(self, name: str, context: int, horizon: int) -> Split:
        origins = self.origins(name, context, horizon)
        x, scale = windows(self.features, context, origins)
        y = targets(self.bars["close"], self.features, origins, horizon)
        return Split(x, scale, y, self.features.index[origins])

    def close_at(self, rows: np.ndarray) -> np.ndarray:
        """Closes at feature rows (origins, or origins + h)."""
        return self.bars["close"].loc[self.features.index[0] :].to_numpy()[rows]


def load_series(
    data: str, *, gaps: str = "keep", max_gap: int = 48, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> Series:
    """Read (bundled name or file path), validate, featurise and split a series.

    Raises:
        kiln.market.bars.BarsError: the bars fail validation.
        ValueError: too short a series for the splits.
    """
    raw = bundled_bars(data) if data in BUNDLED else read_bars(data)
    bars, calendar = validate_bars(raw, gaps=gaps, max_gap=max_gap)
    feats = compute_features(bars)
    n = len(feats)
    test_start = int(round(n * (1 - test_fraction)))
    val_start = int(round(n * (1 - test_fraction - val_fraction)))
    if val_start < 200:
        raise ValueError(
            f"{data}: {len(bars)} bars leave {val_start} training rows after the {WARMUP}-bar indicator "
            "warm-up and the validation/test splits; a forecaster needs a longer series"
        )
    return Series(data, bars, calendar, feats, val_start, test_start)


def pinball(q: torch.Tensor, y: torch.Tensor, levels: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Mean pinball loss ρ_τ(y − q) of quantiles q (N, H, Q) for targets y (N, H), in ``unit`` (N, H)."""
    u = (y[..., None] - q) / unit[..., None]
    return torch.maximum(levels * u, (levels - 1) * u).mean()


@torch.no_grad()
def predict(model: torch.nn.Module, x: np.ndarray, scale: np.ndarray, batch: int = 512) -> np.ndarray:
    model.eval()
    out = [
        model(torch.from_numpy(x[i : i + batch]), torch.from_numpy(scale[i : i + batch])).numpy()
        for i in range(0, len(x), batch)
    ]
    return np.concatenate(out)


def interval_metrics(q: np.ndarray, y: np.ndarray, quantiles: tuple[float, ...]) -> dict[str, float]:
    """Pinball (σ-free, in log-return units), median MAE and 80% interval coverage of quantiles q."""
    levels = np.asarray(quantiles, dtype=np.float64)
    u = y[..., None] - q
    loss = float(np.maximum(levels * u, (levels - 1) * u).mean())
    mid = q[..., quantiles.index(0.5)] if 0.5 in quantiles else q.mean(-1)
    out = {"pinball": loss, "mae_log_return": float(np.abs(y - mid).mean())}
    if 0.1 in quantiles and 0.9 in quantiles:
        lo, hi = q[..., quantiles.index(0.1)], q[..., quantiles.index(0.9)]
        out["coverage_80"] = float(((y >= lo) & (y <= hi)).mean())
    return out


def train_forecaster(
    name: str, recipe: ForecastRecipe, *, epochs: int, seed: int = 0, progress: bool = True
) -> TrainResult:
    """Train ``recipe`` and save the best-on-validation weights as artifact ``name``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    series = load_series(
        recipe.data,
        gaps=recipe.gaps,
        max_gap=recipe.max_gap,
        val_fraction=recipe.val_fraction,
        test_fraction=recipe.test_fraction,
    )
    model = create_model(recipe.architecture, num_inputs=len(FEATURES), **recipe.model_args)
    context, horizon, quantiles = model.context, model.horizon, model.quantiles
    train, val = series.split("train", context, horizon), series.split("val", context, horizon)
    if recipe.max_train_windows > 0:
        keep = slice(-recipe.max_train_windows, None)
        train = Split(train.x[keep], train.scale[keep], train.y[keep], train.origins[keep])
    x_tr, s_tr, y_tr = (torch.from_numpy(a) for a in (train.x, train.scale, train.y))
    levels = torch.tensor(quantiles)
    sqrt_h = torch.arange(1, horizon + 1, dtype=torch.float32).sqrt()

    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(x_tr) / recipe.batch_size)
    total, warmup = epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch
    run_path = run_dir(name)
    best_path = run_path / "best.safetensors"
    best_val, best_epoch, step, train_loss = math.inf, -1, 0, math.nan
    t0, cpu0 = time.perf_counter(), time.process_time()
    bar = tqdm(range(epochs), desc=f"train {name}", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(x_tr), generator=gen)
        running = 0.0
        for i in range(0, len(order), recipe.batch_size):
            idx = order[i : i + recipe.batch_size]
            q = model(x_tr[idx], s_tr[idx])
            loss = pinball(q, y_tr[idx], levels, s_tr[idx] * sqrt_h)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, warmup, recipe.lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            running += loss.item() * len(idx)
        train_loss = running / len(order)
        q_val = torch.from_numpy(predict(model, val.x, val.scale))
        val_loss = pinball(
            q_val, torch.from_numpy(val.y), levels, torch.from_numpy(val.scale) * sqrt_h
        ).item()
        if not math.isfinite(val_loss):
            raise RuntimeError(
                f"{name}: training diverged in epoch {epoch}; lower the recipe's lr ({recipe.lr})"
            )
        if val_loss < best_val:
            best_val, best_epoch = val_loss, epoch
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(best_path))
        bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{val_loss:.4f}", best=f"{best_val:.4f}")
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0

    model.load_state_dict(load_file(str(best_path)))
    val_metrics = interval_metrics(predict(model, val.x, val.scale), val.y, quantiles)
    metrics = {
        "train_loss": train_loss,
        "val_loss": best_val,
        **{f"val_{k}": v for k, v in val_metrics.items()},
        # the random walk's median forecast is no change (a log-return of 0): the MAE to beat
        "val_mae_random_walk": float(np.abs(val.y).mean()),
        "train_seconds": round(seconds, 1),
        # CPU time of the process: what the wall time would be alone on the cores it used (a shared machine
        # stretches the wall time, not this)
        "train_cpu_seconds": round(cpu_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "best_epoch": best_epoch,
    }
    idx = series.features.index
    cal = series.calendar
    manifest = {
        **model.kiln_config,
        "task": recipe.task,
        "frequency": cal.frequency,
        "calendar": {"sessions": cal.sessions, "fx_close": list(cal.fx_close), "month_end": cal.month_end},
        "context": context,
        "horizon": horizon,
        "quantiles": list(quantiles),
        "warmup_bars": WARMUP,
        "min_bars": WARMUP + context,
        "features": list(FEATURES),
        "target": "log(close[t+h] / close[t]), h = 1..horizon",
        "data": {
            "source": recipe.data if recipe.data in BUNDLED else str(Path(recipe.data).resolve()),
            "gaps": recipe.gaps,
            "max_gap": recipe.max_gap,
            "bars": len(series.bars),
            "first": series.bars.index[0].isoformat(),
            "last": series.bars.index[-1].isoformat(),
            "val_start": idx[series.val_start].isoformat(),
            "test_start": idx[series.test_start].isoformat(),
        },
        "inputs": [
            {"name": "features", "datatype": "FP32", "shape": [-1, context, len(FEATURES)]},
            {"name": "scale", "datatype": "FP32", "shape": [-1, 1]},
        ],
        "outputs": [{"name": "quantiles", "datatype": "FP32", "shape": [-1, horizon, len(quantiles)]}],
        "metrics": metrics,
        "training": training_block(
            name,
            recipe,
            epochs=epochs,
            seed=seed,
            path=run_path,
            split={"train": len(train.y), "val": len(val.y)},
        ),
    }
    artifact = save_artifact(name, best_path, manifest, labels={"task": recipe.task})
    return TrainResult(
        artifact,
        seconds,
        {"val_loss": best_val, "val_coverage_80": val_metrics.get("coverage_80", math.nan)},
    )
