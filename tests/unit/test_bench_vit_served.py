"""``kiln bench vit``'s served part: the gRPC and peer targets and the peers' table come from the figures."""

from __future__ import annotations

from benchmarks.vit import _peer_section, _peer_targets, _served_target

REFERENCE = [{"backend": "onnxruntime", "batch": 32, "samples_per_s": 1000.0}]


def _comparison(json_rate: float, binary_rate: float, grpc_rate: float, skipped=None) -> dict:
    def row(server, rate, client):
        return {
            "server": server,
            "req_per_s": rate,
            "req_per_s_min": rate * 0.9,
            "req_per_s_max": rate * 1.1,
            "latency_ms_p50": 50.0,
            "errors": 0,
            "client_cpu_share": client,
            "server_cpu_ms_per_request": 2.0 if server.startswith("kiln-") else 2.5,
            "server_cpu_cores": 1.0,
            "client": "wrk -t1",
        }

    return {
        "concurrency": 32,
        "rounds": 3,
        "duration_s": 5,
        "warmup_s": 1,
        "threads": 2,
        "batch_max_size": 32,
        "batch_window_ms": 2.0,
        "summary": [
            row("kiln-json", json_rate, 0.02),
            row("kiln-binary", binary_rate, 0.02),
            row("kiln-grpc", grpc_rate, 0.15),
            row("fastapi", 300.0, 0.02),
            row("litserve", 400.0, 0.02),
        ],
        "skipped": skipped or {},
        "agreement": {"kiln-binary": 0.0, "fastapi": 0.0, "litserve": 1e-7},
    }


def test_peer_targets_compare_with_the_best_peer():
    json_t, binary_t = _peer_targets(_comparison(json_rate=600.0, binary_rate=700.0, grpc_rate=700.0))
    assert json_t["met"] is True and "vs litserve 400.0 = 1.50x" in json_t["measured"]
    assert not json_t["reason"] and "server CPU 2.00 vs 2.50 ms/request" in json_t["measured"]
    assert binary_t["met"] is False and "1.75x" in binary_t["measured"] and "BentoML" in binary_t["reason"]


def test_peer_targets_say_which_peers_were_skipped():
    c = _comparison(600.0, 900.0, 700.0, skipped={"ray": "ray.serve is not installed"})
    json_t, _ = _peer_targets(c)
    assert "ray skipped: ray.serve is not installed" in json_t["measured"]
    c["summary"] = [r for r in c["summary"] if r["server"].startswith("kiln-")]
    json_t, binary_t = _peer_targets(c)
    assert json_t["met"] is None and "no peer measured" in json_t["measured"] and "ray" in json_t["measured"]


def test_grpc_target_uses_the_interleaved_median_and_reports_the_client():
    served = [{"batching": "on", "protocol": "grpc", "concurrency": 32, "req_per_s": 100.0, "errors": 0}]
    t = _served_target(served, REFERENCE, _comparison(500.0, 600.0, grpc_rate=650.0))
    assert t["met"] is True and "650.0 req/s vs 1000.0 samples/s in process = 65%" in t["measured"]
    assert "median of 3 interleaved rounds" in t["measured"] and "client 15% of a core" in t["measured"]
    alone = _served_target(served, REFERENCE)  # no comparison: the Kiln-alone cell
    assert alone["met"] is False and "= 10%" in alone["measured"] and alone["reason"]


def test_peer_section_lists_every_server_and_the_skipped_ones():
    c = _comparison(500.0, 600.0, 650.0, skipped={"ray": "ray.serve is not installed"})
    text = "\n".join(_peer_section(c))
    for server in ("kiln-json", "kiln-binary", "kiln-grpc", "fastapi", "litserve"):
        assert f"| {server} |" in text
    assert "| ray | skipped |" in text and "2 intra-op threads" in text and "litserve 1.0e-07" in text
    assert _peer_section(None) == []
