"""``kiln bench forecast``: walk-forward (rolling-origin) backtest of the forecasters on real data.

For GOOG daily and EURUSD hourly (the ``backtesting`` package's bundled series) the Performer (FAVOR+)
+ BiLSTM forecaster of the default recipe is compared, on the same origins and the same final period,
with a random walk, a drift model, ARIMA (statsmodels), an LSTM and the same network with softmax
attention (both trained by the same trainer and recipe, architecture swapped).

The final period (the recipe's last ``test_fraction`` of the bars) is the test period: no choice reads
it — checkpoints are picked on the validation period before it, the ARIMA order by AIC on the bars
before it, the recipes' settings were fixed before this suite was first run. Origins step through the
test period (every bar, or every k-th to bound ARIMA's refits); at each origin every model forecasts
the next H closes from the bars up to the origin only. ARIMA is refitted at every origin on a rolling
window of log closes (the order stays the one chosen before the test period).

Metrics per dataset, model and horizon h: MAE and RMSE of the close, MAPE (%), directional accuracy
(sign of the forecast h-step return vs the realised one; a forecast of no change counts as a coin flip,
0.5, so the random walk scores 0.5 by construction), coverage of the 80% interval (quantiles 0.1-0.9;
target 75-85%), and the Diebold-Mariano test against the random walk on squared errors (Diebold &
Mariano 1995, with the small-sample correction of Harvey, Leybourne & Newbold 1997 and a Newey-West
variance over h-1 lags; negative statistic = the model's errors are smaller).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from benchmarks.report import fmt, machine_info, markdown_table, run_header, target_lines, write_results

RESULTS = Path(__file__).resolve().parent / "results" / "forecast.json"
DATASETS = {"GOOG": "forecaster-goog-daily", "EURUSD": "forecaster-eurusd-hourly"}
NEURAL = {  # bench name suffix → registry architecture
    "performer": "performer_bilstm_forecaster",
    "softmax-transformer": "softmax_bilstm_forecaster",
    "lstm": "lstm_forecaster",
}
HORIZONS = (1, 5, 10)
ARIMA_WINDOW = 500  # log closes each refit sees
ARIMA_ORDERS = [(p, q) for p in range(3) for q in range(3)]
SIGMA_WINDOW = 100  # returns behind the random walk's and drift's Gaussian intervals
Z80 = 1.2815515655446004  # standard normal 0.9 quantile


class BenchmarkError(RuntimeError):
    """The benchmark cannot run (a model failed to train)."""


@dataclass(frozen=True)
class Settings:
    max_origins: int  # per dataset; origins are spread evenly over the test period


FULL = Settings(max_origins=400)
QUICK = Settings(max_origins=40)


# --- models -----------------------------------------------------------------------------------------------


def _ensure_neural(dataset: str, quick: bool, log=print) -> dict[str, Any]:
    """The default recipe's forecaster (from the store, trained if missing) and the two trained baselines."""
    from kiln.artifacts import ArtifactError, get_artifact
    from training.recipes import RECIPES
    from training.trainer import train

    recipe_name = DATASETS[dataset]
    base = RECIPES[recipe_name]
    arts = {}
    for key, arch in NEURAL.items():
        name = recipe_name if key == "performer" else f"bench-{recipe_name}-{key}"
        try:
            art = get_artifact(name)
            if art.manifest["architecture"] != arch or art.manifest["data"]["source"] != base.data:
                raise ArtifactError("stale")
        except ArtifactError:
            log(f"   training {name} ({arch})")
            try:
                recipe = dataclasses.replace(base, architecture=arch)
                art = train(name, recipe=recipe, epochs=2 if quick else None).artifact
            except Exception as exc:  # noqa: BLE001 — reported with the model's name
                raise BenchmarkError(f"training {name} failed: {exc}") from exc
        arts[key] = art
    return arts


def _neural_forecasts(art, series, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(median, q0.1, q0.9) h-step log-returns (N, H) of a trained forecaster at origin rows (PyTorch)."""
    from kiln.artifacts import load_torch_model
    from kiln.market.features import windows
    from training.forecasting import predict

    x, scale = windows(series.features, art.manifest["context"], rows)
    q = predict(load_torch_model(art), x, scale)
    levels = art.manifest["quantiles"]
    return q[..., levels.index(0.5)], q[..., levels.index(0.1)], q[..., levels.index(0.9)]


def _log_close(series) -> np.ndarray:
    return np.log(series.bars["close"].loc[series.features.index[0] :].to_numpy(dtype=np.float64))


def _naive_forecasts(series, rows: np.ndarray, horizon: int, drift: bool):
    """Random walk (no change) or drift (Hyndman's: the average log-return of all history so far), with
    Gaussian 80% intervals from the last SIGMA_WINDOW returns, widening as √h."""
    full = np.log(series.bars["close"].to_numpy(dtype=np.float64))
    offset = len(full) - len(_log_close(series))  # feature row r is bar r + offset
    h = np.arange(1, horizon + 1)
    med, lo, hi = [], [], []
    for r in rows:
        t = r + offset
        rets = np.diff(full[max(0, t - SIGMA_WINDOW) : t + 1])
        sigma = rets.std()
        mu = (full[t] - full[0]) / t if drift else 0.0
        m = mu * h
        med.append(m)
        lo.append(m - Z80 * sigma * np.sqrt(h))
        hi.append(m + Z80 * sigma * np.sqrt(h))
    return np.array(med), np.array(lo), np.array(hi)


def _arima_order(series) -> tuple[int, int]:
    """ARIMA(p, 1, q) order by AIC on the last ARIMA_WINDOW log closes before the test period."""
    from statsmodels.tsa.arima.model import ARIMA

    y = _log_close(series)[: series.test_start][-ARIMA_WINDOW:]
    best, best_aic = (0, 0), math.inf
    for p, q in ARIMA_ORDERS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            aic = ARIMA(y, order=(p, 1, q), trend="t").fit().aic
        if aic < best_aic:
            best, best_aic = (p, q), aic
    return best


def _arima_forecasts(series, rows: np.ndarray, horizon: int, order: tuple[int, int]):
    from statsmodels.tsa.arima.model import ARIMA

    y = _log_close(series)
    med, lo, hi = [], [], []
    for r in rows:
        window = y[max(0, r + 1 - ARIMA_WINDOW) : r + 1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fc = ARIMA(window, order=(order[0], 1, order[1]), trend="t").fit().get_forecast(horizon)
        ci = fc.conf_int(alpha=0.2)
        med.append(fc.predicted_mean - y[r])
        lo.append(ci[:, 0] - y[r])
        hi.append(ci[:, 1] - y[r])
    return np.array(med), np.array(lo), np.array(hi)


# --- metrics ----------------------------------------------------------------------------------------------


def diebold_mariano(e_model: np.ndarray, e_base: np.ndarray, h: int) -> tuple[float, float]:
    """DM statistic and two-sided p-value for equal squared-error accuracy (HLN-corrected, t(n−1)).

    d_t = e_model² − e_base²; DM = mean(d) / sqrt(V/n), V the Newey-West long-run variance with h−1 lags
    (Diebold & Mariano 1995, eq. 2 of HLN 1997); HLN's factor sqrt((n + 1 − 2h + h(h−1)/n) / n).
    """
    d = e_model**2 - e_base**2
    n = len(d)
    dbar = d.mean()
    gamma = [((d[k:] - dbar) * (d[: n - k] - dbar)).sum() / n for k in range(h)]
    v = gamma[0] + 2 * sum(gamma[1:])
    if v <= 0:
        return math.nan, math.nan
    dm = dbar / math.sqrt(v / n)
    dm *= math.sqrt((n + 1 - 2 * h + h * (h - 1) / n) / n)
    return float(dm), float(2 * stats.t.sf(abs(dm), df=n - 1))


def score(
    last: np.ndarray,
    actual: np.ndarray,
    med: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    rw_err: np.ndarray,
    h: int,
) -> dict[str, float]:
    """Metrics at one horizon; inputs are (N,) log-returns at that horizon, ``last`` the origin closes."""
    price, pred = last * np.exp(actual), last * np.exp(med)
    err = pred - price
    sign_hit = np.where(med == 0, 0.5, (np.sign(med) == np.sign(actual)).astype(float))
    dm, p = diebold_mariano(err, rw_err, h) if rw_err is not None else (math.nan, math.nan)
    return {
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "mape": float(100 * np.abs(err / price).mean()),
        "directional_accuracy": float(sign_hit.mean()),
        "coverage_80": float(((actual >= lo) & (actual <= hi)).mean()),
        "dm_vs_random_walk": dm,
        "dm_p_value": p,
    }


def evaluate_dataset(dataset: str, settings: Settings, log=print) -> dict[str, Any]:
    from training.forecasting import load_series

    arts = _ensure_neural(dataset, settings is QUICK, log)
    perf = arts["performer"]
    t = perf.manifest["training"]
    series = load_series(dataset, val_fraction=t["val_fraction"], test_fraction=t["test_fraction"])
    horizon = perf.manifest["horizon"]
    context = perf.manifest["context"]
    all_rows = series.origins("test", context, horizon)
    stride = max(1, math.ceil(len(all_rows) / settings.max_origins))
    rows = all_rows[::stride]
    y = _log_close(series)
    actual = y[rows[:, None] + np.arange(1, horizon + 1)] - y[rows][:, None]
    last = np.exp(y[rows])
    first = series.features.index[rows[0]]
    log(f"   {dataset}: {len(rows)} origins (every {stride} of {len(all_rows)}) from {first}")

    forecasts: dict[str, tuple] = {}
    seconds: dict[str, float] = {}
    for key, fn in (
        ("random walk", lambda: _naive_forecasts(series, rows, horizon, drift=False)),
        ("drift", lambda: _naive_forecasts(series, rows, horizon, drift=True)),
    ):
        t0 = time.perf_counter()
        forecasts[key] = fn()
        seconds[key] = time.perf_counter() - t0
    order = _arima_order(series)
    t0 = time.perf_counter()
    forecasts[f"ARIMA({order[0]},1,{order[1]})"] = _arima_forecasts(series, rows, horizon, order)
    seconds[f"ARIMA({order[0]},1,{order[1]})"] = time.perf_counter() - t0
    for key, art in arts.items():
        t0 = time.perf_counter()
        forecasts[key] = _neural_forecasts(art, series, rows)
        seconds[key] = time.perf_counter() - t0
    log(f"   {dataset}: forecasts done ({', '.join(f'{k} {v:.1f}s' for k, v in seconds.items())})")

    rw_med = forecasts["random walk"][0]
    table = []
    for key, (med, lo, hi) in forecasts.items():
        for h in HORIZONS:
            i = h - 1
            rw_err = last * np.exp(rw_med[:, i]) - last * np.exp(actual[:, i])
            m = score(
                last,
                actual[:, i],
                med[:, i],
                lo[:, i],
                hi[:, i],
                None if key == "random walk" else rw_err,
                math.ceil(h / stride),
            )
            table.append({"model": key, "h": h, **m})
    int8 = _int8_check(perf, series, rows, actual, last)
    return {
        "dataset": dataset,
        "frequency": perf.manifest["frequency"],
        "bars": len(series.bars),
        "test_period": [str(series.features.index[series.test_start]), str(series.bars.index[-1])],
        "origins": len(rows),
        "origin_stride": stride,
        "arima_order": [order[0], 1, order[1]],
        "models": {
            k: {
                "tag": a.tag,
                "architecture": a.manifest["architecture"],
                "parameters": a.manifest["metrics"]["parameters"],
                "train_seconds": a.manifest["metrics"]["train_seconds"],
                "train_cpu_seconds": a.manifest["metrics"].get("train_cpu_seconds"),
                "torch_threads": a.manifest["metrics"].get("torch_threads"),
                "val_pinball": a.manifest["metrics"]["val_pinball"],
                "best_epoch": a.manifest["metrics"]["best_epoch"],
            }
            for k, a in arts.items()
        },
        "forecast_seconds": {k: round(v, 2) for k, v in seconds.items()},
        "metrics": table,
        "int8": int8,
    }


def _int8_check(art, series, rows, actual, last) -> dict[str, Any]:
    """The served graphs on the test origins: fp32 ONNX vs int8 (if exported), MAE at h=1 and latency."""
    import onnxruntime as ort

    from export.pipeline import export_artifact
    from kiln.market.features import windows

    missing = [f for f in ("onnx", "int8-static") if not art.export(f)]
    if missing:
        art = export_artifact(art.tag, missing, log=lambda _: None, progress=False)
    x, scale = windows(series.features, art.manifest["context"], rows)
    levels = art.manifest["quantiles"]
    int8_entry = art.export("int8-static") or {}
    out = {"holds_accuracy_on_validation": bool(int8_entry.get("gate", {}).get("passed"))}
    if "file" not in int8_entry:  # discarded by its quality gate (export.gates): nothing to time
        out["int8-static"] = {"discarded": int8_entry.get("discarded", "not exported")}
    for fmt_name in [f for f in ("onnx", "int8-static") if f not in out]:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(
            str(art.file(art.export(fmt_name)["file"])), opts, providers=["CPUExecutionProvider"]
        )
        q = sess.run(None, {"features": x, "scale": scale})[0]
        med = q[:, 0, levels.index(0.5)]
        mae = float(np.abs(last * np.exp(med) - last * np.exp(actual[:, 0])).mean())
        for _ in range(5):
            sess.run(None, {"features": x[:1], "scale": scale[:1]})
        t0 = time.perf_counter()
        for _ in range(50):
            sess.run(None, {"features": x[:1], "scale": scale[:1]})
        out[fmt_name] = {"mae_h1": mae, "latency_ms_batch1": round((time.perf_counter() - t0) / 50 * 1000, 3)}
    return out


# --- targets and report -----------------------------------------------------------------------------------


def _row(results, dataset, model, h):
    d = next(r for r in results["datasets"] if r["dataset"] == dataset)
    return next(m for m in d["metrics"] if m["model"] == model and m["h"] == h)


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    targets = []
    beats, misses = [], []
    for d in results["datasets"]:
        arima = next(m for m in d["metrics"] if m["model"].startswith("ARIMA"))["model"]
        for h in HORIZONS:
            p = _row(results, d["dataset"], "performer", h)
            for base in ("random walk", arima):
                b = _row(results, d["dataset"], base, h)
                ok = p["mae"] < b["mae"] and p["directional_accuracy"] > b["directional_accuracy"]
                (beats if ok else misses).append(f"{d['dataset']} h={h} vs {base}")
    targets.append(
        {
            "target": "Performer beats random walk and ARIMA on MAE and directional accuracy (EURUSD hourly, "
            "GOOG daily, every horizon)",
            "measured": f"beats in {len(beats)} of {len(beats) + len(misses)} comparisons",
            "met": not misses,
            "reason": ""
            if not misses
            else "not beaten: "
            + ", ".join(misses)
            + ". Markets are close to a random walk at these horizons; "
            "see the Diebold-Mariano column for whether any difference is significant",
        }
    )
    cov = {
        f"{d['dataset']} h={h}": _row(results, d["dataset"], "performer", h)["coverage_80"]
        for d in results["datasets"]
        for h in HORIZONS
    }
    bad = {k: v for k, v in cov.items() if not 0.75 <= v <= 0.85}
    targets.append(
        {
            "target": "Performer's 80% interval covers 75-85% of test-period closes",
            "measured": ", ".join(f"{k}: {v:.1%}" for k, v in cov.items()),
            "met": not bad,
            "reason": ""
            if not bad
            else "outside the band: "
            + ", ".join(bad)
            + " (quantiles fitted on the training period; the test "
            "period's volatility differs from it)",
        }
    )
    perf = {d["dataset"]: d["models"]["performer"] for d in results["datasets"]}
    # CPU seconds of a 1-thread run = its wall time on an idle core; wall time when no CPU time was recorded
    alone = {k: v.get("train_cpu_seconds") or v["train_seconds"] for k, v in perf.items()}
    targets.append(
        {
            "target": "each default forecaster trains in <= 90 s on 2 cores (alone)",
            "measured": ", ".join(
                f"{k}: {v['train_seconds']:.0f} s wall, {alone[k]:.0f} s CPU "
                f"({v.get('torch_threads')} torch thread(s))"
                for k, v in perf.items()
            ),
            "met": all(v <= 90 for v in alone.values()),
            "reason": ""
            if all(v <= 90 for v in alone.values())
            else "CPU time over 90 s: " + ", ".join(k for k, v in alone.items() if v > 90),
        }
    )
    return targets


def _int8_line(r: dict[str, Any]) -> str:
    fp32, int8 = r["onnx"], r["int8-static"]
    if "discarded" in int8:
        return f"int8: {int8['discarded']} (not served); fp32 ONNX test MAE h=1 {fp32['mae_h1']:.5g}."
    return (
        f"int8 (served only if it holds accuracy on validation: {r['holds_accuracy_on_validation']}): "
        f"test MAE h=1 fp32 ONNX {fp32['mae_h1']:.5g} vs int8 {int8['mae_h1']:.5g}; onnxruntime latency "
        f"per forecast (batch 1, 1 thread) fp32 {fp32['latency_ms_batch1']} ms, "
        f"int8 {int8['latency_ms_batch1']} ms."
    )


def render_markdown(results: dict[str, Any], json_path: Path) -> str:
    lines = [
        "## Forecasting: walk-forward backtest (Performer FAVOR+ / BiLSTM vs baselines)",
        "",
        *run_header(results, json_path),
        "- protocol: rolling origin over the final test period (the recipe's last 20% of bars), which no "
        "choice read: checkpoints by validation pinball loss, ARIMA order by AIC before the test period, "
        "recipes fixed before the first run. Every model forecasts from bars up to its origin only. "
        "Directional accuracy "
        "counts a no-change forecast as 0.5. DM: Diebold-Mariano on squared close errors vs the random walk "
        "(HLN-corrected; negative = smaller errors than the random walk; p two-sided).",
        "",
        "### Targets",
        "",
        *target_lines(results["targets"]),
        "",
    ]
    for d in results["datasets"]:
        lines += [
            f"### {d['dataset']} ({d['frequency']}, {d['bars']} bars; test period {d['test_period'][0]} to "
            f"{d['test_period'][1]}, {d['origins']} origins, every {d['origin_stride']} bar(s))",
            "",
            markdown_table(
                ["model", "h", "MAE", "RMSE", "MAPE %", "dir. acc.", "80% cover", "DM vs RW", "p"],
                [
                    [
                        r["model"],
                        r["h"],
                        f"{r['mae']:.5g}",
                        f"{r['rmse']:.5g}",
                        fmt(r["mape"], 3),
                        fmt(r["directional_accuracy"], 3),
                        fmt(r["coverage_80"], 3),
                        "-" if math.isnan(r["dm_vs_random_walk"]) else fmt(r["dm_vs_random_walk"], 2),
                        "-" if math.isnan(r["dm_p_value"]) else fmt(r["dm_p_value"], 3),
                    ]
                    for r in d["metrics"]
                ],
            ),
            "",
            markdown_table(
                [
                    "neural model",
                    "artifact",
                    "params",
                    "train s (wall)",
                    "train s (CPU)",
                    "best epoch",
                    "val pinball",
                ],
                [
                    [
                        k,
                        f"`{v['tag']}`",
                        v["parameters"],
                        v["train_seconds"],
                        v.get("train_cpu_seconds") or "-",
                        v["best_epoch"],
                        f"{v['val_pinball']:.3g}",
                    ]
                    for k, v in d["models"].items()
                ],
            ),
            "",
            _int8_line(d["int8"]),
            "",
        ]
    return "\n".join(lines)


def run(quick: bool, output: str, command: str) -> dict[str, Any]:
    """Run the suite, write the JSON and the markdown section; returns the results."""
    from kiln.settings import kiln_home

    settings = QUICK if quick else FULL
    print(f"kiln bench forecast{' --quick' if quick else ''}: store {kiln_home()}")
    machine = machine_info()
    t0 = time.perf_counter()
    datasets = []
    for i, dataset in enumerate(DATASETS, 1):
        print(f"{i}/{len(DATASETS)} {dataset}")
        datasets.append(evaluate_dataset(dataset, settings))
    results = {
        "suite": "forecast",
        "quick": quick,
        "command": command,
        "machine": machine,
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "settings": dataclasses.asdict(settings),
        "horizons": list(HORIZONS),
        "datasets": datasets,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    results["targets"] = evaluate_targets(results)
    write_results(results, "forecast", output, quick, RESULTS, render_markdown)
    return results
