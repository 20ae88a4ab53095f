"""serving.launch: each `kiln serve` keeps its Prometheus multiprocess files in its own directory."""

from __future__ import annotations

import os

from serving.launch import metrics_dir


def test_the_metrics_directory_is_per_http_port():
    home = os.environ["BENTOML_HOME"]
    a = metrics_dir(["serve", "serving.service:Kiln", "--host", "0.0.0.0", "--port", "3000"])
    b = metrics_dir(["serve", "serving.service:Kiln", "--port=3001"])
    assert a == os.path.join(home, "prometheus_multiproc_dir", "http-3000")
    assert b.endswith(os.path.join("prometheus_multiproc_dir", "http-3001")) and a != b
    assert metrics_dir(["serve", "serving.service:Kiln"]).endswith("http-3000")  # bentoml's default port
