"""The Prometheus series Kiln exports (from ``serving.metrics``) and the recording rules' series, for the
tests that check dashboards, rules and autoscaling reference only what exists."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

RULES = Path(__file__).resolve().parents[1] / "k8s" / "monitoring" / "prometheus-rule.yaml"
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def kiln_series() -> set[str]:
    """Sample names of every ``kiln_*`` metric defined in serving.metrics (``_total``, ``_bucket``...)."""
    import prometheus_client

    from serving import metrics

    names = set()
    for obj in vars(metrics).values():
        if isinstance(obj, prometheus_client.metrics.MetricWrapperBase):
            for family in obj.describe():
                names |= {family.name + suffix for suffix in _SUFFIXES[family.type]}
    return {n for n in names if n.startswith("kiln_")}


def recorded_series() -> set[str]:
    """Names the recording rules of k8s/monitoring/prometheus-rule.yaml write."""
    spec = yaml.safe_load(RULES.read_text())["spec"]
    return {r["record"] for g in spec["groups"] for r in g["rules"] if "record" in r}


def referenced_series(expr: str) -> set[str]:
    """Kiln series and recording-rule names an expression reads (``kiln_...`` and ``level:kiln_...:op``)."""
    return set(re.findall(r"(?<![\w:])((?:[a-z_]+:)?kiln_[a-z0-9_]+(?::[a-z0-9_]+)?)", expr))
