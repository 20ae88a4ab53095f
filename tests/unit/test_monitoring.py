"""k8s/monitoring: the rules pass `promtool check rules` and their unit tests (`promtool test rules`), and the
rules, the Grafana dashboard and the prometheus-adapter config read only series Kiln exports.

promtool is Debian's ``prometheus`` package (``.ci/run`` installs it); without it these tests skip outside
CI and fail in CI. The live check of the same rules and dashboard is tests/integration/test_prometheus.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from monitoring_series import kiln_series, recorded_series, referenced_series

MONITORING = Path(__file__).resolve().parents[2] / "k8s" / "monitoring"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    message = "promtool is not installed: `apt-get install -y prometheus` (Debian; .ci/run does it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory) -> Path:
    """prometheus-rule.yaml's spec as the plain rule file ``kiln-rules.yaml`` next to rules-test.yaml."""
    work = tmp_path_factory.mktemp("rules")
    spec = yaml.safe_load((MONITORING / "prometheus-rule.yaml").read_text())["spec"]
    (work / "kiln-rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copy(MONITORING / "rules-test.yaml", work / "rules-test.yaml")
    return work


def _promtool(promtool: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_rules_pass_promtool_check(promtool, rules_dir):
    proc = _promtool(promtool, rules_dir, "check", "rules", "kiln-rules.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_rules_pass_their_unit_tests(promtool, rules_dir):
    proc = _promtool(promtool, rules_dir, "test", "rules", "rules-test.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_wrong_expectation_fails_promtool(promtool, rules_dir, tmp_path):
    """The unit tests can fail: the same file with one expected value changed does."""
    shutil.copy(rules_dir / "kiln-rules.yaml", tmp_path / "kiln-rules.yaml")
    text = (rules_dir / "rules-test.yaml").read_text()
    assert "value: 0.1\n" in text
    (tmp_path / "rules-test.yaml").write_text(text.replace("value: 0.1\n", "value: 0.2\n", 1))
    proc = _promtool(promtool, tmp_path, "test", "rules", "rules-test.yaml")
    assert proc.returncode != 0 and "FAILED" in proc.stdout + proc.stderr


def test_every_alert_is_unit_tested():
    spec = yaml.safe_load((MONITORING / "prometheus-rule.yaml").read_text())["spec"]
    alerts = {r["alert"] for g in spec["groups"] for r in g["rules"] if "alert" in r}
    assert alerts >= {
        "KilnHighErrorRatio",
        "KilnHighP99Latency",
        "KilnHighQueueTime",
        "KilnRejectingRequests",
        "KilnModelNotReady",
    }
    tests = yaml.safe_load((MONITORING / "rules-test.yaml").read_text())["tests"]
    fired = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert fired == alerts, f"alerts never seen firing in rules-test.yaml: {alerts - fired}"


def test_rules_read_only_series_kiln_exports():
    exported, recorded = kiln_series(), recorded_series()
    spec = yaml.safe_load((MONITORING / "prometheus-rule.yaml").read_text())["spec"]
    for group in spec["groups"]:
        for rule in group["rules"]:
            used = referenced_series(rule["expr"])
            assert used, rule
            assert used <= exported | recorded, (
                rule.get("record") or rule["alert"],
                used - exported - recorded,
            )


def test_dashboards_read_only_series_kiln_exports_and_cover_them():
    dashboards = [json.loads(p.read_text()) for p in sorted((MONITORING / "dashboards").glob("*.json"))]
    assert {d["uid"] for d in dashboards} >= {"kiln-serving", "kiln-families"}
    exported, recorded = kiln_series(), recorded_series()
    used = set()
    for panel in (p for d in dashboards for p in d["panels"]):
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            series = referenced_series(target["expr"])
            assert series, (panel["title"], target["expr"])
            assert series <= exported | recorded, (panel["title"], series - exported - recorded)
            used |= series
    for dashboard in dashboards:
        template = dashboard["templating"]["list"]
        assert all(referenced_series(v["definition"]) <= exported for v in template if "definition" in v)
    # every metric Kiln exports has a panel, but the generation family's own counters and the rare events
    # (drops, timeouts, draining) that the request and rejection panels already account for
    not_shown = {"kiln_generated_images", "kiln_denoiser_steps", "kiln_hallucination_rejections"}
    not_shown |= {"kiln_inference_dropped", "kiln_inference_timeouts", "kiln_server_draining"}
    missing = {_base(n) for n in exported} - {_base(n) for n in used} - not_shown
    assert not missing, f"metrics without a dashboard panel: {sorted(missing)}"


def _base(series: str) -> str:
    for suffix in ("_total", "_bucket", "_sum", "_count"):
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


def test_prometheus_adapter_rules_read_kiln_series():
    values = yaml.safe_load((MONITORING / "prometheus-adapter-values.yaml").read_text())
    exported = kiln_series()
    rules = values["rules"]["custom"]
    assert rules
    for rule in rules:
        assert referenced_series(rule["seriesQuery"]) <= exported
        assert referenced_series(rule["metricsQuery"]) <= exported
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
