"""serving.tasks.forecasting: serving never imports training (bars and features come from kiln.market, a
static check of every import statement), and the request model's limits."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import ValidationError

from serving import tasks
from serving.repository import ModelRepository
from serving.tasks.forecasting import MAX_BARS, ForecastRequest


def test_serving_and_market_code_never_import_training():
    root = Path(__file__).resolve().parents[3]
    for path in [*(root / "serving").rglob("*.py"), *(root / "kiln" / "market").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad = [n for n in names if n == "training" or n.startswith("training.")]
            assert not bad, f"{path.relative_to(root)} imports {bad}"


def test_request_limits():
    ForecastRequest(dataset="GOOG")
    with pytest.raises(ValidationError, match="horizon"):
        ForecastRequest(dataset="GOOG", horizon=0)
    with pytest.raises(ValidationError, match="quantiles"):
        ForecastRequest(dataset="GOOG", quantiles=[])
    bar = {"timestamp": "2024-01-02", "open": 1, "high": 1, "low": 1, "close": 1}
    with pytest.raises(ValidationError, match="bars"):
        ForecastRequest(bars=[bar] * (MAX_BARS + 1))
    assert ForecastRequest(bars=[bar]).bars[0].volume == 0.0


def test_forecast_is_a_tool_with_the_route_request_model():
    found = {t.name: t for t in tasks.tools(ModelRepository())}
    assert found["forecast"].request_model is ForecastRequest
    assert found["forecast"].input_schema()["properties"]["horizon"]["minimum"] == 1
